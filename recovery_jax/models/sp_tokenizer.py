"""Torch-free Gemma tokenizer (SentencePiece-BPE with byte fallback) built from GGUF metadata.

A Gemma GGUF stores ``tokenizer.ggml.tokens``, ``scores`` and ``token_type`` but no merges. This
module rebuilds the same ``tokenizers.Tokenizer`` that transformers' GGUF path produces
(``integrations/gguf/gguf_tokenizer_mapping.py:gemma_tokenizer`` + ``GemmaTokenizer``), without
torch or sentencepiece:

- tokens made only of spaces (and other whitespace) are respelled as ``"▁" * len(token)``;
- merges are derived from the vocabulary: every split of a piece into two in-vocab pieces, ordered
  by the piece's position in the file (earlier first), then longer left part, then longer right
  part (``tokenization_utils_base.generate_merges`` with ``vocab_scores = -index``);
- BPE with ``byte_fallback=True``, ``fuse_unk=True``; normalizer ``" " -> "▁"`` (preceded by a
  ``"▁"`` prefix when ``tokenizer.ggml.add_space_prefix`` is true); pre-tokenizer
  ``Split(" ", merged_with_previous)``; decoder ``Replace("▁", " ") + ByteFallback + Fuse``;
- control tokens (type 3) are special added tokens, user-defined tokens (type 4, e.g. ``"\\n"``)
  plain added tokens; both are matched whole (``normalized=False``);
- a ``TemplateProcessing`` post-processor adds BOS (and EOS) as ``tokenizer.ggml.add_bos_token``
  (``add_eos_token``) say.

Building takes ~20 s for Gemma 3's 262k vocabulary (mostly ``GGUFReader`` parsing), so the result
is cached as ``<gguf path>.tokenizer.json``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPIECE_UNDERLINE = "\u2581"
_CONTROL, _USER_DEFINED = 3, 4
_META_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.merges", "general.architecture",
)


def read_tokenizer_metadata(path: str) -> dict:
  """The tokenizer fields of a GGUF file (``gguf.GGUFReader``), keyed by their GGUF names."""
  import gguf
  reader = gguf.GGUFReader(path)
  return {k: reader.fields[k].contents() for k in _META_KEYS if k in reader.fields}


def generate_merges(vocab: Mapping[str, int], vocab_scores: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
  """Merges implied by a vocabulary (port of transformers' ``generate_merges``).

  For every piece (in ``vocab_scores`` order), each split into two in-vocab pieces is a merge with
  the piece's score. Without scores the merges are sorted by ascending vocab id of the merged
  piece; with scores by descending score. Ties: longer left part first, then longer right part.
  """
  reverse = vocab_scores is not None
  scores = dict(vocab_scores) if reverse else vocab
  merges = []
  for merge, piece_score in scores.items():
    local = []
    for index in range(1, len(merge)):
      left, right = merge[:index], merge[index:]
      if left in vocab and right in vocab:
        local.append((left, right, piece_score))
    local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges.extend(local)
  merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=reverse)
  return [(m[0], m[1]) for m in merges]


def respell_space_tokens(tokens: Sequence[str]) -> list[str]:
  """Whitespace-only tokens that contain a space become ``"▁" * len`` (GGUF stores real spaces)."""
  return [SPIECE_UNDERLINE * len(t) if " " in t and not t.strip() else t for t in tokens]


def build_gemma_tokenizer(meta: Mapping) -> Tokenizer:
  """A ``tokenizers.Tokenizer`` from parsed GGUF tokenizer metadata (see ``read_tokenizer_metadata``)."""
  model_type = meta.get("tokenizer.ggml.model")
  if model_type != "llama":
    raise ValueError(f"GGUF tokenizer.ggml.model={model_type!r}: expected 'llama' (SentencePiece)")
  raw_tokens = list(meta["tokenizer.ggml.tokens"])
  tokens = respell_space_tokens(raw_tokens)
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  if "tokenizer.ggml.merges" in meta:
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  else:
    # Gemma's scores do not follow its merge order; the position in the file does
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})

  name = lambda key, default: tokens[meta[key]] if key in meta else default
  unk = name("tokenizer.ggml.unknown_token_id", "<unk>")
  bos = name("tokenizer.ggml.bos_token_id", "<bos>")
  eos = name("tokenizer.ggml.eos_token_id", "<eos>")

  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None,
                             byte_fallback=True))
  replace = normalizers.Replace(" ", SPIECE_UNDERLINE)
  if meta.get("tokenizer.ggml.add_space_prefix", False):
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE), replace])
  else:
    tok.normalizer = replace
  tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
  tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  # as transformers does: the file's own spelling; user-defined runs of spaces (now "▁▁...") stay
  # ordinary vocabulary entries, matched by BPE rather than as added tokens
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, ty in zip(raw_tokens, types) if ty == _CONTROL])
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, ty in zip(raw_tokens, types) if ty == _USER_DEFINED and t in vocab])

  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  if add_bos or add_eos:
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos and eos != bos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
  return tok


def default_cache_path(path: str) -> str:
  return os.fspath(path) + ".tokenizer.json"


def gemma_tokenizer_from_gguf(path: str, cache_path: str | None | bool = None,
                              meta: Mapping | None = None) -> Tokenizer:
  """The Gemma tokenizer described by a GGUF file.

  Args:
    path: the ``.gguf`` file.
    cache_path: where the built ``tokenizer.json`` is kept (default ``path + ".tokenizer.json"``);
      ``False`` builds without reading or writing a cache. A cache older than the GGUF is rebuilt.
    meta: the file's metadata when already parsed (GGUF key -> ``field.contents()``), which saves
      parsing the file again; it must hold ``tokenizer.ggml.tokens`` and ``token_type``.
  """
  path = os.fspath(path)
  read = lambda: meta if meta is not None and "tokenizer.ggml.tokens" in meta else read_tokenizer_metadata(path)
  if cache_path is False:
    return build_gemma_tokenizer(read())
  cache_path = default_cache_path(path) if cache_path in (None, True) else os.fspath(cache_path)
  if os.path.exists(cache_path) and os.path.getmtime(cache_path) >= os.path.getmtime(path):
    return Tokenizer.from_file(cache_path)
  tok = build_gemma_tokenizer(read())
  folder = os.path.dirname(os.path.abspath(cache_path))
  try:
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, cache_path)  # atomic: concurrent builders never see a partial file
  except OSError:
    pass  # read-only location: the tokenizer still works, it is just not cached
  return tok
