"""Tiny random models and SAEs built directly with jax.random (no loaders) for engine tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from recovery_jax.models.config import ModelConfig
from recovery_jax.sae.config import SAEConfig

VOCAB = 97


def tiny_model(family: str = "llama", *, n_layers: int = 3, d_model: int = 32, n_heads: int = 4,
               n_kv_heads: int = 2, d_mlp: int = 64, vocab: int = VOCAB, seed: int = 0, n_positions: int = 64):
  """(params, cfg) of a tiny random llama or gpt2 model (float32)."""
  d_head = d_model // n_heads
  if family == "gpt2":
    n_kv_heads = n_heads
    cfg = ModelConfig(family="gpt2", vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, d_head=d_head, d_mlp=d_mlp, norm_eps=1e-5, act="gelu_tanh",
                      n_positions=n_positions, tie_embeddings=True, name="tiny-gpt2")
  else:
    cfg = ModelConfig(family="llama", vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, d_head=d_head, d_mlp=d_mlp, norm_eps=1e-5, act="silu",
                      tie_embeddings=False, name="tiny-llama")
  rng = np.random.default_rng(seed)  # NumPy: no per-shape compilation
  nrm = lambda shape, s: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
  L, D, H, K, E, F = n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp
  blocks = {
      "ln1": {"w": 1.0 + nrm((L, D), 0.1)},
      "ln2": {"w": 1.0 + nrm((L, D), 0.1)},
      "attn": {"W_Q": nrm((L, D, H, E), D ** -0.5), "W_K": nrm((L, D, K, E), D ** -0.5),
               "W_V": nrm((L, D, K, E), D ** -0.5), "W_O": nrm((L, H, E, D), (H * E) ** -0.5)},
      "mlp": {"W_in": nrm((L, D, F), D ** -0.5), "W_out": nrm((L, F, D), F ** -0.5)},
  }
  params = {"embed": {"W_E": nrm((vocab, D), 1.0)}, "blocks": blocks, "ln_final": {"w": 1.0 + nrm((D,), 0.1)}}
  if family == "gpt2":
    blocks["ln1"]["b"] = nrm((L, D), 0.1)
    blocks["ln2"]["b"] = nrm((L, D), 0.1)
    blocks["attn"].update(b_Q=nrm((L, H, E), 0.1), b_K=nrm((L, K, E), 0.1), b_V=nrm((L, K, E), 0.1),
                          b_O=nrm((L, D), 0.1))
    blocks["mlp"].update(b_in=nrm((L, F), 0.1), b_out=nrm((L, D), 0.1))
    params["pos_embed"] = {"W_pos": nrm((n_positions, D), 0.5)}
    params["ln_final"]["b"] = nrm((D,), 0.1)
  else:
    blocks["mlp"]["W_gate"] = nrm((L, D, F), D ** -0.5)
    params["unembed"] = {"W_U": nrm((D, vocab), D ** -0.5)}
  return params, cfg


def tiny_sae(d_in: int, d_sae: int = 48, *, architecture: str = "standard", seed: int = 1, site: str = ""):
  """(params, cfg) of a random SAE whose features fire on roughly half the tokens."""
  rng = np.random.default_rng(seed)
  w_dec = rng.standard_normal((d_sae, d_in))
  w_dec = w_dec / np.linalg.norm(w_dec, axis=-1, keepdims=True)
  w_enc = w_dec.T + 0.3 * rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  params = {"W_enc": f32(w_enc), "b_enc": f32(-0.1 * np.abs(rng.standard_normal(d_sae))), "W_dec": f32(w_dec),
            "b_dec": jnp.zeros((d_in,), jnp.float32)}
  if architecture == "jumprelu":
    params["threshold"] = jnp.full((d_sae,), 0.2, jnp.float32)
  cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, hook_name=site)
  return params, cfg


def random_tokens(seed: int, b: int, t: int, vocab: int = VOCAB) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)
