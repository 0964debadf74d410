"""SAE feature clamps as edits at hook sites, and the clamp as a function transform.

A clamp is split into static structure and traced values:

* ``ClampSpec`` (frozen, hashable; a jit static argument): the site, the SAE config, the mode
  (``set`` / ``multiply`` / ``zero``), ``positive_only``, whether a position mask is used, and how
  the gradient passes through the unclamped part.
* ``ClampParams`` (a pytree of arrays; vmap over it to sweep): feature indices padded to ``K_max``
  with a boolean mask, the clamp value, and an optional mask over absolute positions.

The clamp is sparse: only the selected features are encoded, and the residual changes by

    x' = x + sum_{i in S} (z'_i - z_i) W_dec[i]          (== D(z') + (x - D(z)), the error kept)

Padded slots contribute exactly zero, so an all-masked clamp (or multiply by 1) returns ``x``
bitwise. Gradients (``error_grad``):

* ``"pass"`` (default, the reference's arithmetic): the formula above is differentiated as written:
  ``dx'/dx = I + W_dec[S]^T (dz'_S/dx - dz_S/dx)``. This is exactly the gradient of the reference's
  ``clamp_sae_safe`` (``D(z') + (x - D(z))`` with the error *not* detached), which is the only clamp
  the reference differentiates through (refusal v4 live clamps downstream of a delta).
* ``"stop"`` (SAELens ``use_error_term`` style): ``x' = stop_gradient(x - D(z)) + D(z')``; the
  gradient flows only through the SAE reconstruction. Needs the full SAE encode.

In the frozen defended reference (IOI, WMDP, TPP) the defended residual at the delta site is a
constant, so no gradient passes through that clamp under either option.

Sites are TransformerLens hook names; edits follow ``recovery_jax.models.transformer.forward``:
``fn(x [batch, seq, d_model], positions [batch, seq]) -> x'`` with absolute positions, so a
position mask means the same thing for a full forward, a suffix run from a cached prefix, and
one-token decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax.sae import core as sae_core
from recovery_jax.sae.config import SAEConfig

Array = jax.Array
EditFn = Callable[[Array, Array], Array]

CLAMP_MODES = ("set", "multiply", "zero")
ERROR_GRADS = ("pass", "stop")
SEMANTICS = ("frozen", "live")


@dataclasses.dataclass(frozen=True)
class ClampSpec:
  """Static structure of one clamp (one SAE at one site).

  mode: ``set`` (z'_i = value), ``multiply`` (z'_i = value * z_i) or ``zero`` (z'_i = 0; value ignored).
  positive_only: change only entries with z_i > 0 (the core reference default); else every entry.
  masked_positions: apply only where ``ClampParams.position_mask`` is True (absolute positions).
  error_grad: ``pass`` or ``stop`` (see the module docstring).
  monitor: the recovery engine tracks this clamp's features for drift, projections and metrics.
  """

  site: str
  sae_cfg: SAEConfig
  mode: str = "set"
  positive_only: bool = True
  masked_positions: bool = False
  error_grad: str = "pass"
  monitor: bool = True

  def __post_init__(self):
    if self.mode not in CLAMP_MODES:
      raise ValueError(f"ClampSpec.mode={self.mode!r}: expected one of {CLAMP_MODES}")
    if self.error_grad not in ERROR_GRADS:
      raise ValueError(f"ClampSpec.error_grad={self.error_grad!r}: expected one of {ERROR_GRADS}")


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


def make_clamp_params(feature_idx, value=0.0, *, k_max: int | None = None, feature_mask=None,
                      position_mask=None) -> ClampParams:
  """Builds ClampParams from a list of feature indices, padding to ``k_max`` (host-side helper)."""
  idx = np.asarray(feature_idx, np.int32).reshape(-1)
  mask = np.ones(idx.shape, bool) if feature_mask is None else np.asarray(feature_mask, bool).reshape(-1)
  k_max = idx.size if k_max is None else k_max
  if idx.size > k_max:
    raise ValueError(f"make_clamp_params: {idx.size} features do not fit k_max={k_max}")
  pad = k_max - idx.size
  idx = np.concatenate([idx, np.zeros(pad, np.int32)])
  mask = np.concatenate([mask, np.zeros(pad, bool)])
  pm = None if position_mask is None else jnp.asarray(position_mask, bool)
  return ClampParams(jnp.asarray(idx), jnp.asarray(mask), jnp.asarray(value, jnp.float32), pm)


def stack_clamp_params(cps: Sequence[ClampParams]) -> ClampParams:
  """Stacks ClampParams of equal K_max along a new leading axis (for vmap over feature sets)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *cps)


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


