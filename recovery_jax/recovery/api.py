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

import warnings

import numpy as np
import jax
import jax.numpy as jnp

from recovery_jax import intervene
from recovery_jax.errors import UserError
from recovery_jax.intervene import ClampSpec
from recovery_jax.models import transformer
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.recovery.engine import Problem, RecoveryOutput, RecoverySpec, suffix_len_for
from recovery_jax.sae import formats as sae_formats


def _host(a):
  """``a`` as a numpy array when it is concrete (list, scalar, numpy or jax array); None for a Tracer."""
  if a is None:
    return None
  if isinstance(a, (list, tuple, int, float, np.integer, np.floating, bool)):
    return np.asarray(a)
  return np.asarray(a) if intervene.is_concrete(a) else None


def check_prompts(tokens, attention_mask=None, *, model_cfg=None, **cols) -> None:
  """Checks a token batch before anything is traced; raises UserError naming the prompt and value.

  tokens [B, T] ids in [0, vocab_size); attention_mask [B, T] (None: all real). With ``model_cfg``,
  no prompt may have more real tokens than the model's context (``ModelConfig.n_positions``: gpt2's
  learned positions, or ``max_position_embeddings`` of a HF / GGUF model; 0 = unknown, unchecked).
  ``cols``: name -> column index per prompt ([B] or a scalar), e.g. ``delta_pos=...``; each must be a
  real (unpadded) token of its prompt. Tracers are skipped (nothing is checked under jit).
  """
  toks = _host(tokens)
  if toks is None:
    return
  if toks.ndim != 2:
    raise UserError(f"tokens: expected shape [batch, seq], got {toks.shape}")
  b, t = toks.shape
  mask = np.ones((b, t), bool) if attention_mask is None else _host(attention_mask)
  if mask is None:
    return
  mask = mask.astype(bool)
  if mask.shape != (b, t):
    raise UserError(f"attention_mask: shape {mask.shape} differs from the tokens' {(b, t)}")
  lengths = mask.sum(-1)
  if (lengths == 0).any():
    raise UserError(f"attention_mask: prompt {int(np.argmax(lengths == 0))} has no real token")
  if model_cfg is not None:
    vocab = model_cfg.vocab_size
    bad = mask & ((toks < 0) | (toks >= vocab))
    if bad.any():
      i, j = (int(v) for v in np.argwhere(bad)[0])
      raise UserError(f"tokens: prompt {i} column {j} holds token id {int(toks[i, j])}, outside the model's "
                      f"vocabulary [0, {vocab})")
    n_ctx = int(getattr(model_cfg, "n_positions", 0) or 0)
    if n_ctx and lengths.max() > n_ctx:
      i = int(np.argmax(lengths))
      raise UserError(f"tokens: prompt {i} has {int(lengths[i])} tokens, more than the model's context of {n_ctx} "
                      f"positions (ModelConfig.n_positions of {model_cfg.name or model_cfg.family!r}); shorten "
                      "the prompts")
  for name, v in cols.items():
    col = _host(v)
    if col is None:
      continue
    if col.dtype.kind not in "iu":
      raise UserError(f"{name}: column indices {col.reshape(-1)[:8].tolist()} are not integers")
    try:
      col = np.broadcast_to(col.reshape(-1) if col.size != 1 else col.reshape(()), (b,))
    except ValueError as e:
      raise UserError(f"{name}: expected one column per prompt ({b}) or a scalar, got shape {col.shape}") from e
    for i in range(b):
      c = int(col[i])
      first = int(np.argmax(mask[i]))
      last = t - 1 - int(np.argmax(mask[i, ::-1]))
      if not 0 <= c < t:
        raise UserError(f"{name}: column {c} of prompt {i} is outside the prompt ({t} columns; its real tokens "
                        f"are columns {first}..{last})")
      if not mask[i, c]:
        raise UserError(f"{name}: column {c} of prompt {i} is padding (attention_mask False; its real tokens are "
                        f"columns {first}..{last})")


