"""Sweeps: grids of points, work units, sharding over a ("data", "model") mesh, and resume.

A grid (from the config) expands to points in a stable order; ``point_id`` is the index. Points that
share static structure form groups; each group is cut into work units of ``unit_size`` points, which
one jit-compiled, vmapped call computes with the unit axis sharded over ``data``. After each unit its
results are saved with orbax (atomic, with a checksum checked on resume), so a killed run resumes from
the finished units and produces identical final results (every point's PRNG key is
``fold_in(base_key, point_id)``); a corrupt saved unit is named and computed again (or stops the run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recovery_jax import errors, outputs


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Cartesian product of ``grid`` (keys in sorted order) -> list of point dicts with ``point_id``."""
  keys = sorted(grid)
  for k in keys:
    if isinstance(grid[k], (str, bytes)) or not isinstance(grid[k], Iterable):
      raise ValueError(f"sweep.{k}={grid[k]!r}: expected a list of values")
    if len(list(grid[k])) == 0:
      raise ValueError(f"sweep.{k} is empty: give at least one value")
  points = []
  for i, values in enumerate(itertools.product(*(list(grid[k]) for k in keys))):
    points.append({"point_id": i, **dict(zip(keys, values))})
  return points


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  unit_id: int
  group: tuple  # static key shared by its points
  points: tuple  # point dicts


def make_units(points: Sequence[dict], static_keys: Sequence[str], unit_size: int) -> list[WorkUnit]:
  """Groups points by ``static_keys`` (in first-seen order) and cuts each group into units."""
  if unit_size < 1:
    raise ValueError(f"unit_size={unit_size}: expected >= 1")
  groups: dict[tuple, list[dict]] = {}
  for p in points:
    groups.setdefault(tuple(p[k] for k in static_keys), []).append(p)
  units, uid = [], 0
  for key, pts in groups.items():
    for s in range(0, len(pts), unit_size):
      units.append(WorkUnit(uid, key, tuple(pts[s:s + unit_size])))
      uid += 1
  return units


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ("data", "model") mesh over ``devices`` (default all); -1 takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"mesh.model={model} does not divide the {n} devices")
  data = n // model if data == -1 else data
  if data * model != n:
    raise ValueError(f"mesh data={data} x model={model} != {n} devices")
  return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def pad_to_multiple(tree, multiple: int):
  """Pads every leaf's leading axis to a multiple of ``multiple`` by repeating the last entry.

  Returns (padded tree, original length)."""
  n = jax.tree.leaves(tree)[0].shape[0]
  target = -(-n // multiple) * multiple
  if target == n:
    return tree, n
  pad = lambda a: np.concatenate([a, np.repeat(np.asarray(a)[-1:], target - n, axis=0)], axis=0)
  return jax.tree.map(pad, tree), n


def shard_leading(tree, mesh: Mesh):
  """Places each leaf with its leading axis over ``data`` (the other axes replicated)."""
  def put(a):
    spec = P("data", *([None] * (np.ndim(a) - 1)))
    return jax.device_put(a, NamedSharding(mesh, spec))
  return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), tree)


BARRIER_TIMEOUT_S = 900


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here until all arrive (no-op on one process). It uses the coordination
  service, not a device collective: a process minutes behind (still compiling) would otherwise trip
  Gloo's 30 s connect timeout at the next cross-process collective. A process that never arrives
  (killed, hung) makes the others fail after ``timeout_s``. ``name`` must be unique per run."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  distributed.global_state.client.wait_at_barrier(f"recovery_jax/{name}", timeout_in_ms=timeout_s * 1000)


CHECKSUM_KEY = "recovery_jax_checksum"  # in each unit's orbax step metadata (custom_metadata)
ON_CORRUPT = ("recompute", "stop")


