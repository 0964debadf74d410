"""Experiment outputs: per-example JSON lines, tables, plots. Writes are atomic; a full disk is one line.

Every app writes through these; ``recovery_jax.report`` (the CLI) re-renders a finished run."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")


def is_disk_full(e: BaseException | str) -> bool:
  """Whether ``e`` (an exception, its causes, or a message) is a full disk (ENOSPC / EDQUOT), also as
  tensorstore words it (a ValueError "...: No space left on device [os_error_code='28']")."""
  if isinstance(e, str):
    return any(t in e for t in _DISK_FULL_TEXT)
  import errno  # pylint: disable=import-outside-toplevel
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(t in str(e) for t in _DISK_FULL_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def human_bytes(n: float) -> str:
  for unit in ("bytes", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} TB"  # unreachable


def disk_full_message(path: str, nbytes: int, what: str = "writing it", after: str = "") -> str:
  """One line: the path, the size that was being written, the space free there now."""
  import shutil  # pylint: disable=import-outside-toplevel
  free, d = "", os.path.dirname(os.path.abspath(path))
  while d and not os.path.isdir(d) and os.path.dirname(d) != d:
    d = os.path.dirname(d)
  try:
    free = f", {human_bytes(shutil.disk_usage(d).free)} free there now"
  except OSError:
    pass
  return (f"{path}: no space left on device {what} (it needs about {human_bytes(nbytes)}{free})"
          + (f"; {after}" if after else "; free some space and rerun"))


def atomic_write(path: str, text: str | bytes) -> None:
  """Writes ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``. A full disk
  is a UserError naming ``path`` and the size; the previous file (if any) is left as it was."""
  data = text.encode() if isinstance(text, str) else bytes(text)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, OSError) and is_disk_full(e):
      from recovery_jax import errors  # pylint: disable=import-outside-toplevel
      raise errors.UserError(disk_full_message(path, len(data))) from None
    raise
  try:  # the rename itself survives a crash once the folder is synced
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def _jsonable(v):
  if isinstance(v, (np.floating, float)):
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, (np.bool_,)):
    return bool(v)
  if isinstance(v, np.ndarray):
    return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  return v


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  """One JSON object a line, written atomically (``atomic_write``)."""
  atomic_write(path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows))


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table (``tabulate``, ``tablefmt="github"``): floats as ``.3f``, every other
  cell as ``str`` (strings that look like numbers are kept as written); cells left-aligned."""
  from tabulate import tabulate  # pylint: disable=import-outside-toplevel
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  bad = [i for i, r in enumerate(rows) if len(r) != len(header)]
  if bad:
    raise ValueError(f"format_table: row {bad[0]} has {len(rows[bad[0]])} cells; expected {len(header)} "
                     f"(header {list(header)})")
  return tabulate([[fmt(v) for v in r] for r in rows], headers=list(header), tablefmt="github",
                  disable_numparse=True)


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save_figure(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
  """Labels, legend, and an atomic save to ``path``."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  pyplot().close(fig)
  os.replace(path + ".tmp.png", path)


def plot_recovery_vs_drift(path: str, groups: Mapping[str, tuple[np.ndarray, np.ndarray]], xlabel: str,
                           ylabel: str, title: str) -> None:
  """Scatter per group (e.g. projection mode): x = defended-feature drift, y = recovered objective."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, (x, y) in groups.items():
    ax.scatter(x, y, s=14, alpha=0.75, label=name)
  ax.axhline(0.0, color="grey", lw=0.8, ls="--")
  save_figure(fig, ax, path, xlabel, ylabel, title)


def plot_curves(path: str, curves: Mapping[str, np.ndarray], ylabel: str, title: str) -> None:
  """Per-step curves, one line per name."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, y in curves.items():
    ax.plot(np.arange(1, len(y) + 1), y, label=name)
  save_figure(fig, ax, path, "step", ylabel, title)
