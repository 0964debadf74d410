"""The refusal defence: SAE refusal features steered at several ``hook_resid_post`` sites, all positions,
live (paper-method 6.3), as edits for the forward pass and for every KV-cached generation step.

Named defences (``DEFENCES``):

  multiply  the paper's ``clamp_sae_safe(3.0, multiply=True, pos="all")``: z_S <- m * z_S at every circuit
            site, the SAE error kept (x' = x + sum_i (m - 1) z_i W_dec[i]). A ``Clamp`` of mode
            ``multiply`` per site; inactive features (z_i = 0) stay 0, so it does nothing where the
            features do not fire on the prompts.
  set       z_S <- v whether the feature is active or not (``Clamp`` mode ``set``, ``positive_only=False``):
            x' = x + sum_i (v - z_i) W_dec[i]; the clamp form of SAELens-style steering.
  add       SAELens's steering convention: x' = x + v * sum_i W_dec[i] at every position (a fixed
            vector, independent of the activations; no SAE encode), ``AddSteer``.

A defence is a tuple of edit objects (``Clamp`` or ``AddSteer``), one per site, each a pytree whose
arrays are leaves: pass it as traced ``edit_args`` to ``generate.generate_jit(make_edits=edits)``.
``error_term="drop"`` (multiply/set) makes each SAE a full bottleneck (x' = D(z')).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from recovery_jax import intervene
from recovery_jax.sae import core as sae_core

Array = jax.Array
DEFENCES = ("multiply", "set", "add")


@struct.dataclass
class AddSteer:
  """SAELens steering at one site: x' = x + value * sum_{i in S} W_dec[i] (masked rows are 0).

  directions: [K, d] effective decoder rows of the selected features; mask: [K] bool; value: [].
  """

  site: str = struct.field(pytree_node=False)
  directions: Array
  mask: Array
  value: Array

  def vector(self) -> Array:
    """[d] the added steering vector."""
    return self.value * jnp.sum(self.directions * self.mask[:, None].astype(self.directions.dtype), axis=0)

  def __call__(self, x: Array, positions: Array | None = None) -> Array:
    del positions  # every position
    return x + self.vector().astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DefenceSpec:
  """Static structure of a refusal defence: the kind (``DEFENCES``) and the SAE error term."""

  kind: str = "multiply"
  error_term: str = "keep"

  def __post_init__(self):
    if self.kind not in DEFENCES:
      raise ValueError(f"defence kind {self.kind!r}: expected one of {DEFENCES}")
    if self.error_term not in intervene.ERROR_TERMS:
      raise ValueError(f"defence error_term {self.error_term!r}: expected one of {intervene.ERROR_TERMS}")
    if self.kind == "add" and self.error_term != "keep":
      raise ValueError("the additive steering defence has no SAE pass; error_term must be 'keep'")


def make_defence(spec: DefenceSpec, saes: Mapping[str, tuple], features: Mapping[str, Sequence[int]], value: float,
                 k_max: int | None = None) -> tuple:
  """One edit per site of ``features`` (site -> feature ids; sites with no features are skipped).

  saes: site -> (SAE params, SAEConfig). value: m (multiply) or v (set, add). ``k_max`` pads every
  site's feature list to one length (default: the longest list), so defences of one shape stack.
  """
  sites = [s for s in features if len(features[s])]
  if not sites:
    raise ValueError("make_defence: no features at any site")
  k_max = k_max or max(len(features[s]) for s in sites)
  out = []
  for site in sites:
    if site not in saes:
      raise ValueError(f"make_defence: no SAE for site {site!r}; SAEs at {sorted(saes)}")
    sae, cfg = saes[site]
    if spec.kind == "add":
      cp = intervene.make_clamp_params(features[site], value, k_max=k_max, d_sae=cfg.d_sae)
      rows = sae_core.effective_decoder(sae, cfg)[cp.feature_idx].astype(jnp.float32)
      out.append(AddSteer(site, rows, cp.feature_mask, cp.value))
    else:
      cs = intervene.ClampSpec(site=site, sae_cfg=cfg, mode=spec.kind, positive_only=spec.kind == "multiply",
                               error_term=spec.error_term)
      out.append(intervene.make_clamp(cs, sae, features[site], value, k_max=k_max))
  return tuple(out)


def edits(defence: Sequence) -> dict:
  """Edit map (site -> fn(x, positions)) of a defence; a static builder for ``generate_jit(make_edits=...)``."""
  return intervene.chain_edits(*({d.site: d} for d in defence))
