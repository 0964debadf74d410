"""Why a recovery step has a fixed cost: a layer's weights indexed out of the stacked parameters inside
``lax.scan`` (as ``transformer.forward`` does) against the same weights scanned as ``xs`` and against
an unrolled loop over per-layer arrays. fwd+bwd w.r.t. the input of a 20-layer MLP stack (SmolLM2's
d_model 576, d_mlp 1536) at batch 4 and 64; median of 7 calls after one warm-up.

  python -m bench.weight_indexing

Indexed in the scan, the forward saves every layer's weight slice as a residual for the backward: a
copy of the weights per call, whatever the batch (docs/benchmarks.md, "The per-step fixed cost").
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
  L, d, f = 20, 576, 1536
  k = jax.random.split(jax.random.key(0), 3)
  Wu = jax.random.normal(k[0], (L, d, f)) * 0.02; Wd = jax.random.normal(k[1], (L, f, d)) * 0.02
  def stacked(W, x):
    Wu, Wd = W
    def body(h, i):
      u = jax.lax.dynamic_index_in_dim(Wu, i, keepdims=False); dd = jax.lax.dynamic_index_in_dim(Wd, i, keepdims=False)
      return h + jnp.tanh(h @ u) @ dd, None
    return jax.lax.scan(body, x, jnp.arange(L))[0]
  def xs_scan(W, x):
    def body(h, w):
      return h + jnp.tanh(h @ w[0]) @ w[1], None
    return jax.lax.scan(body, x, W)[0]
  def unrolled(Wl, x):
    for u, dd in Wl:
      x = x + jnp.tanh(x @ u) @ dd
    return x
  Wl = [(Wu[i], Wd[i]) for i in range(L)]
  for B in (4, 64):
    x = jax.random.normal(k[2], (B, d))
    for name, fn, W in (("stacked", stacked, (Wu, Wd)), ("xs", xs_scan, (Wu, Wd)), ("unrolled", unrolled, Wl)):
      g = jax.jit(jax.grad(lambda x, W: fn(W, x).sum()))
      g(x, W).block_until_ready()
      ts = []
      for _ in range(7):
        t = time.perf_counter(); g(x, W).block_until_ready(); ts.append(time.perf_counter() - t)
      print(B, name, f"{np.median(ts)*1e3:.1f} ms (fwd+bwd, {L} MLP layers)")


if __name__ == "__main__":
  main()
