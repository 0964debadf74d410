"""Refusal threat models x projection modes: relative-budget curves and each case's minimum rho.

A curve unit (``recovery.curve``; one per threat model x mode) recovers every valid case at every rho of
``curve.rhos`` (both stages bounded by rho * ||h_def||_F at their delta positions, per case) in one program
per batch of the cases tiled over the grid, generates with each recovered delta under the live defence,
then bisects each case's (last failing, first recovering] interval ``curve.bisect_steps`` times on the
first generation variant's not-R label. ``curve_group`` / ``curve_section`` / ``plot_curves`` turn the
finished units into the threat x mode table of ``recovery.md`` and ``recovery_vs_rho.png``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from recovery_jax import outputs
from recovery_jax.recovery import min_budget
from recovery_jax.tasks import refusal_stats as stats
from recovery_jax.experiments.refusal.jobs import (RecoveryContext, _recover_cases, select_cases, threat_sites,
                                                   v4_config)


def compute_curve(ctx: RecoveryContext, job: dict) -> dict[str, np.ndarray]:
  """A budget curve of one (threat model, mode): every valid case at every rho of ``recovery.curve.rhos``
  (relative budgets, both stages) in one recovery call per batch of the cases tiled over the grid, then
  ``curve.bisect_steps`` bisections of each case's (last failing, first recovering] grid interval on the
  first generation variant's not-R label. Rows [G * N] (``case``, ``rho``) and per case [N]
  ``min_case``, ``min_rho`` (+inf: no rho recovered it) and ``min_lo``."""
  config, r = ctx.config, ctx.config.recovery
  cv = r.curve
  defence = ctx.defence_for(job)
  idx = select_cases(ctx.valid, ctx.base_ids, int(r.max_cases))
  out: dict[str, np.ndarray] = {"n_cases": np.asarray([len(idx)], np.int32)}
  if not len(idx):
    return out
  grid = np.sort(np.asarray(cv.rhos, np.float64))
  n, g = len(idx), len(grid)
  v4 = v4_config(config, job["mode"], budget_scale="relative")
  out.update(_recover_cases(ctx, job, defence, v4, np.tile(idx, g), np.repeat(grid, n)))
  out["rho"] = np.repeat(grid, n)
  key = f"{r.variants[0]}_nonrefusal"
  rec = (out[key].astype(bool) & ~out["diverged"].astype(bool)).reshape(g, n)
  first = np.where(rec.any(0), rec.argmax(0), -1)
  found = first >= 0
  hi = np.where(found, grid[np.maximum(first, 0)], np.inf)
  lo = np.where(first > 0, grid[np.maximum(first - 1, 0)], 0.0)
  sel = np.flatnonzero(found)
  for _ in range(int(cv.bisect_steps) if len(sel) else 0):
    mid = (lo[sel] + hi[sel]) / 2
    part = _recover_cases(ctx, dict(job, attribution=False), defence, v4, idx[sel], mid)
    good = part[key].astype(bool) & ~part["diverged"].astype(bool)
    hi[sel] = np.where(good, mid, hi[sel])
    lo[sel] = np.where(good, lo[sel], mid)
  out.update(min_case=idx.astype(np.int32), min_rho=hi, min_lo=lo)
  return out


def curve_group(config, job: dict, rows: Sequence[dict], res: dict) -> dict:
  """One threat model x mode of the budget curves: per variant the recovered rate at every rho, and the
  minimum rho per case of the first variant (grid then bisection) as a median with its interval;
  drift and reactivation of the clamped features at every rho (stage-2 state, valid cases)."""
  rhos = sorted({r["budget"] for r in rows})
  at = lambda rho: [r for r in rows if r["budget"] == rho]
  points = []
  for rho in rhos:
    pts = at(rho)
    ok = [r for r in pts if not r["diverged"]]
    points.append({"rho": rho, "n": len(pts), "diverged": len(pts) - len(ok),
                   "recovered": {v: stats.rate([r[f"{v}_nonrefusal"] for r in ok], len(pts))
                                 for v in config.recovery.variants},
                   "drift_rel": stats.mean_ci([r["drift_rel"] for r in ok])["mean"],
                   "reactivation": stats.mean_ci([r["reactivation"] for r in ok])["mean"],
                   "rel_delta_norm": stats.mean_ci([r[f"{config.recovery.variants[0]}_rel_delta_norm"] for r in ok])["mean"]})
  mins = np.asarray(res["min_rho"], np.float64)
  med, lo, hi = min_budget.median_ci(mins)
  return {"threat": job["threat"], "mode": job["mode"], "n_cases": int(len(mins)), "points": points,
          "min_rho": {"median": med, "lo": lo, "hi": hi, "n_never": int(np.isinf(mins).sum()),
                      "bisect_steps": int(config.recovery.curve.bisect_steps)}}


def curve_section(config, curve: Sequence[dict]) -> str:
  """The threat-model x mode table of the relative-budget curves (markdown)."""
  r = config.recovery
  v0 = r.variants[0]
  rhos = sorted({p["rho"] for g in curve for p in g["points"]})
  threats = threat_sites(config)
  fmt = lambda x: "-" if x is None or not np.isfinite(x) else f"{x:.3g}"
  head = (["threat model (delta sites)", "mode", "cases"] + [f"{v0}: not R at rho={x:g} [W 95%]" for x in rhos]
          + [f"min rho (median [95% CI]; never)", f"drift rel at rho={rhos[0]:g} / {rhos[-1]:g}",
             f"reactivation at rho={rhos[0]:g} / {rhos[-1]:g}"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in curve:
    by = {p["rho"]: p for p in g["points"]}
    cells = [f"{g['threat']} ({', '.join(threats.get(g['threat'], ()))})", g["mode"], str(g["n_cases"])]
    for x in rhos:
      p = by.get(x)
      rec = None if p is None else p["recovered"][v0]
      cells.append("-" if rec is None else f"{rec['k']}/{rec['n']} [{rec['wilson'][0]:.2f}, {rec['wilson'][1]:.2f}]")
    m = g["min_rho"]
    cells.append(f"{fmt(m['median'])} [{fmt(m['lo'])}, {fmt(m['hi'])}]; {m['n_never']}")
    first, last = by.get(rhos[0]), by.get(rhos[-1])
    cells.append(f"{fmt(first and first['drift_rel'])} / {fmt(last and last['drift_rel'])}")
    cells.append(f"{fmt(first and first['reactivation'])} / {fmt(last and last['reactivation'])}")
    lines.append("| " + " | ".join(cells) + " |")
  more = "".join(f"; {v}: " + ", ".join(f"{p['recovered'][v]['k']}/{p['recovered'][v]['n']}" for p in g["points"])
                 + f" ({g['threat']}, {g['mode']})" for g in curve for v in r.variants[1:])
  return ("## Threat models x projection modes: relative-budget curves\n\n"
          f"Both stages at budget rho * ||h_def||_F (the defended residual at each stage's delta positions, per case); "
          f"every case at every rho in one program; min rho: the first grid rho that recovered the case ({v0} not R), "
          f"refined by {r.curve.bisect_steps} bisection steps (never-recovered cases count as beyond the grid). Drift "
          "(relative L2) and reactivation of the clamped features in the stage-2 teacher-forced state, the clamps "
          "live after the delta. A delta site before a clamp (same residual or upstream) passes through it.\n\n"
          + "\n".join(lines) + "\n" + (f"\nOther variants (not R per rho){more}\n" if more else "")
          + "\n![recovered vs rho](recovery_vs_rho.png)\n")


def plot_curves(path: str, curve: Sequence[dict], variant: str) -> None:
  """Fraction recovered against rho, one line per threat model x mode (Wilson intervals as bars)."""
  plt = outputs.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for g in curve:
    xs = [p["rho"] for p in g["points"]]
    rec = [p["recovered"][variant] for p in g["points"]]
    ys = np.asarray([x["rate"] for x in rec])
    err = np.abs(np.asarray([x["wilson"] for x in rec]).T - ys)
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{g['threat']} / {g['mode']}")
  ax.set_xscale("log")
  ax.set_ylim(-0.03, 1.03)
  outputs.save_figure(fig, ax, path, "relative budget rho = ||delta|| / ||h_def||",
                      f"fraction recovered ({variant}: not R)", "refusal: recovered vs relative budget")


