"""The shared runner: every setting (``setting.Setting``) runs through ``run(config, workdir, setting)``.

The runner owns what the settings share: the workdir (claimed and locked, ``config.json``), the
device mesh, the work units (resumable under ``workdir/units``, checksummed, ``on_corrupt``),
progress bars, collection of every unit's rows (as each unit finishes), the divergence count,
``results.jsonl`` / ``curves.json``, TensorBoard events (``telemetry``), ``manifest.json``
(``manifest``), the per-phase profile (``profile``: ``profile.json`` and the end of summary.md),
rendering (summary.md, then ``report.html``: ``html_report``) and printing. A setting supplies validation, loading and preflight, its
units, how one unit is computed, its rows and its own sections (see ``setting.py``); settings on the
engine's grid subclass ``grid.GridSetting``. ``python -m recovery_jax.report --workdir=...``
re-renders any finished run through ``render`` (its setting's ``render`` and the profile).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import logging

from recovery_jax import errors, html_report, manifest, outputs, sweep, telemetry
from recovery_jax import profile as profile_lib
from recovery_jax.experiments import setting as setting_lib


def log(msg: str) -> None:
  """Progress for the user on stdout (the absl log keeps a copy at debug level)."""
  logging.debug("%s", msg)
  print(msg, flush=True)


def snapshot_config(config, workdir: str) -> None:
  """Claims ``workdir`` (``recovery_jax.workdir.claim``: locked, one config per workdir) and writes
  config.json; a workdir holding another config's run is an error unless overwriting was asked for."""
  from recovery_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  workdir_lib.claim(workdir, config, writer=is_writer())
  path = os.path.join(workdir, "config.json")
  if is_writer() and not os.path.exists(path):
    outputs.atomic_write(path, config.to_json(indent=2, sort_keys=True))


def is_writer() -> bool:
  """Whether this process writes the run's outputs: process 0 of a multi-process run (the others
  compute their share of every unit and join orbax's collective saves, but write nothing)."""
  return jax.process_index() == 0


