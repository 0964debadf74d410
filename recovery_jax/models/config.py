"""Static model configuration: one frozen dataclass covers the four decoder-only families."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

Family = Literal["llama", "gemma2", "gemma3", "gpt2"]
FAMILIES = ("llama", "gemma2", "gemma3", "gpt2")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer.

  Everything here is static (hashable, part of the jit cache key); arrays live in the params pytree.
  ``layer_types`` holds ``"full"`` or ``"sliding"`` per layer.

  ``dtype`` is the compute dtype of activations (the Flax/MaxText ``dtype``, not ``param_dtype``):
  the residual stream, projections and MLP run in it, with weights cast to it where they are used,
  so parameters may be stored in any dtype (``load_model(dtype=...)``). Norms, RoPE, attention
  scores and softmax, and logits are computed in float32 whatever ``dtype`` is. ``"float32"``
  (default) with bfloat16 parameters is the recommended accelerator setting (paper-method Q26:
  bf16 weights, f32 residual); ``"bfloat16"`` also halves activation memory and rounds the residual
  stream to bf16 after every block (and after every edit, as the reference does with delta).
  """

  family: Family
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_head: int
  d_mlp: int
  norm_eps: float = 1e-6
  act: Literal["silu", "gelu_tanh", "gelu"] = "silu"
  rope_theta: float = 10000.0
  rope_local_theta: float | None = None  # gemma3: RoPE base of sliding layers
  rope_scaling_factor: float = 1.0  # linear RoPE scaling of full-attention layers
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  attn_softcap: float | None = None
  final_softcap: float | None = None
  query_pre_attn_scalar: float | None = None  # gemma: q is scaled by this**-0.5 instead of d_head**-0.5
  tie_embeddings: bool = True
  n_positions: int = 0  # the context length (gpt2: its learned positions); 0: unknown, not checked
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  name: str = ""
  dtype: str = "float32"  # compute dtype of activations: "float32" or "bfloat16" (see above)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r}: expected one of {FAMILIES}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.layer_types and len(self.layer_types) != self.n_layers:
      raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
    bad = set(self.layer_types) - {"full", "sliding"}
    if bad:
      raise ValueError(f"ModelConfig.layer_types: unknown entries {sorted(bad)}; expected 'full' or 'sliding'")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}: expected one of {DTYPES}")

  @property
  def compute_dtype(self):
    """``dtype`` as a numpy dtype (jnp.float32 / jnp.bfloat16)."""
    return jnp.dtype(self.dtype)

  @property
  def is_gemma(self) -> bool:
    return self.family in ("gemma2", "gemma3")

  @property
  def uses_rope(self) -> bool:
    return self.family != "gpt2"

  @property
  def norm(self) -> str:
    return "layernorm" if self.family == "gpt2" else "rms"

  @property
  def query_scale(self) -> float:
    s = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.d_head
    return float(s) ** -0.5

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    if not self.layer_types:
      return (False,) * self.n_layers
    return tuple(t == "sliding" for t in self.layer_types)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
