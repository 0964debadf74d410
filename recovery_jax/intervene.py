"""SAE feature clamps: the clamp as one object, as an edit at a hook site, and as a function transform.

A ``Clamp`` is one pytree (``flax.struct`` dataclass):

* ``spec``: ``ClampSpec`` (static metadata, part of the jit cache key): the site, the SAE config,
  the mode (``set`` / ``multiply`` / ``zero``), ``positive_only``, position masking, how the
  gradient passes the unclamped part, and the ``error_term`` (keep or drop).
* ``sae``: the SAE params (SAELens names; leaves).
* ``params``: ``ClampParams`` (leaves): feature indices padded to ``K_max`` with a boolean mask,
  the clamp value, an optional mask over absolute positions. A sweep stacks clamps (``stack_clamps``)
  and vmaps over ``params`` (``clamp_axes``) while the SAE stays shared.

With the error term kept (the paper's defence) the clamp is sparse: only the selected features are
encoded, and the residual changes by

    x' = x + sum_{i in S} (z'_i - z_i) W_dec[i]          (== D(z') + (x - D(z)), the error kept)

Padded slots contribute exactly zero, so an all-masked clamp (or multiply by 1) returns ``x``
bitwise. ``error_term="drop"`` inserts the SAE as a full bottleneck: x' = D(z') (the reconstruction
residual x - D(z), where the paper locates recovery, no longer passes; "SAE insertion as a
defence", arXiv 2604.18756). Gradients with the error kept (``error_grad``):

* ``"pass"`` (default, the reference's arithmetic): the formula above is differentiated as written:
  ``dx'/dx = I + W_dec[S]^T (dz'_S/dx - dz_S/dx)``, the gradient of the reference's
  ``clamp_sae_safe`` (``D(z') + (x - D(z))`` with the error *not* detached).
* ``"stop"`` (SAELens ``use_error_term`` style): ``x' = stop_gradient(x - D(z)) + D(z')``; the
  gradient flows only through the SAE reconstruction. Needs the full SAE encode.

Sites are TransformerLens hook names; edits follow ``recovery_jax.models.transformer.forward``:
``fn(x [batch, seq, d_model], positions [batch, seq]) -> x'`` with absolute positions, so a
position mask means the same thing for a full forward, a suffix run from a cached prefix, and
one-token decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from recovery_jax.errors import UserError
from recovery_jax.sae import core as sae_core
from recovery_jax.sae.config import SAEConfig

Array = jax.Array
EditFn = Callable[[Array, Array], Array]

CLAMP_MODES = ("set", "multiply", "zero")
ERROR_GRADS = ("pass", "stop")
ERROR_TERMS = ("keep", "drop")


@dataclasses.dataclass(frozen=True)
class ClampSpec:
  """Static structure of one clamp (one SAE at one site).

  mode: ``set`` (z'_i = value), ``multiply`` (z'_i = value * z_i) or ``zero`` (z'_i = 0; value ignored).
  positive_only: change only entries with z_i > 0 (the core reference default); else every entry.
  masked_positions: apply only where ``ClampParams.position_mask`` is True (absolute positions).
  error_grad: ``pass`` or ``stop`` (with the error term kept; see the module docstring).
  error_term: ``keep`` (x' = x + D(z') - D(z)) or ``drop`` (x' = D(z'): the SAE as a bottleneck).
  monitor: the recovery engine tracks this clamp's features for drift, projections and metrics.
  """

  site: str
  sae_cfg: SAEConfig
  mode: str = "set"
  positive_only: bool = True
  masked_positions: bool = False
  error_grad: str = "pass"
  error_term: str = "keep"
  monitor: bool = True

  def __post_init__(self):
    if self.mode not in CLAMP_MODES:
      raise ValueError(f"ClampSpec.mode={self.mode!r}: expected one of {CLAMP_MODES}")
    if self.error_grad not in ERROR_GRADS:
      raise ValueError(f"ClampSpec.error_grad={self.error_grad!r}: expected one of {ERROR_GRADS}")
    if self.error_term not in ERROR_TERMS:
      raise ValueError(f"ClampSpec.error_term={self.error_term!r}: expected one of {ERROR_TERMS}")


class ClampParams(NamedTuple):
  """Traced values of one clamp.

  feature_idx: [K_max] int32 SAE feature indices (padded; masked entries are ignored).
  feature_mask: [K_max] bool, True for real features. Real indices must be unique.
  value: [] float32 clamp value (set / multiply).
  position_mask: None, or [P] / [batch, P] bool over absolute positions 0..P-1 (positions >= P are
    not clamped); used when ``ClampSpec.masked_positions``.
  """

  feature_idx: Array
  feature_mask: Array
  value: Array
  position_mask: Array | None = None


def is_concrete(a) -> bool:
  """Whether ``a`` can be read on the host now: a numpy array or a fully addressable jax array, not a
  Tracer (under jit / vmap / grad nothing is checked)."""
  if isinstance(a, np.ndarray):
    return True
  return (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
          and getattr(a, "is_fully_addressable", False))


def check_feature_ids(feature_idx, d_sae: int, feature_mask=None, *, what: str = "feature_idx",
                      sae: str = "") -> None:
  """Raises UserError when a real feature id (``feature_mask`` True; any leading stack axes) is
  negative or >= ``d_sae``: indexing would silently read another feature (99999 -> d_sae - 1,
  -3 -> d_sae - 3). Lists and concrete arrays are checked; Tracers are skipped."""
  if isinstance(feature_idx, (list, tuple, int, np.integer)):
    feature_idx = np.asarray(feature_idx)
  if not is_concrete(feature_idx) or (feature_mask is not None and not isinstance(feature_mask, (list, tuple))
                                      and not is_concrete(feature_mask)):
    return
  idx = np.asarray(feature_idx)
  if not idx.size:
    return
  if idx.dtype.kind not in "iu" and not (idx.dtype.kind == "f" and np.all(np.mod(idx, 1) == 0)):
    raise UserError(f"{what}: feature ids {idx.reshape(-1)[:8].tolist()} (dtype {idx.dtype}) are not integers in "
                    f"[0, d_sae={d_sae})")
  real = np.ones(idx.shape, bool) if feature_mask is None else np.asarray(feature_mask, bool)
  try:
    real = np.broadcast_to(real, idx.shape)
  except ValueError as e:
    raise UserError(f"{what}: feature ids of shape {idx.shape} and their mask of shape {real.shape} differ") from e
  bad = real & ((idx < 0) | (idx >= d_sae))
  if bad.any():
    vals = sorted({int(v) for v in idx[bad]})
    more = f" (and {len(vals) - 8} more)" if len(vals) > 8 else ""
    raise UserError(f"{what}: feature id(s) {vals[:8]}{more} outside [0, d_sae={d_sae}) of the SAE{' ' + sae if sae else ''};"
                    " a feature id must satisfy 0 <= id < d_sae")


def make_clamp_params(feature_idx, value=0.0, *, k_max: int | None = None, feature_mask=None,
                      position_mask=None, d_sae: int | None = None) -> ClampParams:
  """Builds ClampParams from a list of feature indices, padding to ``k_max`` (host-side helper);
  with ``d_sae`` the ids are checked to lie in [0, d_sae) (``make_clamp`` always checks)."""
  idx = np.asarray(feature_idx).reshape(-1)
  mask = np.ones(idx.shape, bool) if feature_mask is None else np.asarray(feature_mask, bool).reshape(-1)
  if d_sae is not None:
    check_feature_ids(idx, d_sae, mask)
  if idx.size and (idx.max() > np.iinfo(np.int32).max or idx.min() < np.iinfo(np.int32).min):
    raise UserError(f"feature_idx: feature ids {idx.min()}..{idx.max()} do not fit int32")
  idx = idx.astype(np.int32)
  k_max = idx.size if k_max is None else k_max
  if idx.size > k_max:
    raise ValueError(f"make_clamp_params: {idx.size} features do not fit k_max={k_max}")
  pad = k_max - idx.size
  idx = np.concatenate([idx, np.zeros(pad, np.int32)])
  mask = np.concatenate([mask, np.zeros(pad, bool)])
  pm = None if position_mask is None else jnp.asarray(position_mask, bool)
  return ClampParams(jnp.asarray(idx), jnp.asarray(mask), jnp.asarray(value, jnp.float32), pm)


# ----------------------------------------------------------------------------------------------
# the clamp maths


def clamp_values(spec: ClampSpec, z: Array, value: Array) -> Array:
  """Replacement activations z' for the selected features: z [..., K] -> [..., K]."""
  if spec.mode == "zero":
    new = jnp.zeros_like(z)
  elif spec.mode == "set":
    new = jnp.broadcast_to(jnp.asarray(value, z.dtype), z.shape)
  else:
    new = z * jnp.asarray(value, z.dtype)
  if spec.positive_only:
    new = jnp.where(z > 0, new, z)
  return new


