"""Random SAEs for tests, smoke runs and benchmarks (the one builder), and the byte-level tiny model
that the SAE trainer's smoke config uses."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from recovery_jax.models import random_init
from recovery_jax.sae.config import SAEConfig

BYTE_VOCAB = 256
BOS, EOS = 256, 257  # special tokens of ``byte_tokenizer``


def random_sae(d_in: int, d_sae: int = 48, *, architecture: str = "standard", seed: int = 1, site: str = "",
               model_name: str = "", k: int | None = None, enc_noise: float = 0.3, b_enc: float = -0.1,
               b_dec: float = 0.0, threshold: float = 0.2, apply_b_dec_to_input: bool = False,
               ) -> tuple[dict, SAEConfig]:
  """(params, SAEConfig) of a random SAE in SAELens names and shapes.

  ``W_dec`` rows have unit norm, ``W_enc = W_dec.T + enc_noise * N(0, 1/d_in)``,
  ``b_enc = b_enc * |N(0, 1)|`` (negative: features fire on roughly half of unit-scale inputs),
  ``b_dec = b_dec * N(0, 1)`` (zero unless asked), JumpReLU ``threshold`` per feature, and for
  topk/batchtopk ``k`` (default ``d_sae // 8``). Drawn with NumPy's generator in that order, so the
  arrays of a given seed do not change when ``b_dec`` or the architecture do.
  """
  rng = np.random.default_rng(seed)
  w_dec = rng.standard_normal((d_sae, d_in))
  w_dec = w_dec / np.linalg.norm(w_dec, axis=-1, keepdims=True)
  w_enc = w_dec.T + enc_noise * rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  params = {"W_enc": f32(w_enc), "b_enc": f32(b_enc * np.abs(rng.standard_normal(d_sae))), "W_dec": f32(w_dec),
            "b_dec": f32(b_dec * rng.standard_normal(d_in)) if b_dec else jnp.zeros((d_in,), jnp.float32)}
  if architecture == "jumprelu":
    params["threshold"] = jnp.full((d_sae,), threshold, jnp.float32)
  if architecture in ("topk", "batchtopk") and k is None:
    k = max(1, d_sae // 8)
  cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec_to_input,
                  hook_name=site, model_name=model_name, k=k)
  return params, cfg


def byte_tokenizer():
  """``tokenizers.Tokenizer`` over the 256 byte symbols (no merges) plus ``<bos>``=256, ``<eos>``=257."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {c: i for i, c in enumerate(sorted(alphabet))}
  tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens([AddedToken("<bos>", special=True), AddedToken("<eos>", special=True)])
  return tk


def tiny_model(seed: int = 0):
  """Random llama-family (params, ModelConfig) over ``byte_tokenizer``'s 258 ids (2 layers, d_model 64)."""
  return random_init.random_model("llama", seed=seed, n_layers=2, d_model=64, d_mlp=128,
                                  vocab_size=BYTE_VOCAB + 2, tie_embeddings=True, bos_token_id=BOS,
                                  eos_token_ids=(EOS,), pad_token_id=EOS, name="tiny-random-llama")
