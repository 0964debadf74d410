"""Random-weight models in the stacked params layout (tiny CI models, benchmark shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recovery_jax.models.config import ModelConfig


def tiny_config(family: str = "llama", *, vocab_size: int = 128, d_model: int = 64, n_layers: int = 4,
                n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128, name: str = "tiny") -> ModelConfig:
  """A small config of ``family`` for tests and smoke runs."""
  kw = {}
  if family in ("gemma2", "gemma3"):
    kw = dict(sliding_window=8, layer_types=tuple("full" if (i + 1) % 2 == 0 else "sliding" for i in range(n_layers)),
              act="gelu_tanh", query_pre_attn_scalar=d_model // n_heads)
    if family == "gemma2":
      kw.update(attn_softcap=50.0, final_softcap=30.0)
    else:
      kw.update(rope_local_theta=10000.0, rope_theta=1e6)
  if family == "gpt2":
    kw = dict(act="gelu_tanh", n_positions=256, norm_eps=1e-5)
    n_kv_heads = n_heads
  return ModelConfig(family=family, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, d_head=d_model // n_heads, d_mlp=d_mlp, name=name, **kw)


def gpt2_small_config(vocab_size: int = 50257) -> ModelConfig:
  """GPT-2 small's shape (124M): 12 layers, d_model 768, 12 heads."""
  return ModelConfig(family="gpt2", vocab_size=vocab_size, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                     d_head=64, d_mlp=3072, act="gelu_tanh", n_positions=1024, norm_eps=1e-5, name="gpt2-small-random")


def _gemma2_shape(name: str, *, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_head: int,
                  d_mlp: int, query_pre_attn_scalar: float) -> ModelConfig:
  return ModelConfig(family="gemma2", vocab_size=256000, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, d_head=d_head, d_mlp=d_mlp, act="gelu_tanh", sliding_window=4096,
                     layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers)),
                     attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=query_pre_attn_scalar,
                     tie_embeddings=True, bos_token_id=2, eos_token_ids=(1, 107), pad_token_id=0, name=name)


def gemma2_9b_config() -> ModelConfig:
  """Gemma 2 9B's shape: 42 layers, d_model 3584, 16 heads / 8 KV heads of 256, d_mlp 14336, vocab 256000."""
  return _gemma2_shape("gemma-2-9b-shape", d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, d_head=256,
                       d_mlp=14336, query_pre_attn_scalar=256)


def gemma2_27b_config() -> ModelConfig:
  """Gemma 2 27B's shape: 46 layers, d_model 4608, 32 heads / 16 KV heads of 128, d_mlp 36864, vocab 256000."""
  return _gemma2_shape("gemma-2-27b-shape", d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16, d_head=128,
                       d_mlp=36864, query_pre_attn_scalar=144)


def llama3_70b_config() -> ModelConfig:
  """Llama 3 70B's shape: 80 layers, d_model 8192, 64 heads / 8 KV heads of 128, d_mlp 28672, vocab 128256
  (untied unembedding; RoPE base 500000, Llama 3.1's frequency-dependent RoPE scaling not modelled)."""
  return ModelConfig(family="llama", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                     d_head=128, d_mlp=28672, norm_eps=1e-5, act="silu", rope_theta=500000.0, tie_embeddings=False,
                     bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama-3-70b-shape")


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
  """Gaussian weights (std 0.02, output projections scaled by 1/sqrt(2 n_layers)), unit norms."""
  D, H, K, E, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.n_layers,
                         cfg.vocab_size)
  keys = iter(jax.random.split(key, 16))
  w = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)
  out_std = 0.02 / (2 * L) ** 0.5
  ones = lambda *shape: jnp.ones(shape, dtype)
  zeros = lambda *shape: jnp.zeros(shape, dtype)
  attn = {"W_Q": w((L, D, H, E)), "W_K": w((L, D, K, E)), "W_V": w((L, D, K, E)), "W_O": w((L, H, E, D), out_std)}
  mlp = {"W_in": w((L, D, F)), "W_out": w((L, F, D), out_std)}
  blocks = {"ln1": {"w": ones(L, D)}, "ln2": {"w": ones(L, D)}, "attn": attn, "mlp": mlp}
  params = {"embed": {"W_E": w((V, D))}, "blocks": blocks, "ln_final": {"w": ones(D)}}
  if cfg.family == "gpt2":
    for n in ("ln1", "ln2"):
      blocks[n]["b"] = zeros(L, D)
    attn.update(b_Q=zeros(L, H, E), b_K=zeros(L, K, E), b_V=zeros(L, K, E), b_O=zeros(L, D))
    mlp.update(b_in=zeros(L, F), b_out=zeros(L, D))
    params["ln_final"]["b"] = zeros(D)
    params["pos_embed"] = {"W_pos": w((cfg.n_positions, D), 0.01)}
  else:
    mlp["W_gate"] = w((L, D, F))
  if cfg.is_gemma:
    blocks["ln1_post"] = {"w": ones(L, D)}
    blocks["ln2_post"] = {"w": ones(L, D)}
  if cfg.family == "gemma3":
    attn["q_norm"] = {"w": ones(L, E)}
    attn["k_norm"] = {"w": ones(L, E)}
  if not cfg.tie_embeddings:
    params["unembed"] = {"W_U": w((D, V))}
  return params
