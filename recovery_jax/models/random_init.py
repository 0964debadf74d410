"""Random-weight models in the stacked params layout: the one builder of tiny test models and
benchmark shapes (``loading.load_model("tiny-random-llama")`` and the tests use it).

Two initialisations:
  ``"normal"``  GPT-2 style, N(0, 0.02) with output projections scaled by 1/sqrt(2 n_layers), unit
                norms, zero biases; ``jax.random`` (named tiny models, benchmarks).
  ``"fan_in"``  N(0, 1/fan_in) weights, N(0, 1) embeddings, norm weights 1 + N(0, 0.1^2), biases
                N(0, 0.1^2): activations and logits of order one, so tests see non-trivial numbers;
                NumPy's generator (no per-shape compilation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax.models.config import ModelConfig

INITS = ("normal", "fan_in")
TEST_VOCAB = 97  # vocabulary of ``random_model`` and ``random_tokens`` unless told otherwise


def tiny_config(family: str = "llama", *, vocab_size: int = 128, d_model: int = 64, n_layers: int = 4,
                n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128, name: str = "tiny", **overrides) -> ModelConfig:
  """A small config of ``family`` (gemma sliding windows and softcaps, gpt2 positions); ``overrides``
  are further ``ModelConfig`` fields."""
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
  kw.update(overrides)
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


def init_params(cfg: ModelConfig, key, dtype=jnp.float32, *, init: str = "normal") -> dict:
  """Random params for ``cfg``; ``key`` is a PRNG key or an int seed (``"fan_in"`` needs an int)."""
  if init == "normal":
    if isinstance(key, int):
      key = jax.random.key(key)
    keys = iter(jax.random.split(key, 16))
    w = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)
    params = _layout(cfg, w, fan_in=False, dtype=dtype)
  elif init == "fan_in":
    if not isinstance(key, (int, np.integer)):
      raise TypeError(f"init_params(init='fan_in') takes an int seed, got {type(key).__name__}")
    rng = np.random.default_rng(int(key))
    w = lambda shape, std: jnp.asarray(std * rng.standard_normal(shape), dtype)
    params = _layout(cfg, w, fan_in=True, dtype=dtype)
  else:
    raise ValueError(f"init_params: init={init!r}; expected one of {INITS}")
  return params


def _layout(cfg: ModelConfig, w, *, fan_in: bool, dtype) -> dict:
  """Draws every array in a fixed order with ``w(shape, std)`` (the order fixes the numbers)."""
  D, H, K, E, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.n_layers,
                         cfg.vocab_size)
  std = (lambda n: n ** -0.5) if fan_in else (lambda n: 0.02)
  out_std = (lambda n: n ** -0.5) if fan_in else (lambda n: 0.02 / (2 * L) ** 0.5)
  ones = lambda *shape: jnp.ones(shape, dtype)
  if fan_in:
    norm = lambda *shape: 1.0 + w(shape, 0.1)
    bias = lambda *shape: w(shape, 0.1)
  else:
    norm = ones
    bias = lambda *shape: jnp.zeros(shape, dtype)
  ln1, ln2 = ({"w": norm(L, D)}, {"w": norm(L, D)}) if fan_in else ({}, {})
  attn = {"W_Q": w((L, D, H, E), std(D)), "W_K": w((L, D, K, E), std(D)), "W_V": w((L, D, K, E), std(D)),
          "W_O": w((L, H, E, D), out_std(H * E))}
  mlp = {"W_in": w((L, D, F), std(D)), "W_out": w((L, F, D), out_std(F))}
  if not fan_in:
    ln1, ln2 = {"w": norm(L, D)}, {"w": norm(L, D)}
  embed = {"W_E": w((V, D), 1.0 if fan_in else 0.02)}
  ln_final = {"w": norm(D)}
  blocks = {"ln1": ln1, "ln2": ln2, "attn": attn, "mlp": mlp}
  params = {"embed": embed, "blocks": blocks, "ln_final": ln_final}
  if cfg.family == "gpt2":
    ln1["b"], ln2["b"] = bias(L, D), bias(L, D)
    attn.update(b_Q=bias(L, H, E), b_K=bias(L, K, E), b_V=bias(L, K, E), b_O=bias(L, D))
    mlp.update(b_in=bias(L, F), b_out=bias(L, D))
    params["pos_embed"] = {"W_pos": w((cfg.n_positions, D), 0.5 if fan_in else 0.01)}
    ln_final["b"] = bias(D)
  else:
    mlp["W_gate"] = w((L, D, F), std(D))
  if cfg.is_gemma:
    blocks["ln1_post"] = {"w": norm(L, D)}
    blocks["ln2_post"] = {"w": norm(L, D)}
  if cfg.family == "gemma3":
    attn["q_norm"] = {"w": norm(L, E)}
    attn["k_norm"] = {"w": norm(L, E)}
  if not cfg.tie_embeddings:
    params["unembed"] = {"W_U": w((D, V), std(D))}
  return params


def random_model(family: str = "llama", *, seed: int = 0, init: str = "fan_in", dtype=jnp.float32, n_layers: int = 3,
                 d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 64,
                 vocab_size: int = TEST_VOCAB, **overrides) -> tuple[dict, ModelConfig]:
  """(params, cfg) of a tiny random model of ``family``, test-sized by default.

  Defaults: norm eps 1e-5, untied embeddings for llama (tied for gpt2 and gemma), 64 positions for
  gpt2, name ``tiny-<family>``; ``overrides`` are further ``ModelConfig`` fields.
  """
  kw = dict(norm_eps=1e-5, tie_embeddings=family != "llama", name=f"tiny-{family}")
  if family == "gpt2":
    kw["n_positions"] = 64
  kw.update(overrides)
  cfg = tiny_config(family, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                    n_kv_heads=n_kv_heads, d_mlp=d_mlp, **kw)
  return init_params(cfg, seed, dtype, init=init), cfg


def random_tokens(seed: int, b: int, t: int, vocab: int = TEST_VOCAB) -> np.ndarray:
  """[b, t] int32 token ids drawn uniformly from ``range(vocab)``."""
  return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)
