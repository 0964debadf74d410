"""TPP's latent-level recovery: a linear probe on the mean-pooled residual at the SAE site.

No transformer runs here: the clean residual ``h`` at the probe site is cached once; the defence
clamps (zero-ablates) the class's latents at every position; delta is added to the defended
residual and the probe reads the mean over pooled tokens (SAE/probe algebra only, vmapped over
examples and classes). Uses the engine's optimiser, drift monitor and encoder projector.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from recovery_jax import intervene
from recovery_jax.intervene import Clamp
from recovery_jax.recovery import engine
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery.optimizer import Eval, HParams, Monitor, RecoveryConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
  """Static structure of a probe recovery (the clamp's own spec travels with the Clamp).

  broadcast: False: one delta row per delta column (the default scope: the last non-pad position);
  True: a single delta row added at every delta column of each row (paper-method 3.3's "delta
  broadcast to all positions"; delta [1, 1, d]).
  before: the threat model. False: delta is added to the defended residual, after the clamp (the
  paper); True: to the clean residual before it, so the clamp re-acts on ``h + delta`` (the relative
  budget then reads ``h`` at the delta columns, the state delta is added to).
  """

  config: RecoveryConfig
  broadcast: bool = False
  before: bool = False

  def canonical(self) -> "ProbeSpec":
    return dataclasses.replace(self, config=self.config.canonical())


class ProbeProblem(NamedTuple):
  """h [B, T, d] clean residual at the site; pool_mask [B, T] (tokens pooled); positions [B, T];
  probe_w [d], probe_b []; delta_cols / delta_valid [B, P]; monitor_cols / monitor_valid [B, M];
  row_weight [B]."""

  h: Array
  pool_mask: Array
  positions: Array
  probe_w: Array
  probe_b: Array
  delta_cols: Array
  delta_valid: Array
  monitor_cols: Array
  monitor_valid: Array
  row_weight: Array


def probe_logit(h: Array, pool_mask: Array, w: Array, b: Array) -> Array:
  """Linear probe on the mean over pooled tokens: h [B, T, d] -> [B]."""
  m = pool_mask.astype(jnp.float32)
  pooled = jnp.einsum("btd,bt->bd", h.astype(jnp.float32), m) / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
  return pooled @ w.astype(jnp.float32) + b


def recover_probe(spec: ProbeSpec, clamp: Clamp, pb: ProbeProblem, hp: HParams, key: Array) -> engine.RecoveryOutput:
  """TPP recovery: maximise the probe logit of the pooled ``h_def + delta`` (frozen reference)."""
  h_def = clamp(pb.h.astype(jnp.float32), pb.positions)
  place = intervene.placement(pb.delta_cols, pb.delta_valid, 0, pb.h.shape[1])
  n_rows = pb.delta_cols.shape[1]
  if spec.broadcast:
    place, n_rows = place.sum(-1, keepdims=True), 1
  feats_of = lambda x: (clamp.features(engine.gather_cols(x, pb.monitor_cols)),)
  masks = (pb.monitor_valid[:, :, None] & clamp.mask[None, None],)

  def f(delta):
    if spec.before:
      x = clamp(intervene.add_rows(pb.h.astype(jnp.float32), place, delta[0]), pb.positions)
    else:
      x = intervene.add_rows(h_def, place, delta[0])
    rows = probe_logit(x, pb.pool_mask, pb.probe_w, pb.probe_b)
    return Eval(obj_lib.weighted_mean(rows, pb.row_weight), rows, feats_of(x))

  enc = None
  if spec.config.projection in ("encoder", "encoder_exact"):
    enc = engine.encoder_projector(pb.h.shape[-1], (clamp.site,), (clamp,), hp.ridge,
                                   spec.config.projection == "encoder_exact", spec.config.exact_rtol)
  delta0 = jnp.zeros((1, n_rows, pb.h.shape[-1]), jnp.float32)
  h_def_cols = engine.gather_cols(pb.h.astype(jnp.float32) if spec.before else h_def, pb.delta_cols)[None]  # [1, B, P, d]
  hp = opt_lib.absolute_budget(spec.config, hp, h_def_cols, pb.row_weight)
  res = opt_lib.optimize(f, delta0, Monitor(feats_of(h_def), masks, (clamp.decoder_rows(),)), spec.config, hp, key,
                         enc, refs_from_start=True)
  return engine.output_of(res, probe_logit(pb.h, pb.pool_mask, pb.probe_w, pb.probe_b),
                          probe_logit(h_def, pb.pool_mask, pb.probe_w, pb.probe_b), masks, h_def_cols,
                          pb.row_weight, hp.budget)


@functools.partial(jax.jit, static_argnames=("spec",))
def _recover_probe_examples(spec, clamp, pbs, hp, key, ids):
  return jax.vmap(lambda pb, i: recover_probe(spec, clamp, pb, hp, jax.random.fold_in(key, i)))(pbs, ids)


def recover_probe_examples(spec: ProbeSpec, clamp: Clamp, problems: ProbeProblem, hp: HParams, key: Array,
                           ids=None):
  """TPP recovery of a stack of problems (leading axis N), one compiled program; problem i uses
  ``fold_in(key, ids[i])`` (``engine.problem_ids``)."""
  return _recover_probe_examples(spec.canonical(), clamp, problems, hp, key, engine.problem_ids(problems, ids))


@functools.partial(jax.jit, static_argnames=("spec",))
def _recover_probe_grid(spec, clamps, pbs, hp, keys, ids):
  axes = intervene.clamp_axes((clamps,))[0]

  def point(c, hp, key):
    one = lambda cc, pb, i: recover_probe(spec, cc, pb, hp, jax.random.fold_in(key, i))
    return jax.vmap(one, in_axes=(axes, 0, 0))(c, pbs, ids)

  return jax.vmap(point, in_axes=(axes, 0, 0))(clamps, hp, keys)


def recover_probe_grid(spec: ProbeSpec, clamps: Clamp, problems: ProbeProblem, hp: HParams, keys: Array,
                       ids=None):
  """TPP recovery over G grid points x N problems in one compiled program, a clamp per (point,
  problem): each problem may have its own target class (its probe in ``problems``, its latents in
  ``clamps``). clamps: ClampParams [G, N, K_max] (SAE shared); problems [N, ...]; hp leaves [G];
  keys [G] (problem i of point g uses ``fold_in(keys[g], ids[i])``, ids [N] the problems' ids in the
  whole set, default 0..N-1). Outputs gain leading axes [G, N]."""
  return _recover_probe_grid(spec.canonical(), clamps, problems, hp, keys, engine.problem_ids(problems, ids))
