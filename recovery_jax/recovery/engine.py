"""The recovery engine: defended forward, prefix caching, and one compiled recovery per problem.

A *problem* is B token rows sharing one recovery variable ``delta`` [n_sites, P, d] (IOI's shared
delta: B = 64 prompts; per-example recovery: B = 1, vmapped over examples). The defence is a tuple
of ``intervene.Clamp`` objects (static spec as pytree metadata, SAE and feature arrays as leaves);
the rest of the static structure lives in ``RecoverySpec`` (hashable; a jit static argument):
model config, delta sites, objective, optimiser config, semantics and the suffix length. One
compiled program serves every prompt, feature set (indices padded to K_max with a mask), clamp
value and budget of a sweep; ``recover_grid`` vmaps over stacked clamps and hyper-parameters.

Columns vs positions: ``delta_cols``, ``readout_cols``, ``monitor_cols`` index the token array
([0, T)); ``positions`` are absolute positions (what clamp position masks and RoPE see).

Semantics (paper-method 1.3):
* frozen: at the first delta site s0 the residual is h_def + delta with h_def the defended residual
  of the delta-free run; at later delta sites the clamp is *not* re-applied: its delta-free change
  is added as a constant (reference ``FixedDirectDefendedPlusDeltaHook``; for a single delta site
  this is exactly the reference). Clamps at non-delta sites run live.
* live: every clamp runs in every forward; at a delta site the order is clamp -> fixed delta ->
  delta -> capture (refusal v4).
With one delta site the two coincide (the input of the clamp at s0 does not depend on delta). A
clamp at a site visited *after* s0 runs live in both (e.g. a delta at ``blocks.11.hook_resid_post``
enters the SAE clamped at ``blocks.12.hook_resid_pre``).

Prefix caching (``suffix_len`` = S): columns before p = min(delta, readout columns) and layers
before s0 do not depend on delta. ``prepare`` runs the delta-free defended forward once, keeps its
KV cache (clamps active, fixed delta applied) and the residual at s0 for columns [p, p + S); each
step runs ``forward(resid=h_s0 + delta, start_layer, cache=prefix, ...)`` over S columns only.
Every delta, readout and monitor column must lie in [p, p + S) (``check_problems`` raises
otherwise; ``suffix_len_for`` computes the smallest S); monitored features at a site before s0 are
read from the delta-free run, exact because they do not depend on delta. ``suffix_len=None``
recomputes the full forward every step (any site kind).

Size: the defended forward, the prefix cache and the compiled entry points share
``RecoverySpec`` and the column bookkeeping; each entry point is a few lines over the same core.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recovery_jax import intervene
from recovery_jax.intervene import Clamp
from recovery_jax.models import sharding as sharding_lib
from recovery_jax.models import sites as sites_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery import projections as proj_lib
from recovery_jax.recovery.optimizer import Eval, HParams, Monitor, RecoveryConfig  # noqa: F401 (re-export)
from recovery_jax.recovery.problem import (  # noqa: F401 (re-exported: the engine's public vocabulary)
    SEMANTICS, Problem, RecoveryOutput, RecoverySpec, check_problems, gather_cols, monitored, output_of,
    suffix_len_for)

Array = jax.Array


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


# ----------------------------------------------------------------------------------------------
# helpers


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
    rows = obj_lib.row_scores(spec.objective, transformer.final_logits(params, spec.model_cfg, h), pb.targets)
  return obj_lib.weighted_mean(rows, pb.row_weight), rows


def _compose(fns: Sequence[Callable]) -> Callable:
  def edit(x, p):
    for fn in fns:
      x = fn(x, p)
    return x
  return edit


def _site_edits(spec: RecoverySpec, clamps, *, delta, fixed, place, fixed_place, offsets, after=None, live=False):
  """Edit map for the clamps, fixed delta and delta. ``after``: only sites visited after it.
  ``live``: clamps run at every site (the delta-free setup run)."""
  frozen = spec.semantics == "frozen" and not live
  sites = {c.site for c in clamps} | set(spec.delta_sites)
  if after is not None:
    sites = {s for s in sites if spec.key_of(s) > spec.key_of(after)}
  edits = {}
  for site in sorted(sites, key=spec.key_of):
    fns = []
    di = spec.delta_sites.index(site) if site in spec.delta_sites else None
    if frozen and di is not None and di > 0:
      if offsets is not None:
        fns.append(lambda x, p, o=offsets[di]: x + o.astype(x.dtype))
    else:
      fns += [c for c in clamps if c.site == site]
    if di is not None:
      if fixed is not None:
        fns.append(intervene.add_edit(fixed_place, fixed[di]))
      if delta is not None:
        fns.append(intervene.add_edit(place, delta[di]))
    if fns:
      edits[site] = _compose(fns)
  return edits


def _offset_sites(spec: RecoverySpec, clamps) -> tuple[str, ...]:
  """Later delta sites whose clamps frozen semantics replaces by their delta-free change."""
  if spec.semantics != "frozen":
    return ()
  clamp_sites = {c.site for c in clamps}
  return tuple(s for s in spec.delta_sites[1:] if s in clamp_sites)


def _first_col(pb: Problem) -> Array:
  big = jnp.iinfo(jnp.int32).max
  d = jnp.min(jnp.where(pb.delta_valid, pb.delta_cols, big))
  return jnp.minimum(d, jnp.min(pb.readout_cols)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# prepare


def prepare(spec: RecoverySpec, params, clamps: Sequence[Clamp], pb: Problem) -> Prepared:
  """Runs the delta-independent forwards: base, clamp-only (refs, h_def) and, with caching or a
  fixed delta, the delta-free defended run with its KV cache (clamps + fixed delta)."""
  cfg = spec.model_cfg
  b, t = pb.tokens.shape
  mon = monitored(clamps)
  s_len = spec.suffix_len
  tokens, mask, positions = pb.tokens, pb.attention_mask.astype(bool), pb.positions.astype(jnp.int32)
  if s_len is not None:  # pad so that a suffix [p, p + S) starting anywhere stays inside the array
    tokens = _pad_cols(tokens, s_len)
    mask = _pad_cols(mask, s_len, False)
    last = jnp.max(positions, axis=1, keepdims=True)
    positions = jnp.concatenate([positions, last + 1 + jnp.arange(s_len, dtype=jnp.int32)[None]], axis=1)
  tp = tokens.shape[1]
  # The layers below the first edited site are the same in every run here: run them once. Their
  # cache slots stay empty: the steps start at ``spec.start_layer`` >= ``low`` and never read them.
  low = max(0, min(spec.key_of(s)[0] for s in {c.site for c in clamps} | set(spec.delta_sites)))
  cache0 = transformer.init_cache(cfg, b, tp) if s_len is not None else None
  stem = functools.partial(transformer.forward, params, cfg, positions=positions, attention_mask=mask,
                           compute_logits=False)
  if low > 0:
    run = functools.partial(stem, resid=stem(tokens, stop_layer=low).resid, start_layer=low)
  else:
    run = functools.partial(stem, tokens)

  _, rows_base = _readout(spec, params, pb, run().resid, pb.readout_cols)

  # clamp-only run: refs, defended rows, h_def at the delta sites
  cap = tuple(dict.fromkeys([clamps[i].site for i in mon] + list(spec.delta_sites)))
  features = lambda i, x: clamps[i].features(gather_cols(x, pb.monitor_cols))
  offset_sites = _offset_sites(spec, clamps)
  ref_is_setup = pb.fixed_delta is None
  ref = run(edits=intervene.clamp_edits(clamps), capture=cap, capture_inputs=offset_sites if ref_is_setup else (),
            cache=cache0 if ref_is_setup else None)
  _, rows_def = _readout(spec, params, pb, ref.resid, pb.readout_cols)
  refs = tuple(features(i, ref.captures[clamps[i].site]) for i in mon)
  masks = monitor_masks(clamps, pb)
  h_def = jnp.stack([gather_cols(ref.captures[s], pb.delta_cols) for s in spec.delta_sites])

  # the delta-free run: clamps live everywhere, plus the fixed delta of an earlier stage
  fplace = None if pb.fixed_delta is None else intervene.placement(pb.fixed_cols, pb.fixed_valid, 0, tp)
  if ref_is_setup:
    setup, c_base = ref, refs
  else:
    edits = _site_edits(spec, clamps, delta=None, fixed=pb.fixed_delta, place=None, fixed_place=fplace,
                        offsets=None, live=True)
    setup = run(edits=edits, capture=cap, capture_inputs=offset_sites, cache=cache0)
    c_base = tuple(features(i, setup.captures[clamps[i].site]) for i in mon)
  # frozen offsets: the clamps' change at later delta sites in the delta-free run (site output minus
  # input, less the fixed delta added there after the clamps)
  offsets = None
  if offset_sites:
    def offset(di, s):
      if s not in offset_sites:
        return jnp.zeros((b, tp, cfg.d_model), jnp.float32)
      o = setup.captures[s] - setup.captures[f"{s}:input"]
      if pb.fixed_delta is not None:
        o = o - intervene.add_rows(jnp.zeros_like(o), fplace, pb.fixed_delta[di])
      return o
    offsets = jnp.stack([offset(di, s) for di, s in enumerate(spec.delta_sites)])

  common = dict(rows_base=rows_base, rows_defended=rows_def, refs=refs, masks=masks, c_base=c_base, h_def=h_def)
  if s_len is None:
    return Prepared(**common, start=jnp.zeros((), jnp.int32), cache=None, h0=None,
                    chunk_positions=pb.positions.astype(jnp.int32), chunk_mask=pb.attention_mask.astype(bool),
                    offsets=None if offsets is None else offsets[:, :, :t])
  p0 = _first_col(pb)
  cache = setup.cache
  cache = cache._replace(valid=cache.valid & (jnp.arange(tp)[None] < p0), index=p0)
  return Prepared(**common, start=p0, cache=cache, h0=_slice_cols(setup.captures[spec.delta_sites[0]], p0, s_len),
                  chunk_positions=_slice_cols(positions, p0, s_len), chunk_mask=_slice_cols(mask, p0, s_len),
                  offsets=None if offsets is None else jax.vmap(lambda o: _slice_cols(o, p0, s_len))(offsets))


# ----------------------------------------------------------------------------------------------
# evaluators


def _split_layer(spec: RecoverySpec, clamps: Sequence[Clamp], low: int) -> int:
  """First layer after the last monitored site (the head's ``stop_layer``); at least ``low``."""
  layers = [sites_lib.parse_site(clamps[i].site, spec.model_cfg.n_layers).layer for i in monitored(clamps)]
  return max([low] + [l + 1 for l in layers if l is not None and l + 1 > low])


def _split_edits(spec: RecoverySpec, edits: dict, split: int) -> tuple[dict, dict]:
  """Edits visited before layer ``split`` (embeddings included: head) and from it on (tail)."""
  head = {k: e for k, e in edits.items() if spec.key_of(k)[0] < split}
  return head, {k: e for k, e in edits.items() if k not in head}


def make_evaluator(spec: RecoverySpec, params, clamps: Sequence[Clamp], pb: Problem,
                   prep: Prepared) -> opt_lib.SplitEval:
  """f(delta [n_sites, P, d]) -> Eval(objective, rows [B], monitored features), cut after the last
  monitored site (``optimizer.SplitEval``): the head runs the layers up to it and returns the
  features and the residual there, the tail runs the later layers and the readout."""
  cfg = spec.model_cfg
  mon = monitored(clamps)
  s0 = spec.delta_sites[0]
  k0 = spec.key_of(s0)

  if spec.suffix_len is None:
    t = pb.tokens.shape[1]
    place = intervene.placement(pb.delta_cols, pb.delta_valid, 0, t)
    fplace = None if pb.fixed_delta is None else intervene.placement(pb.fixed_cols, pb.fixed_valid, 0, t)
    cap = tuple(dict.fromkeys(clamps[i].site for i in mon))
    split = _split_layer(spec, clamps, 0)
    run = functools.partial(transformer.forward, params, cfg, positions=prep.chunk_positions,
                            attention_mask=prep.chunk_mask, compute_logits=False, remat=spec.remat)

    def edits_of(delta):
      return _split_edits(spec, _site_edits(spec, clamps, delta=delta, fixed=pb.fixed_delta, place=place,
                                            fixed_place=fplace, offsets=prep.offsets), split)

    def head_full(delta):
      out = run(pb.tokens, stop_layer=split, edits=edits_of(delta)[0], capture=cap)
      feats = tuple(clamps[i].features(gather_cols(out.captures[clamps[i].site], pb.monitor_cols)) for i in mon)
      return feats, out.resid

    def tail_full(h, delta):
      out = run(resid=h, start_layer=split, edits=edits_of(delta)[1])
      return _readout(spec, params, pb, out.resid, pb.readout_cols)

    return opt_lib.SplitEval(head_full, tail_full)

  s_len = spec.suffix_len
  p0 = prep.start
  place = intervene.placement(pb.delta_cols, pb.delta_valid, p0, s_len)
  fplace = None if pb.fixed_delta is None else intervene.placement(pb.fixed_cols, pb.fixed_valid, p0, s_len)
  later = [i for i in mon if spec.key_of(clamps[i].site) > k0]
  cap = tuple(dict.fromkeys(clamps[i].site for i in later))
  mon_rel = pb.monitor_cols - p0
  split = _split_layer(spec, clamps, spec.start_layer)
  run = functools.partial(transformer.forward, params, cfg, cache=prep.cache, positions=prep.chunk_positions,
                          attention_mask=prep.chunk_mask, compute_logits=False, remat=spec.remat)

  def edits_of(delta):
    return _split_edits(spec, _site_edits(spec, clamps, delta=delta, fixed=pb.fixed_delta, place=place,
                                          fixed_place=fplace, offsets=prep.offsets, after=s0), split)

  def head_cached(delta):
    x0 = intervene.add_rows(prep.h0, place, delta[0])
    out = run(resid=x0, start_layer=spec.start_layer, stop_layer=split, edits=edits_of(delta)[0], capture=cap)
    feats = []
    for j, i in enumerate(mon):
      kk = spec.key_of(clamps[i].site)
      if kk < k0:  # before the first delta site: independent of delta
        feats.append(prep.c_base[j])
        continue
      x = x0 if kk == k0 else out.captures[clamps[i].site]
      feats.append(clamps[i].features(gather_cols(x, mon_rel)))
    return tuple(feats), out.resid

  def tail_cached(h, delta):
    out = run(resid=h, start_layer=split, edits=edits_of(delta)[1])
    return _readout(spec, params, pb, out.resid, pb.readout_cols - p0)

  return opt_lib.SplitEval(head_cached, tail_cached)


# ----------------------------------------------------------------------------------------------
# recovery


def encoder_projector(d_model: int, delta_sites: Sequence[str], clamps: Sequence[Clamp], ridge: Array,
                      exact: bool, rtol: float | None = None) -> proj_lib.EncoderProjector:
  """Per delta site, the projector built from the effective encoder columns of the clamps on that
  residual vector ([n_sites, d, K]; zero columns, i.e. the identity, at a site without clamps).
  A clamp at ``blocks.L+1.hook_resid_pre`` acts on the vector of ``blocks.L.hook_resid_post``."""
  cols = []
  for site in delta_sites:
    parts = [c.encoder_columns() for c in clamps if sites_lib.same_residual(c.site, site, None)]
    cols.append(jnp.concatenate(parts, axis=1) if parts else jnp.zeros((d_model, 1), jnp.float32))
  k = max(c.shape[1] for c in cols)
  a = jnp.stack([jnp.pad(c, ((0, 0), (0, k - c.shape[1]))) for c in cols])
  if exact:
    return proj_lib.exact_projector(a, rtol)
  return proj_lib.ridge_projector(a, ridge)


def monitor_masks(clamps: Sequence[Clamp], pb: Problem) -> tuple:
  """Valid entries of the monitored features: per monitored clamp [B, M, K] bool (monitor column
  valid and feature real)."""
  return tuple(pb.monitor_valid[:, :, None] & clamps[i].mask[None, None] for i in monitored(clamps))


def monitor_of(clamps: Sequence[Clamp], refs: tuple, masks: tuple) -> Monitor:
  """The drift monitor: references, masks and the clamps' effective decoder rows [K, d]."""
  return Monitor(refs, masks, tuple(clamps[i].decoder_rows() for i in monitored(clamps)))


def refs_from_start(pb: Problem, delta0: Array | None) -> bool:
  """Whether the first step's own features can serve as drift references: the first evaluated
  state is the defended one (no initial delta, no fixed earlier-stage delta). c - r is then exactly
  0 where delta has no effect (as in the reference, whose refs and steps run the same kernels),
  not float noise between two compiled paths that Adam would turn into O(lr) moves."""
  return delta0 is None and pb.fixed_delta is None


def _delta_shape(spec: RecoverySpec, pb: Problem) -> tuple[int, int, int]:
  return (len(spec.delta_sites), pb.delta_cols.shape[1], spec.model_cfg.d_model)


def recover(spec: RecoverySpec, params, clamps: Sequence[Clamp], pb: Problem, hp: HParams, key: Array,
            delta0: Array | None = None) -> RecoveryOutput:
  """Optimises the delta of one problem (pure; jit with ``spec`` static, vmap over problems,
  feature sets, clamp values, budgets)."""
  cfg = spec.config
  clamps = tuple(clamps)
  prep = prepare(spec, params, clamps, pb)
  hp = opt_lib.absolute_budget(cfg, hp, prep.h_def, pb.row_weight)
  f = make_evaluator(spec, params, clamps, pb, prep)
  enc = None
  if cfg.projection in ("encoder", "encoder_exact"):
    enc = encoder_projector(spec.model_cfg.d_model, spec.delta_sites, clamps, hp.ridge,
                            cfg.projection == "encoder_exact", cfg.exact_rtol)
  from_start = refs_from_start(pb, delta0)
  if delta0 is None:
    delta0 = jnp.zeros(_delta_shape(spec, pb), jnp.float32)
  res = opt_lib.optimize(f, delta0.astype(jnp.float32), monitor_of(clamps, prep.refs, prep.masks), cfg, hp, key,
                         enc, refs_from_start=from_start)
  return output_of(res, prep.rows_base, prep.rows_defended, prep.masks, prep.h_def, pb.row_weight, hp.budget)


def evaluate(spec: RecoverySpec, params, clamps: Sequence[Clamp], pb: Problem, deltas: Array) -> Eval:
  """Evaluates stacked deltas [N, n_sites, P, d] under the active clamps (replays, attribution)."""
  clamps = tuple(clamps)
  prep = prepare(spec, params, clamps, pb)
  return jax.vmap(make_evaluator(spec, params, clamps, pb, prep))(deltas)


def _examples(spec, params, clamps, pbs, hp, key, ids, hp_axis=None):
  """vmap over a stack of N problems; problem i uses fold_in(key, ids[i]) and ``hp`` (``hp_axis=0``:
  its own ``hp[i]``)."""
  return jax.vmap(lambda pb, h, i: recover(spec, params, clamps, pb, h, jax.random.fold_in(key, i)),
                  in_axes=(0, hp_axis, 0))(pbs, hp, ids)


def _grid(spec, params, clamps, pbs, hp, key_data, ids):
  """vmap over G points (stacked clamps params, hp, keys) of the N-problem recovery."""
  def one_point(cl, h, kd):
    return _examples(spec, params, cl, pbs, h, jax.random.wrap_key_data(kd), ids)
  return jax.vmap(one_point, in_axes=(intervene.clamp_axes(clamps), 0, 0))(clamps, hp, key_data)


def problem_ids(problems, ids=None) -> Array:
  """Example ids [N] (int32) of a problem stack: ``ids``, or 0..N-1. Keys are ``fold_in(key, id)``, so a
  caller that splits a stack into batches passes each problem's id in the whole stack."""
  n = jax.tree.leaves(problems)[0].shape[0]
  if ids is None:
    return jnp.arange(n, dtype=jnp.int32)
  ids = jnp.asarray(ids, jnp.int32)
  if ids.shape != (n,):
    raise ValueError(f"ids of shape {ids.shape}: expected ({n},), one per problem")
  return ids


_examples_jit = jax.jit(_examples, static_argnums=(0, 7))


def recover_examples(spec: RecoverySpec, params, clamps: Sequence[Clamp], problems: Problem, hp: HParams,
                     key: Array, ids=None, per_example_hp: bool = False) -> RecoveryOutput:
  """Recovers every problem of a stack (leading axis N) in one compiled program; problem i uses
  ``fold_in(key, ids[i])`` (ids [N], default 0..N-1: the problems' ids in the whole set, so that a
  batch of a larger set gets the same keys) and ``hp`` (``per_example_hp``: every field [N], problem i
  at ``hp[i]``, e.g. its own budget). Outputs have a leading axis N. Compiled once per
  ``spec.canonical()``, the clamps' specs, array shapes and ``per_example_hp``."""
  clamps = tuple(clamps)
  check_problems(spec, clamps, problems)
  return _examples_jit(spec.canonical(), params, clamps, problems, hp, key, problem_ids(problems, ids),
                       0 if per_example_hp else None)


@functools.lru_cache(maxsize=None)
def _grid_program(spec: RecoverySpec, mesh: Mesh | None):
  fn = functools.partial(_grid, spec)
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=NamedSharding(mesh, P("data")))


