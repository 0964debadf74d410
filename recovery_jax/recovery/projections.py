"""Projections that keep the recovery delta away from the defended features.

The delta is a single array [n_sites, P, d]. Two families:

* Encoder projections (per site, per row): the null space of the selected encoder columns
  ``A = W_enc[:, S]`` [d, K] of the clamps at that site.
  - ``encoder`` (reference ``project_to_encoder_null``): ``g - A (A^T A + ridge I)^-1 A^T g``.
  - ``encoder_exact``: the orthogonal projector onto null(A^T) (SVD basis, rank-revealing).
  Masked (padded) features are zero columns, which the ridge solve and the SVD both ignore.
* Jacobian projections (all sites and rows jointly): the row space of the map delta -> monitored
  features c (flattened, masked).
  - ``jacobian`` (reference ``build_jacobian_basis``): VJPs of a drift probe and n Gaussian probes,
    modified Gram-Schmidt in order, keeping vectors with norm > 1e-7.
  - ``jacobian_exact``: the full row space of J (SVD, relative rank cutoff).

A projector is represented as ``(U, V)`` with ``P(g) = g - (g U) V^T`` applied row-wise (encoder,
U/V: [n_sites, d, K]) or as an orthonormal basis ``Q`` [n_basis, n_delta] with ``P(g) = g - Q^T(Q g)``
(Jacobian).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

PROJECTIONS = ("none", "encoder", "encoder_exact", "jacobian", "jacobian_exact")


class EncoderProjector(NamedTuple):
  """Row-wise projector per site: P(g_s) = g_s - (g_s U_s) V_s^T; U, V: [n_sites, d, K]."""

  u: Array
  v: Array


def ridge_projector(a: Array, ridge: Array | float) -> EncoderProjector:
  """Reference ridge solve. a: [n_sites, d, K] masked encoder columns (zeros for padding)."""
  a = a.astype(jnp.float32)
  gram = jnp.einsum("sdk,sdl->skl", a, a)
  eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
  # B = A (A^T A + ridge I)^-1 so that A coeff = B A^T g (gram is symmetric)
  b = jnp.swapaxes(jnp.linalg.solve(gram + ridge * eye, jnp.swapaxes(a, 1, 2)), 1, 2)
  return EncoderProjector(a, b)


def orthonormal_columns(a: Array, rtol: float | None = None) -> Array:
  """Orthonormal basis of span(a) as columns [d, K] (zeros beyond the numerical rank)."""
  u, s, _ = jnp.linalg.svd(a.astype(jnp.float32), full_matrices=False)
  if rtol is None:
    rtol = max(a.shape) * jnp.finfo(jnp.float32).eps
  keep = s > rtol * jnp.max(s, initial=0.0)
  return u * keep[None, :].astype(u.dtype)


def exact_projector(a: Array, rtol: float | None = None) -> EncoderProjector:
  """Orthogonal projector onto null(A^T) per site; a: [n_sites, d, K]."""
  q = jax.vmap(lambda x: orthonormal_columns(x, rtol))(a)
  return EncoderProjector(q, q)


def apply_encoder(proj: EncoderProjector, g: Array) -> Array:
  """g: [n_sites, P, d] -> projected rows."""
  coeff = jnp.einsum("spd,sdk->spk", g, proj.u)
  return g - jnp.einsum("spk,sdk->spd", coeff, proj.v)


# ----------------------------------------------------------------------------------------------
# Jacobian row-space bases (flattened delta space)


def gram_schmidt(vectors: Array, tol: float = 1e-7) -> Array:
  """Sequential modified Gram-Schmidt: [n, D] -> [n, D], dropped vectors are zero rows."""

  def body(i, basis):
    q = apply_basis(basis, vectors[i])  # rows >= i are still zero: no-ops
    n = jnp.linalg.norm(q)
    keep = n > tol
    return basis.at[i].set(jnp.where(keep, q / jnp.where(keep, n, 1.0), 0.0))

  return jax.lax.fori_loop(0, vectors.shape[0], body, jnp.zeros_like(vectors))


def sketch_probes(key: Array, c: Array, r: Array, mask: Array, n_probes: int, drift_probe: bool) -> Array:
  """Cotangent probes in feature space [n, n_c]: the unit drift direction (if ||c-r|| > 1e-8, else
  a zero probe) followed by ``n_probes`` Gaussian unit vectors over the valid entries."""
  m = mask.astype(jnp.float32)
  probes = []
  if drift_probe:
    d = (c - r) * m
    dn = jnp.linalg.norm(d)
    probes.append(jnp.where(dn > 1e-8, d / jnp.where(dn > 1e-8, dn, 1.0), 0.0))
  if n_probes > 0:
    g = jax.random.normal(key, (n_probes, c.shape[0]), jnp.float32) * m
    g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-8)
    probes.extend(list(g))
  return jnp.stack(probes) if probes else jnp.zeros((0, c.shape[0]), jnp.float32)


def rowspace_basis(jac: Array, rtol: float | None = None) -> Array:
  """Orthonormal basis of the row space of jac [n_c, n_delta] as rows [n_c, n_delta]."""
  return orthonormal_columns(jac.T, rtol).T


def apply_basis(basis: Array, g: Array) -> Array:
  """Removes the span of orthonormal rows ``basis`` [n, D] from flat g [D] (reference order: one
  vector at a time)."""

  def body(i, g):
    b = basis[i]
    return g - jnp.dot(g, b) * b

  return jax.lax.fori_loop(0, basis.shape[0], body, g)