def position_gate(cp: ClampParams, positions: Array) -> Array:
  """[batch, seq] bool: whether each absolute position is clamped under ``cp.position_mask``."""
  pm = cp.position_mask
  if pm is None:
    raise ValueError("a ClampSpec with masked_positions=True needs ClampParams.position_mask")
  pm = jnp.asarray(pm, bool)
  if pm.ndim == 1:
    pm = pm[None]
  pm = jnp.broadcast_to(pm, (positions.shape[0], pm.shape[-1]))
  p = pm.shape[-1]
  inside = (positions >= 0) & (positions < p)
  return jnp.take_along_axis(pm, jnp.clip(positions, 0, p - 1), axis=1) & inside


@struct.dataclass
class Clamp:
  """One clamp: static ``spec`` (pytree metadata), SAE params and ``ClampParams`` (leaves).

  Call it as an edit: ``clamp(x [batch, seq, d], positions [batch, seq]) -> x'``.
  """

  spec: ClampSpec = struct.field(pytree_node=False)
  sae: dict
  params: ClampParams

  def __post_init__(self):
    """Concrete feature ids (numpy or jax arrays, not Tracers) must lie in [0, d_sae); a concrete
    clamp value must be finite."""
    p = self.params
    if isinstance(p, ClampParams) and isinstance(self.spec, ClampSpec):
      where = f"at {self.spec.site!r}" + (f" ({self.sae_cfg.source})" if self.sae_cfg.source else "")
      check_feature_ids(p.feature_idx, self.sae_cfg.d_sae, p.feature_mask, what=f"clamp {where}: feature_idx")
      if is_concrete(p.value) and not np.isfinite(np.asarray(p.value, np.float32)).all():
        raise UserError(f"clamp {where}: clamp value {np.asarray(p.value).tolist()} is not finite")

  @property
  def site(self) -> str:
    return self.spec.site

  @property
  def sae_cfg(self) -> SAEConfig:
    return self.spec.sae_cfg

  @property
  def mask(self) -> Array:
    """[K] bool: real (unpadded) features."""
    return jnp.asarray(self.params.feature_mask, bool)

  def features(self, x: Array) -> Array:
    """Activations of the selected features: x [..., d] -> z_S [..., K]."""
    return sae_core.encode_subset(self.sae, self.sae_cfg, x, self.params.feature_idx)

  def pre_features(self, x: Array) -> Array:
    """Pre-activations of the selected features: x [..., d] -> [..., K]."""
    return sae_core.encode_pre_subset(self.sae, self.sae_cfg, x, self.params.feature_idx)

  def decoder_rows(self) -> Array:
    """[K, d] float32 effective decoder rows of the selected features (zero rows where masked):
    what a unit change of z_i adds to the (normalised) SAE output."""
    w = sae_core.effective_decoder(self.sae, self.sae_cfg)[self.params.feature_idx]
    return w.astype(jnp.float32) * self.mask.astype(jnp.float32)[:, None]

  def encoder_columns(self) -> Array:
    """[d, K] float32 effective encoder directions of the selected features (zero where masked):
    the gradient of their pre-activations w.r.t. the SAE input (``sae_core.encoder_columns``)."""
    w = sae_core.encoder_columns(self.sae, self.sae_cfg, self.params.feature_idx)
    return w.astype(jnp.float32) * self.mask.astype(jnp.float32)[None]

  def change(self, x: Array, positions: Array | None = None) -> tuple[Array, Array]:
    """Sparse clamp change. x: [batch, seq, d] -> (dz [batch, seq, K], z_S [batch, seq, K]).

    ``dz = z'_S - z_S`` on real features (and clamped positions), exactly 0 elsewhere.
    """
    z = self.features(x)
    keep = self.mask
    if self.spec.masked_positions:
      if positions is None:
        raise ValueError("a position-masked clamp needs positions")
      keep = keep & position_gate(self.params, positions)[..., None]
    dz = jnp.where(keep, clamp_values(self.spec, z, self.params.value) - z, 0.0)
    return dz, z

  def __call__(self, x: Array, positions: Array | None = None) -> Array:
    """Defended residual: x [batch, seq, d] -> x' [batch, seq, d]."""
    dz, _ = self.change(x, positions)
    spec, cfg, idx = self.spec, self.sae_cfg, self.params.feature_idx
    if spec.error_term == "drop" or spec.error_grad == "stop":
      xf = x.astype(jnp.float32)
      z = sae_core.encode(self.sae, cfg, xf)
      recon = sae_core.decode(self.sae, cfg, z.at[..., idx].add(dz), xf)
      if spec.error_term == "drop":
        return recon.astype(x.dtype)
      err = jax.lax.stop_gradient(xf - sae_core.decode(self.sae, cfg, z, xf))
      return (err + recon).astype(x.dtype)
    return x + sae_core.decode_delta(self.sae, cfg, dz, idx, x).astype(x.dtype)


