"""High-level entry points: one SAE clamp at one site, a delta at one position per prompt.

This is what the IOI experiment (and any single-site experiment on token batches) calls:

  out = recover_site(params, model_cfg, sae, sae_cfg, site="blocks.4.hook_resid_pre",
                     tokens=tokens, attention_mask=mask, delta_pos=end, readout_pos=end,
                     objective=Objective("logit_diff"), targets={"pos": io_ids, "neg": s_ids},
                     feature_idx=idx, clamp_value=-5.0, shared=True)
  out.rows_base, out.rows_defended, out.rows        # [B] logit differences
  out.feats[0], out.refs[0], out.masks[0]           # [B, 1, K] E_S(h_def + delta), E_S(h_def) at end

``recover_site_grid`` runs G feature sets / clamp values / budgets / lrs in one compiled program.
Shapes (B prompts, K = K_max, d = d_model):

  shared=True   one problem of B rows: delta [1, 1, d], history[k] [steps], rows [B]
  shared=False  B problems of 1 row:   delta [B, 1, 1, d], history[k] [B, steps], rows [B]
  both: feats / refs / masks tuples of [B, 1, K]; h_def [B, 1, 1, d] (defended residual at the
  delta position, for the relative delta norm and attribution).
  grid: every output gains a leading axis G.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from recovery_jax import intervene
from recovery_jax.intervene import ClampSpec
from recovery_jax.models import transformer
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.recovery.engine import Problem, RecoveryOutput, RecoverySpec, suffix_len_for


def site_problems(tokens, attention_mask, delta_pos, readout_pos, targets, *, shared: bool,
                  monitor_pos=None, row_weight=None) -> Problem:
  """Stacked problems for a batch of B prompts with one delta column each.

  tokens / attention_mask [B, T]; delta_pos, readout_pos, monitor_pos [B] column indices (monitor
  defaults to delta_pos); targets: dict of [B, ...]. shared -> 1 problem of B rows (leading axis
  1); else B problems of 1 row (leading axis B).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
  col = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.int32).reshape(-1), (b,))[:, None]
  dpos = col(delta_pos)
  pb = Problem(
      tokens=tokens, attention_mask=mask, positions=transformer.default_positions(mask, b, t),
      delta_cols=dpos, delta_valid=jnp.ones((b, 1), bool), readout_cols=col(readout_pos),
      monitor_cols=dpos if monitor_pos is None else col(monitor_pos), monitor_valid=jnp.ones((b, 1), bool),
      targets=jax.tree.map(jnp.asarray, dict(targets)),
      row_weight=jnp.ones((b,), jnp.float32) if row_weight is None else jnp.asarray(row_weight, jnp.float32))
  if shared:
    return jax.tree.map(lambda a: a[None], pb)
  return jax.tree.map(lambda a: a[:, None], pb)


def _unshare(out: RecoveryOutput, shared: bool) -> RecoveryOutput:
  """Drops the problem axis of row arrays: shared [1, B] -> [B]; per-example [B, 1] -> [B]."""
  if shared:
    out = jax.tree.map(lambda a: a[0], out)
    return out._replace(h_def=jnp.moveaxis(out.h_def, 1, 0))
  rows = lambda a: a[:, 0]
  return out._replace(rows_base=rows(out.rows_base), rows_defended=rows(out.rows_defended), rows=rows(out.rows),
                      feats=tuple(map(rows, out.feats)), refs=tuple(map(rows, out.refs)),
                      masks=tuple(map(rows, out.masks)), h_def=out.h_def[:, :, 0])


def _setup(model_cfg, sae_cfg, site, objective, config, clamp_mode, positive_only, suffix_len, pbs, error_term):
  if suffix_len == "auto":
    suffix_len = suffix_len_for(pbs)
  clamp_spec = ClampSpec(site=site, sae_cfg=sae_cfg, mode=clamp_mode, positive_only=positive_only,
                         error_term=error_term)
  spec = RecoverySpec(model_cfg=model_cfg, delta_sites=(site,), objective=objective, config=config,
                      suffix_len=suffix_len)
  return spec, clamp_spec