def _model_axis(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(dict(mesh.shape).get(sharding_lib.MODEL, 1))


def grid_shardings(spec: RecoverySpec, mesh: Mesh, params, clamps: Sequence[Clamp], problems: Problem, hp: HParams,
                   key_data: Array) -> tuple:
  """Placement of ``recover_grid``'s inputs on ``mesh``, as a tuple of sharding pytrees matching
  (params, clamps, problems, hp, key_data).

  Points (ClampParams, hp, keys: leading axis G) go over ``data``; problems are replicated. With a
  ``model`` axis > 1 the model params are tensor-parallel (``models.sharding.param_shardings``) and
  the SAE params are split over their latents (``sae_param_shardings``: the SAE is the second-largest
  weight, and the sparse clamp reads only K of its columns); otherwise both are replicated."""
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  like = lambda tree, s: jax.tree.map(lambda _: s, tree)
  tp = _model_axis(mesh) > 1
  p_s = sharding_lib.param_shardings(params, spec.model_cfg, mesh) if tp else like(params, repl)
  c_s = tuple(c.replace(sae=sharding_lib.sae_param_shardings(c.sae, mesh) if tp else like(c.sae, repl),
                        params=like(c.params, data)) for c in clamps)
  return p_s, c_s, like(problems, repl), like(hp, data), data


def recover_grid(spec: RecoverySpec, params, clamps: Sequence[Clamp], problems: Problem, hp: HParams,
                 keys: Array, mesh: Mesh | None = None, ids=None) -> RecoveryOutput:
  """A grid of G sweep points x N problems in one compiled program.

  clamps: tuple of Clamps whose ``params`` are stacked over G (``intervene.stack_clamps``; SAE
  params shared); hp: HParams with leaves [G]; keys: [G] typed PRNG keys (problem i of point g uses
  ``fold_in(keys[g], ids[i])``, ids [N] default 0..N-1). With a ``mesh`` the points are sharded over
  its ``data`` axis (G must be a multiple of its size; ``sweep.pad_to_multiple``) and problems are replicated; model params
  and SAEs are replicated, or tensor-parallel over a ``model`` axis > 1 (``grid_shardings``; the
  program is then traced under ``jax.set_mesh(mesh)`` so the forward's sharding constraints apply).
  Outputs have leading axes [G, N], sharded over ``data`` with a mesh (on several processes they
  are not fully addressable: ``multihost_utils.process_allgather`` them). Compiled once per
  canonical spec, mesh, the clamps' specs and array shapes.
  """
  clamps = tuple(clamps)
  check_problems(spec, clamps, problems)
  typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
  key_data = jax.random.key_data(keys) if typed else jnp.asarray(keys)
  program = _grid_program(spec.canonical(), mesh)
  ids = problem_ids(problems, ids)
  if mesh is None:
    return program(params, clamps, problems, hp, key_data, ids)
  g, n_data = key_data.shape[0], mesh.shape["data"]
  if g % n_data:
    raise ValueError(f"recover_grid: {g} points do not split over the mesh's data axis of {n_data}")
  args = (params, clamps, problems, hp, key_data)
  args = jax.device_put(args, grid_shardings(spec, mesh, *args)) + (jax.device_put(ids, NamedSharding(mesh, P())),)
  if _model_axis(mesh) == 1:
    return program(*args)
  with jax.set_mesh(mesh):
    return program(*args)
