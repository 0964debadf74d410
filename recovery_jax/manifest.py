"""``manifest.json`` in every run folder: what a reader needs to reproduce a table exactly.

  versions    jax, jaxlib, flax, optax, orbax-checkpoint, numpy, ml_collections, tensorboardX,
              recovery_jax, python; ``git``: the package checkout's commit and whether it had changes
  files       every model and SAE the run loaded (``experiments.setup`` records them as it loads):
              its config value, the path it resolved to and the sha256 of each file read from there
              (a file; for a folder, its top-level weight / config files: ``WEIGHT_SUFFIXES``); tiny
              random models and random SAEs name their seed instead
  seeds       every config field whose name contains ``seed``
  config      the resolved config (as ``config.json``)
  judge       the detectors the run's labels come from (refusal: the rules and a sha256 of each list
              of strings they match), and any config field naming a judge or detector
  host        host name, platform, CPU count; ``devices``: platform, kinds, counts, processes

Hashes are cached in ``hash_cache_path()`` by (real path, size, mtime), so a multi-GB model is read
once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import threading
from typing import Any

from recovery_jax import outputs

FILE = "manifest.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections", "tensorboardX",
            "recovery_jax")
WEIGHT_SUFFIXES = (".safetensors", ".json", ".npz", ".npy", ".gguf", ".bin", ".pt", ".pth", ".model")
HASH_CACHE_ENV = "RECOVERY_JAX_HASH_CACHE"

_LOADED: list[dict] = []  # files recorded by ``record`` since the last ``begin``
_LOCK = threading.Lock()


def begin() -> None:
  """Forgets the files of an earlier run in this process (the runner calls it at a run's start)."""
  with _LOCK:
    _LOADED.clear()


def record(kind: str, value: str, path: str | None, **extra) -> None:
  """Notes that the run loaded ``kind`` ("model", "sae") given as ``value`` (the config's value) from
  ``path`` (None: nothing read from disk, e.g. random weights); hashed when the manifest is written."""
  entry = {"kind": kind, "value": value, "path": os.path.abspath(path) if path else None, **extra}
  with _LOCK:
    if entry not in _LOADED:
      _LOADED.append(entry)


def loaded() -> list[dict]:
  with _LOCK:
    return [dict(e) for e in _LOADED]


# --- hashes --------------------------------------------------------------------------------------


def hash_cache_path(env=None) -> str:
  """``$RECOVERY_JAX_HASH_CACHE``, else ``$XDG_CACHE_HOME/recovery_jax/sha256.json`` (``~/.cache/...``)."""
  env = os.environ if env is None else env
  if env.get(HASH_CACHE_ENV):
    return os.path.expanduser(env[HASH_CACHE_ENV])
  root = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "recovery_jax", "sha256.json")


def _read_cache(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def sha256_file(path: str, cache: str | None = None) -> str:
  """sha256 of ``path``'s bytes, cached in the JSON file ``cache`` (default ``hash_cache_path()``) by
  (real path, size, mtime in ns): an unchanged file is not read again. The cache is rewritten
  atomically; two processes writing it at once lose at most an entry (hashed again next time)."""
  cache = hash_cache_path() if cache is None else cache
  st = os.stat(path)
  key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
  entries = _read_cache(cache)
  if key in entries:
    return entries[key]
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  digest = h.hexdigest()
  entries = _read_cache(cache)  # again: another process may have added entries meanwhile
  real = os.path.realpath(path) + "|"
  entries = {k: v for k, v in entries.items() if not k.startswith(real)}  # older versions of this file
  entries[key] = digest
  try:
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    outputs.atomic_write(cache, json.dumps(entries, indent=0, sort_keys=True))
  except Exception:  # pylint: disable=broad-except  # a read-only cache folder only costs a re-hash
    pass
  return digest


def files_of(path: str) -> list[str]:
  """The files a load of ``path`` reads: the file itself; for a folder its top-level files whose
  names end in ``WEIGHT_SUFFIXES`` (sorted)."""
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(path, n)))
  return []


def hashed(entry: dict, cache: str | None = None) -> dict:
  """``entry`` of ``record`` with ``files``: [{"name", "bytes", "sha256"}] of ``files_of(path)``."""
  out = dict(entry)
  if entry.get("path"):
    out["files"] = [{"name": os.path.relpath(f, entry["path"]) if os.path.isdir(entry["path"]) else os.path.basename(f),
                     "bytes": os.path.getsize(f), "sha256": sha256_file(f, cache)} for f in files_of(entry["path"])]
  return out


# --- the rest ------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out: dict[str, str | None] = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_state(folder: str | None = None) -> dict | None:
  """``{"commit", "dirty"}`` of the git checkout holding ``folder`` (default: this package), or None
  (not a checkout, or no git)."""
  folder = folder or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    if commit.returncode != 0:
      return None
    status = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def seeds(config: dict, prefix: str = "") -> dict[str, Any]:
  """Every field of ``config`` (a plain dict) whose name contains ``seed``, by dotted name."""
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(seeds(v, f"{prefix}{k}."))
    elif "seed" in str(k).lower():
      out[f"{prefix}{k}"] = v
  return out


def _fields_named(config: dict, words: tuple, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if any(w in str(k).lower() for w in words):
      out[name] = v
    elif isinstance(v, dict):
      out.update(_fields_named(v, words, f"{name}."))
  return out


def _digest_strings(items) -> str:
  return hashlib.sha256("\n".join(items).encode()).hexdigest()


def judge(experiment: str, config: dict) -> dict:
  """The detectors the run's labels come from (see the module docstring)."""
  out: dict[str, Any] = {}
  fields = _fields_named(config, ("judge", "detector"))
  if fields:
    out["config"] = fields
  if experiment == "refusal":
    from recovery_jax.tasks import refusal_judge as rj  # pylint: disable=import-outside-toplevel
    out["detectors"] = {"module": rj.__name__, "r_eff_rules": list(rj.R_EFF_RULES),
                        "refusal_prefixes": {"n": len(rj.REFUSAL_PREFIXES),
                                             "sha256": _digest_strings(rj.REFUSAL_PREFIXES)},
                        "safety_cues": {"n": len(rj.SAFETY_CUES), "sha256": _digest_strings(rj.SAFETY_CUES)}}
  return out


def devices() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  devs = jax.devices()
  return {"platform": devs[0].platform if devs else None, "kinds": sorted({d.device_kind for d in devs}),
          "count": len(devs), "local_count": jax.local_device_count(), "processes": jax.process_count()}


def host() -> dict:
  return {"name": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
          "cpus": os.cpu_count()}


def build(config, experiment: str, cache: str | None = None) -> dict:
  """The manifest of a run of ``config`` (a ConfigDict or dict) after its loading (see module docstring)."""
  from recovery_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  cfg = workdir_lib.config_dict(config)
  return {"experiment": experiment, "versions": versions(), "git": git_state(),
          "files": [hashed(e, cache) for e in loaded()], "seeds": seeds(cfg), "judge": judge(experiment, cfg),
          "host": host(), "devices": devices(), "config_sha256": workdir_lib.digest(config), "config": cfg}


def write(workdir: str, manifest: dict) -> None:
  outputs.atomic_write(os.path.join(workdir, FILE), json.dumps(manifest, indent=1, sort_keys=False, default=str))