def make_clamp(spec: ClampSpec, sae, feature_idx, value=0.0, **kw) -> Clamp:
  """A Clamp from a spec, SAE params and a list of feature indices (``make_clamp_params`` kwargs);
  ids outside [0, d_sae) are a UserError."""
  kw.setdefault("d_sae", spec.sae_cfg.d_sae)
  return Clamp(spec, sae, make_clamp_params(feature_idx, value, **kw))


def with_params(clamp: Clamp, params: ClampParams) -> Clamp:
  return clamp.replace(params=params)


def stack_clamps(clamps: Sequence[Clamp]) -> Clamp:
  """Stacks the ``params`` of clamps that share spec and SAE (a sweep over feature sets, clamp
  values): one Clamp whose ClampParams leaves gain a leading axis; vmap it with ``clamp_axes``."""
  first = clamps[0]
  if any(c.spec != first.spec for c in clamps):
    raise ValueError("stack_clamps: every clamp must have the same ClampSpec")
  return first.replace(params=jax.tree.map(lambda *xs: jnp.stack(xs), *(c.params for c in clamps)))


def clamp_axes(clamps: Sequence[Clamp], axis: int | None = 0) -> tuple:
  """vmap ``in_axes`` for a tuple of (stacked) clamps: ClampParams mapped, SAE params shared."""
  return tuple(Clamp(c.spec, None, jax.tree.map(lambda _: axis, c.params)) for c in clamps)