def recover_site(params, model_cfg, sae, sae_cfg, *, site: str, tokens, attention_mask=None, delta_pos,
                 readout_pos, objective: Objective, targets: dict, feature_idx, feature_mask=None,
                 clamp_value: float = 0.0, config: RecoveryConfig = RecoveryConfig(), shared: bool = False,
                 clamp_mode: str = "set", positive_only: bool = True, error_term: str = "keep", monitor_pos=None,
                 suffix_len: int | str | None = "auto", key=None) -> RecoveryOutput:
  """Recovery under one clamp (``sae`` at ``site``) with a delta at ``delta_pos`` of each prompt.

  feature_idx [K] (feature_mask [K] marks real entries; default all); clamp_value: the set value
  (IOI: -5 on positive activations) or multiplier. ``shared`` picks one delta for the batch
  (reference IOI) or one per prompt (vmapped). ``suffix_len``: "auto" (prefix caching with the
  smallest covering suffix), an int, or None (full recompute each step). ``key`` defaults to
  ``PRNGKey(0)``; prompt i of a per-prompt run uses ``fold_in(key, i)``.
  Returns a RecoveryOutput with row arrays [B] (see the module docstring for delta/history).
  """
  pbs = site_problems(tokens, attention_mask, delta_pos, readout_pos, targets, shared=shared, monitor_pos=monitor_pos)
  spec, cs = _setup(model_cfg, sae_cfg, site, objective, config, clamp_mode, positive_only, suffix_len, pbs,
                    error_term)
  clamp = intervene.Clamp(cs, sae, intervene.ClampParams(
      jnp.asarray(feature_idx, jnp.int32),
      jnp.ones(np.shape(feature_idx), bool) if feature_mask is None else jnp.asarray(feature_mask, bool),
      jnp.asarray(clamp_value, jnp.float32)))
  key = jax.random.PRNGKey(0) if key is None else key
  out = engine.recover_examples(spec, params, (clamp,), pbs, config.hparams(), key)
  return _unshare(out, shared)


def recover_site_grid(params, model_cfg, sae, sae_cfg, *, site: str, tokens, attention_mask=None, delta_pos,
                      readout_pos, objective: Objective, targets: dict, feature_idx, feature_mask, clamp_value,
                      budget=None, lr=None, config: RecoveryConfig = RecoveryConfig(), shared: bool = False,
                      clamp_mode: str = "set", positive_only: bool = True, error_term: str = "keep",
                      monitor_pos=None, suffix_len: int | str | None = "auto", key=None) -> RecoveryOutput:
  """``recover_site`` over a grid of G points in one compiled program.

  feature_idx / feature_mask [G, K_max] (pad smaller sets, mask False); clamp_value [G] (or a
  scalar); budget / lr [G] (default: config's). Point g uses ``fold_in(key, g)``. Every output
  gains a leading axis G.
  """
  pbs = site_problems(tokens, attention_mask, delta_pos, readout_pos, targets, shared=shared, monitor_pos=monitor_pos)
  spec, cs = _setup(model_cfg, sae_cfg, site, objective, config, clamp_mode, positive_only, suffix_len, pbs,
                    error_term)
  idx = jnp.asarray(feature_idx, jnp.int32)
  g = idx.shape[0]
  vec = lambda v, default: jnp.broadcast_to(jnp.asarray(default if v is None else v, jnp.float32), (g,))
  clamp = intervene.Clamp(cs, sae, intervene.ClampParams(idx, jnp.asarray(feature_mask, bool), vec(clamp_value, 0.0)))
  hp = config.hparams(budget=vec(budget, config.budget), lr=vec(lr, config.lr))
  hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (g,)), hp)
  key = jax.random.PRNGKey(0) if key is None else key
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(g))
  out = engine.recover_grid(spec, params, (clamp,), pbs, hp, keys)
  return jax.vmap(lambda o: _unshare(o, shared))(out) if not shared else jax.tree.map(lambda a: a[:, 0], out)
