"""Refusal recovery statistics and tables (paper-method sections 6.4, 7, 10.4).

Pure host-side functions over per-case label rows (dicts): binary rates with the Wilson 95% interval
and the reference's percentile bootstrap (``metrics.wilson``, ``metrics.bootstrap_ci``: 2000
resamples, ``random.Random(0)``), means with bootstrap intervals, and the markdown tables of
``recovery.md``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from recovery_jax import metrics, outputs


def rate(flags: Sequence[bool], n: int | None = None) -> dict:
  """k of n with the Wilson 95% and the bootstrap interval of the 0/1 flags.

  flags: one bool per counted case; ``n`` (default ``len(flags)``) is the denominator: cases not in
  ``flags`` (e.g. diverged ones) count as failures. Returns {k, n, rate, wilson: [lo, hi],
  bootstrap: [lo, hi]} (None entries when n = 0).
  """
  flags = [bool(f) for f in flags]
  n = len(flags) if n is None else int(n)
  if n < len(flags):
    raise ValueError(f"rate: n={n} is smaller than the {len(flags)} flags")
  k = sum(flags)
  if n == 0:
    return {"k": 0, "n": 0, "rate": None, "wilson": [None, None], "bootstrap": [None, None]}
  _, lo, hi = metrics.wilson(k, n)
  _, blo, bhi = metrics.bootstrap_ci([float(f) for f in flags] + [0.0] * (n - len(flags)))
  return {"k": k, "n": n, "rate": k / n, "wilson": [lo, hi], "bootstrap": [blo, bhi]}


def mean_ci(values: Sequence[float]) -> dict:
  """Mean of the finite values with the reference's bootstrap interval: {mean, lo, hi, n}."""
  xs = metrics.finite_values(values)
  m, lo, hi = metrics.bootstrap_ci(xs)
  return {"mean": m, "lo": lo, "hi": hi, "n": len(xs)}


def _f(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{digits}f}"


def fmt_rate(r: dict) -> str:
  """``k/n = 0.96 [W 0.80, 0.99; B 0.88, 1.00]``."""
  if not r["n"]:
    return "0/0"
  w, b = r["wilson"], r["bootstrap"]
  return f"{r['k']}/{r['n']} = {r['rate']:.2f} [W {w[0]:.2f}, {w[1]:.2f}; B {b[0]:.2f}, {b[1]:.2f}]"


def fmt_mean(m: dict) -> str:
  if m["mean"] is None:
    return "-"
  return f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def summarize_group(cases: Sequence[dict], prefix: str) -> dict:
  """Rates of one (job, variant) over its cases (dicts with ``diverged`` and ``{prefix}_*`` labels):
  valid, diverged, recovered (not R), cooperative, base-like, strict base-like; drift and norms.

  Diverged cases stay in the denominator and never count as recovered; their drifts and norms are
  left out of the means.
  """
  n = len(cases)
  ok = [c for c in cases if not c["diverged"]]
  flag = lambda key: [bool(c[f"{prefix}_{key}"]) for c in ok]
  has_eff = all(f"{prefix}_nonrefusal_eff" in c for c in ok)
  return {
      "valid": n, "diverged": n - len(ok),
      "recovered": rate(flag("nonrefusal"), n),
      "recovered_eff": rate(flag("nonrefusal_eff"), n) if has_eff else None, "cooperative": rate(flag("cooperative"), n),
      "base_like": rate(flag("base_like"), n), "strict": rate(flag("strict"), n),
      "drift_rel": mean_ci([c["drift_rel"] for c in ok]), "floor_rel": mean_ci([c["floor_rel"] for c in ok]),
      "rel_delta_norm": mean_ci([c[f"{prefix}_rel_delta_norm"] for c in ok]),
      "delta_norm": mean_ci([c[f"{prefix}_delta_norm"] for c in ok]),
      "reactivation": mean_ci([c["reactivation"] for c in ok]),
  }


RECOVERY_HEADER = ["run", "mode", "variant", "valid", "diverged", "recovered (not R) [Wilson; bootstrap]",
                   "not R_eff [Wilson; bootstrap]", "cooperative", "base-like", "strict base-like", "rel. delta norm", "||delta||",
                   "drift rel", "floor rel", "reactivation"]


def recovery_table(groups: Sequence[dict]) -> str:
  """One row per (job, mode, variant) summary (``summarize_group`` plus run/mode/variant keys)."""
  rows = []
  for g in groups:
    s = g["summary"]
    rows.append([g["run"], g["mode"], g["variant"], s["valid"], s["diverged"], fmt_rate(s["recovered"]),
                 fmt_rate(s["recovered_eff"]) if s.get("recovered_eff") else "-",
                 f"{s['cooperative']['k']}/{s['valid']}", f"{s['base_like']['k']}/{s['valid']}",
                 f"{s['strict']['k']}/{s['valid']}", fmt_mean(s["rel_delta_norm"]), _f(s["delta_norm"]["mean"], 2),
                 fmt_mean(s["drift_rel"]), _f(s["floor_rel"]["mean"]), _f(s["reactivation"]["mean"])])
  return outputs.format_table(RECOVERY_HEADER, rows)


def attribution_table(rows: Sequence[dict]) -> str:
  """Rows {mode, component, recovered rate dict, base_like k, strict k, energy mean, norm mean}."""
  body = [[r["mode"], r["component"], fmt_rate(r["recovered"]),
           fmt_rate(r["recovered_eff"]) if r.get("recovered_eff") else "-", f"{r['base_like']}/{r['recovered']['n']}",
           f"{r['strict']}/{r['recovered']['n']}", _f(r["energy"]), _f(r["norm"], 2)] for r in rows]
  return outputs.format_table(["mode", "replayed component", "recovered (not R)", "not R_eff", "base-like", "strict",
                              "energy fraction", "||component||"], body)


