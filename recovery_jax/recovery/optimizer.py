"""The projected recovery optimiser: an optax chain in the reference's order, scanned over steps.

Per step (paper-method 1.4 and 6.4):

  1. evaluate the objective and the monitored defended features c at delta_t (one linearisation);
  2. gradient: ``none`` / ``encoder*``: g = grad(-obj + penalties), encoder modes project each row;
     ``jacobian*``: g = P_J(grad(-obj)) + grad(penalties) (the drift gradient is added unprojected);
  3. optax chain: [project gradient] -> Adam -> [project the update (jacobian_exact) or the parameter
     (encoder modes with project_params)] -> clip to the Frobenius budget
     (delta <- delta * B / (||delta|| + 1e-8) if ||delta|| > B, all sites and rows jointly);
  4. jacobian modes: ``correction_steps`` plain gradient steps on the drift loss (each clipped);
  5. best-checkpoint bookkeeping (snapshots after the update at steps 0, every-1, ..., last).

The snapshot of step t is scored with the forward of step t+1 (same delta, same numbers as the
reference's extra no-grad pass), so checkpointing costs no extra forward.

Everything is a pure function of arrays: ``optimize`` runs inside jit/vmap. Numeric knobs that a
sweep varies (lr, budget, ridge, lambdas, correction lr, checkpoint threshold/weight) are traced
``HParams``; the rest of ``RecoveryConfig`` is static.

Size: the config, the optax chain, the scanned step and its checkpoint bookkeeping are one
algorithm read top to bottom (the reference's step order); splitting it would scatter that order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery import projections as proj_lib

Array = jax.Array

CHECKPOINTS = ("final", "drift_constrained", "penalty_score")
BUDGET_SCALES = ("absolute", "relative")
_TRACED = ("lr", "budget", "ridge", "lambda_act", "lambda_decode", "lambda_delta", "correction_lr",
           "checkpoint_tau", "checkpoint_penalty_weight")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
  """Recovery settings. Defaults are the core reference's (``optimize_delta``).

  projection: none | encoder | encoder_exact | jacobian | jacobian_exact.
  project_params: also project the parameter after Adam. None = the mode's default: False for
    ``encoder`` (core, faithful; True reproduces v4's encoder mode), True for ``encoder_exact``
    (exact C1) and ``jacobian_exact`` (the update is projected onto null(J) at delta_t), False for
    ``jacobian`` (reference sketch).
  drift_penalty: l2 (core A, with lambda_act) | raw_mse | relative_mse | relative_l2 (v4).
  lambda_decode: core ``Dd`` = ||(c - r) W_dec[S]||_F. lambda_delta: core ||delta||_F term.
  checkpoint: final | drift_constrained | penalty_score (v4 best-checkpoint selection).
  budget_scale: absolute (``budget`` is ||delta||_F's bound) | relative (``budget`` is rho, the bound is
    rho * ||h_def||_F, the defended state at the delta sites x positions: ``absolute_budget``).
  record_delta: keep every iterate in ``history["delta"]`` ([steps, n_sites, P, d], the delta
    after each step) for trajectory analysis.
  """

  steps: int = 100
  lr: float = 0.1
  budget: float = 20.0
  budget_scale: str = "absolute"
  projection: str = "encoder"
  project_params: bool | None = None
  ridge: float = 1e-4
  exact_rtol: float | None = None
  lambda_act: float = 0.0
  lambda_decode: float = 0.0
  lambda_delta: float = 0.0
  drift_penalty: str = "l2"
  act_loss_eps: float = 1e-6
  jacobian_probes: int = 8
  jacobian_drift_probe: bool = True
  jacobian_tol: float = 1e-7
  correction_steps: int = 0
  correction_lr: float = 0.05
  correction_every: int = 1
  checkpoint: str = "final"
  checkpoint_every: int = 10
  checkpoint_tau: float = 0.03
  checkpoint_penalty_weight: float = 10.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  record_delta: bool = False

  def __post_init__(self):
    if self.projection not in proj_lib.PROJECTIONS:
      raise ValueError(f"RecoveryConfig.projection={self.projection!r}: expected one of {proj_lib.PROJECTIONS}")
    if self.checkpoint not in CHECKPOINTS:
      raise ValueError(f"RecoveryConfig.checkpoint={self.checkpoint!r}: expected one of {CHECKPOINTS}")
    if self.drift_penalty not in obj_lib.DRIFT_PENALTIES:
      raise ValueError(f"RecoveryConfig.drift_penalty={self.drift_penalty!r}: expected one of {obj_lib.DRIFT_PENALTIES}")
    if self.budget_scale not in BUDGET_SCALES:
      raise ValueError(f"RecoveryConfig.budget_scale={self.budget_scale!r}: expected one of {BUDGET_SCALES}")
    if self.steps < 1:
      raise ValueError(f"RecoveryConfig.steps={self.steps}: need at least one step")

  @property
  def projects_params(self) -> bool:
    if self.project_params is not None:
      return self.project_params
    return self.projection in ("encoder_exact", "jacobian_exact")

  @property
  def is_jacobian(self) -> bool:
    return self.projection in ("jacobian", "jacobian_exact")

  def hparams(self, **overrides) -> "HParams":
    """The traced numeric knobs as float32 arrays (``overrides`` may pass arrays, e.g. budgets [G])."""
    vals = {k: overrides.pop(k, getattr(self, k)) for k in _TRACED}
    if overrides:
      raise TypeError(f"hparams: unknown overrides {sorted(overrides)}")
    return HParams(**{k: jnp.asarray(v, jnp.float32) for k, v in vals.items()})

  def canonical(self) -> "RecoveryConfig":
    """This config with traced values canonicalised: the jit cache key. Lambdas keep only whether
    they are non-zero (zero terms are skipped statically)."""
    kw = {k: 0.0 for k in _TRACED}
    for k in ("lambda_act", "lambda_decode", "lambda_delta"):
      kw[k] = 1.0 if getattr(self, k) != 0 else 0.0
    return dataclasses.replace(self, **kw)

  def replace(self, **kw) -> "RecoveryConfig":
    return dataclasses.replace(self, **kw)


class HParams(NamedTuple):
  lr: Array
  budget: Array
  ridge: Array
  lambda_act: Array
  lambda_decode: Array
  lambda_delta: Array
  correction_lr: Array
  checkpoint_tau: Array
  checkpoint_penalty_weight: Array


class Eval(NamedTuple):
  """One evaluation of a delta: the objective (scalar), per-row scores [B], monitored features
  (tuple over monitored clamps of [B, M, K])."""

  objective: Array
  rows: Array
  feats: tuple


@dataclasses.dataclass(frozen=True)
class SplitEval:
  """An evaluator cut after the last monitored site: ``head(delta) -> (feats, mid)`` runs the layers
  up to it, ``tail(mid, delta) -> (objective, rows)`` the rest and the readout. Calling it composes
  the two (``Eval``). The Jacobian modes send the probe and penalty cotangents back through ``head``
  only (never through the later layers or the unembedding) and the objective's once through ``tail``;
  the correction steps run ``head`` only."""

  head: Callable
  tail: Callable

  def __call__(self, delta: Array) -> Eval:
    feats, mid = self.head(delta)
    objective, rows = self.tail(mid, delta)
    return Eval(objective, rows, tuple(feats))


def features_of(f: Callable[[Array], Eval], delta: Array) -> tuple:
  """The monitored features of ``f(delta)``, without the tail of a ``SplitEval``."""
  return tuple(f.head(delta)[0]) if isinstance(f, SplitEval) else f(delta).feats


class Monitor(NamedTuple):
  """What the drift terms compare against: refs (tuple of [B, M, K]), masks (bool, same shapes),
  dec (tuple of [K, d] masked W_dec[S] rows, for lambda_decode)."""

  refs: tuple
  masks: tuple
  dec: tuple


class OptResult(NamedTuple):
  delta: Array  # selected delta (best checkpoint, or final iterate)
  delta_last: Array  # final iterate
  objective: Array  # at the selected delta
  rows: Array  # [B] per-row scores at the selected delta
  feats: tuple  # monitored features at the selected delta
  drift_rel: Array  # relative_l2 drift at the selected delta
  best_step: Array  # step of the selected snapshot (steps - 1 for final)
  history: dict  # per-step arrays [steps, ...]
  refs: tuple  # the references the drift terms used
  objective_last: Array  # at the final iterate
  drift_rel_last: Array
  diverged: Array  # [] bool: some step had a non-finite objective, gradient or delta


# ----------------------------------------------------------------------------------------------
# optax pieces


def clip_to_ball(budget: Array) -> optax.GradientTransformation:
  """Clip the *parameter* to the Frobenius ball: p' = p * B / (||p|| + 1e-8) if ||p|| > B.
  An overflowing norm (a diverged step) gives NaN, never a silent rescale to 0."""

  def fn(updates, params):
    return clip(params + updates, budget) - params

  return optax.stateless(fn)


def project_gradient(fn: Callable[[Array], Array]) -> optax.GradientTransformation:
  return optax.stateless(lambda u, p: fn(u))


def project_parameter(fn: Callable[[Array], Array]) -> optax.GradientTransformation:
  """p' = fn(p + u), expressed as an update."""
  return optax.stateless(lambda u, p: fn(p + u) - p)


def recovery_tx(hp: HParams, cfg: RecoveryConfig, grad_proj=None, update_proj=None, param_proj=None):
  """project gradient -> Adam -> project update/parameter -> clip to the budget."""
  ident = lambda x: x
  return optax.chain(
      project_gradient(grad_proj or ident),
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.scale(-hp.lr),
      project_gradient(update_proj or ident),
      project_parameter(param_proj or ident),
      clip_to_ball(hp.budget),
  )


def absolute_budget(cfg: RecoveryConfig, hp: HParams, h_def: Array, row_weight: Array) -> HParams:
  """``hp`` with its budget in the residual's units. ``budget_scale="relative"`` reads ``hp.budget`` as
  rho and bounds ||delta||_F by rho * ||h_def||_F, h_def [n_sites, B, P, d] the defended state at the
  delta sites x positions; over the B rows of one problem (``row_weight`` [B]) the norm is the
  weighted root mean square, so a delta shared by B rows gets one row's budget (B = 1: the paper's
  relative delta norm ||delta||_F / ||h_def||_F <= rho)."""
  if cfg.budget_scale == "absolute":
    return hp
  sq = jnp.sum(jnp.square(h_def.astype(jnp.float32)), axis=(0, 2, 3))  # [B]
  w = row_weight.astype(jnp.float32)
  return hp._replace(budget=hp.budget * jnp.sqrt((sq * w).sum() / jnp.maximum(w.sum(), 1e-12)))


def clip(delta: Array, budget: Array) -> Array:
  """delta * B / (||delta|| + 1e-8) where ||delta|| > B; NaN where the norm is not finite (the
  rescale would otherwise turn an overflow into delta = 0 and hide the divergence)."""
  n = jnp.sqrt(jnp.sum(jnp.square(delta)))
  out = jnp.where(n > budget, delta * (budget / (n + 1e-8)), delta)
  return jnp.where(jnp.isfinite(n), out, jnp.nan)


# ----------------------------------------------------------------------------------------------


def flat_features(feats: tuple) -> Array:
  """Concatenated, flattened float32 features (tuple over monitored clamps) -> [n]."""
  if not feats:
    return jnp.zeros((0,), jnp.float32)
  return jnp.concatenate([f.reshape(-1).astype(jnp.float32) for f in feats])


def unflat_features(flat: Array, like: tuple) -> tuple:
  """Inverse of ``flat_features`` with the shapes of ``like``."""
  out, o = [], 0
  for f in like:
    out.append(flat[o:o + f.size].reshape(f.shape))
    o += f.size
  return tuple(out)


def penalties(cfg: RecoveryConfig, hp: HParams, feats: tuple, mon: Monitor):
  """(weighted penalty on the features, act penalty value, act l2 drift)."""
  act = obj_lib.drift_penalty(cfg.drift_penalty, feats, mon.refs, mon.masks, cfg.act_loss_eps)
  total = jnp.zeros((), jnp.float32)
  if cfg.lambda_act != 0:
    total += hp.lambda_act * act
  if cfg.lambda_decode != 0 and feats:
    dd = jnp.concatenate([
        jnp.einsum("bmk,kd->bmd", jnp.where(m, c - r, 0.0), w).reshape(-1)
        for c, r, m, w in zip(feats, mon.refs, mon.masks, mon.dec)])
    total += hp.lambda_decode * obj_lib.safe_norm(dd)
  return total, act


def drift_l2(feats: tuple, mon: Monitor) -> Array:
  return obj_lib.drift_penalty("l2", feats, mon.refs, mon.masks)


def _cos(a: Array, b: Array) -> Array:
  return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12)