def check_clamps(clamps: Sequence[Clamp], d_model: int) -> None:
  """Shape checks at a public boundary (host or trace time; params may carry leading stack axes)."""
  for c in clamps:
    chex.assert_equal_shape([c.params.feature_idx, c.params.feature_mask])
    chex.assert_type(c.params.feature_idx, int)
    if c.sae_cfg.d_in != d_model:
      raise ValueError(f"clamp at {c.site!r}: SAE d_in={c.sae_cfg.d_in} != model d_model={d_model}")


def clamp_residual(spec: ClampSpec, sae, cp: ClampParams, x: Array, positions: Array | None = None) -> Array:
  """Defended residual of one clamp given as parts (see ``Clamp``)."""
  return Clamp(spec, sae, cp)(x, positions)


def chain_edits(*edit_maps: Mapping[str, EditFn]) -> dict[str, EditFn]:
  """Merges edit maps; where several edit one site they run in argument order."""
  out: dict[str, EditFn] = {}
  for m in edit_maps:
    for site, fn in (m or {}).items():
      if site in out:
        first = out[site]
        out[site] = lambda x, p, f=first, g=fn: g(f(x, p), p)
      else:
        out[site] = fn
  return out


def clamp_edits(clamps: Sequence[Clamp]) -> dict[str, EditFn]:
  """Edit map of several clamps (clamps sharing a site run in the given order)."""
  return chain_edits(*({c.site: c} for c in clamps))


