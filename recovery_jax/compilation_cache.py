"""JAX's persistent compilation cache, on by default for the apps and the tests.

A program compiled once is stored under ``cache_dir()`` and loaded by every later process that
compiles the same program (same HLO, backend, flags and jax version), so a second run of an app, or
a second test session, skips most of XLA's compile time. JAX writes each entry atomically, so
processes may share the folder.

  RECOVERY_JAX_COMPILATION_CACHE=/path   another folder
  RECOVERY_JAX_COMPILATION_CACHE=off     no persistent cache
"""

from __future__ import annotations

import os

ENV = "RECOVERY_JAX_COMPILATION_CACHE"


def cache_dir(env=None) -> str | None:
  """The cache folder: ``$RECOVERY_JAX_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/recovery_jax/jax``
  (``~/.cache/recovery_jax/jax``); None when the variable is ``off`` (or 0 / false / none / empty)."""
  env = os.environ if env is None else env
  value = env.get(ENV)
  if value is not None:
    return None if value.strip().lower() in ("", "off", "0", "false", "none") else os.path.expanduser(value)
  root = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "recovery_jax", "jax")


def enable(path: str | None = None, min_compile_time_s: float = 0.0) -> str | None:
  """Turns the persistent cache on at ``path`` (default ``cache_dir()``) for programs that took at
  least ``min_compile_time_s`` to compile. The default keeps every program: JAX's own 1 s (or a
  0.1 s) threshold leaves most of an app's programs to be compiled again by every run (IOI demo,
  warm: 117 of 132 programs and 12.7 s of compiling at 0.1 s; 0 of 132 and 8.5 s at 0;
  docs/benchmarks.md). Returns the folder, or None when it is off or the folder cannot be created
  (then nothing changes: compiling still works, only uncached)."""
  import jax  # pylint: disable=import-outside-toplevel
  path = cache_dir() if path is None else path
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
