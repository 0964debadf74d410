"""Variant (a): the reference-shaped loop, written with recovery_jax primitives.

One example at a time (batch 1, unpadded), a Python loop over examples and over steps, and the full
forward recomputed at every step: all layers, all columns, full-vocabulary logits at every column,
as the paper's PyTorch code does with TransformerLens hooks. The delta enters through an edit at
the site on that full-sequence forward:

* frozen (IOI): the edit overwrites the residual with ``x_def + delta`` (``FixedDirectDefended
  PlusDeltaHook``). It selects with a traced all-true mask so that XLA still computes the layers
  below the site, which the reference computes and throws away.
* live (refusal): clamp -> add delta rows -> capture at every site.

The optimiser is the engine's own: a ``recovery.optimizer.Stepper`` on this full-forward evaluator,
``optimizer.init``, then ``optimizer.step`` jit-compiled once and called once per Python iteration
(``optimize`` scans the same step), then ``optimizer.finish``.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bench.problems import Workload
from recovery_jax import intervene
from recovery_jax.models import transformer
from recovery_jax.recovery import engine
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery import projections as proj_lib
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery.engine import Problem, RecoverySpec

Array = jax.Array


class Prep(NamedTuple):
  """Per-example state built once before the steps (``refs``/``masks`` as ``engine.monitor_of`` reads them)."""

  x_def: Array  # [1, T, d] frozen defended residual at the delta site (zeros for live workloads)
  keep: Array  # [T] bool, all True (opaque to XLA)
  refs: tuple  # monitored features at delta = 0
  masks: tuple
  enc_proj: proj_lib.EncoderProjector | None


def _check(spec: RecoverySpec) -> None:
  if spec.semantics == "frozen" and len(spec.delta_sites) != 1:
    raise ValueError("bench.reference_loop: frozen semantics with one delta site only "
                     f"(got {spec.delta_sites}); the engine's frozen offsets at later sites are not modelled")


def _delta_edits(spec: RecoverySpec, clamps, pb: Problem, x_def: Array, keep: Array, delta: Array) -> dict:
  """Clamp edits plus delta rows [n_sites, P, d] added at the problem's delta columns."""
  place = intervene.placement(pb.delta_cols, pb.delta_valid, 0, pb.tokens.shape[1])
  if spec.semantics == "frozen":
    s0 = spec.delta_sites[0]
    add = intervene.add_edit(place, delta[0])
    frozen = {s0: lambda x, positions: jnp.where(keep[None, :, None], add(x_def, positions), x)}
    return intervene.chain_edits(intervene.clamp_edits([c for c in clamps if c.site != s0]), frozen)
  adds = {s: intervene.add_edit(place, delta[j]) for j, s in enumerate(spec.delta_sites)}
  return intervene.chain_edits(intervene.clamp_edits(clamps), adds)


def full_eval(spec: RecoverySpec, params, clamps, pb: Problem, x_def: Array, keep: Array, delta: Array) -> opt_lib.Eval:
  """Objective and monitored features of one example (batch 1) from a full-sequence forward with
  full-vocabulary logits at every column."""
  mon = engine.monitored(clamps)
  out = transformer.forward(params, spec.model_cfg, pb.tokens, positions=pb.positions,
                            edits=_delta_edits(spec, clamps, pb, x_def, keep, delta),
                            capture=tuple(dict.fromkeys(clamps[i].site for i in mon)))
  rows = obj_lib.row_scores(spec.objective, engine.gather_cols(out.logits, pb.readout_cols), pb.targets)
  feats = tuple(clamps[i].features(engine.gather_cols(out.captures[clamps[i].site], pb.monitor_cols)) for i in mon)
  return opt_lib.Eval(obj_lib.weighted_mean(rows, pb.row_weight), rows, feats)


def prepare(spec: RecoverySpec, params, clamps, pb: Problem, hp: opt_lib.HParams, keep: Array) -> Prep:
  """Frozen defended residual, drift references at delta = 0, and the encoder projector."""
  cfg, clamps = spec.model_cfg, tuple(clamps)
  b, t = pb.tokens.shape
  x_def = jnp.zeros((b, t, cfg.d_model), jnp.float32)
  if spec.semantics == "frozen":
    s0 = spec.delta_sites[0]
    before = [c for c in clamps if spec.key_of(c.site) < spec.key_of(s0)]
    x_def = transformer.forward(params, cfg, pb.tokens, positions=pb.positions, stop_layer=spec.start_layer,
                                edits=intervene.clamp_edits(before), compute_logits=False).resid
    for c in (c for c in clamps if c.site == s0):
      x_def = c(x_def, pb.positions)
  zero = jnp.zeros((len(spec.delta_sites), pb.delta_cols.shape[1], cfg.d_model), jnp.float32)
  refs = full_eval(spec, params, clamps, pb, x_def, keep, zero).feats
  masks = engine.monitor_masks(clamps, pb)
  enc = None
  if spec.config.projection in ("encoder", "encoder_exact"):
    enc = engine.encoder_projector(cfg.d_model, spec.delta_sites, clamps, hp.ridge,
                                   spec.config.projection == "encoder_exact", spec.config.exact_rtol)
  return Prep(x_def, keep, refs, masks, enc)