def clamp_dz(spec: ClampSpec, sae, cp: ClampParams, x: Array, positions: Array | None = None):
  """Sparse clamp change. x: [batch, seq, d]. Returns (dz [batch, seq, K], z_S [batch, seq, K]).

  ``dz = z'_S - z_S`` on real features (and clamped positions), exactly 0 elsewhere.
  """
  z = sae_core.encode_subset(sae, spec.sae_cfg, x, cp.feature_idx)
  keep = jnp.asarray(cp.feature_mask, bool)
  if spec.masked_positions:
    if positions is None:
      raise ValueError("a position-masked clamp needs positions")
    keep = keep & position_gate(cp, positions)[..., None]
  dz = jnp.where(keep, clamp_values(spec, z, cp.value) - z, 0.0)
  return dz, z


def clamp_residual(spec: ClampSpec, sae, cp: ClampParams, x: Array, positions: Array | None = None) -> Array:
  """Defended residual: x [batch, seq, d] -> x' [batch, seq, d] (error term kept)."""
  dz, _ = clamp_dz(spec, sae, cp, x, positions)
  if spec.error_grad == "stop":
    cfg = spec.sae_cfg
    xf = x.astype(jnp.float32)
    z = sae_core.encode(sae, cfg, xf)
    z_new = z.at[..., cp.feature_idx].add(dz)
    err = jax.lax.stop_gradient(xf - sae_core.decode(sae, cfg, z, xf))
    return (err + sae_core.decode(sae, cfg, z_new, xf)).astype(x.dtype)
  step = sae_core.decode_delta(sae, spec.sae_cfg, dz, cp.feature_idx, x)
  return x + step.astype(x.dtype)


def clamp_edit(spec: ClampSpec, sae, cp: ClampParams) -> EditFn:
  """The clamp as an edit function ``fn(x, positions) -> x'`` for ``forward(edits=...)``."""
  return lambda x, positions: clamp_residual(spec, sae, cp, x, positions)


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


def clamp_edits(specs: Sequence[ClampSpec], saes: Sequence, cps: Sequence[ClampParams]) -> dict[str, EditFn]:
  """Edit map of several clamps (clamps sharing a site run in the given order)."""
  if not len(specs) == len(saes) == len(cps):
    raise ValueError(f"clamp_edits: {len(specs)} specs, {len(saes)} SAEs and {len(cps)} ClampParams")
  return chain_edits(*({s.site: clamp_edit(s, a, c)} for s, a, c in zip(specs, saes, cps)))


def clamp(forward_fn: Callable, specs: Sequence[ClampSpec] | ClampSpec, saes, cps) -> Callable:
  """Function transform: returns a defended ``forward_fn`` with the same signature.

  The clamp edits run first at their sites; edits passed by the caller to the defended forward
  run after them at the same site (order: clamp -> caller edit -> capture), which is the
  reference's live order (clamp -> add delta -> capture features).

    defended = clamp(transformer.forward, spec, sae_params, clamp_params)
    out = defended(params, cfg, tokens, capture=("blocks.4.hook_resid_pre",))
  """
  if isinstance(specs, ClampSpec):
    specs, saes, cps = (specs,), (saes,), (cps,)
  base = clamp_edits(specs, saes, cps)

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