def check_sae(model_cfg, sae, sae_cfg, site: str, *, allow_site_mismatch: bool = False) -> None:
  """Checks an SAE against the model and clamp site before tracing; raises UserError.

  d_in must equal the model's width at ``site``; the SAE's recorded hook (``sae_cfg.hook_name``,
  SAELens ``hook_name``) must be ``site`` (``allow_site_mismatch=True`` warns instead); concrete
  weights must be finite (the tensor and SAE file are named).
  """
  src = sae_cfg.source or "<in-memory SAE>"
  width = sae_formats.site_width(model_cfg, site)
  if sae_cfg.d_in != width:
    raise UserError(f"{src}: SAE d_in={sae_cfg.d_in} does not match the model's width {width} at {site!r} "
                    f"(model {model_cfg.name or model_cfg.family!r}, d_model={model_cfg.d_model})")
  if sae_cfg.hook_name and sae_cfg.hook_name != site:
    msg = (f"{src}: the SAE's recorded hook_name {sae_cfg.hook_name!r} is not the clamp site {site!r}")
    if not allow_site_mismatch:
      raise UserError(msg + "; pass allow_site_mismatch=True to use it there anyway")
    warnings.warn(msg + " (allow_site_mismatch=True)", UserWarning, stacklevel=3)
  for name in sorted(sae or {}):
    a = sae[name]
    if intervene.is_concrete(a) and not bool(jnp.isfinite(jnp.asarray(a)).all()):
      raise UserError(f"{src}: {sae_formats.nonfinite_report(name, np.asarray(a, np.float32))}; SAE weights must "
                      "be finite (a NaN weight makes every score NaN)")


def _check_inputs(params, model_cfg, sae, sae_cfg, site, tokens, attention_mask, delta_pos, readout_pos,
                  monitor_pos, feature_idx, feature_mask, allow_site_mismatch) -> None:
  del params
  check_sae(model_cfg, sae, sae_cfg, site, allow_site_mismatch=allow_site_mismatch)
  intervene.check_feature_ids(feature_idx, sae_cfg.d_sae, feature_mask, sae=sae_cfg.source)
  cols = dict(delta_pos=delta_pos, readout_pos=readout_pos)
  if monitor_pos is not None:
    cols["monitor_pos"] = monitor_pos
  check_prompts(tokens, attention_mask, model_cfg=model_cfg, **cols)


def site_problems(tokens, attention_mask, delta_pos, readout_pos, targets, *, shared: bool,
                  monitor_pos=None, row_weight=None) -> Problem:
  """Stacked problems for a batch of B prompts with one delta column each.

  tokens / attention_mask [B, T]; delta_pos, readout_pos, monitor_pos [B] column indices (monitor
  defaults to delta_pos), each a real token of its prompt (``check_prompts``: a UserError otherwise);
  targets: dict of [B, ...]. shared -> 1 problem of B rows (leading axis 1); else B problems of 1 row
  (leading axis B).
  """
  cols = dict(delta_pos=delta_pos, readout_pos=readout_pos)
  if monitor_pos is not None:
    cols["monitor_pos"] = monitor_pos
  check_prompts(tokens, attention_mask, **cols)
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
                 suffix_len: int | str | None = "auto", key=None, allow_site_mismatch: bool = False
                 ) -> RecoveryOutput:
  """Recovery under one clamp (``sae`` at ``site``) with a delta at ``delta_pos`` of each prompt.

  feature_idx [K] (feature_mask [K] marks real entries; default all); clamp_value: the set value
  (IOI: -5 on positive activations) or multiplier. ``shared`` picks one delta for the batch
  (reference IOI) or one per prompt (vmapped). ``suffix_len``: "auto" (prefix caching with the
  smallest covering suffix), an int, or None (full recompute each step). ``key`` defaults to
  ``PRNGKey(0)``; prompt i of a per-prompt run uses ``fold_in(key, i)``.
  Returns a RecoveryOutput with row arrays [B] (see the module docstring for delta/history).

  Checked before tracing (UserError): feature ids in [0, d_sae); positions on real tokens; prompts
  within the model's context; the SAE's d_in, finite weights and recorded hook_name vs ``site``
  (``allow_site_mismatch=True``: a warning).
  """
  _check_inputs(params, model_cfg, sae, sae_cfg, site, tokens, attention_mask, delta_pos, readout_pos, monitor_pos,
                feature_idx, feature_mask, allow_site_mismatch)
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
                      monitor_pos=None, suffix_len: int | str | None = "auto", key=None,
                      allow_site_mismatch: bool = False) -> RecoveryOutput:
  """``recover_site`` over a grid of G points in one compiled program (the same checks).

  feature_idx / feature_mask [G, K_max] (pad smaller sets, mask False); clamp_value [G] (or a
  scalar); budget / lr [G] (default: config's). Point g uses ``fold_in(key, g)``. Every output
  gains a leading axis G.
  """
  _check_inputs(params, model_cfg, sae, sae_cfg, site, tokens, attention_mask, delta_pos, readout_pos, monitor_pos,
                feature_idx, feature_mask, allow_site_mismatch)
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