class _Best(NamedTuple):
  has: Array
  score: Array
  fallback: Array
  step: Array
  delta: Array
  objective: Array
  rows: Array
  feats: tuple
  rel: Array


def _update_best(cfg: RecoveryConfig, hp: HParams, best: _Best, take: Array, step, delta, ev: Eval, rel):
  if cfg.checkpoint == "drift_constrained":
    feasible = rel <= hp.checkpoint_tau
    score = jnp.where(feasible, ev.objective, -jnp.inf)
    fallback = ev.objective - hp.checkpoint_penalty_weight * rel
  else:
    score = ev.objective - hp.checkpoint_penalty_weight * jnp.maximum(0.0, rel - hp.checkpoint_tau)
    fallback = score
  both_inf = (score == -jnp.inf) & (best.score == -jnp.inf)
  better = jnp.where(both_inf, fallback > best.fallback, score > best.score)
  upd = take & (~best.has | better)
  pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(upd, n, o), new, old)
  return _Best(best.has | upd, pick(score, best.score), pick(fallback, best.fallback),
               pick(jnp.asarray(step, jnp.int32), best.step), pick(delta, best.delta),
               pick(ev.objective, best.objective), pick(ev.rows, best.rows), pick(ev.feats, best.feats),
               pick(rel, best.rel))


