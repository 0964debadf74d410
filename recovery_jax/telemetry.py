"""Watching a run: progress bars on the long phases and TensorBoard event files beside the JSONL.

Progress bars (tqdm) show the unit and an ETA on every long loop: the work units (``sweep.run_units``)
and every ``batching.map_batched`` loop (preflight and evaluation generation, harvests, feature
statistics), named after the phase that runs them (``profile.phase``). They are quiet when stderr is
not a terminal, when absl's verbosity is ``-2`` (ERROR) or lower, or when the run's config says
``progress=False`` (``progress(enabled)`` for the run's duration).

TensorBoard (tensorboardX; no TensorFlow or torch needed) under ``<workdir>/tensorboard``, written as
each work unit finishes (resumed units when they are read back) and flushed, so
``tensorboard --logdir runs/`` shows a sweep live:

  tensorboard/units      per-unit results at step = unit id: ``unit/<field>`` the mean over the
                         unit's rows of each field in ``UNIT_FIELDS`` present (fractions for booleans),
                         ``unit/recovered_fraction`` recovered among valid rows, ``unit/n_rows``,
                         ``unit/seconds`` (units computed in this process)
  tensorboard/<point>    one run per recovery curve (a grid point: ``p0003 none (shared)``) with
                         ``curve/<name>`` per step for each per-step history in the curve
                         (objective, delta_norm, drift_l2)

The folder is cleared when a run starts (every unit, resumed or not, is written again), so one
folder never holds two copies of a step.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
from typing import Any, Iterator, Sequence

from recovery_jax import profile

DIR = "tensorboard"
UNITS_RUN = "units"
UNIT_FIELDS = ("valid", "recovered", "diverged", "delta_norm", "rel_delta_norm", "act_drift_l2", "act_drift_rel",
               "zero_reactivation", "n_reactivated", "nonrefusal", "nonrefusal_eff", "strict", "base_like",
               "drift_rel")
CURVE_META = ("point_id", "grid_id", "name")

_ENABLED = [True]  # the active run's progress switch (``progress``)


# --- progress bars -------------------------------------------------------------------------------


def bars_enabled() -> bool:
  """Whether progress bars show: the run's switch, stderr a terminal, absl verbosity above ERROR."""
  if not _ENABLED[-1]:
    return False
  try:
    if not sys.stderr.isatty():
      return False
  except (AttributeError, ValueError):
    return False
  from absl import logging  # pylint: disable=import-outside-toplevel
  return logging.get_verbosity() > logging.ERROR


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[None]:
  """Progress bars on (``enabled``, still subject to ``bars_enabled``) or off for the block."""
  _ENABLED.append(bool(enabled))
  try:
    yield
  finally:
    _ENABLED.pop()


def bar(total: int, desc: str, unit: str = "it", **kw):
  """A tqdm bar (ETA included), disabled when ``bars_enabled()`` is False; close it (or use ``with``)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not bars_enabled(), **kw)


class BatchProgress:
  """A ``progress(done, n)`` callback for ``batching.map_batched``: a bar named after the current
  phase (``desc`` overrides), opened at the first finished batch, closed at the last. Loops that end
  within a second never show one."""

  def __init__(self, desc: str | None = None):
    self.desc = desc or profile.current_phase() or "batches"
    self._bar = None

  def __call__(self, done: int, n: int) -> None:
    if self._bar is None:
      if not bars_enabled():
        return
      self._bar = bar(n, self.desc, unit="ex", leave=False, delay=1.0)
    self._bar.update(done - self._bar.n)
    if done >= n:
      self._bar.close()


def batch_progress(desc: str | None = None) -> BatchProgress | None:
  """``BatchProgress(desc)`` when bars show, else None (``map_batched``'s default)."""
  return BatchProgress(desc) if bars_enabled() else None


# --- TensorBoard ---------------------------------------------------------------------------------


def _number(v) -> float | None:
  if isinstance(v, bool):
    return float(v)
  try:
    x = float(v)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def unit_scalars(rows: Sequence[dict]) -> dict[str, float]:
  """Per-unit results from the unit's rows (see the module docstring)."""
  out: dict[str, float] = {"n_rows": float(len(rows))}
  for key in UNIT_FIELDS:
    vals = [_number(r[key]) for r in rows if key in r]
    vals = [v for v in vals if v is not None]
    if vals:
      out[key] = sum(vals) / len(vals)
  if rows and all("recovered" in r for r in rows):
    pool = [r for r in rows if r.get("valid", True)]
    if pool:
      out["recovered_fraction"] = sum(bool(r["recovered"]) for r in pool) / len(pool)
  return out


def curve_run(curve: dict) -> str:
  """A curve's TensorBoard run name: ``p{point_id:04d} {name}`` with only safe characters."""
  name = f"p{int(curve.get('point_id', 0)):04d} {curve.get('name', '')}".strip()
  return re.sub(r"[^A-Za-z0-9_.() =+-]", "_", name)


def summary_writer():
  """``tensorboardX.SummaryWriter``. tensorboardX imports torch, when installed, only to accept torch
  tensors (seconds of import time in a JAX run); unless torch is already loaded, it is imported with
  torch hidden, so it falls back to numpy (all this module writes)."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # type: ignore[assignment]  # ``import torch`` raises ImportError
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel,unused-import
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  return SummaryWriter


class EventLog:
  """TensorBoard events of one run under ``<workdir>/tensorboard`` (see the module docstring);
  ``enabled=False`` (or the non-writer processes) writes nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.root = os.path.join(workdir, DIR)
    self.enabled = bool(enabled)
    self._writers: dict[str, Any] = {}
    if self.enabled:
      shutil.rmtree(self.root, ignore_errors=True)

  def _writer(self, run: str):
    if run not in self._writers:
      self._writers[run] = summary_writer()(logdir=os.path.join(self.root, run), flush_secs=5)
    return self._writers[run]

  def unit(self, unit_id: int, rows: Sequence[dict], curves: Sequence[dict], seconds: float | None = None) -> None:
    """Writes one finished unit: its per-unit scalars and its curves; flushed at once."""
    if not self.enabled:
      return
    w = self._writer(UNITS_RUN)
    for k, v in unit_scalars(rows).items():
      w.add_scalar(f"unit/{k}", v, unit_id)
    if seconds is not None:
      w.add_scalar("unit/seconds", float(seconds), unit_id)
    w.flush()
    for c in curves:
      cw = self._writer(curve_run(c))
      for key, ys in c.items():
        if key in CURVE_META or not isinstance(ys, (list, tuple)):
          continue
        for step, y in enumerate(ys):
          y = _number(y)
          if y is not None:
            cw.add_scalar(f"curve/{key}", y, step)
      cw.close()  # a curve is written once: close its file (and its writer thread) now
      del self._writers[curve_run(c)]

  def close(self) -> None:
    for w in self._writers.values():
      w.close()
    self._writers.clear()
