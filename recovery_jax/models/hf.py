"""Hugging Face checkpoints: config.json + safetensors (single file or sharded index) -> params.

Conversion into the stacked params layout of ``transformer.py`` for llama, gemma2, gemma3 and gpt2.
Errors (``LoadError``, a ``UserError``) name the file and tensor: unsupported architecture, missing
tensor, shape mismatch, NaN or inf values. ``max_position_embeddings`` (gpt2: ``n_positions``) becomes
``ModelConfig.n_positions``, the context length that prompts are checked against.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import numpy as np

from recovery_jax.errors import UserError
from recovery_jax.models.config import ModelConfig

_ARCH_TO_FAMILY = {
    "LlamaForCausalLM": "llama", "llama": "llama",
    "Gemma2ForCausalLM": "gemma2", "gemma2": "gemma2",
    "Gemma3ForCausalLM": "gemma3", "gemma3_text": "gemma3", "gemma3": "gemma3",
    "GPT2LMHeadModel": "gpt2", "gpt2": "gpt2",
}


class LoadError(UserError):
  """A checkpoint that cannot be loaded; the message names the file and the tensor or field."""


def check_finite(a: np.ndarray, name: str, source: str) -> None:
  """Raises LoadError naming ``source`` and tensor ``name`` when ``a`` holds NaN or inf."""
  bad = ~np.isfinite(a)
  if bad.any():
    n_nan = int(np.isnan(a).sum())
    kinds = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "inf")) if n)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise LoadError(f"{source}: tensor {name!r} {list(a.shape)} holds {kinds} value(s) (first at index {first}); "
                    "model weights must be finite (a corrupt or partly written checkpoint?)")


def _family(cfg: Mapping, path: str) -> str:
  for key in list(cfg.get("architectures") or []) + [cfg.get("model_type", "")]:
    if key in _ARCH_TO_FAMILY:
      return _ARCH_TO_FAMILY[key]
  raise LoadError(
      f"{path}: unsupported architecture {cfg.get('architectures')} / model_type={cfg.get('model_type')!r}; "
      f"supported: {sorted(set(_ARCH_TO_FAMILY))}")


def _rope(cfg: Mapping) -> tuple[float, float | None, float]:
  """(global theta, local theta or None, linear scaling factor) from old- or new-style HF configs."""
  rp = cfg.get("rope_parameters")
  scaling = cfg.get("rope_scaling") or {}
  local = cfg.get("rope_local_base_freq")
  if isinstance(rp, Mapping) and "full_attention" in rp:
    full, slide = rp["full_attention"], rp.get("sliding_attention", {})
    theta = full.get("rope_theta", 10000.0)
    local = slide.get("rope_theta", local)
    scaling = full
  elif isinstance(rp, Mapping):
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = rp
  else:
    theta = cfg.get("rope_theta", 10000.0)
  factor = 1.0
  rtype = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if rtype == "linear":
    factor = float(scaling["factor"])
  elif rtype not in ("default", None):
    raise LoadError(f"config.json: rope type {rtype!r} is not supported (default or linear)")
  return float(theta), (float(local) if local is not None else None), factor


def _context_length(cfg: Mapping, path: str) -> int:
  """``max_position_embeddings`` (0 when absent: unknown, prompts are not checked against it)."""
  n = cfg.get("max_position_embeddings") or 0
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise LoadError(f"{path}: field 'max_position_embeddings' = {n!r}: expected a positive integer")
  return n


def config_from_hf(cfg: Mapping, path: str = "config.json") -> ModelConfig:
  """ModelConfig from a parsed HF config.json."""
  fam = _family(cfg, path)
  eos = cfg.get("eos_token_id")
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
  if fam == "gpt2":
    d = cfg["n_embd"]
    return ModelConfig(
        family="gpt2", vocab_size=cfg["vocab_size"], d_model=d, n_layers=cfg["n_layer"], n_heads=cfg["n_head"],
        n_kv_heads=cfg["n_head"], d_head=d // cfg["n_head"], d_mlp=cfg.get("n_inner") or 4 * d,
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5), act="gelu_tanh", n_positions=cfg["n_positions"],
        tie_embeddings=True, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
        name=cfg.get("_name_or_path", ""))
  theta, local, factor = _rope(cfg)
  n_layers = cfg["num_hidden_layers"]
  d_head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
  layer_types: tuple[str, ...] = ()
  sliding_window = None
  if fam in ("gemma2", "gemma3"):
    lt = cfg.get("layer_types")
    if lt is None:
      pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 2 if fam == "gemma2" else 6))
      lt = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    layer_types = tuple("sliding" if t == "sliding_attention" else "full" for t in lt)
    sliding_window = cfg.get("sliding_window")
    act = "gelu_tanh"
  else:
    act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}[cfg.get("hidden_act", "silu")]
  return ModelConfig(
      family=fam, vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=n_layers,
      n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
      d_head=d_head, d_mlp=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6), act=act,
      rope_theta=theta, rope_local_theta=local if fam == "gemma3" else None, rope_scaling_factor=factor,
      sliding_window=sliding_window, layer_types=layer_types,
      attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
      query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if fam in ("gemma2", "gemma3") else None,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", fam != "llama")),
      bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos, pad_token_id=cfg.get("pad_token_id"),
      n_positions=_context_length(cfg, path), name=cfg.get("_name_or_path", ""))


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a HF folder (model.safetensors or a sharded index) as float32 numpy arrays."""
  from safetensors import safe_open
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(single):
    files = ["model.safetensors"]
  else:
    raise LoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")
  out = {}
  for fn in files:
    fp = os.path.join(folder, fn)
    if not os.path.exists(fp):
      raise LoadError(f"{index}: shard {fn} is missing")
    with safe_open(fp, framework="numpy") as f:
      for k in f.keys():
        t = f.get_slice(k)
        dtype = t.get_dtype()
        if dtype in ("BF16", "bfloat16"):
          out[k] = _bf16(fp, k)
        else:
          out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
        check_finite(out[k], k, fp)
  return out