def _is_snapshot(cfg: RecoveryConfig, step):
  every = max(int(cfg.checkpoint_every), 1)
  return (step == 0) | (step == cfg.steps - 1) | ((step + 1) % every == 0)


class OptState(NamedTuple):
  """Carry of the scanned step: the iterate, Adam state, best snapshot, drift references, and
  whether any step so far produced a non-finite value."""

  delta: Array
  opt: optax.OptState
  best: _Best
  refs: tuple
  diverged: Array


@dataclasses.dataclass(frozen=True)
class Stepper:
  """Everything one recovery step needs besides its state (closed over, not traced as a carry; it
  holds a function, so it is not a jit argument: build it inside the jitted function).

  f: delta -> Eval (pure; traced once per linearisation). mon: defended references for drift.
  enc_proj: per-site row projector for the encoder modes. refs_from_start: take the drift
  references from the first step's own features (valid when ``f(delta0)`` is the defended state,
  i.e. delta0 = 0 and no fixed delta): c - r is then exactly 0 wherever delta has no effect.
  """

  f: Callable[[Array], Eval]
  mon: Monitor
  cfg: RecoveryConfig
  hp: HParams
  key: Array
  enc_proj: proj_lib.EncoderProjector | None = None
  refs_from_start: bool = False

  def __post_init__(self):
    if self.cfg.projection in ("encoder", "encoder_exact") and self.enc_proj is None:
      raise ValueError(f"projection {self.cfg.projection!r} needs an encoder projector")

  def enc(self, g: Array) -> Array:
    return g if self.enc_proj is None else proj_lib.apply_encoder(self.enc_proj, g)

  @property
  def param_proj(self):
    cfg = self.cfg
    return self.enc if (cfg.projection in ("encoder", "encoder_exact") and cfg.projects_params) else None


