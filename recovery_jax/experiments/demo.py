"""The main job: a demo-size run of every setting, then one combined report.

Each setting of ``config.settings`` (name -> a config file spec and ``dotted.key=value`` overrides)
runs with its own experiment module in ``workdir/<name>`` (so each keeps its own resume), and
``workdir/report.md`` gets one row per (setting, mode, variant): valid cases, recovered with a Wilson
95% interval, drift, reactivation and relative delta norm, with links to the setting's summary, plots
and feature cards. A finished setting (``workdir/<name>/demo_done.json``) is not run again; a failing
setting is reported in its row, the others still run, and the command then fails naming it.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from typing import Any

from recovery_jax import config_utils, errors, experiments, outputs
from recovery_jax.experiments import runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DONE = "demo_done.json"
COLUMNS = ("setting", "mode", "variant", "valid/N", "recovered", "rate [95% CI]", "act drift", "react. frac",
           "rel. delta norm", "wall s", "outputs")


def validate(config) -> None:
  if not config.settings:
    raise errors.UserError("config field 'settings' is empty: nothing to run")
  names(config)
  for name, s in config.settings.items():
    if not s.get("config"):
      raise errors.UserError(f"config field 'settings.{name}.config' is empty: expected e.g. 'configs/ioi.py'")


def names(config) -> tuple[str, ...]:
  """The settings in run order: ``config.order`` (unknown names are an error), else as given."""
  order = tuple(config.get("order", ()) or config.settings.keys())
  unknown = [n for n in order if n not in config.settings]
  if unknown:
    raise errors.UserError(f"config field 'order' names {unknown}, not in 'settings' ({sorted(config.settings)})")
  return order


def setting_config(name: str, s) -> Any:
  """The ConfigDict of one setting: its file and overrides (errors name the setting)."""
  try:
    return config_utils.load_config_file(s.config, tuple(s.get("overrides", ())), root=ROOT)
  except ValueError as e:
    raise errors.UserError(f"config field 'settings.{name}': {e}") from e


def summary_rows(subdir: str) -> list[dict]:
  """The setting's rows in the runner's summary format (``summary.jsonl``): one per grid point x mode
  x variant; a setting with its own report writes ``demo_rows.jsonl`` in the same keys instead."""
  for name in ("demo_rows.jsonl", "summary.jsonl"):
    path = os.path.join(subdir, name)
    if os.path.exists(path):
      with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
  return []


def _links(workdir: str, name: str) -> str:
  sub = os.path.join(workdir, name)
  found = [f for f in ("summary.md", "recovery.md", "cards/cards.md", "cards/cards.html") if os.path.exists(
      os.path.join(sub, f))]
  found += sorted(f for f in os.listdir(sub) if f.endswith(".png")) if os.path.isdir(sub) else []
  return ", ".join(f"[{f}]({name}/{f})" for f in found)


def _fmt(v, spec=".3f") -> str:
  return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def report_rows(workdir: str, name: str, wall_s: float | None, error: str | None) -> list[list[str]]:
  """Table rows of one setting (one per summary row; one 'failed' row on error)."""
  links = _links(workdir, name)
  if error is not None:
    return [[name, "-", "-", "-", "-", f"failed: {error}", "-", "-", "-", _fmt(wall_s, ".0f"), links]]
  out = []
  for s in summary_rows(os.path.join(workdir, name)):
    nv = int(s["n_valid"])
    ci = s.get("ci") or [float("nan")] * 2
    rate = f"{s['rate']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if nv else "-"
    variant = s.get("variant", "-") + (f" ({s['run']})" if s.get("run") else "")
    out.append([name, s.get("mode", "-"), variant, f"{nv}/{s.get('n_examples', '?')}",
                f"{s['n_recovered']}/{nv}", rate, _fmt(s.get("act_drift_valid")), _fmt(s.get("reactivation_valid")),
                _fmt(s.get("rel_delta_norm_valid")), _fmt(wall_s, ".0f"), links])
  return out or [[name, "-", "-", "-", "-", "no summary rows", "-", "-", "-", _fmt(wall_s, ".0f"), links]]


def run(config, workdir: str) -> dict[str, Any]:
  """Runs every setting of ``config.settings`` into ``workdir/<name>``; writes ``report.md``."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  done, failed = {}, {}
  cfgs = {name: setting_config(name, config.settings[name]) for name in names(config)}  # bad configs: before any run
  for name, cfg in cfgs.items():
    s = config.settings[name]
    sub = os.path.join(workdir, name)
    marker = os.path.join(sub, DONE)
    if os.path.exists(marker):
      with open(marker) as f:
        done[name] = json.load(f)["wall_s"]
      runner.log(f"[{name}] finished earlier ({done[name]:.0f} s): not run again")
      continue
    runner.log(f"[{name}] {s.config} {' '.join(s.get('overrides', ()))} -> {sub}")
    t = time.time()
    try:
      experiments.load(cfg.experiment).run(cfg, sub)
    except Exception as e:  # pylint: disable=broad-except  # reported in the row; the command fails below
      failed[name] = (time.time() - t, f"{type(e).__name__}: {e}".splitlines()[0][:200])
      runner.log(f"[{name}] failed:\n{traceback.format_exc()}")
      continue
    done[name] = time.time() - t
    if runner.is_writer():
      outputs.atomic_write(marker, json.dumps({"wall_s": done[name]}))
  rows = []
  for name in names(config):
    wall, err = (done[name], None) if name in done else failed[name]
    rows += report_rows(workdir, name, wall, err)
  text = (f"# recovery_jax demo: every setting, demo size\n\n{outputs.format_table(COLUMNS, rows)}\n\n"
          "Rates are recovered / valid with Wilson 95% intervals; drifts are absolute L2 norms over the clamped "
          "features; 'react. frac' the fraction of clamped features that fire again; wall time per setting "
          f"(this run: {time.time() - t0:.0f} s in all; a setting finished earlier shows its own run's time).\n")
  if runner.is_writer():
    outputs.atomic_write(os.path.join(workdir, "report.md"), text)
  print(text, flush=True)
  if failed:
    raise errors.UserError(f"{len(failed)} setting(s) failed: {', '.join(failed)} (see {workdir}/report.md and the "
                           "log above); rerun the same command to retry them")
  return {"rows": rows, "wall_s": done}
