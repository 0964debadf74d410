"""Variant (a): the reference-shaped loop, written with recovery_jax primitives.

One example at a time (batch 1, unpadded), a Python loop over examples and over steps, and the full
forward recomputed at every step: all layers, all columns, full-vocabulary logits at every column,
as the paper's PyTorch code does with TransformerLens hooks. The delta enters through an edit at
the site on that full-sequence forward:

* frozen (IOI): the edit overwrites the residual with ``x_def + delta`` (``FixedDirectDefended
  PlusDeltaHook``). It selects with a traced all-true mask so that XLA still computes the layers
  below the site, which the reference computes and throws away.
* live (refusal): clamp -> add delta rows -> capture at every site.

Each step (gradient, projection, Adam, clip) is one jit-compiled call (``bench.stepper.step``).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bench import problems, stepper
from bench.problems import Data, Workload
from recovery_jax import intervene
from recovery_jax.models import transformer
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery import projections as proj_lib

Array = jax.Array


class Prep(NamedTuple):
  """Per-example state built once before the steps."""

  x_def: Array  # [1, T, d] frozen defended residual at the site (zeros for live workloads)
  keep: Array  # [T] bool, all True (opaque to XLA)
  mon: opt_lib.Monitor
  enc_proj: proj_lib.EncoderProjector | None


def _delta_edits(wl: Workload, x_def: Array, keep: Array, delta: Array) -> dict:
  """Edits adding delta rows [n_sites, n_rows, d] at columns delta_start.. of a full sequence."""
  c0, n = wl.delta_start, wl.n_rows

  def add(j):
    return lambda x, positions: x.at[:, c0:c0 + n].add(delta[j][None].astype(x.dtype))

  if wl.semantics == "frozen":
    site = wl.sites[0]
    return {site: lambda x, positions: jnp.where(keep[None, :, None], add(0)(x_def, positions), x)}
  return {s: add(j) for j, s in enumerate(wl.sites)}


def full_eval(params, cfg: ModelConfig, wl: Workload, data: Data, prep_x_def: Array, keep: Array,
              delta: Array) -> opt_lib.Eval:
  """Objective and monitored features of one example (batch 1) from a full-sequence forward."""
  edits = _delta_edits(wl, prep_x_def, keep, delta)
  if wl.semantics == "live":
    edits = intervene.chain_edits(intervene.clamp_edits(wl.specs, data.saes, data.clamps), edits)
  out = transformer.forward(params, cfg, data.tokens, edits=edits, capture=wl.sites)
  logits = out.logits[:, wl.readout_start:wl.readout_start + wl.n_readout]
  rows = problems.row_scores(wl, logits, data.targets)
  ms, nm = wl.mon_start, wl.n_mon
  feats = problems.monitored_features(wl, data, {s: out.captures[s][:, ms:ms + nm] for s in wl.sites})
  return opt_lib.Eval(rows.mean(), rows, feats)


def prepare(params, cfg: ModelConfig, wl: Workload, data: Data, keep: Array) -> Prep:
  """Frozen defended residual, drift references at delta = 0, and the encoder projector."""
  t, d = wl.seq_len, cfg.d_model
  if wl.semantics == "frozen":
    h = transformer.forward(params, cfg, data.tokens, stop_layer=wl.start_layer, compute_logits=False).resid
    x_def = intervene.clamp_residual(wl.specs[0], data.saes[0], data.clamps[0], h)
  else:
    x_def = jnp.zeros((1, t, d), jnp.float32)
  zero = jnp.zeros((wl.n_sites, wl.n_rows, d), jnp.float32)
  refs = full_eval(params, cfg, wl, data, x_def, keep, zero).feats
  enc = None
  if wl.rcfg.projection in ("encoder", "encoder_exact"):
    enc = proj_lib.ridge_projector(problems.encoder_matrix(wl, data), wl.rcfg.ridge)
  return Prep(x_def, keep, problems.monitor(wl, data, refs), enc)


def one_step(params, cfg: ModelConfig, wl: Workload, data: Data, prep: Prep, delta, opt_state, t, hp):
  f = lambda d: full_eval(params, cfg, wl, data, prep.x_def, prep.keep, d)
  return stepper.step(f, delta, opt_state, t, data.keys[0], prep.mon, wl.rcfg, hp, prep.enc_proj)


def final_eval(params, cfg: ModelConfig, wl: Workload, data: Data, prep: Prep, delta):
  return full_eval(params, cfg, wl, data, prep.x_def, prep.keep, delta)


class ReferenceLoop:
  """Compiled per-example functions and the Python loops of variant (a)."""

  def __init__(self, params, cfg: ModelConfig, wl: Workload, data: Data):
    stepper.check_supported(wl.rcfg)
    self.params, self.cfg, self.wl, self.data = params, cfg, wl, data
    self.hp = wl.rcfg.hparams()
    self.keep = jnp.ones((wl.seq_len,), bool)
    self.delta0 = jnp.zeros((wl.n_sites, wl.n_rows, cfg.d_model), jnp.float32)
    self._prep = jax.jit(functools.partial(prepare, cfg=cfg, wl=wl))
    self._step = jax.jit(functools.partial(one_step, cfg=cfg, wl=wl))
    self._final = jax.jit(functools.partial(final_eval, cfg=cfg, wl=wl))
    self.compiled = None
    self.compile_s = None

  def compile(self) -> dict:
    """AOT-compiles prep, step and final eval on example 0; returns compile seconds and memory."""
    t0 = time.perf_counter()
    ex = self.data.example(0)
    prep_c = self._prep.lower(self.params, data=ex, keep=self.keep).compile()
    prep = prep_c(self.params, data=ex, keep=self.keep)
    opt_state = stepper.init_state(self.delta0, self.wl.rcfg, self.hp)
    step_c = self._step.lower(self.params, data=ex, prep=prep, delta=self.delta0, opt_state=opt_state,
                              t=jnp.int32(0), hp=self.hp).compile()
    final_c = self._final.lower(self.params, data=ex, prep=prep, delta=self.delta0).compile()
    self.compile_s = time.perf_counter() - t0
    self.compiled = (prep_c, step_c, final_c)
    return {"compile_s": self.compile_s, "step_memory": memory_stats(step_c)}

  def recover(self, i: int, steps: int | None = None, timing: dict | None = None) -> tuple[Array, Array]:
    """Whole recovery of example i: (final objective, final delta). ``timing`` accumulates the
    seconds of the per-example fixed work ("fixed": defended reference, drift refs, final eval),
    of the steps ("steps"), and each step's seconds ("step_times"; every step blocks, as the
    reference's synchronous PyTorch steps do)."""
    if self.compiled is None:
      self.compile()
    prep_c, step_c, final_c = self.compiled
    steps = self.wl.rcfg.steps if steps is None else steps
    timing = {} if timing is None else timing
    ex = self.data.example(i)
    t0 = time.perf_counter()
    prep = jax.block_until_ready(prep_c(self.params, data=ex, keep=self.keep))
    t1 = time.perf_counter()
    delta = jnp.zeros_like(self.delta0)
    opt_state = stepper.init_state(delta, self.wl.rcfg, self.hp)
    step_times = timing.setdefault("step_times", [])
    for t in range(steps):
      ts = time.perf_counter()
      delta, opt_state, _ = step_c(self.params, data=ex, prep=prep, delta=delta, opt_state=opt_state,
                                   t=jnp.int32(t), hp=self.hp)
      delta = jax.block_until_ready(delta)
      step_times.append(time.perf_counter() - ts)
    t2 = time.perf_counter()
    ev = final_c(self.params, data=ex, prep=prep, delta=delta)
    obj = float(ev.objective)  # blocks, as the reference's .item() calls do
    t3 = time.perf_counter()
    timing["fixed"] = timing.get("fixed", 0.0) + (t1 - t0) + (t3 - t2)
    timing["steps"] = timing.get("steps", 0.0) + (t2 - t1)
    return obj, delta

  def run(self, n: int, steps: int | None = None) -> dict:
    """Recovers examples 0..n-1 one after the other; objectives, wall seconds and their split."""
    t0, c0 = time.perf_counter(), time.process_time()
    timing = {}
    objs = [self.recover(i, steps, timing)[0] for i in range(n)]
    return {"objectives": objs, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "fixed_s": timing["fixed"], "steps_s": timing["steps"], "step_times": timing["step_times"]}


def memory_stats(compiled) -> dict:
  """Bytes of a compiled executable: arguments, outputs and temporaries (XLA memory analysis)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes)}
