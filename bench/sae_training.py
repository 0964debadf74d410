"""Throughput of N SAEs trained in one vmapped program vs N sequential single-SAE runs.

  python -m bench.sae_training                      # N=4 sites, small shapes, ~1-2 minutes on CPU
  python -m bench.sae_training --sites=8 --d_sae=2048 --arch=topk

Both sides use ``recovery_jax.sae.train``: the vmapped side one ``make_train_step(tc, opt, N)``
call per step on a stacked state fed [N, B, d_in]; the sequential side N single-SAE steps (the N = 1
program) per step. Steps are timed after compilation (steady state, best of ``--repeats``), and the
end-to-end ``train()`` wall times (compile and data gathering included) are reported beside them.
Random activations stand in for a store (throughput does not depend on the values). Writes
``bench/results/sae_training.json`` and ``.md`` with the machine's load average, because a shared
machine's figures depend on it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from recovery_jax.sae import train as train_lib

_SITES = flags.DEFINE_integer("sites", 4, "N: SAEs (sites) trained together")
_D_IN = flags.DEFINE_integer("d_in", 128, "activation width")
_D_SAE = flags.DEFINE_integer("d_sae", 1024, "latents per SAE")
_BATCH = flags.DEFINE_integer("batch", 512, "tokens per SAE per step")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per repeat")
_REPEATS = flags.DEFINE_integer("repeats", 3, "repeats (best kept)")
_ARCH = flags.DEFINE_string("arch", "jumprelu", "jumprelu | topk | standard")
_OUT = flags.DEFINE_string("out", "bench/results/sae_training", "output path without extension")


def _stores(n, rows, d, seed=0):
  r = np.random.default_rng(seed)
  return [(r.normal(size=(rows, d)) * (1 + i)).astype(np.float16) for i in range(n)]


def _time_steps(step, state, xs, coeffs, steps, repeats):
  """Best-of-repeats seconds for ``steps`` calls of ``step`` (state threaded, results blocked)."""
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for s in range(steps):
      state, m = step(state, xs[s % len(xs)], coeffs)
    jax.block_until_ready((state, m))
    best = min(best, time.perf_counter() - t0)
  return best, state


def run(n, d_in, d_sae, batch, steps, repeats, arch):
  tc = train_lib.TrainConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=32, batch_size=batch, total_steps=steps,
                             warmup_steps=2, dead_tokens=50 * batch, jumprelu_init_l0=32.0, l0_coeff=0.4)
  stores = _stores(n, 8 * batch, d_in)
  opt = train_lib.make_optimizer(tc)
  states = [train_lib.init_state(jax.random.PRNGKey(i), tc, s[:batch], opt) for i, s in enumerate(stores)]
  xs = [np.stack([s[j * batch:(j + 1) * batch] for s in stores]) for j in range(4)]
  xs = [jnp.asarray(x) for x in xs]
  coeffs = jnp.full((n,), tc.sparsity_coeff(), jnp.float32)
  # vmapped: one program for N SAEs
  vstep = train_lib.make_train_step(tc, opt, n)
  vstate = train_lib.stack_states(states)
  vstate, _ = vstep(vstate, xs[0], coeffs)  # compile
  t_v, _ = _time_steps(vstep, vstate, xs, coeffs, steps, repeats)
  # the same program with lax.map over sites instead of vmap
  mstep = train_lib.make_train_step(tc, opt, n, site_axis="map")
  mstate = train_lib.stack_states(states)
  mstate, _ = mstep(mstate, xs[0], coeffs)
  t_m, _ = _time_steps(mstep, mstate, xs, coeffs, steps, repeats)
  # sequential: N single-SAE programs, one after the other, each step
  sstep = train_lib.make_train_step(tc, opt, 1)
  sstates = [train_lib.stack_states([s]) for s in states]
  c1 = coeffs[:1]
  sstates[0], _ = sstep(sstates[0], xs[0][:1], c1)  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for s in range(steps):
      x = xs[s % len(xs)]
      for i in range(n):
        sstates[i], m = sstep(sstates[i], x[i:i + 1], c1)
    jax.block_until_ready((sstates, m))
    best = min(best, time.perf_counter() - t0)
  t_s = best
  # end to end: train() on N stores vs N train() calls (compile, init and batch gathering included)
  e2e_steps = max(steps // 2, 5)
  tc_e2e = train_lib.TrainConfig(**{**tc.__dict__, "total_steps": e2e_steps})
  train_lib._optimizer_and_step.cache_clear()
  t0 = time.perf_counter()
  train_lib.train(tc_e2e, stores, progress=False, log_every=e2e_steps)
  t_v_e2e = time.perf_counter() - t0
  train_lib._optimizer_and_step.cache_clear()
  t0 = time.perf_counter()
  for i, s in enumerate(stores):
    train_lib.train(tc_e2e, s, seed=i, progress=False, log_every=e2e_steps)
  t_s_e2e = time.perf_counter() - t0
  tokens = n * batch * steps
  return {"arch": arch, "sites": n, "d_in": d_in, "d_sae": d_sae, "batch_per_sae": batch, "timed_steps": steps,
          "repeats": repeats,
          "vmapped_tokens_per_s": tokens / t_v, "sequential_tokens_per_s": tokens / t_s, "speedup": t_s / t_v,
          "mapped_tokens_per_s": tokens / t_m, "mapped_speedup": t_s / t_m,
          "vmapped_step_ms": 1e3 * t_v / steps, "mapped_step_ms": 1e3 * t_m / steps, "sequential_step_ms": 1e3 * t_s / steps,
          "e2e_steps": e2e_steps, "e2e_vmapped_s": t_v_e2e, "e2e_sequential_s": t_s_e2e,
          "e2e_speedup": t_s_e2e / t_v_e2e}


def main(argv):
  del argv
  load_before = os.getloadavg()
  t0 = time.time()
  res = run(_SITES.value, _D_IN.value, _D_SAE.value, _BATCH.value, _STEPS.value, _REPEATS.value, _ARCH.value)
  res.update(load_average_before=load_before, load_average_after=os.getloadavg(), wall_s=time.time() - t0,
             cpu_count=os.cpu_count(), device=str(jax.devices()[0]), jax=jax.__version__,
             machine=platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(res, indent=1))
  md = [
      "# SAE training: one vmapped N-site program vs N sequential runs", "",
      f"{res['date']}, {res['device']}, {res['cpu_count']} CPUs, jax {res['jax']}; load average (1, 5, 15 min) "
      f"{tuple(round(x, 2) for x in load_before)} before, {tuple(round(x, 2) for x in res['load_average_after'])} after "
      f"(this benchmark's own threads included; a load well above the {res['cpu_count']} CPUs means other jobs "
      "shared them, and the figures are then not figures).", "",
      f"{res['arch']}, N = {res['sites']} SAEs, d_in {res['d_in']}, d_sae {res['d_sae']}, {res['batch_per_sae']} tokens "
      f"per SAE per step; steady state: best of {res['repeats']} x {res['timed_steps']} steps after compilation.", "",
      "| | vmapped (1 program) | lax.map (1 program) | sequential (N programs) | speed-up vmap / map |",
      "| --- | --- | --- | --- | --- |",
      f"| tokens/s (all SAEs) | {res['vmapped_tokens_per_s']:,.0f} | {res['mapped_tokens_per_s']:,.0f} | "
      f"{res['sequential_tokens_per_s']:,.0f} | {res['speedup']:.2f}x / {res['mapped_speedup']:.2f}x |",
      f"| ms per step of all N | {res['vmapped_step_ms']:.1f} | {res['mapped_step_ms']:.1f} | {res['sequential_step_ms']:.1f} | |",
      f"| end-to-end train(), {res['e2e_steps']} steps (s) | {res['e2e_vmapped_s']:.1f} | | {res['e2e_sequential_s']:.1f} | "
      f"{res['e2e_speedup']:.2f}x / |", ""]
  out.with_suffix(".md").write_text("\n".join(md))
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