def clamp(forward_fn: Callable, clamps: Sequence[Clamp] | Clamp) -> Callable:
  """Function transform: returns a defended ``forward_fn`` with the same signature.

  The clamp edits run first at their sites; edits passed by the caller to the defended forward
  run after them at the same site (order: clamp -> caller edit -> capture), which is the
  reference's live order (clamp -> add delta -> capture features).

    defended = clamp(transformer.forward, make_clamp(spec, sae_params, feature_ids, -5.0))
    out = defended(params, cfg, tokens, capture=("blocks.4.hook_resid_pre",))
  """
  base = clamp_edits((clamps,) if isinstance(clamps, Clamp) else tuple(clamps))

  def defended(*args, edits: Mapping[str, EditFn] | None = None, **kwargs):
    return forward_fn(*args, edits=chain_edits(base, edits or {}), **kwargs)

  return defended


# ----------------------------------------------------------------------------------------------
# additive edits (recovery deltas)


def placement(cols: Array, valid: Array, start: Array | int, length: int) -> Array:
  """One-hot placement [batch, length, P] of delta rows into a chunk of columns.

  cols: [batch, P] column (token index) of each delta row; valid: [batch, P] bool; the chunk
  covers columns [start, start + length).
  """
  rel = cols - start
  hit = rel[:, None, :] == jnp.arange(length, dtype=rel.dtype)[None, :, None]
  return (hit & valid[:, None, :]).astype(jnp.float32)


def add_rows(x: Array, place: Array, rows: Array) -> Array:
  """x [batch, seq, d] + rows [P, d] (shared) or [batch, P, d] placed by ``place`` [batch, seq, P]."""
  if rows.ndim == 2:
    add = jnp.einsum("bsp,pd->bsd", place, rows.astype(jnp.float32))
  else:
    add = jnp.einsum("bsp,bpd->bsd", place, rows.astype(jnp.float32))
  return x + add.astype(x.dtype)


def add_edit(place: Array, rows: Array) -> EditFn:
  """Edit adding ``rows`` at the columns of ``place`` (ignores absolute positions)."""
  return lambda x, positions: add_rows(x, place, rows)


def add_at_positions_edit(rows: Array, at: Array, valid: Array | None = None) -> EditFn:
  """Edit adding ``rows`` [P, d] (or [batch, P, d]) where the *absolute* position equals ``at``
  [batch, P]: the same edit works for a full forward, a prefill and one-token KV-cached decoding
  (e.g. a recovered delta applied during generation)."""
  valid = jnp.ones(at.shape, bool) if valid is None else valid

  def fn(x, positions):
    place = ((positions[:, :, None] == at[:, None, :]) & valid[:, None, :]).astype(jnp.float32)
    return add_rows(x, place, rows)

  return fn