def gather(tree, name: str):
  """``tree`` made readable on this host: arrays sharded over devices of several processes are not
  fully addressable, so they are gathered to numpy (``process_allgather``, after a ``sweep.barrier``
  called ``name``); on one process ``tree`` is returned as it is."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  tree = jax.block_until_ready(tree)
  sweep.barrier(name)
  return multihost_utils.process_allgather(tree, tiled=True)


def on_corrupt(config) -> str:
  """What a resumed run does with a stored work unit that fails its checksum: ``recompute`` (default:
  a warning naming it, then it is computed again) or ``stop`` (config field ``on_corrupt``)."""
  value = config.get("on_corrupt", "recompute")
  if value not in ("recompute", "stop"):
    raise errors.UserError(f"config field 'on_corrupt'={value!r}: expected 'recompute' or 'stop'")
  return value


def make_mesh(config):
  """The ("data", "model") mesh of ``config.mesh``; a bad shape is a ``UserError`` naming the field."""
  try:
    return sweep.make_mesh(int(config.mesh.data), int(config.mesh.model))
  except ValueError as e:
    raise errors.UserError(f"config field 'mesh': {e}") from e


def tensorboard_enabled(config) -> bool:
  """Config field ``tensorboard`` (default True): TensorBoard events under ``workdir/tensorboard``."""
  value = config.get("tensorboard", True)
  if not isinstance(value, bool):
    raise errors.UserError(f"config field 'tensorboard'={value!r}: expected True or False")
  return value


def write_manifest(config, workdir: str, setting: setting_lib.Setting) -> None:
  """``workdir/manifest.json`` (``recovery_jax.manifest``) once the setting has loaded its files."""
  manifest.write(workdir, manifest.build(config, setting.name or str(config.get("experiment", ""))))


def render(workdir: str, setting: setting_lib.Setting, plots: bool = True) -> str:
  """A finished run re-rendered (``python -m recovery_jax.report``): the setting's ``render``
  (summary.md and its own files), then the run's ``profile.json``, when there is one, as the section
  that ends summary.md, then ``report.html`` where there is a summary.md (``html_report.write``);
  returns the markdown."""
  text = setting.render(workdir, plots=plots)
  prof = profile_lib.read(workdir)
  text = text if prof is None else render_profile(workdir, text, prof)
  if os.path.isfile(os.path.join(workdir, html_report.SUMMARY)):
    html_report.write(workdir)
  return text


def run(config, workdir: str, setting: setting_lib.Setting) -> dict[str, Any]:
  """Runs ``setting`` on ``config`` into ``workdir``: validate, claim the workdir, prepare (then
  ``manifest.json``), every work unit (resumed where stored; each unit's rows and TensorBoard events
  as it finishes), rows, the setting's own outputs, render, the per-phase profile (``profile.json``,
  printed and at the end of summary.md). Returns ``{"rows": rows, "text": summary markdown (writer
  process), "profile": the profile, **setting.finish(...)}``."""
  t_start = time.time()
  prof = profile_lib.Profile()
  with profile_lib.active(prof), telemetry.progress(bool(config.get("progress", True))):
    with profile_lib.phase("load"):
      setting.validate(config)
      use_tb = tensorboard_enabled(config)
      os.makedirs(workdir, exist_ok=True)
      snapshot_config(config, workdir)
      manifest.begin()
      mesh = make_mesh(config)
      ctx = setting.prepare(config, workdir, mesh)
      units = setting.units(config, ctx)
      if is_writer():
        write_manifest(config, workdir, setting)
    rows, curves = [], []
    if units:
      log(f"{setting.name}: {len(units)} work units on a {dict(mesh.shape)} mesh")
      events = telemetry.EventLog(workdir, enabled=use_tb and is_writer())
      per_unit: dict[int, tuple[list, list]] = {}

      def on_result(u: sweep.WorkUnit, result, seconds: float | None) -> None:
        with profile_lib.phase("evaluation"):
          per_unit[u.unit_id] = setting.unit_rows(config, ctx, u, result)
          events.unit(u.unit_id, *per_unit[u.unit_id], seconds=seconds)

      store = sweep.UnitStore(os.path.join(workdir, "units"))
      try:
        with profile_lib.phase("recovery"):
          sweep.run_units(units, lambda u: setting.compute_unit(config, ctx, mesh, u), store, log=log,
                          progress=config.get("progress", True), on_corrupt=on_corrupt(config), on_result=on_result)
      finally:
        store.close()
        events.close()
      for u in units:
        r, c = per_unit[u.unit_id]
        rows += r
        curves += c
    with profile_lib.phase("evaluation"):
      n_div = sum(1 for r in rows if r.get("diverged"))
      if n_div:
        logging.warning("%d of %d rows diverged (non-finite objective, gradient or delta)", n_div, len(rows))
        print(f"warning: {n_div} of {len(rows)} examples diverged (non-finite objective, gradient or delta); "
              f"flagged 'diverged' in {setting.rows_file} and the summary, never counted as recovered", flush=True)
      if is_writer():
        outputs.write_jsonl(os.path.join(workdir, setting.rows_file), rows)
        if curves:
          outputs.atomic_write(os.path.join(workdir, "curves.json"), json.dumps(curves))
      extra = setting.finish(config, ctx, workdir, rows, curves, time.time() - t_start)
    out = {"rows": rows, **extra}
    if is_writer():
      with profile_lib.phase("report"):
        text = setting.render(workdir, plots=config.plots)
  out["profile"] = prof.result(time.time() - t_start)
  if is_writer():
    profile_lib.write(workdir, out["profile"])
    out["text"] = render_profile(workdir, text, out["profile"])
    write_html(workdir)
    print(out["text"], flush=True)
  return out


def write_html(workdir: str) -> None:
  """``report.html`` (``html_report``) at a run's end; a failure there is a warning naming the re-render
  command (the run's rows and summary.md are written by then)."""
  if not os.path.isfile(os.path.join(workdir, html_report.SUMMARY)):
    return
  try:
    html_report.write(workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("report.html not written: %s", e)
    print(f"warning: {workdir}/report.html not written ({type(e).__name__}: {e}); "
          f"python -m recovery_jax.report --workdir={workdir} writes it again", flush=True)


def render_profile(workdir: str, text: str, prof: dict) -> str:
  """``text`` (the setting's summary) with the profile section, which also ends summary.md."""
  section = profile_lib.table(prof)
  path = os.path.join(workdir, "summary.md")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      md = f.read()
    outputs.atomic_write(path, md.split(profile_lib.SECTION_TITLE)[0].rstrip("\n") + "\n\n" + section)
  return text.split(profile_lib.SECTION_TITLE)[0].rstrip("\n") + "\n\n" + section