def stepper(spec: RecoverySpec, params, clamps, pb: Problem, prep: Prep, hp: opt_lib.HParams,
            key: Array) -> opt_lib.Stepper:
  """The engine optimiser's Stepper on the full-forward evaluator. As ``engine.recover`` (delta0 = 0,
  no fixed delta) the drift references are the first step's own features."""
  f = functools.partial(full_eval, spec, params, tuple(clamps), pb, prep.x_def, prep.keep)
  return opt_lib.Stepper(f, engine.monitor_of(tuple(clamps), prep.refs, prep.masks), spec.config, hp, key,
                         prep.enc_proj, refs_from_start=engine.refs_from_start(pb, None))


def init(spec, params, clamps, pb, prep, hp, key, delta0) -> opt_lib.OptState:
  return opt_lib.init(stepper(spec, params, clamps, pb, prep, hp, key), delta0)


def step(spec, params, clamps, pb, prep, hp, key, state, t) -> tuple[opt_lib.OptState, Array]:
  """One optimiser step: (new state, objective at the old delta)."""
  state, hist = opt_lib.step(stepper(spec, params, clamps, pb, prep, hp, key), state, t)
  return state, hist["objective"]


def finish(spec, params, clamps, pb, prep, hp, key, state) -> opt_lib.OptResult:
  return opt_lib.finish(stepper(spec, params, clamps, pb, prep, hp, key), state)


class ReferenceLoop:
  """Compiled per-example functions and the Python loops of variant (a)."""

  def __init__(self, params, wl: Workload):
    _check(wl.spec)
    self.params, self.wl = params, wl
    self.spec = wl.spec.canonical()  # the jit static argument; numbers come from hp
    self.clamps = wl.clamps
    self.hp = wl.spec.config.hparams()
    self.keep = jnp.ones((wl.seq_len,), bool)
    self.delta0 = jnp.zeros((len(wl.spec.delta_sites), wl.problems.delta_cols.shape[-1],
                             wl.spec.model_cfg.d_model), jnp.float32)
    jit = lambda fn: jax.jit(fn, static_argnums=0)
    self._fns = (jit(prepare), jit(init), jit(step), jit(finish))
    self.compiled = None
    self.compile_s = None

  def compile(self) -> dict:
    """AOT-compiles prepare, init, step and finish on example 0; returns compile seconds and memory."""
    t0 = time.perf_counter()
    prep_f, init_f, step_f, fin_f = self._fns
    common = (self.spec, self.params, self.clamps, self.wl.example(0))
    prep_c = prep_f.lower(*common, self.hp, self.keep).compile()
    prep = prep_c(*common[1:], self.hp, self.keep)
    args = common + (prep, self.hp, self.wl.example_key(0))
    init_c = init_f.lower(*args, self.delta0).compile()
    state = init_c(*args[1:], self.delta0)
    step_c = step_f.lower(*args, state, jnp.int32(0)).compile()
    fin_c = fin_f.lower(*args, state).compile()
    self.compile_s = time.perf_counter() - t0
    self.compiled = (prep_c, init_c, step_c, fin_c)
    return {"compile_s": self.compile_s, "step_memory": memory_stats(step_c)}

  def recover(self, i: int, steps: int | None = None, timing: dict | None = None) -> opt_lib.OptResult:
    """Whole recovery of example i. ``timing`` accumulates the seconds of the per-example fixed work
    ("fixed": defended reference, drift refs, optimiser init, final eval), of the steps ("steps"),
    and each step's seconds ("step_times"; every step blocks, as the reference's synchronous
    PyTorch steps do)."""
    if self.compiled is None:
      self.compile()
    prep_c, init_c, step_c, fin_c = self.compiled
    steps = self.wl.spec.config.steps if steps is None else steps
    timing = {} if timing is None else timing
    common = (self.params, self.clamps, self.wl.example(i))
    t0 = time.perf_counter()
    prep = prep_c(*common, self.hp, self.keep)
    args = common + (prep, self.hp, self.wl.example_key(i))
    state = jax.block_until_ready(init_c(*args, self.delta0))
    t1 = time.perf_counter()
    step_times = timing.setdefault("step_times", [])
    for t in range(steps):
      ts = time.perf_counter()
      state, _ = step_c(*args, state, jnp.int32(t))
      state = jax.block_until_ready(state)
      step_times.append(time.perf_counter() - ts)
    t2 = time.perf_counter()
    res = fin_c(*args, state)
    float(res.objective)  # blocks, as the reference's .item() calls do
    t3 = time.perf_counter()
    timing["fixed"] = timing.get("fixed", 0.0) + (t1 - t0) + (t3 - t2)
    timing["steps"] = timing.get("steps", 0.0) + (t2 - t1)
    return res

  def run(self, n: int, steps: int | None = None) -> dict:
    """Recovers examples 0..n-1 one after the other; objectives, wall seconds and their split."""
    t0, c0 = time.perf_counter(), time.process_time()
    timing = {}
    objs = [float(self.recover(i, steps, timing).objective) for i in range(n)]
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