def _refs_for(st: Stepper, feats, refs, first):
  if not st.refs_from_start:
    return refs
  return jax.tree.map(lambda c, r: jnp.where(first, jax.lax.stop_gradient(c), r), feats, refs)


def _grad_step(st: Stepper, delta, key, refs, first):
  """Returns (eval, act, loss, g, grad_proj, update_proj, rank, refs)."""
  cfg, hp, mon, mode = st.cfg, st.hp, st.mon, st.cfg.projection
  if not cfg.is_jacobian:
    def loss_parts(d):
      ev = st.f(d)
      m = mon._replace(refs=_refs_for(st, ev.feats, refs, first))
      pen, act = penalties(cfg, hp, ev.feats, m)
      loss = -ev.objective + pen
      if cfg.lambda_delta != 0:
        loss += hp.lambda_delta * obj_lib.safe_norm(d)
      return loss, (ev, act, m.refs)

    (loss, (ev, act, refs)), g = jax.value_and_grad(loss_parts, has_aux=True)(delta)
    gp = st.enc if mode in ("encoder", "encoder_exact") else None
    return ev, act, loss, g, gp, None, jnp.zeros((), jnp.int32), refs

  if isinstance(st.f, SplitEval):
    def fh(d):
      feats, mid = st.f.head(d)
      return (flat_features(feats), mid), tuple(feats)

    (c_flat, mid), vjp_head, feats = jax.vjp(fh, delta, has_aux=True)
    (objective, rows), vjp_tail = jax.vjp(st.f.tail, mid, delta)
    ct_mid, g_tail = vjp_tail((-jnp.ones_like(objective), jnp.zeros_like(rows)))
    ev = Eval(objective, rows, feats)
  else:
    def fc(d):
      ev = st.f(d)
      return (ev.objective, flat_features(ev.feats)), ev

    (objective, c_flat), vjp, ev = jax.vjp(fc, delta, has_aux=True)
  refs = _refs_for(st, ev.feats, refs, first)
  m = mon._replace(refs=refs)
  pen_of_flat = lambda cf: penalties(cfg, hp, unflat_features(cf, ev.feats), m)
  (pen, act), pen_ct = jax.value_and_grad(pen_of_flat, has_aux=True)(c_flat)
  loss = -objective + pen
  n_c = c_flat.shape[0]
  masks_flat = flat_features(tuple(mk.astype(jnp.float32) for mk in mon.masks)) > 0
  if mode == "jacobian":
    probes = proj_lib.sketch_probes(key, c_flat, flat_features(refs), masks_flat, cfg.jacobian_probes,
                                    cfg.jacobian_drift_probe)
  else:
    probes = jnp.eye(n_c, dtype=jnp.float32) * masks_flat[None].astype(jnp.float32)
  n_p = probes.shape[0]
  cts_c = jnp.concatenate([jnp.zeros((1, n_c), jnp.float32), pen_ct[None], probes], axis=0)
  if isinstance(st.f, SplitEval):  # row 0: the objective's cotangent entering the head at ``mid``
    cts_mid = jax.tree.map(lambda m: jnp.zeros((n_p + 2,) + m.shape, m.dtype).at[0].set(m), ct_mid)
    (grads,) = jax.vmap(lambda a, b: vjp_head((a, b)))(cts_c, cts_mid)
    grads = grads.at[0].add(g_tail)
  else:
    cts_obj = jnp.concatenate([jnp.array([-1.0, 0.0], jnp.float32), jnp.zeros((n_p,), jnp.float32)])
    (grads,) = jax.vmap(lambda a, b: vjp((a, b)))(cts_obj, cts_c)
  g_obj, g_pen, q = grads[0], grads[1], grads[2:].reshape(n_p, -1)
  if mode == "jacobian":
    basis = proj_lib.gram_schmidt(q, cfg.jacobian_tol)
  else:
    basis = proj_lib.rowspace_basis(q, cfg.exact_rtol)
  rank = jnp.sum(jnp.any(basis != 0, axis=-1)).astype(jnp.int32)
  proj = lambda g: proj_lib.apply_basis(basis, g.reshape(-1)).reshape(delta.shape)
  if cfg.lambda_delta != 0:
    g_pen = g_pen + hp.lambda_delta * jax.grad(obj_lib.safe_norm)(delta)
    loss += hp.lambda_delta * obj_lib.safe_norm(delta)
  gp = lambda g: proj(g) + g_pen  # the objective gradient is projected, the drift gradient not
  up = proj if mode == "jacobian_exact" and cfg.projects_params else None
  return ev, act, loss, g_obj, gp, up, rank, refs


