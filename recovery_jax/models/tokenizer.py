"""Tokenizers as ``tokenizers.Tokenizer`` objects: from tokenizer.json, or built from GGUF metadata.

SmolLM2 (GPT-2-style byte-level BPE, ``tokenizer.ggml.model == "gpt2"``) is rebuilt from the GGUF
vocabulary and merges without torch; SentencePiece-BPE GGUFs (Gemma) go through ``sp_tokenizer``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


def bpe_tokenizer_from_gguf_metadata(meta: dict[str, Any]):
  """Byte-level BPE tokenizer from GGUF ``tokenizer.ggml.{tokens,merges,token_type}``."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
  return tk


def tokenizer_from_gguf(path: str, meta: dict[str, Any]):
  kind = meta.get("tokenizer.ggml.model")
  if kind == "gpt2":
    return bpe_tokenizer_from_gguf_metadata(meta)
  if kind == "llama":
    from recovery_jax.models import sp_tokenizer  # pylint: disable=import-outside-toplevel
    return sp_tokenizer.gemma_tokenizer_from_gguf(path, meta=meta)
  raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (gpt2 or llama)")


def tokenizer_from_file(path: str):
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no tokenizer.json")
  return Tokenizer.from_file(path)


def encode_batch(tokenizer, texts: Sequence[str], *, bos_id: int | None = None, pad_id: int = 0,
                 length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded token ids and attention mask, both [batch, seq]; ``bos_id`` is prepended when given."""
  rows = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
  if bos_id is not None:
    rows = [[bos_id] + r for r in rows]
  t = max(len(r) for r in rows) if length is None else length
  if any(len(r) > t for r in rows):
    raise ValueError(f"encode_batch: a text has {max(len(r) for r in rows)} tokens, more than length={t}")
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    if r:
      ids[i, t - len(r):] = r
      mask[i, t - len(r):] = 1
  return ids, mask
