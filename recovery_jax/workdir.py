"""Workdirs are owned: one config per workdir, one process at a time.

``claim(workdir, config)`` (every app, before it writes anything):

  config.sha256  the hash of the config that made the run (then the config's JSON); a workdir made
                 under another config is a ``UserError`` naming the fields that differ, unless
                 overwriting was asked for
                 (``--overwrite`` of ``recovery_jax.main``: ``allow_overwrite``), which clears the old
                 run's outputs first. A workdir from before the hash file is judged by its config.json.
  .lock          ``fcntl.flock``-ed for the life of the process (pid, host and start time inside): a
                 second process in the same workdir fails at once with a message naming the first.

Only the writing process of a multi-process run (process 0) locks and writes; the others only check.
The kernel drops the lock when its process ends, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket

from recovery_jax import errors

HASH_FILE = "config.sha256"
LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"

_HELD: dict[str, int] = {}  # realpath -> fd of a lock this process holds
_OVERWRITE: set[str] = set()  # realpaths whose runs of another config this process may discard


def _key(workdir: str) -> str:
  return os.path.realpath(workdir)


def config_dict(config) -> dict:
  """``config`` (a ConfigDict or a dict) as plain JSON values, keys sorted."""
  text = config.to_json(sort_keys=True) if hasattr(config, "to_json") else json.dumps(config, sort_keys=True,
                                                                                        default=str)
  return json.loads(text)


def digest(config) -> str:
  """sha256 of the canonical JSON of ``config``."""
  text = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def differences(old, new, prefix: str = "") -> list[str]:
  """``"field: old -> new"`` for each dotted field whose value differs (missing: ``<none>``)."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += differences(old.get(k, "<none>"), new.get(k, "<none>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "another process"
  return f"process {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('start', '?')})"


def lock(workdir: str) -> None:
  """Takes ``workdir/.lock`` for this process (again: a no-op); a ``UserError`` naming the holder when
  another process has it."""
  key = _key(workdir)
  if key in _HELD:
    return
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.UserError(f"--workdir={workdir!r}: cannot open the lock file {path}: {e.strerror}") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    who = _holder(fd) if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES) else None
    os.close(fd)
    if who is None:
      raise errors.UserError(f"--workdir={workdir!r}: cannot lock {path}: {e.strerror}") from e
    raise errors.UserError(f"--workdir={workdir!r} is in use by {who}; wait for it to end (or stop it), or use "
                           "another --workdir") from e
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(info).encode())
  _HELD[key] = fd


def release(workdir: str) -> None:
  """Drops this process's lock of ``workdir`` (none held: a no-op); the file stays."""
  fd = _HELD.pop(_key(workdir), None)
  if fd is not None:
    os.close(fd)  # closing the last descriptor releases the flock


def allow_overwrite(workdir: str) -> None:
  """Lets ``claim`` of ``workdir`` or of a folder under it discard a run of another config."""
  _OVERWRITE.add(_key(workdir))


def _overwrite_allowed(workdir: str) -> bool:
  key = _key(workdir)
  return any(key == r or key.startswith(r.rstrip(os.sep) + os.sep) for r in _OVERWRITE)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _stored(workdir: str) -> tuple[str | None, dict | None]:
  """(hash of the workdir's run or None, its config as a dict or None): from config.sha256 (the hash,
  then the config's JSON), else, for a workdir from before that file, from its config.json."""
  old = _read_json(os.path.join(workdir, CONFIG_FILE))
  old = old if isinstance(old, dict) else None
  try:
    with open(os.path.join(workdir, HASH_FILE), encoding="utf-8") as f:
      first, _, rest = f.read().partition("\n")
  except OSError:
    return (digest(old) if old is not None else None), old
  try:
    stored = json.loads(rest)
  except ValueError:
    stored = None
  return first.strip() or None, stored if isinstance(stored, dict) else old


def clear(workdir: str) -> list[str]:
  """Removes everything in ``workdir`` but the lock file; returns the names removed."""
  gone = []
  for name in sorted(os.listdir(workdir)):
    if name == LOCK_FILE:
      continue
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
    gone.append(name)
  return gone


def _write_hash(workdir: str, config) -> None:
  """config.sha256: the hash on line 1, the config's canonical JSON on line 2 (to name differing fields)."""
  tmp = os.path.join(workdir, f".{HASH_FILE}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(f"{digest(config)}\n{json.dumps(config_dict(config), sort_keys=True)}\n")
  os.replace(tmp, os.path.join(workdir, HASH_FILE))


def _is_writer() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def claim(workdir: str, config, *, overwrite: bool | None = None, writer: bool | None = None) -> None:
  """Makes ``workdir`` this run's: locked by this process, holding ``config``'s hash.

  A workdir holding a run of another config is a ``UserError`` naming the differing fields, unless
  ``overwrite`` (None: whether ``allow_overwrite`` covers the workdir), which removes that run's
  outputs. ``writer`` (None: process 0) is False on the other processes of a multi-process run: they
  lock and write nothing, and only check the hash (when not overwriting)."""
  writer = _is_writer() if writer is None else writer
  overwrite = _overwrite_allowed(workdir) if overwrite is None else overwrite
  new = digest(config)
  if writer:
    os.makedirs(workdir, exist_ok=True)
    lock(workdir)
  elif overwrite:
    return
  old, old_config = _stored(workdir)
  if old == new:
    if writer and not os.path.exists(os.path.join(workdir, HASH_FILE)):
      _write_hash(workdir, config)
    return
  if old is not None:
    if not (overwrite and writer):
      diff = differences(old_config, config_dict(config)) if old_config is not None else []
      what = f"fields that differ (workdir's run -> this config): {'; '.join(diff[:6])}" + (
          f"; and {len(diff) - 6} more" if len(diff) > 6 else "") if diff else f"its {HASH_FILE} differs"
      raise errors.UserError(f"--workdir={workdir!r} holds a run of a different config ({what}); use another "
                             "--workdir, the same config to resume, or --overwrite to discard that run")
    if not os.path.exists(os.path.join(workdir, HASH_FILE)) and "experiment" not in (old_config or {}):
      raise errors.UserError(f"--workdir={workdir!r} holds a {CONFIG_FILE} that is not a recovery_jax run's; "
                             "--overwrite removes only runs: use another --workdir")
    gone = clear(workdir)
    print(f"--overwrite: removed the run of another config from {workdir} ({', '.join(gone)})", flush=True)
  if writer:
    _write_hash(workdir, config)