def _correction(st: Stepper, delta, refs):
  """``correction_steps`` plain gradient steps on the drift penalty, each clipped to the budget."""
  cfg, hp = st.cfg, st.hp

  def act_loss(d):
    return obj_lib.drift_penalty(cfg.drift_penalty, features_of(st.f, d), refs, st.mon.masks, cfg.act_loss_eps)

  def body(_, d):
    return clip(d - hp.correction_lr * jax.grad(act_loss)(d), hp.budget)

  return jax.lax.fori_loop(0, cfg.correction_steps, body, delta)


def init(st: Stepper, delta0: Array) -> OptState:
  """The state before step 0 (v4 projects the initial delta in encoder mode with project_params)."""
  if st.param_proj is not None:
    delta0 = st.param_proj(delta0)
  ev0 = jax.eval_shape(st.f, delta0)
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  best0 = _Best(jnp.asarray(False), jnp.asarray(-jnp.inf, jnp.float32), jnp.asarray(-jnp.inf, jnp.float32),
                jnp.asarray(st.cfg.steps - 1, jnp.int32), delta0, zeros(ev0.objective), zeros(ev0.rows),
                jax.tree.map(zeros, ev0.feats), jnp.zeros((), jnp.float32))
  return OptState(delta0, recovery_tx(st.hp, st.cfg).init(delta0), best0, st.mon.refs, jnp.asarray(False))