def budget_table(rows: Sequence[dict]) -> str:
  body = [[_f(r["budget"], 0), r["variant"], fmt_rate(r["recovered"]), f"{r['base_like']}/{r['recovered']['n']}",
           f"{r['strict']}/{r['recovered']['n']}", _f(r["drift_rel"]), _f(r["delta_norm"], 2)] for r in rows]
  return outputs.format_table(["budget (both stages)", "variant", "recovered (not R)", "base-like", "strict",
                              "drift rel", "||delta||"], body)


def k_table(rows: Sequence[dict]) -> str:
  """The feature-set-size sweep: one row per (K, variant), each K with its own preflight."""
  body = [[str(r["k"]), str(r["preflight_valid"]), r["variant"], fmt_rate(r["recovered"]),
           f"{r['base_like']}/{r['recovered']['n']}", f"{r['strict']}/{r['recovered']['n']}", _f(r["drift_rel"]),
           _f(r["delta_norm"], 2)] for r in rows]
  return outputs.format_table(["K (features)", "preflight valid", "variant", "recovered (not R)", "base-like", "strict",
                              "drift rel", "||delta||"], body)


def drift_groups(rows: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Main-run cases per projection mode: (relative drift of the defended features, stage-2 objective);
  diverged cases are left out."""
  out: dict[str, tuple[list, list]] = {}
  for r in rows:
    if r["run"] == "main" and not r["diverged"]:
      x, y = out.setdefault(r["mode"], ([], []))
      x.append(r["drift_rel"])
      y.append(r["objective2"])
  return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in out.items()}


def drift_variant(rows: Sequence[dict]) -> str | None:
  """The variant whose recovered label marks the drift scatter: the first ``{v}_nonrefusal`` field of
  the first main-run case (rows list the variants in ``recovery.variants`` order); None without one."""
  for r in rows:
    if r["run"] == "main" and not r["diverged"]:
      for k in r:
        if k.endswith("_nonrefusal") and not k.startswith("attr_"):
          return k[:-len("_nonrefusal")]
  return None


def plot_drift(path: str, rows: Sequence[dict], title: str) -> bool:
  """Stage-2 objective vs defended-feature drift, one colour per mode (paper Figure 4); False if no case.

  The stage-2 objective is a weighted sum of teacher-forced log-probabilities and margins
  (``objectives.teacher_forced``): its zero is no decision boundary (recovery is the detector's
  not-R label on the generated text), so no line is drawn at zero; each case is marked by that label
  instead (filled: recovered, open: not), for the first variant (``drift_variant``).
  """
  groups = drift_groups(rows)
  if not groups:
    return False
  v = drift_variant(rows)
  plt = outputs.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, (mode, (x, y)) in enumerate(groups.items()):
    colour = f"C{i}"
    if v is None:
      ax.scatter(x, y, s=14, alpha=0.75, color=colour, label=mode)
      continue
    rec = np.asarray([bool(r.get(f"{v}_nonrefusal")) for r in rows
                      if r["run"] == "main" and not r["diverged"] and r["mode"] == mode], bool)
    if rec.any():
      ax.scatter(x[rec], y[rec], s=16, alpha=0.8, color=colour, label=f"{mode}: recovered ({rec.sum()})")
    if (~rec).any():
      ax.scatter(x[~rec], y[~rec], s=16, alpha=0.8, facecolors="none", edgecolors=colour,
                 label=f"{mode}: not recovered ({(~rec).sum()})")
  what = f"\n(filled: recovered, {v}'s not-R label on the text)" if v is not None else ""
  outputs.save_figure(fig, ax, path, "defended-feature drift (relative L2, stage 2)",
                      "stage-2 objective (teacher-forced base answer)", title + what)
  return True


def plot_budget(path: str, rows: Sequence[dict], title: str) -> None:
  """Recovery rate vs budget with Wilson intervals, one line per variant (PNG)."""
  plot_rate(path, rows, "budget", "budget ||delta|| per stage", title)


def plot_k(path: str, rows: Sequence[dict], title: str) -> None:
  """Recovery rate vs feature-set size K with Wilson intervals, one line per variant (PNG)."""
  plot_rate(path, rows, "k", "defended features K (global top K)", title)


def plot_rate(path: str, rows: Sequence[dict], x_key: str, xlabel: str, title: str) -> None:
  """Recovery rate vs ``row[x_key]`` (log axis) with Wilson intervals, one line per variant (PNG)."""
  plt = outputs.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for v in sorted({r["variant"] for r in rows}):
    rs = sorted((r for r in rows if r["variant"] == v and r["recovered"]["n"]), key=lambda r: r[x_key])
    if not rs:
      continue
    x = np.asarray([r[x_key] for r in rs])
    y = np.asarray([r["recovered"]["rate"] for r in rs])
    lo = y - np.asarray([r["recovered"]["wilson"][0] for r in rs])
    hi = np.asarray([r["recovered"]["wilson"][1] for r in rs]) - y
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=v)
  ax.set_xscale("log")
  ticks = sorted({float(r[x_key]) for r in rows})
  ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the swept values, not powers of ten
  ax.minorticks_off()
  ax.set_ylim(-0.02, 1.02)
  outputs.save_figure(fig, ax, path, xlabel, "recovery rate (not R), Wilson 95%", title)
