"""Summaries and plots of a finished run, rendered from its per-example rows alone.

``render(workdir)`` reads ``run.json`` (title, header, objective name, wall time), ``results.jsonl``
(one row per grid point and example, written by ``runner.run``) and ``curves.json`` (mean
objective per step and point), and writes ``summary.md``, ``summary.jsonl`` and the plots
(``recovery_vs_drift.png``: recovered score vs drift per mode; ``objective_curves.png``;
``recovery_vs_budget.png``: fraction recovered vs budget, when several budgets were swept), so a
finished run can be re-rendered without recomputing (``python -m recovery_jax.report``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from recovery_jax import errors, metrics, outputs
from recovery_jax.recovery import attribution
from recovery_jax.recovery import min_budget

SWEEP_NAMES = {"n_features": "K", "clamp_value": "clamp", "budget": "budget", "seed": "seed"}


def _mean(rows: Sequence[dict], key: str) -> float:
  vals = [float(r[key]) for r in rows if r.get(key) is not None and np.isfinite(float(r[key]))]
  return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: Sequence[dict]) -> list[dict]:
  """One summary dict per grid point (in point order) from per-example rows."""
  by_point: dict[int, list[dict]] = {}
  for r in rows:
    by_point.setdefault(int(r["point_id"]), []).append(r)
  out = []
  for pid in sorted(by_point):
    rs = by_point[pid]
    v = [r for r in rs if r["valid"]]
    nv, k = len(v), sum(1 for r in v if r["recovered"])
    lo, hi = metrics.wilson_interval(k, nv) if nv else (float("nan"), float("nan"))
    s = {key: rs[0][key] for key in rs[0] if key in SWEEP_NAMES or key in ("mode", "variant", "grid_id")}
    s.update(point_id=pid, n_examples=len(rs), n_valid=nv, n_recovered=k, rate=k / nv if nv else float("nan"),
             ci=[lo, hi], mean_recovered_valid=_mean(v, "recovered_score"), act_drift_valid=_mean(v, "act_drift_l2"),
             decode_drift_valid=_mean(v, "decode_drift_l2"), pre_act_drift_valid=_mean(v, "pre_act_drift_l2"),
             act_drift_rel_valid=_mean(v, "act_drift_rel"),
             n_zero_ref_valid=sum(1 for r in v if not r["ref_norm"] > 0),
             reactivation_valid=_mean(v, "reactivated_fraction_within_eligible"),
             zero_react_valid=sum(1 for r in v if r["zero_reactivation"]),
             rel_delta_norm_valid=_mean(v, "rel_delta_norm"), steps_at_budget_valid=_mean(v, "steps_at_budget"),
             n_diverged=sum(1 for r in rs if r["diverged"]))
    if any(k.startswith("attr_") for k in rs[0]) and nv:
      s["attribution"] = {n: {"recovered": sum(1 for r in v if r[f"attr_{n}_recovered"]),
                              "energy": _mean(v, f"attr_{n}_energy")} for n in attribution.COMPONENTS}
    out.append(s)
  return out


def _table(summary: list[dict], objective_name: str) -> str:
  sweep_keys = [k for k in SWEEP_NAMES if summary and k in summary[0]]
  header = [SWEEP_NAMES[k] for k in sweep_keys] + [
      "mode", "variant", "valid/N", "recovered", "rate [95% CI]", f"mean rec. {objective_name} (valid)",
      "act drift", "decode drift", "pre-act drift", "react. frac", "zero-react", "rel. delta norm", "steps at budget",
      "diverged"]
  rows = []
  for s in summary:
    nv = s["n_valid"]
    rate = f"{s['rate']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if nv else "-"
    rows.append([s[k] for k in sweep_keys] + [
        s["mode"], s["variant"], f"{nv}/{s['n_examples']}", f"{s['n_recovered']}/{nv}", rate,
        s["mean_recovered_valid"], s["act_drift_valid"], s["decode_drift_valid"], s["pre_act_drift_valid"],
        s["reactivation_valid"], f"{s['zero_react_valid']}/{nv}", s["rel_delta_norm_valid"],
        s["steps_at_budget_valid"], s["n_diverged"]])
  return outputs.format_table(header, rows)


def _attribution_table(summary: list[dict], top_k: int) -> str:
  rows = [[s.get("n_features", ""), s.get("clamp_value", ""), s.get("budget", ""), s["mode"],
           *[f"{s['attribution'][n]['recovered']}/{s['n_valid']} ({s['attribution'][n]['energy']:.2f})"
             for n in attribution.COMPONENTS]] for s in summary if "attribution" in s]
  if not rows:
    return ""
  header = ["K", "clamp", "budget", "mode", *[f"{n} replay" for n in attribution.COMPONENTS]]
  return ("Recovery-path attribution (per-prompt deltas, valid prompts; recovered when only that component "
          f"is replayed under the clamp, mean energy fraction in brackets; top-k = {top_k}):\n\n"
          f"{outputs.format_table(header, rows)}\n\n")


def _min_budget_table(rows: Sequence[dict], refined: Sequence[dict] = ()) -> str:
  """The minimum relative budget per valid example (``min_budget.from_rows``: the first rho of the
  sweep that recovered it; with ``refined`` rows of ``experiments.bisect``, also the bisected minimum),
  median with a bootstrap interval, per K x clamp x seed x mode x variant; empty unless the run swept
  more than one relative budget."""
  budgets = sorted({float(r["budget"]) for r in rows if r.get("budget_scale") == "relative" and "budget" in r})
  if len(budgets) < 2:
    return ""
  keys = [k for k in ("n_features", "clamp_value", "seed") if k in rows[0]] + ["mode", "variant"]
  fmt = lambda x: f"> {budgets[-1]:g}" if np.isinf(x) else f"{x:.3g}"
  ci = lambda xs: "{} [{}, {}]".format(*(fmt(v) for v in min_budget.median_ci(xs)))
  bisected = {}
  for r in refined:
    if r.get("bisect_steps"):
      bisected.setdefault(tuple(r.get(k) for k in keys), []).append(min_budget.rho(r["min_rho"]))
  steps = max([int(r.get("bisect_steps", 0)) for r in refined] or [0])
  table = []
  for group, mins in min_budget.from_rows(rows, keys).items():
    table.append([*group, len(mins), sum(1 for m in mins if np.isfinite(m)), ci(mins)]
                 + ([ci(bisected[group]) if group in bisected else "-"] if steps else []))
  header = ([SWEEP_NAMES.get(k, k) for k in keys] + ["valid", "recovered at some rho", "median min rho on the grid [95% CI]"]
            + ([f"after {steps} bisection steps"] if steps else []))
  return (f"Minimum relative budget per valid example: the smallest rho of {budgets} that recovered it (never "
          "recovered: beyond the sweep)" + (", then narrowed by bisection (experiments/bisect.py; per-example "
          "variants)" if steps else "") + "; median with a percentile-bootstrap interval:\n\n"
          f"{outputs.format_table(header, table)}\n\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def render(workdir: str, plots: bool = True) -> tuple[str, list[dict]]:
  """Writes summary.md, summary.jsonl and plots from results.jsonl, curves.json and run.json."""
  need = [os.path.join(workdir, n) for n in ("run.json", "results.jsonl", "curves.json")]
  missing = [p for p in need if not os.path.exists(p)]
  if missing:
    raise errors.UserError(f"{workdir}: not a finished run (missing {', '.join(missing)})")
  with open(need[0]) as f:
    meta = json.load(f)
  rows = read_jsonl(need[1])
  with open(need[2]) as f:
    curves = json.load(f)
  mb = os.path.join(workdir, "min_budget.jsonl")
  refined = read_jsonl(mb) if os.path.exists(mb) else []
  summary = summarize(rows)
  n_zero = sum(s["n_zero_ref_valid"] for s in summary)
  notes = ("Drifts are absolute L2 norms over the clamped features (relative drift is undefined where the "
           f"defended features are all zero: {n_zero} valid example-points here). The relative delta norm is "
           "||delta|| / ||h_def|| at the delta positions; steps at budget counts steps with ||delta|| on the "
           "budget.\n\n")
  if any(r.get("budget_scale") == "relative" for r in rows):
    notes += ("Budgets are relative (recovery.budget_scale=relative): the budget column is rho, and each "
              "problem's delta is bounded by rho * ||h_def||_F at its delta positions (row field budget_bound)."
              "\n\n")
  n_div = sum(s["n_diverged"] for s in summary)
  if n_div:
    notes += (f"**{n_div} example-points diverged** (a non-finite objective, gradient, delta or behaviour score); they count "
              "as not recovered and their drifts are void (column 'diverged'; field 'diverged' in results.jsonl)."
              "\n\n")
  links = "".join(f"{line}\n" for line in meta.get("links", ()))
  text = (f"# {meta['title']}\n\n{meta['header']}\n\n{_table(summary, meta['objective_name'])}\n\n{notes}"
          f"{_min_budget_table(rows, refined)}{_attribution_table(summary, meta['attribution_top_k'])}{links + chr(10) if links else ''}"
          f"(wall time {meta['wall_s']:.0f} s)\n")
  outputs.atomic_write(os.path.join(workdir, "summary.md"), text)
  outputs.write_jsonl(os.path.join(workdir, "summary.jsonl"), summary)
  if plots:
    _plots(workdir, rows, curves, meta["objective_name"])
    plot_recovered_vs_budget(os.path.join(workdir, "recovery_vs_budget.png"), summary,
                             "relative budget rho" if any(r.get("budget_scale") == "relative" for r in rows)
                             else "budget ||delta||")
  return text, summary


def recovered_vs_budget(summary: Sequence[dict]) -> dict[tuple, dict[str, tuple[np.ndarray, ...]]]:
  """Recovered fraction per budget from ``summarize``'s points, pooled over seeds: panel (the swept
  (K, clamp) values that vary, as (name, value) pairs) -> line "mode (variant)" -> (budgets [P],
  rate [P], Wilson lo [P], hi [P]), budgets ascending; points without a valid example are left out.
  Empty unless more than one budget was swept."""
  if len({float(s["budget"]) for s in summary if "budget" in s}) < 2:
    return {}
  varying = [k for k in ("n_features", "clamp_value") if len({s.get(k) for s in summary}) > 1]
  counts: dict[tuple, dict[str, dict[float, list[int]]]] = {}
  for s in summary:
    panel = tuple((SWEEP_NAMES[k], s[k]) for k in varying)
    c = counts.setdefault(panel, {}).setdefault(f"{s['mode']} ({s['variant']})", {}).setdefault(float(s["budget"]), [0, 0])
    c[0] += s["n_recovered"]
    c[1] += s["n_valid"]
  out: dict[tuple, dict[str, tuple[np.ndarray, ...]]] = {}
  for panel, lines in counts.items():
    for name, by_b in lines.items():
      pts = [(b, k, n) for b, (k, n) in sorted(by_b.items()) if n]
      if pts:
        ci = np.asarray([metrics.wilson_interval(k, n) for _, k, n in pts])
        out.setdefault(panel, {})[name] = (np.asarray([b for b, _, _ in pts]), np.asarray([k / n for _, k, n in pts]),
                                           ci[:, 0], ci[:, 1])
  return out


def plot_recovered_vs_budget(path: str, summary: Sequence[dict], xlabel: str) -> bool:
  """Fraction recovered (among valid examples, pooled over seeds) vs the budget with Wilson 95% bars,
  one line per mode x variant, one panel per swept (K, clamp) (PNG); False (nothing written) unless
  the run swept more than one budget."""
  data = recovered_vs_budget(summary)
  if not data:
    return False
  plt = outputs.pyplot()
  n = len(data)
  cols = min(n, 3)
  rows_n = -(-n // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False, sharey=True)
  budgets = sorted({float(s["budget"]) for s in summary})
  for ax, (panel, lines) in zip(axes.flat, sorted(data.items(), key=lambda kv: str(kv[0]))):
    for name, (x, y, lo, hi) in lines.items():
      ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=name)
    if budgets[0] > 0:
      ax.set_xscale("log")
      ax.set_xticks(budgets, [f"{b:g}" for b in budgets])  # the swept values, not powers of ten
      ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction recovered (valid), Wilson 95%")
    ax.set_title(", ".join(f"{k}={v:g}" for k, v in panel) or "recovered vs budget")
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[n:]:
    ax.set_visible(False)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)
  return True


def _plots(workdir: str, rows: Sequence[dict], curves: Sequence[dict], objective_name: str) -> None:
  """Recovered score vs defended-feature drift per mode (paper Figure 4), and objective curves."""
  drift_key = "pre_act_drift_l2" if rows and "pre_act_drift_l2" in rows[0] else "act_drift_l2"
  scatter: dict[str, tuple[list, list]] = {}
  for r in rows:
    if r["grid_id"] == 0 and r["valid"]:
      x, y = scatter.setdefault(f"{r['mode']} ({r['variant']})", ([], []))
      x.append(r[drift_key])
      y.append(r["recovered_score"])
  if scatter:
    outputs.plot_recovery_vs_drift(os.path.join(workdir, "recovery_vs_drift.png"),
                                   {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in scatter.items()},
                                   f"defended-feature drift ({drift_key})", f"recovered {objective_name}",
                                   "recovery vs drift (valid examples)")
  lines = {c["name"]: np.asarray(c["objective"]) for c in curves if c["grid_id"] == 0}
  if lines:
    outputs.plot_curves(os.path.join(workdir, "objective_curves.png"), lines, f"objective (mean {objective_name})",
                        "recovery objective per step")