def step(st: Stepper, state: OptState, t: Array) -> tuple[OptState, dict]:
  """One recovery step ``t`` (module docstring, 1-5): (new state, history entries of this step)."""
  cfg, hp = st.cfg, st.hp
  ev, act, loss, g, gp, up, rank, refs = _grad_step(st, state.delta, jax.random.fold_in(st.key, t), state.refs,
                                                    t == 0)
  mon_t = st.mon._replace(refs=refs)
  rel = obj_lib.relative_l2(ev.feats, refs, st.mon.masks)
  best = state.best
  if cfg.checkpoint != "final":
    prev = t - 1
    best = _update_best(cfg, hp, best, (t >= 1) & _is_snapshot(cfg, prev), prev, state.delta, ev, rel)
  g_applied = (gp or (lambda x: x))(g)
  tx = recovery_tx(hp, cfg, grad_proj=gp, update_proj=up, param_proj=st.param_proj)
  updates, opt_state = tx.update(g, state.opt, state.delta)
  new = optax.apply_updates(state.delta, updates)
  if cfg.is_jacobian and cfg.correction_steps > 0:
    every = max(int(cfg.correction_every), 1)
    if every == 1:
      new = _correction(st, new, refs)
    else:
      new = jax.lax.cond((t + 1) % every == 0, functools.partial(_correction, st), lambda d, r: d, new, refs)
  finite = jnp.isfinite(ev.objective) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(new))
  hist = dict(objective=ev.objective, loss=loss, act_penalty=act, drift_l2=drift_l2(ev.feats, mon_t),
              drift_rel=rel, delta_norm=jnp.sqrt(jnp.sum(jnp.square(new))), proj_cos=_cos(g, g_applied),
              basis_rank=rank, rows=ev.rows, finite=finite)
  if cfg.record_delta:
    hist["delta"] = new
  return OptState(new, opt_state, best, refs, state.diverged | ~finite), hist


def finish(st: Stepper, state: OptState) -> OptResult:
  """Scores the final iterate and picks the selected delta (final or best checkpoint)."""
  cfg, hp = st.cfg, st.hp
  ev_n = st.f(state.delta)
  rel_n = obj_lib.relative_l2(ev_n.feats, state.refs, st.mon.masks)
  diverged = state.diverged | ~jnp.isfinite(ev_n.objective)
  if cfg.checkpoint == "final":
    return OptResult(state.delta, state.delta, ev_n.objective, ev_n.rows, ev_n.feats, rel_n,
                     jnp.asarray(cfg.steps - 1, jnp.int32), {}, state.refs, ev_n.objective, rel_n, diverged)
  best = _update_best(cfg, hp, state.best, jnp.asarray(True), cfg.steps - 1, state.delta, ev_n, rel_n)
  return OptResult(best.delta, state.delta, best.objective, best.rows, best.feats, best.rel, best.step, {},
                   state.refs, ev_n.objective, rel_n, diverged)


def optimize(f: Callable[[Array], Eval], delta0: Array, mon: Monitor, cfg: RecoveryConfig, hp: HParams,
             key: Array, enc_proj: proj_lib.EncoderProjector | None = None, refs_from_start: bool = False) -> OptResult:
  """Maximises ``f(delta).objective`` from ``delta0`` [n_sites, P, d]: ``init``, ``step`` scanned
  over ``cfg.steps``, ``finish`` (see the module docstring and ``Stepper``)."""
  st = Stepper(f, mon, cfg, hp, key, enc_proj, refs_from_start)
  state, history = jax.lax.scan(lambda s, t: step(st, s, t), init(st, delta0), jnp.arange(cfg.steps, dtype=jnp.int32))
  return finish(st, state)._replace(history=history)
