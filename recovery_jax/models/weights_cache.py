"""Converted weights kept on disk: a GGUF file is parsed and dequantised once, later loads read float32.

Reading SmolLM2's GGUF takes about 8 s on a 2-core CPU (the header's 49k-token vocabulary is parsed
field by field, then every tensor is dequantised); every app and test process paid it again. The
converted result (the numpy params pytree, the ``ModelConfig`` and the tokenizer) is kept under
``<cache_dir>/converted/<key>/`` as one ``.npy`` per weight, ``config.json`` and ``tokenizer.json``,
where the key names the source file by its real path, size and modification time (a changed file is
converted again) and ``VERSION`` (bumped when the conversion changes). Loading it takes about a
second; it costs disk, 4 bytes a weight (SmolLM2: 515 MB).

A folder appears whole or not at all (written beside it, then renamed), so processes may share the
cache; a damaged or partial entry is converted again. ``RECOVERY_JAX_WEIGHTS_CACHE=off`` turns it off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from recovery_jax.models.config import ModelConfig

VERSION = 1
ENV = "RECOVERY_JAX_WEIGHTS_CACHE"


def enabled() -> bool:
  return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "none", "")


def source_key(path: str, *extra: str) -> str:
  """A name for source file ``path`` as it is now: a hash of its real path, size, mtime and ``extra``."""
  st = os.stat(path)
  key = "|".join([os.path.realpath(path), str(st.st_size), str(st.st_mtime_ns), *extra])
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def entry_dir(root: pathlib.Path, path: str) -> pathlib.Path:
  """The cache folder of source file ``path`` under ``root``."""
  return root / "converted" / f"{pathlib.Path(path).stem[:40]}-{source_key(path, f'v{VERSION}')}"


def publish(folder: pathlib.Path, fill: Callable[[pathlib.Path], None]) -> bool:
  """Creates ``folder`` whole or not at all: ``fill(tmp)`` writes into a new folder beside it, which is
  then renamed. False where nothing was stored (unwritable, full, or another process stored it first)."""
  try:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".partial-"))
  except OSError:
    return False
  try:
    fill(tmp)
    os.rename(tmp, folder)
    return True
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    return False


def _flat(params, prefix=()) -> dict[tuple[str, ...], np.ndarray]:
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v)
  return out


def write(folder: pathlib.Path, params: dict, cfg: ModelConfig, tokenizer) -> bool:
  """Stores an entry (``publish``); False where nothing was stored."""
  def fill(tmp: pathlib.Path) -> None:
    leaves = []
    for i, (keys, a) in enumerate(_flat(params).items()):
      np.save(tmp / f"{i}.npy", a, allow_pickle=False)
      leaves.append(list(keys))
    (tmp / "tokenizer.json").write_text("" if tokenizer is None else tokenizer.to_str())
    meta = {"version": VERSION, "config": dataclasses.asdict(cfg), "leaves": leaves,
            "tokenizer": tokenizer is not None}
    (tmp / "config.json").write_text(json.dumps(meta))
  return publish(folder, fill)


def read(folder: pathlib.Path) -> tuple[dict, ModelConfig, Any] | None:
  """(numpy params, cfg, tokenizer) of an entry, or None when it is missing or unreadable."""
  try:
    meta = json.loads((folder / "config.json").read_text())
    if meta.get("version") != VERSION:
      return None
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    params: dict = {}
    for i, keys in enumerate(meta["leaves"]):
      node = params
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = np.load(folder / f"{i}.npy", allow_pickle=False)
    tokenizer = None
    if meta["tokenizer"]:
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
      tokenizer = Tokenizer.from_str((folder / "tokenizer.json").read_text())
    return params, cfg, tokenizer
  except Exception:  # pylint: disable=broad-except  # damaged or partial: the caller converts again
    return None


def cached(root: pathlib.Path, path: str, convert: Callable[[str], tuple[dict, ModelConfig, Any]]):
  """``convert(path)`` -> (numpy params, cfg, tokenizer), through the cache under ``root``."""
  if not enabled() or not os.path.isfile(path):  # a missing file: the converter names the error
    return convert(path)
  folder = entry_dir(root, path)
  hit = read(folder)
  if hit is not None:
    return hit
  if folder.exists():  # damaged: replace it
    shutil.rmtree(folder, ignore_errors=True)
  out = convert(path)
  write(folder, *out)
  return out
