"""Tiny stand-ins for smoke runs and tests: a random llama-family model and a byte-level tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recovery_jax.models.config import ModelConfig

BYTE_VOCAB = 256
BOS, EOS = 256, 257  # special tokens of ``byte_tokenizer``


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


def tiny_model(seed: int = 0, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
               d_mlp: int = 128, vocab_size: int = BYTE_VOCAB + 2, name: str = "tiny-random-llama"):
  """Random llama-family (params, ModelConfig) in the layout of ``models/transformer.py``."""
  d_head = d_model // n_heads
  cfg = ModelConfig(family="llama", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                    n_kv_heads=n_kv_heads, d_head=d_head, d_mlp=d_mlp, norm_eps=1e-5, bos_token_id=BOS,
                    eos_token_ids=(EOS,), pad_token_id=EOS, name=name)
  ks = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
  L, D, H, K, E, F = n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp

  def rnd(shape, fan_in):
    return jax.random.normal(next(ks), shape, jnp.float32) / jnp.sqrt(fan_in)

  params = {
      "embed": {"W_E": jax.random.normal(next(ks), (vocab_size, D), jnp.float32)},
      "blocks": {
          "ln1": {"w": 1.0 + 0.1 * jax.random.normal(next(ks), (L, D))},
          "ln2": {"w": 1.0 + 0.1 * jax.random.normal(next(ks), (L, D))},
          "attn": {"W_Q": rnd((L, D, H, E), D), "W_K": rnd((L, D, K, E), D), "W_V": rnd((L, D, K, E), D),
                   "W_O": rnd((L, H, E, D), H * E)},
          "mlp": {"W_in": rnd((L, D, F), D), "W_gate": rnd((L, D, F), D), "W_out": rnd((L, F, D), F)},
      },
      "ln_final": {"w": jnp.ones((D,), jnp.float32)},
  }
  return params, cfg
