"""The recovery engine: defended forward, prefix caching, and one compiled recovery per problem.

A *problem* is B token rows sharing one recovery variable ``delta`` [n_sites, P, d] (IOI's shared
delta: B = 64 prompts; per-example recovery: B = 1, vmapped over examples). Everything static
lives in ``RecoverySpec`` (hashable; a jit static argument): model config, clamps, delta sites,
objective, recovery config and the suffix length. Everything else is arrays, so one compiled
program serves every prompt, feature set (indices padded to K_max with a mask), clamp value and
budget of a sweep, and ``jax.vmap`` over stacked arrays is the sweep.

Columns vs positions: ``delta_cols``, ``readout_cols``, ``monitor_cols`` index the token array
([0, T)); ``positions`` are absolute positions (what clamp position masks and RoPE see).

Semantics (paper-method 1.3):
* frozen: at the first delta site s0 the residual is h_def + delta with h_def the defended residual
  of the delta-free run; at later delta sites the clamp is *not* re-applied: its delta-free change
  is added as a constant (reference ``FixedDirectDefendedPlusDeltaHook``; for a single delta site
  this is exactly the reference). Clamps at non-delta sites run live.
* live: every clamp runs in every forward; at a delta site the order is clamp -> fixed delta ->
  delta -> capture (refusal v4).
With one delta site the two coincide (the input of the clamp at s0 does not depend on delta).

Prefix caching (``suffix_len`` = S): columns before p = min(delta, readout columns) and layers
before s0 do not depend on delta. ``prepare`` runs the delta-free defended forward once, keeps its
KV cache (clamps active, fixed delta applied) and the residual at s0 for columns [p, p + S); each
step runs ``forward(resid=h_s0 + delta, start_layer, cache=prefix, ...)`` over S columns only.
Monitored features outside the suffix are taken from the delta-free run (exact: they do not depend
on delta). ``suffix_len=None`` recomputes the full forward every step (any site kind).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from recovery_jax import intervene
from recovery_jax.intervene import ClampParams, ClampSpec
from recovery_jax.models import sites as sites_lib
from recovery_jax.models import transformer
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery import projections as proj_lib
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import Eval, HParams, Monitor, RecoveryConfig
from recovery_jax.sae import core as sae_core

Array = jax.Array

_HOOK_RANK = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_resid_mid": 2, "hook_mlp_out": 3,
              "hook_resid_post": 4}


def visit_key(site: str, n_layers: int) -> tuple[int, int]:
  """Order in which ``forward`` visits hook sites."""
  s = sites_lib.parse_site(site, n_layers)
  if s.layer is None:
    return {"hook_embed": (-1, 0), "hook_pos_embed": (-1, 1)}.get(s.hook, (n_layers, 0))
  return (s.layer, _HOOK_RANK[s.hook])


@dataclasses.dataclass(frozen=True)
class RecoverySpec:
  """Static structure of a recovery (the jit cache key together with array shapes).

  clamps: the defence (one ClampSpec per SAE/site; ``saes`` and ``ClampParams`` tuples align).
  delta_sites: residual sites carrying the recovery variable, in forward order.
  suffix_len: static number of columns recomputed from the cached prefix (None: full recompute).
  config: RecoveryConfig; its traced numbers are ignored here (see ``RecoveryConfig.static``).
  """

  model_cfg: ModelConfig
  clamps: tuple[ClampSpec, ...]
  delta_sites: tuple[str, ...]
  objective: Objective
  config: RecoveryConfig
  suffix_len: int | None = 1

  def __post_init__(self):
    n = self.model_cfg.n_layers
    if not self.delta_sites:
      raise ValueError("RecoverySpec.delta_sites is empty")
    keys = [visit_key(s, n) for s in self.delta_sites]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
      raise ValueError(f"RecoverySpec.delta_sites {self.delta_sites} must be distinct and in forward order")
    for c in self.clamps:
      sites_lib.parse_site(c.site, n)
    if self.suffix_len is not None:
      s0 = sites_lib.parse_site(self.delta_sites[0], n)
      if s0.hook not in ("hook_resid_pre", "hook_resid_post"):
        raise ValueError(f"prefix caching starts at a resid_pre/resid_post site, got {self.delta_sites[0]!r};"
                         " use suffix_len=None")
      if self.suffix_len < 1:
        raise ValueError(f"RecoverySpec.suffix_len={self.suffix_len}: expected >= 1 or None")
    if self.objective.kind == "probe_logit":
      raise ValueError("probe_logit objectives use recover_probe, not the transformer engine")

  @property
  def start_layer(self) -> int:
    s0 = sites_lib.parse_site(self.delta_sites[0], self.model_cfg.n_layers)
    return s0.layer if s0.hook == "hook_resid_pre" else s0.layer + 1

  @property
  def monitored(self) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(self.clamps) if c.monitor)

  def key_of(self, site: str) -> tuple[int, int]:
    return visit_key(site, self.model_cfg.n_layers)

  def canonical(self) -> "RecoverySpec":
    return dataclasses.replace(self, config=self.config.static())


class Problem(NamedTuple):
  """Arrays of one problem (B rows sharing a delta [n_sites, P, d]).

  tokens [B, T] int; attention_mask [B, T] bool; positions [B, T] int (absolute);
  delta_cols / delta_valid [B, P]; readout_cols [B, R]; monitor_cols / monitor_valid [B, M];
  targets: objective targets (dict of [B, ...]); row_weight [B] float (objective row weights);
  fixed_delta [n_sites, Pf, d] with fixed_cols / fixed_valid [B, Pf], or None (no earlier stage).
  """

  tokens: Array
  attention_mask: Array
  positions: Array
  delta_cols: Array
  delta_valid: Array
  readout_cols: Array
  monitor_cols: Array
  monitor_valid: Array
  targets: dict
  row_weight: Array
  fixed_delta: Array | None = None
  fixed_cols: Array | None = None
  fixed_valid: Array | None = None


class Prepared(NamedTuple):
  """Delta-independent quantities computed once per problem (see ``prepare``)."""

  rows_base: Array  # [B] objective rows, no clamp
  rows_defended: Array  # [B] objective rows, clamp only
  refs: tuple  # monitored features of the clamp-only run at monitor cols, [B, M, K] each
  masks: tuple  # bool, same shapes
  c_base: tuple  # monitored features of the delta-free run (clamp + fixed delta)
  h_def: Array  # [n_sites, B, P, d] defended residual at the delta sites/cols (clamp-only run)
  start: Array  # [] first suffix column p (0 without caching)
  cache: transformer.KVCache | None  # prefix cache (cached mode)
  h0: Array | None  # [B, S, d] residual at s0 for the suffix columns (cached mode)
  chunk_positions: Array  # [B, S or T]
  chunk_mask: Array  # [B, S or T]
  offsets: Array | None  # [n_sites, B, S or T, d] frozen clamp changes at later delta sites


class RecoveryOutput(NamedTuple):
  """Result of one problem. Row arrays are [B]; features are tuples over monitored clamps of
  [B, M, K]; history holds per-step arrays [steps] (``rows``: [steps, B])."""

  delta: Array  # [n_sites, P, d] selected delta
  delta_last: Array  # final iterate
  history: dict
  objective_base: Array
  rows_base: Array
  objective_defended: Array
  rows_defended: Array
  objective: Array  # recovered (at the selected delta)
  rows: Array
  feats: tuple
  refs: tuple
  masks: tuple
  drift_rel: Array
  best_step: Array
  h_def: Array  # [n_sites, B, P, d]
  objective_last: Array  # at the final iterate (differs from ``objective`` with checkpoint selection)
  drift_rel_last: Array


# ----------------------------------------------------------------------------------------------
# helpers


final_logits = transformer.final_logits


def gather_cols(x: Array, cols: Array) -> Array:
  """x [B, T, ...] at cols [B, C] -> [B, C, ...] (cols clipped into range)."""
  cols = jnp.clip(cols, 0, x.shape[1] - 1)
  idx = cols.reshape(cols.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _pad_cols(x: Array, n: int, value=0) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n)
  return jnp.pad(x, pad, constant_values=value)


def _slice_cols(x: Array, start: Array, length: int) -> Array:
  return jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)


def _readout(spec: RecoverySpec, params, pb: Problem, resid: Array, cols: Array):
  h = gather_cols(resid, cols)
  ids = obj_lib.readout_ids(spec.objective, pb.targets)
  if ids is not None:  # only a few logits are read: unembed just those
    sub = transformer.final_logits_at(params, spec.model_cfg, h, ids)
    rows = obj_lib.row_scores_at(spec.objective, sub, pb.targets)
  else:
    rows = obj_lib.row_scores(spec.objective, final_logits(params, spec.model_cfg, h), pb.targets)
  return obj_lib.weighted_mean(rows, pb.row_weight), rows


def _features(spec: RecoverySpec, saes, cps, i: int, x: Array, cols: Array) -> Array:
  c = spec.clamps[i]
  return sae_core.encode_subset(saes[i], c.sae_cfg, gather_cols(x, cols), cps[i].feature_idx)


def _compose(fns: Sequence[Callable]) -> Callable:
  def edit(x, p):
    for fn in fns:
      x = fn(x, p)
    return x
  return edit


def _site_edits(spec: RecoverySpec, saes, cps, *, delta, fixed, place, fixed_place, offsets, after=None,
                live=False, record=None):
  """Edit map for the clamps, fixed delta and delta. ``after``: only sites visited after it.
  ``live``: clamps run at every site (the delta-free setup run); ``record``: dict receiving the
  clamp change at each later delta site (frozen offsets)."""
  n = spec.model_cfg.n_layers
  frozen = spec.config.semantics == "frozen" and not live
  sites = {c.site for c in spec.clamps} | set(spec.delta_sites)
  if after is not None:
    sites = {s for s in sites if visit_key(s, n) > visit_key(after, n)}
  edits = {}
  for site in sorted(sites, key=lambda s: visit_key(s, n)):
    fns = []
    di = spec.delta_sites.index(site) if site in spec.delta_sites else None
    frozen_here = frozen and di is not None and di > 0
    if frozen_here:
      if offsets is not None:
        fns.append(lambda x, p, o=offsets[di]: x + o.astype(x.dtype))
    else:
      cl = [intervene.clamp_edit(c, saes[i], cps[i]) for i, c in enumerate(spec.clamps) if c.site == site]
      if record is not None and cl and di is not None and di > 0:
        def rec(x, p, cl=_compose(cl), di=di):
          y = cl(x, p)
          record[di] = y - x
          return y
        cl = [rec]
      fns += cl
    if di is not None:
      if fixed is not None:
        fns.append(intervene.add_edit(fixed_place, fixed[di]))
      if delta is not None:
        fns.append(intervene.add_edit(place, delta[di]))
    if fns:
      edits[site] = _compose(fns)
  return edits


def _needs_offsets(spec: RecoverySpec) -> bool:
  later = set(spec.delta_sites[1:])
  return spec.config.semantics == "frozen" and any(c.site in later for c in spec.clamps)


def _first_col(pb: Problem) -> Array:
  big = jnp.iinfo(jnp.int32).max
  d = jnp.min(jnp.where(pb.delta_valid, pb.delta_cols, big))
  return jnp.minimum(d, jnp.min(pb.readout_cols)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# prepare


def prepare(spec: RecoverySpec, params, saes, cps, pb: Problem) -> Prepared:
  """Runs the delta-independent forwards: base, clamp-only (refs, h_def) and, with caching, the
  delta-free defended run with its KV cache (clamps + fixed delta)."""
  cfg = spec.model_cfg
  b, t = pb.tokens.shape
  mon = spec.monitored
  s_len = spec.suffix_len
  tokens, mask, positions = pb.tokens, pb.attention_mask.astype(bool), pb.positions.astype(jnp.int32)
  if s_len is not None:  # pad so that the suffix [p, p + S) always fits
    tokens = _pad_cols(tokens, s_len)
    mask = _pad_cols(mask, s_len, False)
    last = jnp.max(positions, axis=1, keepdims=True)
    positions = jnp.concatenate([positions, last + 1 + jnp.arange(s_len, dtype=jnp.int32)[None]], axis=1)
  tp = tokens.shape[1]

  base = transformer.forward(params, cfg, tokens, positions=positions, attention_mask=mask, compute_logits=False)
  _, rows_base = _readout(spec, params, pb, base.resid, pb.readout_cols)

  # clamp-only run: refs, defended rows, h_def at the delta sites
  cap = tuple(dict.fromkeys([spec.clamps[i].site for i in mon] + list(spec.delta_sites)))
  clamps = intervene.clamp_edits(spec.clamps, saes, cps)
  use_ref_as_setup = pb.fixed_delta is None and not _needs_offsets(spec)
  cache0 = transformer.init_cache(cfg, b, tp) if (s_len is not None and use_ref_as_setup) else None
  ref = transformer.forward(params, cfg, tokens, positions=positions, attention_mask=mask, edits=clamps,
                            capture=cap, cache=cache0, compute_logits=False)
  _, rows_def = _readout(spec, params, pb, ref.resid, pb.readout_cols)
  refs = tuple(_features(spec, saes, cps, i, ref.captures[spec.clamps[i].site], pb.monitor_cols) for i in mon)
  masks = tuple(pb.monitor_valid[:, :, None] & jnp.asarray(cps[i].feature_mask, bool)[None, None] for i in mon)
  h_def = jnp.stack([gather_cols(ref.captures[s], pb.delta_cols) for s in spec.delta_sites])

  # delta-free run with the fixed delta (and the frozen offsets)
  recorded = {}
  if use_ref_as_setup:
    setup, c_base = ref, refs
  else:
    fplace = None
    if pb.fixed_delta is not None:
      fplace = intervene.placement(pb.fixed_cols, pb.fixed_valid, 0, tp)
    edits = _site_edits(spec, saes, cps, delta=None, fixed=pb.fixed_delta, place=None, fixed_place=fplace,
                        offsets=None, live=True, record=recorded if _needs_offsets(spec) else None)
    cache0 = transformer.init_cache(cfg, b, tp) if s_len is not None else None
    setup = transformer.forward(params, cfg, tokens, positions=positions, attention_mask=mask, edits=edits,
                                capture=cap, cache=cache0, compute_logits=False)
    c_base = tuple(_features(spec, saes, cps, i, setup.captures[spec.clamps[i].site], pb.monitor_cols) for i in mon)
  offsets = None
  if _needs_offsets(spec):
    offsets = jnp.stack([recorded.get(di, jnp.zeros((b, tp, cfg.d_model), jnp.float32))
                         for di in range(len(spec.delta_sites))])

  if s_len is None:
    return Prepared(rows_base, rows_def, refs, masks, c_base, h_def, jnp.zeros((), jnp.int32), None, None,
                    pb.positions.astype(jnp.int32), pb.attention_mask.astype(bool), offsets)

  p0 = _first_col(pb)
  cache = setup.cache
  col = jnp.arange(tp)[None]
  cache = cache._replace(valid=cache.valid & (col < p0), index=p0)
  h0 = _slice_cols(setup.captures[spec.delta_sites[0]], p0, s_len)
  if offsets is not None:
    offsets = jax.vmap(lambda o: _slice_cols(o, p0, s_len))(offsets)
  return Prepared(rows_base, rows_def, refs, masks, c_base, h_def, p0, cache, h0,
                  _slice_cols(positions, p0, s_len), _slice_cols(mask, p0, s_len), offsets)


# ----------------------------------------------------------------------------------------------
# evaluators


def make_evaluator(spec: RecoverySpec, params, saes, cps, pb: Problem, prep: Prepared) -> Callable[[Array], Eval]:
  """f(delta [n_sites, P, d]) -> Eval(objective, rows [B], monitored features)."""
  cfg = spec.model_cfg
  mon = spec.monitored
  s0 = spec.delta_sites[0]
  k0 = visit_key(s0, cfg.n_layers)

  if spec.suffix_len is None:
    t = pb.tokens.shape[1]
    place = intervene.placement(pb.delta_cols, pb.delta_valid, 0, t)
    fplace = None if pb.fixed_delta is None else intervene.placement(pb.fixed_cols, pb.fixed_valid, 0, t)
    cap = tuple(dict.fromkeys(spec.clamps[i].site for i in mon))

    def f_full(delta):
      edits = _site_edits(spec, saes, cps, delta=delta, fixed=pb.fixed_delta, place=place, fixed_place=fplace,
                          offsets=prep.offsets)
      out = transformer.forward(params, cfg, pb.tokens, positions=prep.chunk_positions,
                                attention_mask=prep.chunk_mask, edits=edits, capture=cap, compute_logits=False)
      objective, rows = _readout(spec, params, pb, out.resid, pb.readout_cols)
      feats = tuple(_features(spec, saes, cps, i, out.captures[spec.clamps[i].site], pb.monitor_cols) for i in mon)
      return Eval(objective, rows, feats)

    return f_full

  s_len = spec.suffix_len
  p0 = prep.start
  place = intervene.placement(pb.delta_cols, pb.delta_valid, p0, s_len)
  fplace = None if pb.fixed_delta is None else intervene.placement(pb.fixed_cols, pb.fixed_valid, p0, s_len)
  later = [i for i in mon if visit_key(spec.clamps[i].site, cfg.n_layers) > k0]
  cap = tuple(dict.fromkeys(spec.clamps[i].site for i in later))
  mon_rel = pb.monitor_cols - p0
  in_suffix = pb.monitor_valid & (mon_rel >= 0) & (mon_rel < s_len)

  def f_cached(delta):
    x0 = intervene.add_rows(prep.h0, place, delta[0])
    edits = _site_edits(spec, saes, cps, delta=delta, fixed=pb.fixed_delta, place=place, fixed_place=fplace,
                        offsets=prep.offsets, after=s0)
    out = transformer.forward(params, cfg, resid=x0, start_layer=spec.start_layer, cache=prep.cache,
                              positions=prep.chunk_positions, attention_mask=prep.chunk_mask, edits=edits,
                              capture=cap, compute_logits=False)
    objective, rows = _readout(spec, params, pb, out.resid, pb.readout_cols - p0)
    feats = []
    for j, i in enumerate(mon):
      site = spec.clamps[i].site
      kk = visit_key(site, cfg.n_layers)
      if kk < k0:
        feats.append(prep.c_base[j])
        continue
      x = x0 if kk == k0 else out.captures[site]
      c = _features(spec, saes, cps, i, x, mon_rel)
      feats.append(jnp.where(in_suffix[:, :, None], c, prep.c_base[j]))
    return Eval(objective, rows, tuple(feats))

  return f_cached


# ----------------------------------------------------------------------------------------------
# recovery


def encoder_projector(d_model: int, delta_sites: Sequence[str], clamps: Sequence[ClampSpec], saes, cps,
                      ridge: Array, exact: bool, rtol: float | None = None) -> proj_lib.EncoderProjector:
  """Per delta site, the projector built from the masked encoder columns of the clamps at that
  site ([n_sites, d, K]; zero columns, i.e. the identity, at a site without clamps)."""
  cols = []
  for site in delta_sites:
    parts = [sae_core.encoder_columns(saes[i], c.sae_cfg, cps[i].feature_idx).astype(jnp.float32)
             * jnp.asarray(cps[i].feature_mask, jnp.float32)[None]
             for i, c in enumerate(clamps) if c.site == site]
    cols.append(jnp.concatenate(parts, axis=1) if parts else jnp.zeros((d_model, 1), jnp.float32))
  k = max(c.shape[1] for c in cols)
  a = jnp.stack([jnp.pad(c, ((0, 0), (0, k - c.shape[1]))) for c in cols])
  if exact:
    return proj_lib.exact_projector(a, rtol)
  return proj_lib.ridge_projector(a, ridge)


def monitor_of(spec: RecoverySpec, saes, cps, prep: Prepared) -> Monitor:
  dec = tuple(jnp.asarray(saes[i]["W_dec"], jnp.float32)[cps[i].feature_idx]
              * jnp.asarray(cps[i].feature_mask, jnp.float32)[:, None] for i in spec.monitored)
  return Monitor(prep.refs, prep.masks, dec)


def _delta_shape(spec: RecoverySpec, pb: Problem) -> tuple[int, int, int]:
  return (len(spec.delta_sites), pb.delta_cols.shape[1], spec.model_cfg.d_model)


def recover(spec: RecoverySpec, params, saes, cps, pb: Problem, hp: HParams, key: Array,
            delta0: Array | None = None) -> RecoveryOutput:
  """Optimises the delta of one problem (pure; jit with ``spec`` static, vmap over problems,
  feature sets, clamp values, budgets)."""
  cfg = spec.config
  saes, cps = tuple(saes), tuple(cps)
  prep = prepare(spec, params, saes, cps, pb)
  f = make_evaluator(spec, params, saes, cps, pb, prep)
  mon = monitor_of(spec, saes, cps, prep)
  enc = None
  if cfg.projection in ("encoder", "encoder_exact"):
    enc = encoder_projector(spec.model_cfg.d_model, spec.delta_sites, spec.clamps, saes, cps, hp.ridge,
                            cfg.projection == "encoder_exact", cfg.exact_rtol)
  # Without an initial or fixed delta the first step's features *are* the references; taking them
  # from that step makes c - r exactly 0 where delta has no effect (as in the reference, whose refs
  # and steps run the same kernels) instead of float noise that Adam would turn into O(lr) moves.
  refs_from_start = delta0 is None and pb.fixed_delta is None
  if delta0 is None:
    delta0 = jnp.zeros(_delta_shape(spec, pb), jnp.float32)
  res = opt_lib.optimize(f, delta0.astype(jnp.float32), mon, cfg, hp, key, enc, refs_from_start=refs_from_start)
  w = pb.row_weight
  return RecoveryOutput(
      delta=res.delta, delta_last=res.delta_last, history=res.history,
      objective_base=obj_lib.weighted_mean(prep.rows_base, w), rows_base=prep.rows_base,
      objective_defended=obj_lib.weighted_mean(prep.rows_defended, w), rows_defended=prep.rows_defended,
      objective=res.objective, rows=res.rows, feats=res.feats, refs=res.refs, masks=prep.masks,
      drift_rel=res.drift_rel, best_step=res.best_step, h_def=prep.h_def, objective_last=res.objective_last,
      drift_rel_last=res.drift_rel_last)


def evaluate(spec: RecoverySpec, params, saes, cps, pb: Problem, deltas: Array) -> Eval:
  """Evaluates stacked deltas [N, n_sites, P, d] under the active clamp (replays, attribution)."""
  saes, cps = tuple(saes), tuple(cps)
  prep = prepare(spec, params, saes, cps, pb)
  f = make_evaluator(spec, params, saes, cps, pb, prep)
  return jax.vmap(f)(deltas)


@functools.partial(jax.jit, static_argnames=("spec",))
def _recover_examples(spec, params, saes, cps, pbs, hp, key):
  n = pbs.tokens.shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  return jax.vmap(lambda pb, k: recover(spec, params, saes, cps, pb, hp, k))(pbs, keys)


@functools.partial(jax.jit, static_argnames=("spec",))
def _recover_grid(spec, params, saes, cps, pbs, hp, key):
  g = jax.tree.leaves(hp)[0].shape[0]

  def one_point(cp, h, i):
    return _recover_examples.__wrapped__(spec, params, saes, cp, pbs, h, jax.random.fold_in(key, i))

  return jax.vmap(one_point)(cps, hp, jnp.arange(g))


def recover_examples(spec: RecoverySpec, params, saes, cps, problems: Problem, hp: HParams, key: Array):
  """Recovers every problem of a stack (leading axis N) in one compiled program; problem i uses
  ``fold_in(key, i)``. Outputs have a leading axis N. Compiled once per ``spec.canonical()`` and
  array shapes."""
  return _recover_examples(spec.canonical(), params, tuple(saes), tuple(cps), problems, hp, key)


def recover_grid(spec: RecoverySpec, params, saes, cps, problems: Problem, hp: HParams, key: Array):
  """Grid of G sweep points x N problems: ``cps`` (tuple of stacked ClampParams) and ``hp`` have a
  leading axis G (feature sets padded to one K_max, clamp values, budgets, lrs). Point g uses
  ``fold_in(key, g)``. Outputs have leading axes [G, N]."""
  return _recover_grid(spec.canonical(), params, tuple(saes), tuple(cps), problems, hp, key)


# ----------------------------------------------------------------------------------------------
# TPP: latent-level recovery with a linear probe on the mean-pooled residual (no transformer)


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
  """Static structure of a probe recovery: one clamp at the probe site (TPP: zero ablation)."""

  clamp: ClampSpec
  config: RecoveryConfig

  def canonical(self) -> "ProbeSpec":
    return dataclasses.replace(self, config=self.config.static())


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


def recover_probe(spec: ProbeSpec, sae, cp: ClampParams, pb: ProbeProblem, hp: HParams, key: Array) -> RecoveryOutput:
  """TPP recovery: maximise the probe logit of the pooled ``h_def + delta`` (frozen reference)."""
  c = spec.clamp
  h_def = intervene.clamp_residual(c, sae, cp, pb.h.astype(jnp.float32), pb.positions)
  t = pb.h.shape[1]
  place = intervene.placement(pb.delta_cols, pb.delta_valid, 0, t)
  feats_of = lambda x: (sae_core.encode_subset(sae, c.sae_cfg, gather_cols(x, pb.monitor_cols), cp.feature_idx),)
  refs = feats_of(h_def)
  masks = (pb.monitor_valid[:, :, None] & jnp.asarray(cp.feature_mask, bool)[None, None],)

  def f(delta):
    x = intervene.add_rows(h_def, place, delta[0])
    rows = probe_logit(x, pb.pool_mask, pb.probe_w, pb.probe_b)
    return Eval(obj_lib.weighted_mean(rows, pb.row_weight), rows, feats_of(x))

  dec = (jnp.asarray(sae["W_dec"], jnp.float32)[cp.feature_idx] * jnp.asarray(cp.feature_mask, jnp.float32)[:, None],)
  mon = Monitor(refs, masks, dec)
  enc = None
  if spec.config.projection in ("encoder", "encoder_exact"):
    enc = encoder_projector(pb.h.shape[-1], (c.site,), (c,), (sae,), (cp,), hp.ridge,
                            spec.config.projection == "encoder_exact", spec.config.exact_rtol)
  delta0 = jnp.zeros((1, pb.delta_cols.shape[1], pb.h.shape[-1]), jnp.float32)
  res = opt_lib.optimize(f, delta0, mon, spec.config, hp, key, enc, refs_from_start=True)
  rows_base = probe_logit(pb.h, pb.pool_mask, pb.probe_w, pb.probe_b)
  rows_def = probe_logit(h_def, pb.pool_mask, pb.probe_w, pb.probe_b)
  w = pb.row_weight
  h_def_rows = gather_cols(h_def, pb.delta_cols)[None]
  return RecoveryOutput(
      delta=res.delta, delta_last=res.delta_last, history=res.history,
      objective_base=obj_lib.weighted_mean(rows_base, w), rows_base=rows_base,
      objective_defended=obj_lib.weighted_mean(rows_def, w), rows_defended=rows_def,
      objective=res.objective, rows=res.rows, feats=res.feats, refs=res.refs, masks=masks,
      drift_rel=res.drift_rel, best_step=res.best_step, h_def=h_def_rows, objective_last=res.objective_last,
      drift_rel_last=res.drift_rel_last)


@functools.partial(jax.jit, static_argnames=("spec",))
def _recover_probe_examples(spec, sae, cp, pbs, hp, key):
  n = pbs.h.shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  return jax.vmap(lambda pb, k: recover_probe(spec, sae, cp, pb, hp, k))(pbs, keys)


def recover_probe_examples(spec: ProbeSpec, sae, cp: ClampParams, problems: ProbeProblem, hp: HParams, key: Array):
  """TPP recovery of a stack of problems (leading axis N), one compiled program."""
  return _recover_probe_examples(spec.canonical(), sae, cp, problems, hp, key)
