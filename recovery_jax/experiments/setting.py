"""The ``Setting`` protocol: what each of the four settings (IOI, refusal, unlearning, TPP) supplies.

A setting is a stateless object (one per module, ``SETTING``); everything a run loads lives in the
context ``prepare`` returns. ``runner.run(config, workdir, setting)`` drives it and owns the rest:

  runner                                  setting
  ------                                  -------
  workdir claim, config.json, the mesh    validate(config)
                                          prepare(config, workdir, mesh) -> ctx
                                             (model, SAEs, features, defence, preflight)
  work units resumable under units/       units(config, ctx) -> [sweep.WorkUnit]
  progress, checksums, the orbax store    compute_unit(config, ctx, mesh, unit) -> {name: array}
  rows of every unit, divergence count    unit_rows(config, ctx, unit, result) -> (rows, curves)
  results file, curves.json               finish(config, ctx, workdir, rows, curves, wall_s) -> dict
  render + print                          render(workdir, plots) -> markdown  (no model: ``report``)

Keys and batching are the runner's rules, used through ``sweep.point_key`` and
``batching.map_batched``: an example's key is ``fold_in(key, example_id)``, never a function of a
batch position, so batch size, device count and resume change no number. The settings on the
engine's grid (IOI, unlearning, TPP) subclass ``grid.GridSetting``, which supplies ``units``,
``compute_unit`` and ``unit_rows``; refusal implements the protocol itself (its units are the jobs
of the two-stage recovery).
"""

from __future__ import annotations

from typing import Any, Sequence

from recovery_jax import sweep


class Setting:
  """Base class of a setting; subclasses override what is theirs (see the module docstring)."""

  name: str = ""
  rows_file: str = "results.jsonl"  # one JSON line per row of ``unit_rows``

  def validate(self, config) -> None:
    """Every config field the setting reads, checked before anything loads; errors name the field."""

  def prepare(self, config, workdir: str, mesh) -> Any:
    """Loads model, SAEs and data, selects features, builds the defence, runs the preflight; the
    context every later call receives. Writes the setting's preflight files (writer process only)."""
    raise NotImplementedError

  def units(self, config, ctx) -> list[sweep.WorkUnit]:
    """The run's work units (ids stable across runs of one config: a resumed run finds them)."""
    raise NotImplementedError

  def compute_unit(self, config, ctx, mesh, unit: sweep.WorkUnit) -> dict[str, Any]:
    """One unit's results as a flat dict of arrays (stored by the runner, read back on resume)."""
    raise NotImplementedError

  def unit_rows(self, config, ctx, unit: sweep.WorkUnit, result: dict) -> tuple[list[dict], list[dict]]:
    """(rows, curves) of one finished unit, from its stored result alone."""
    raise NotImplementedError

  def finish(self, config, ctx, workdir: str, rows: Sequence[dict], curves: Sequence[dict],
             wall_s: float) -> dict[str, Any]:
    """After every unit: the setting's own outputs beside the rows (run on every process; files are
    written by the writer process only). Returns extra entries of ``runner.run``'s result."""
    del config, ctx, workdir, rows, curves, wall_s
    return {}

  def render(self, workdir: str, plots: bool = True) -> str:
    """summary.md (and the setting's own files) re-rendered from a finished run's files, no model."""
    raise NotImplementedError
