"""Sweeps: grids of points, work units, sharding over a ("data", "model") mesh, and resume.

A grid (from the config) expands to points in a stable order; ``point_id`` is the index. Points that
share static structure form groups; each group is cut into work units of ``unit_size`` points, which
one jit-compiled, vmapped call computes with the unit axis sharded over ``data``. After each unit its
results are saved with orbax (atomic), so a killed run resumes from the finished units and produces
identical final results (every point's PRNG key is ``fold_in(base_key, point_id)``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


class UnitStore:
  """Finished work units on disk (orbax), keyed by unit id; writes are atomic.

  Multi-process (one directory on a filesystem every process sees): every process constructs the
  store and calls ``save`` for every unit with the same (host, fully gathered) values; orbax's
  CheckpointManager runs its saves as collectives: process 0 writes numpy leaves and finalises the
  step (atomic rename of its temp directory), the others wait at its barriers. ``finished`` and
  ``load`` read the shared directory on every process."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    barrier(f"unit_store:{self.directory}")  # orbax's own barriers are Gloo collectives: align first
    os.makedirs(self.directory, exist_ok=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

  def finished(self) -> set[int]:
    self._mngr.reload()
    return set(int(s) for s in self._mngr.all_steps())

  def save(self, unit_id: int, tree) -> None:
    tree = jax.tree.map(np.asarray, tree)
    self._mngr.save(unit_id, args=self._ocp.args.StandardSave(tree))
    self._mngr.wait_until_finished()

  def load(self, unit_id: int):
    return self._mngr.restore(unit_id, args=self._ocp.args.StandardRestore())

  def close(self):
    self._mngr.close()


def run_units(units: Sequence[WorkUnit], compute: Callable[[WorkUnit], Any], store: UnitStore,
              log: Callable[[str], None] = print, progress: bool = False) -> dict[int, Any]:
  """Computes every unit not yet in ``store`` (saving each as it finishes); returns all results.
  ``progress``: a tqdm bar over the units still to compute (with an ETA)."""
  done = store.finished()
  if done:
    log(f"resuming: {len(done)} of {len(units)} work units already finished")
  todo = [u for u in units if u.unit_id not in done]
  bar = None
  if progress and todo:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(todo), desc="work units", unit="unit", dynamic_ncols=True)
  results = {u.unit_id: store.load(u.unit_id) for u in units if u.unit_id in done}
  for u in todo:
    t0 = time.time()
    out = compute(u)
    store.save(u.unit_id, out)
    results[u.unit_id] = jax.tree.map(np.asarray, out)
    msg = (f"work unit {u.unit_id + 1}/{len(units)} finished: {len(u.points)} points, group {u.group}, "
           f"{time.time() - t0:.1f} s")
    if bar is not None:
      bar.update(1)
      bar.write(msg)
    else:
      log(msg)
  if bar is not None:
    bar.close()
  return results


def point_key(base_seed: int, point_id: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(base_seed), point_id)
