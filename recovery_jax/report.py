"""Experiment outputs: per-example JSON lines, the summary table, plots. Writes are atomic."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


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
  atomic_write(path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows))


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table."""
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  cells = [[fmt(v) for v in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
  return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
  """Labels, legend, and an atomic save to ``path``."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  _pyplot().close(fig)
  os.replace(path + ".tmp.png", path)


def plot_recovery_vs_drift(path: str, groups: Mapping[str, tuple[np.ndarray, np.ndarray]], xlabel: str,
                           ylabel: str, title: str) -> None:
  """Scatter per group (e.g. projection mode): x = defended-feature drift, y = recovered objective."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, (x, y) in groups.items():
    ax.scatter(x, y, s=14, alpha=0.75, label=name)
  ax.axhline(0.0, color="grey", lw=0.8, ls="--")
  _finish(fig, ax, path, xlabel, ylabel, title)


def plot_curves(path: str, curves: Mapping[str, np.ndarray], ylabel: str, title: str) -> None:
  """Per-step curves, one line per name."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, y in curves.items():
    ax.plot(np.arange(1, len(y) + 1), y, label=name)
  _finish(fig, ax, path, "step", ylabel, title)


def _main(argv) -> None:  # pragma: no cover - exercised through the CLI test
  """``python -m recovery_jax.report --workdir=<finished run>``: re-renders summary and plots."""
  del argv
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from recovery_jax import errors  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments import summary  # pylint: disable=import-outside-toplevel
  try:
    text, _ = summary.render(flags.FLAGS.workdir, plots=not flags.FLAGS.no_plots)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(text)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  flags.DEFINE_string("workdir", None, "A finished run's folder (results.jsonl, curves.json, run.json).")
  flags.DEFINE_bool("no_plots", False, "Skip the plots.")
  flags.mark_flags_as_required(["workdir"])
  app.run(_main)
