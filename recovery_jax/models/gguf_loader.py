"""GGUF files (llama.cpp) -> params, via the ``gguf`` package, dequantised to float32.

Tensors are renamed to their HF names and converted by ``hf.params_from_hf``. Two llama.cpp
conventions are undone: llama Q/K rows are stored permuted for its RoPE layout
(``permute(w, n_head)``), and Gemma RMSNorm weights are stored as ``w + 1``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from recovery_jax.models import hf
from recovery_jax.models.config import ModelConfig

_SUPPORTED = ("llama", "gemma3", "gemma2")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def read_metadata(reader) -> dict[str, Any]:
  """GGUF key/values as python values (arrays of strings/ints become lists)."""
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception:  # pylint: disable=broad-except
      continue
  return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: GGUF [rows, cols] Q/K -> HF rotate_half layout."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_from_gguf(meta: dict[str, Any], path: str) -> dict[str, Any]:
  arch = meta.get("general.architecture")
  if arch not in _SUPPORTED:
    raise hf.LoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {_SUPPORTED}")
  g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
  n_heads = g("attention.head_count")
  d_model = g("embedding_length")
  vocab = g("vocab_size") or len(meta["tokenizer.ggml.tokens"])
  cfg = {
      "model_type": "gemma3_text" if arch == "gemma3" else arch,
      "vocab_size": int(vocab), "hidden_size": int(d_model), "num_hidden_layers": int(g("block_count")),
      "num_attention_heads": int(n_heads), "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
      "head_dim": int(g("attention.key_length") or d_model // n_heads),
      "intermediate_size": int(g("feed_forward_length")),
      "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": float(g("rope.freq_base", 10000.0)),
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
      "_name_or_path": meta.get("general.name", os.path.basename(path)),
      "max_position_embeddings": int(g("context_length") or 0),  # checked against prompt lengths
  }
  if arch == "llama":
    cfg["hidden_act"] = "silu"
  else:
    head_dim = cfg["head_dim"]
    cfg["sliding_window"] = int(g("attention.sliding_window", 4096))
    cfg["query_pre_attn_scalar"] = head_dim
    if arch == "gemma3":
      cfg["rope_local_base_freq"] = 10000.0
      cfg["sliding_window_pattern"] = 6
      scaling = g("rope.scaling.factor")
      if scaling and float(scaling) != 1.0:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(scaling)}
    else:
      cfg["sliding_window_pattern"] = 2
      cfg["attn_logit_softcapping"] = g("attn_logit_softcapping", 50.0)
      cfg["final_logit_softcapping"] = g("final_logit_softcapping", 30.0)
  return cfg


def load_gguf(path: str) -> tuple[dict, ModelConfig, dict[str, Any]]:
  """Loads a GGUF file -> (numpy params, ModelConfig, metadata)."""
  import gguf  # pylint: disable=import-outside-toplevel

  if not os.path.exists(path):
    raise hf.LoadError(f"{path}: no such GGUF file")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise hf.LoadError(f"{path}: not a readable GGUF file ({e})") from e
  meta = read_metadata(reader)
  raw_cfg = hf_config_from_gguf(meta, path)
  arch = meta["general.architecture"]
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    name = t.name
    hf.check_finite(a, name, path)
    if name == "token_embd.weight":
      tensors["model.embed_tokens.weight"] = a
    elif name == "output_norm.weight":
      tensors["model.norm.weight"] = a
    elif name == "output.weight":
      tensors["lm_head.weight"] = a
    elif name.startswith("blk."):
      _, i, kind, wb = name.split(".")
      table = dict(_LAYER_NAMES)
      if arch in ("gemma2", "gemma3"):
        table.update(_GEMMA_LAYER_NAMES)
      else:
        table["ffn_norm"] = "post_attention_layernorm"
      if kind not in table:
        raise hf.LoadError(f"{path}: unexpected tensor {name!r}")
      tensors[f"model.layers.{i}.{table[kind]}.{wb}"] = a
    elif name == "rope_freqs.weight":
      raise hf.LoadError(f"{path}: tensor {name!r} (rope frequency factors) is not supported")
    else:
      raise hf.LoadError(f"{path}: unexpected tensor {name!r}")
  raw_cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
  cfg = hf.config_from_hf(raw_cfg, path)
  if arch == "llama":
    for i in range(cfg.n_layers):
      q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
      if q in tensors:
        tensors[q] = unpermute_qk(tensors[q], cfg.n_heads)
      if k in tensors:
        tensors[k] = unpermute_qk(tensors[k], cfg.n_kv_heads)
  else:  # gemma: stored as w + 1
    for k in list(tensors):
      if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
        tensors[k] = tensors[k] - 1.0
  params = hf.params_from_hf(tensors, cfg, source=path)
  return params, cfg, meta
