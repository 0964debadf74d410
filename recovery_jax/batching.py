"""The one batching rule: map a function over examples in fixed-size, padded, sharded batches.

Every loop over examples (preflight, recovery, generation, harvest) goes through ``map_batched``:

  out = map_batched(fn, examples, batch_size=16, mesh=mesh)   # examples: pytree, leaves [N, ...]

``fn(batch, ids)`` gets a pytree with leaves [B, ...] and the examples' ids [B] (int32: the
position of each example in ``examples``, which is its id) and returns a pytree with leaves [B, ...].
Every batch has the same B (the last one is padded by repeating its last example, and the padded
rows are dropped), so one compiled program serves every batch. With a ``mesh`` B is rounded up to a
multiple of its ``data`` axis and the batch is placed with its leading axis over ``data``.

Randomness never depends on batching: a function that needs a key per example derives it as
``fold_in(key, ids[i])`` (``example_keys``), so batch size, device count and resume change no number.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_size_for(n: int, batch_size: int | None, mesh: Mesh | None = None, exact: bool = False) -> int:
  """The fixed batch size for ``n`` examples: ``batch_size`` (None or 0: all of them), at most ``n``
  unless ``exact`` (then a smaller set is padded up to it, so calls on sets of different sizes share
  one program), rounded up to a multiple of the mesh's ``data`` axis."""
  if n < 1:
    raise ValueError("map_batched: no examples")
  b = n if not batch_size else (int(batch_size) if exact else min(int(batch_size), n))
  if b < 1:
    raise ValueError(f"map_batched: batch_size={batch_size}: expected >= 1")
  m = 1 if mesh is None else int(mesh.shape["data"])
  return -(-b // m) * m


def batch_indices(n: int, b: int) -> Iterator[tuple[np.ndarray, int]]:
  """(indices [b], number of real rows) per batch: ``range(n)`` in order, the last batch padded by
  repeating its last index."""
  for s in range(0, n, b):
    idx = np.arange(s, min(n, s + b))
    real = len(idx)
    yield np.concatenate([idx, np.full(b - real, idx[-1])]).astype(np.int32), real


def _place(tree, mesh: Mesh | None):
  if mesh is None:
    return tree
  def put(a):
    a = np.asarray(a)
    return jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (a.ndim - 1)))))
  return jax.tree.map(put, tree)


def map_batched(fn: Callable[[Any, np.ndarray], Any], examples, batch_size: int | None = None, *,
                mesh: Mesh | None = None, exact: bool = False,
                progress: Callable[[int, int], None] | None = None):
  """``fn`` over the leading axis of ``examples`` in fixed-size padded batches -> numpy pytree [N, ...].

  fn(batch, ids): batch a pytree with leaves [B, ...] (numpy, or sharded over ``data`` with a
  mesh), ids int32 [B] the examples' positions in ``examples``; returns a pytree with leaves [B, ...].
  exact: every batch has exactly ``batch_size`` rows, even when ``n`` is smaller (``batch_size_for``).
  progress: called as ``progress(done, n)`` after each batch (None: a bar named after the current
  phase where bars show, ``telemetry.batch_progress``)."""
  if progress is None:
    from recovery_jax import telemetry  # pylint: disable=import-outside-toplevel
    progress = telemetry.batch_progress()
  leaves = jax.tree.leaves(examples)
  n = int(np.shape(leaves[0])[0]) if leaves else 0
  b = batch_size_for(n, batch_size, mesh, exact)
  outs = []
  for idx, real in batch_indices(n, b):
    batch = jax.tree.map(lambda a: np.asarray(a)[idx], examples)
    out = fn(_place(batch, mesh), idx)
    outs.append(jax.tree.map(lambda a: np.asarray(a)[:real], out))
    if progress is not None:
      progress(int(idx[real - 1]) + 1, n)
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def example_keys(key: jax.Array, ids) -> jax.Array:
  """Per-example keys ``fold_in(key, id)`` [B] for example ids [B]: independent of batching."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.asarray(ids, jax.numpy.int32))
