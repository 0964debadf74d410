"""Isolated probe of layer rematerialisation: the gradient of a SmolLM2-shaped model's last 17 layers
(random weights, 30 layers, d_model 576, vocab 49152) with respect to the residual entering layer 13,
vmapped over N rows of one token, for ``remat`` off / full / dots: median wall time of 5 calls after
compilation, XLA temporary memory, and the max difference to the plain gradient.

  python -m bench.remat_probe --rows=1,64

A direction-finder for ``RecoverySpec.remat``; the engine figures come from ``recovery_throughput``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax.models import random_init, transformer

MODES = {"off": False, "full": True, "dots": "dots"}


def probe(rows: int, reps: int = 5) -> dict:
  params, cfg = random_init.random_model("llama", seed=0, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3,
                                         d_mlp=1536, vocab_size=49152)
  h0 = jnp.full((1, 1, cfg.d_model), 0.1)
  fns = {}
  for name, remat in MODES.items():
    def loss(delta, params, remat=remat):
      out = transformer.forward(params, cfg, resid=h0 + delta, start_layer=13, positions=jnp.full((1, 1), 14),
                                remat=remat)
      return out.logits[:, -1, :5].sum()
    fns[name] = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))
  x = jnp.zeros((rows, 1, 1, cfg.d_model))
  out = {}
  ref = np.asarray(fns["off"](x, params))
  for name, f in fns.items():
    temp = f.lower(x, params).compile().memory_analysis().temp_size_in_bytes
    diff = float(np.abs(np.asarray(f(x, params)) - ref).max())
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      f(x, params).block_until_ready()
      ts.append(time.perf_counter() - t0)
    out[name] = {"ms": 1000 * float(np.median(ts)), "temp_mb": temp / 2**20, "max_diff": diff}
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default="1,64")
  args = ap.parse_args()
  for rows in [int(r) for r in args.rows.split(",") if r]:
    res = probe(rows)
    print(f"rows {rows}: " + "; ".join(f"{k} {v['ms']:.0f} ms, temp {v['temp_mb']:.0f} MB, diff {v['max_diff']:.1e}"
                                       for k, v in res.items()) + f"; load {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
  main()
