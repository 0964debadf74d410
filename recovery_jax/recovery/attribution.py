"""Recovery-path attribution (paper section 6 / App. J; paper-method 9.4, Q24).

Decompose an optimised delta, per (site, position), with the *full* SAE encode at the defended
residual h_def of that (site, position):

  dz            = E(h_def + delta) - E(h_def)                                  [..., d_sae]
  sae_feature   = sum_i dz_i W_dec[i]          (= D(E(h_rec)) - D(E(h_def)) for un-normalised SAEs)
  residual      = delta - sae_feature
  clamped       = sum_{i in S} dz_i W_dec[i]
  nonclamped    = sum_{i not in S} dz_i W_dec[i]
  topk          = the k non-clamped features with the largest |dz_i| (per site and position)
  knockout      = delta - topk

so that clamped + nonclamped + residual == delta. Each component is then *replayed* in place of
delta under the same active clamp (``replay``), and the knockout measures how much recovery
depends on the top-k non-clamped directions.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from recovery_jax.intervene import Clamp
from recovery_jax.models import sites as sites_lib
from recovery_jax.recovery import engine
from recovery_jax.sae import core as sae_core

Array = jax.Array

COMPONENTS = ("full", "residual", "nonclamped", "topk", "clamped", "knockout", "sae_feature")


class Components(NamedTuple):
  """Components of delta, each shaped like delta, plus the feature change dz [..., d_sae]."""

  full: Array
  residual: Array
  nonclamped: Array
  topk: Array
  clamped: Array
  knockout: Array
  sae_feature: Array
  dz: Array

  def stacked(self) -> Array:
    """[len(COMPONENTS), ...] in ``COMPONENTS`` order (for a batched replay)."""
    return jnp.stack([getattr(self, n) for n in COMPONENTS])


def decompose(clamp: Clamp, h_def: Array, delta: Array, k: int = 10) -> Components:
  """Decomposes ``delta`` [..., d] at defended residuals ``h_def`` [..., d] with ``clamp``'s SAE;
  the clamped set S is its (masked) feature set. k: size of the top-k set (Q24: unknown in the
  reference; 10 by default)."""
  sae, sae_cfg = clamp.sae, clamp.sae_cfg
  h = h_def.astype(jnp.float32)
  dl = delta.astype(jnp.float32)
  dz = sae_core.encode(sae, sae_cfg, h + dl) - sae_core.encode(sae, sae_cfg, h)
  d_sae = dz.shape[-1]
  in_s = jnp.zeros((d_sae,), jnp.float32).at[clamp.params.feature_idx].max(clamp.mask.astype(jnp.float32)) > 0
  dec = lambda z: sae_core.decode_delta(sae, sae_cfg, z, jnp.arange(d_sae), h)
  dz_s = jnp.where(in_s, dz, 0.0)
  dz_n = jnp.where(in_s, 0.0, dz)
  kk = min(k, d_sae)
  _, top = jax.lax.top_k(jnp.abs(dz_n), kk)
  top_mask = jnp.put_along_axis(jnp.zeros(dz.shape, bool), top, True, axis=-1, inplace=False) & ~in_s
  clamped, nonclamped, topk = dec(dz_s), dec(dz_n), dec(jnp.where(top_mask, dz_n, 0.0))
  feat = clamped + nonclamped
  residual = dl - feat
  return Components(full=dl, residual=residual, nonclamped=nonclamped, topk=topk, clamped=clamped,
                    knockout=dl - topk, sae_feature=feat, dz=dz)


def clamp_at(spec: engine.RecoverySpec, clamps: Sequence[Clamp], site: str) -> Clamp | None:
  """The first clamp acting on the residual vector of ``site`` (None if there is none)."""
  for c in clamps:
    if sites_lib.same_residual(c.site, site, spec.model_cfg.n_layers):
      return c
  return None


def decompose_sites(spec: engine.RecoverySpec, clamps: Sequence[Clamp], h_def: Array, delta: Array,
                    k: int = 10) -> Components:
  """Decomposes a multi-site delta [n_sites, P, d] at h_def [n_sites, P, d] (one row of the
  engine's ``h_def`` [n_sites, B, P, d]); each site uses the first clamp on its residual vector."""
  parts = []
  for si, site in enumerate(spec.delta_sites):
    c = clamp_at(spec, clamps, site)
    if c is None:
      raise ValueError(f"decompose_sites: no clamp (SAE) acts on the residual at delta site {site!r}")
    parts.append(decompose(c, h_def[si], delta[si], k))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def energy_fractions(comp: Components) -> dict[str, Array]:
  """||component||^2 / ||delta||^2 and the component L2 norms."""
  tot = jnp.sum(jnp.square(comp.full))
  out = {}
  for n in COMPONENTS:
    e = jnp.sum(jnp.square(getattr(comp, n)))
    out[f"{n}_norm"] = jnp.sqrt(e)
    out[f"{n}_energy"] = e / jnp.maximum(tot, 1e-30)
  return out


def replay(spec: engine.RecoverySpec, params, clamps: Sequence[Clamp], pb: engine.Problem,
           comp: Components) -> dict[str, engine.Eval]:
  """Evaluates every component in place of delta under the active clamps (one batched program):
  name -> Eval(objective, rows [B], monitored features)."""
  ev = engine.evaluate(spec, params, clamps, pb, comp.stacked())
  return {n: jax.tree.map(lambda a, i=i: a[i], ev) for i, n in enumerate(COMPONENTS)}