def _bf16(fp: str, key: str) -> np.ndarray:
  from safetensors import safe_open
  with safe_open(fp, framework="flax") as f:
    return np.asarray(f.get_tensor(key), dtype=np.float32)


class _Getter:
  """Fetches tensors by name with shape checks; errors name the source and tensor."""

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str, prefixes: tuple[str, ...] = ("",)):
    self.t, self.source, self.prefixes = tensors, source, prefixes

  def has(self, name: str) -> bool:
    return any(p + name in self.t for p in self.prefixes)

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    for p in self.prefixes:
      if p + name in self.t:
        a = self.t[p + name]
        if tuple(a.shape) != tuple(shape):
          raise LoadError(f"{self.source}: tensor {p + name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return a
    raise LoadError(f"{self.source}: missing tensor {self.prefixes[0] + name!r}")


def _stack(fn: Callable[[int], np.ndarray], n: int) -> np.ndarray:
  return np.stack([fn(i) for i in range(n)])


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "checkpoint") -> dict:
  """Converts HF tensors ([out, in] Linear layout; gpt2 Conv1D [in, out]) to the stacked params layout."""
  D, H, K, E, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.n_layers,
                         cfg.vocab_size)
  if cfg.family == "gpt2":
    g = _Getter(tensors, source, ("transformer.", ""))
    h = lambda i, n: f"h.{i}.{n}"
    c_attn = lambda i: g(h(i, "attn.c_attn.weight"), (D, 3 * D))
    c_attn_b = lambda i: g(h(i, "attn.c_attn.bias"), (3 * D,))
    blocks = {
        "ln1": {"w": _stack(lambda i: g(h(i, "ln_1.weight"), (D,)), L),
                "b": _stack(lambda i: g(h(i, "ln_1.bias"), (D,)), L)},
        "ln2": {"w": _stack(lambda i: g(h(i, "ln_2.weight"), (D,)), L),
                "b": _stack(lambda i: g(h(i, "ln_2.bias"), (D,)), L)},
        "attn": {
            "W_Q": _stack(lambda i: c_attn(i)[:, :D].reshape(D, H, E), L),
            "W_K": _stack(lambda i: c_attn(i)[:, D:2 * D].reshape(D, H, E), L),
            "W_V": _stack(lambda i: c_attn(i)[:, 2 * D:].reshape(D, H, E), L),
            "b_Q": _stack(lambda i: c_attn_b(i)[:D].reshape(H, E), L),
            "b_K": _stack(lambda i: c_attn_b(i)[D:2 * D].reshape(H, E), L),
            "b_V": _stack(lambda i: c_attn_b(i)[2 * D:].reshape(H, E), L),
            "W_O": _stack(lambda i: g(h(i, "attn.c_proj.weight"), (D, D)).reshape(H, E, D), L),
            "b_O": _stack(lambda i: g(h(i, "attn.c_proj.bias"), (D,)), L),
        },
        "mlp": {
            "W_in": _stack(lambda i: g(h(i, "mlp.c_fc.weight"), (D, F)), L),
            "b_in": _stack(lambda i: g(h(i, "mlp.c_fc.bias"), (F,)), L),
            "W_out": _stack(lambda i: g(h(i, "mlp.c_proj.weight"), (F, D)), L),
            "b_out": _stack(lambda i: g(h(i, "mlp.c_proj.bias"), (D,)), L),
        },
    }
    return {
        "embed": {"W_E": g("wte.weight", (V, D))},
        "pos_embed": {"W_pos": g("wpe.weight", (cfg.n_positions, D))},
        "blocks": blocks,
        "ln_final": {"w": g("ln_f.weight", (D,)), "b": g("ln_f.bias", (D,))},
    }

  g = _Getter(tensors, source, ("model.", "model.language_model.", ""))
  lay = lambda i, n: f"layers.{i}.{n}"
  plus = 1.0 if cfg.is_gemma else 0.0
  norm = lambda n, size=D: {"w": _stack(lambda i: g(lay(i, n), (size,)) + plus, L)}
  attn = {
      "W_Q": _stack(lambda i: g(lay(i, "self_attn.q_proj.weight"), (H * E, D)).T.reshape(D, H, E), L),
      "W_K": _stack(lambda i: g(lay(i, "self_attn.k_proj.weight"), (K * E, D)).T.reshape(D, K, E), L),
      "W_V": _stack(lambda i: g(lay(i, "self_attn.v_proj.weight"), (K * E, D)).T.reshape(D, K, E), L),
      "W_O": _stack(lambda i: g(lay(i, "self_attn.o_proj.weight"), (D, H * E)).T.reshape(H, E, D), L),
  }
  if g.has(lay(0, "self_attn.q_proj.bias")):
    attn["b_Q"] = _stack(lambda i: g(lay(i, "self_attn.q_proj.bias"), (H * E,)).reshape(H, E), L)
    attn["b_K"] = _stack(lambda i: g(lay(i, "self_attn.k_proj.bias"), (K * E,)).reshape(K, E), L)
    attn["b_V"] = _stack(lambda i: g(lay(i, "self_attn.v_proj.bias"), (K * E,)).reshape(K, E), L)
  if g.has(lay(0, "self_attn.o_proj.bias")):
    attn["b_O"] = _stack(lambda i: g(lay(i, "self_attn.o_proj.bias"), (D,)), L)
  if cfg.family == "gemma3":
    attn["q_norm"] = norm("self_attn.q_norm.weight", E)
    attn["k_norm"] = norm("self_attn.k_norm.weight", E)
  blocks = {
      "ln1": norm("input_layernorm.weight"),
      "attn": attn,
      "mlp": {
          "W_gate": _stack(lambda i: g(lay(i, "mlp.gate_proj.weight"), (F, D)).T, L),
          "W_in": _stack(lambda i: g(lay(i, "mlp.up_proj.weight"), (F, D)).T, L),
          "W_out": _stack(lambda i: g(lay(i, "mlp.down_proj.weight"), (D, F)).T, L),
      },
  }
  if cfg.is_gemma:
    blocks["ln1_post"] = norm("post_attention_layernorm.weight")
    blocks["ln2"] = norm("pre_feedforward_layernorm.weight")
    blocks["ln2_post"] = norm("post_feedforward_layernorm.weight")
  else:
    blocks["ln2"] = norm("post_attention_layernorm.weight")
  params = {
      "embed": {"W_E": g("embed_tokens.weight", (V, D))},
      "blocks": blocks,
      "ln_final": {"w": g("norm.weight", (D,)) + plus},
  }
  if not cfg.tie_embeddings:
    params["unembed"] = {"W_U": _Getter(tensors, source, ("",))("lm_head.weight", (V, D)).T}
  return params


def load_hf(folder: str) -> tuple[dict, ModelConfig]:
  """Loads a HF folder (config.json + safetensors) into (numpy params, ModelConfig)."""
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise LoadError(f"{folder}: no config.json")
  with open(cfg_path) as f:
    raw = json.load(f)
  if "text_config" in raw and raw.get("model_type") == "gemma3":
    raw = {**raw["text_config"], "architectures": ["Gemma3ForCausalLM"]}
  cfg = config_from_hf(raw, cfg_path)
  params = params_from_hf(read_safetensors(folder), cfg, source=folder)
  return params, cfg