def _leaf_name(path) -> str:
  """A key path as plain names ("x/0/y"): the same for a saved tree and orbax's restored one."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_checksum(tree) -> str:
  """sha256 over every leaf's name, dtype, shape and bytes, the leaves in sorted name order."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for name, leaf in sorted(((_leaf_name(p), np.asarray(x)) for p, x in leaves), key=lambda t: t[0]):
    h.update(f"{name}|{leaf.dtype.str}|{leaf.shape}|".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def _one_line(e: BaseException, limit: int = 200) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class CorruptUnitError(errors.UserError):
  """A saved work unit that cannot be trusted: unreadable, saved without a checksum, or altered."""

  def __init__(self, unit_id: int, path: str, reason: str, hint: str = ""):
    self.unit_id, self.path, self.reason = unit_id, path, reason
    super().__init__(f"work unit {unit_id} at {path} is corrupt: {reason}{hint}")


class _DropDiskFull(logging.Filter):
  """Drops orbax's own (multi-line, traceback) log records of a full disk: the UserError says it."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not ((exc is not None and outputs.is_disk_full(exc)) or outputs.is_disk_full(record.getMessage()))


def _quiet_closed_loops() -> None:
  """After a failed save, tensorstore completes the other writes into orbax's closed event loop,
  which Python prints as an "Event loop is closed" traceback: drop those (only those)."""
  prev = sys.unraisablehook
  if getattr(prev, "_recovery_jax", False):
    return

  def hook(u):
    if not (u.exc_type is RuntimeError and "Event loop is closed" in str(u.exc_value)):
      prev(u)
  hook._recovery_jax = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


class UnitStore:
  """Finished work units on disk (orbax), keyed by unit id; writes are atomic and checked.

  Each unit is saved with a sha256 of its leaves (``tree_checksum``) in its step metadata, written
  inside orbax's temp directory before the atomic rename, so a finished unit always has one;
  ``load`` verifies it (``CorruptUnitError`` when unreadable, missing or different). A full disk is
  a UserError naming the unit's path and the size needed; orbax's temp directory of that unit is
  removed, the finished units stay as they are.

  Multi-process (one directory on a filesystem every process sees): every process constructs the
  store and calls ``save`` for every unit with the same (host, fully gathered) values; orbax's
  CheckpointManager runs its saves as collectives: process 0 writes numpy leaves and finalises the
  step (atomic rename of its temp directory), the others wait at its barriers. ``finished`` and
  ``load`` read the shared directory on every process; ``discard`` deletes on process 0 between
  two barriers."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self._n_discarded = 0
    self._failed = False
    barrier(f"unit_store:{self.directory}")  # orbax's own barriers are Gloo collectives: align first
    os.makedirs(self.directory, exist_ok=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

  def path(self, unit_id: int) -> str:
    return os.path.join(self.directory, str(unit_id))

  def finished(self) -> set[int]:
    self._mngr.reload()
    return set(int(s) for s in self._mngr.all_steps())

  def save(self, unit_id: int, tree) -> None:
    tree = jax.tree.map(np.asarray, tree)
    meta = {CHECKSUM_KEY: {"sha256": tree_checksum(tree), "leaves": len(jax.tree.leaves(tree))}}
    quiet = _DropDiskFull()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
      saved = self._mngr.save(unit_id, args=self._ocp.args.StandardSave(tree), custom_metadata=meta, force=True)
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not outputs.is_disk_full(e):
        raise
      self._failed = True
      _quiet_closed_loops()
      try:  # joins orbax's background threads (they may still be writing into the temp directory)
        self._mngr.close()
      except Exception:  # pylint: disable=broad-except
        pass
      self._remove_tmp(unit_id)
      nbytes = sum(a.nbytes for a in jax.tree.leaves(tree))
      raise errors.UserError(outputs.disk_full_message(
          self.path(unit_id), nbytes, what=f"saving work unit {unit_id}",
          after="the finished work units are kept: free some space and rerun to resume")) from None
    finally:
      absl_logger.removeFilter(quiet)
    if not saved:  # orbax skips a step it thinks is not due: never silently
      raise RuntimeError(f"orbax did not save work unit {unit_id} to {self.path(unit_id)}")

  def _remove_tmp(self, unit_id: int) -> None:
    """Removes orbax's temp directory of ``unit_id`` (a failed save), on process 0."""
    if jax.process_index() != 0:
      return
    for name in os.listdir(self.directory):
      if name.startswith(f"{unit_id}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def load(self, unit_id: int):
    """The unit's saved tree, verified against its checksum (``CorruptUnitError`` otherwise)."""
    path = self.path(unit_id)
    try:
      tree = self._mngr.restore(unit_id, args=self._ocp.args.StandardRestore())
      meta = self._mngr.metadata(unit_id).custom_metadata or {}
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptUnitError(unit_id, path, f"unreadable ({_one_line(e)})") from None
    want = meta.get(CHECKSUM_KEY) if isinstance(meta, dict) else None
    if not isinstance(want, dict) or not want.get("sha256"):
      raise CorruptUnitError(unit_id, path, "no checksum saved with it")
    if tree_checksum(tree) != want["sha256"]:
      raise CorruptUnitError(unit_id, path, "its arrays do not match the checksum saved with them")
    return tree

  def discard(self, unit_id: int) -> None:
    """Deletes a (corrupt) unit so that it is computed again; every process calls it."""
    self._n_discarded += 1
    tag = f"unit_store:{self.directory}:discard{self._n_discarded}:{unit_id}"
    barrier(tag + ":read")  # every process is done reading it
    if jax.process_index() == 0:
      shutil.rmtree(self.path(unit_id), ignore_errors=True)
    barrier(tag + ":deleted")
    self._mngr.reload()

  def close(self):
    try:
      self._mngr.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # after a failed save orbax re-raises its error here: already reported
        raise


def run_units(units: Sequence[WorkUnit], compute: Callable[[WorkUnit], Any], store: UnitStore,
              log: Callable[[str], None] = print, progress: bool = False,
              on_corrupt: str = "recompute",
              on_result: Callable[[WorkUnit, Any, float | None], None] | None = None) -> dict[int, Any]:
  """Computes every unit not yet in ``store`` (saving each as it finishes); returns all results.
  ``progress``: a tqdm bar over the units still to compute (the current unit and an ETA; quiet
  unless ``telemetry.bars_enabled()``). ``on_corrupt``: a saved unit that fails its check
  (unreadable, no checksum, altered) is named in a one-line warning and computed again
  ("recompute"), or ends the run with a UserError naming its path ("stop"). ``on_result(unit,
  result, seconds)``: called once per unit with its (numpy) result, as it is read back (seconds
  None) or finished and saved."""
  if on_corrupt not in ON_CORRUPT:
    raise errors.UserError(f"on_corrupt={on_corrupt!r}: expected one of {ON_CORRUPT}")
  done = store.finished()
  results = {}
  for u in units:
    if u.unit_id not in done:
      continue
    try:
      results[u.unit_id] = store.load(u.unit_id)
    except CorruptUnitError as e:
      if on_corrupt == "stop":
        raise CorruptUnitError(e.unit_id, e.path, e.reason, hint=" (on_corrupt='stop'; delete that folder, or use "
                               "on_corrupt='recompute', to compute it again)") from None
      log(f"warning: {e}; computing it again")
      store.discard(u.unit_id)
  if results:
    log(f"resuming: {len(results)} of {len(units)} work units already finished")
    if on_result is not None:
      for u in units:
        if u.unit_id in results:
          on_result(u, results[u.unit_id], None)
  todo = [u for u in units if u.unit_id not in results]
  bar = None
  if progress and todo:
    from recovery_jax import telemetry  # pylint: disable=import-outside-toplevel
    bar = telemetry.bar(len(todo), "work units", unit="unit")
    bar = None if bar.disable else bar
  for u in todo:
    t0 = time.time()
    if bar is not None:
      bar.set_postfix_str(f"unit {u.unit_id + 1}/{len(units)} {u.group}", refresh=True)
    out = compute(u)
    store.save(u.unit_id, out)
    results[u.unit_id] = jax.tree.map(np.asarray, out)
    seconds = time.time() - t0
    msg = (f"work unit {u.unit_id + 1}/{len(units)} finished: {len(u.points)} points, group {u.group}, "
           f"{seconds:.1f} s")
    if bar is not None:
      bar.update(1)
      bar.write(msg)
    else:
      log(msg)
    if on_result is not None:
      on_result(u, results[u.unit_id], seconds)
  if bar is not None:
    bar.close()
  return results


def point_key(base_seed: int, point_id: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(base_seed), point_id)
