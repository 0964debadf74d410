"""Static SAE configuration, with SAELens field names."""

from __future__ import annotations

import dataclasses
from typing import Literal

Architecture = Literal["standard", "jumprelu", "topk", "batchtopk", "gated"]
ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """Architecture and provenance of one SAE.

  Params (SAELens names and shapes): ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in],
  ``b_dec`` [d_in]; ``threshold`` [d_sae] (jumprelu; kept in float32); gated SAEs have ``b_gate``,
  ``r_mag``, ``b_mag`` [d_sae] and no ``b_enc``.

  ``normalize_activations``: ``expected_average_only_in`` is folded into the weights at load time
  (the loaded config then says ``none``); ``constant_norm_rescale`` and ``layer_norm`` run per token.
  ``batchtopk`` at inference is a JumpReLU with the stored (global) ``threshold``.
  """

  architecture: Architecture
  d_in: int
  d_sae: int
  apply_b_dec_to_input: bool = True
  normalize_activations: str = "none"
  k: int | None = None  # topk / batchtopk
  hook_name: str = ""
  model_name: str = ""
  dtype: str = "float32"
  rescale_acts_by_decoder_norm: bool = False  # topk/batchtopk option in SAELens
  prepend_bos: bool | None = None  # as the SAE was trained (SAELens metadata), None when unknown
  context_size: int | None = None
  source: str = ""  # file it was loaded from (provenance; named in error messages)

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"SAEConfig.architecture={self.architecture!r}: expected one of {ARCHITECTURES}")
    if self.normalize_activations not in NORMALIZATIONS:
      raise ValueError(
          f"SAEConfig.normalize_activations={self.normalize_activations!r}: expected one of {NORMALIZATIONS}")
    if self.architecture in ("topk", "batchtopk") and (self.k is None or not 0 < self.k <= self.d_sae):
      raise ValueError(f"SAEConfig.k={self.k!r}: a {self.architecture} SAE needs 0 < k <= d_sae={self.d_sae}")

  def replace(self, **kw) -> "SAEConfig":
    return dataclasses.replace(self, **kw)
