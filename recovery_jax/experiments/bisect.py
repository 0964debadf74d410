"""Each valid example's minimum relative budget, refined by bisection after a grid run.

A grid run that sweeps several relative budgets (``recovery.budget_scale=relative``, ``sweep.budget`` =
rho values) gives each valid example the first rho that recovered it (``min_budget.from_rows``).
``recovery.bisect_steps`` > 0 narrows that to the (last failing, first recovering] interval by bisection:
every example of a group (K, clamp, seed, mode, variant) at its own midpoint in one program per step
(``min_budget.recover_each``), the same clamps, spec and problems as the grid, the key of the group's
smallest-budget point. Only per-example variants (one row per problem) whose success is the engine's
objective rows (``Grid.bisect``) are refined; the others keep the grid minimum.

``refine(config, ctx, rows)`` returns the rows of ``min_budget.jsonl``: per group and example, the grid minimum,
the refined minimum and the bracket's lower end (``inf``: no rho of the grid recovered it).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from recovery_jax import sweep
from recovery_jax.recovery import min_budget

GROUP_KEYS = ("n_features", "clamp_value", "seed", "mode", "variant")


def _groups(rows: Sequence[dict]) -> dict[tuple, dict]:
  """(group values) -> {"keys", "grid": [G], "point": the smallest-budget row, "ok": {example: [G] bool}}
  over the valid rows of a relative-budget sweep."""
  out: dict[tuple, dict] = {}
  for r in rows:
    if r.get("budget_scale") != "relative" or not r["valid"]:
      continue
    keys = tuple(k for k in GROUP_KEYS if k in r)
    g = out.setdefault(tuple(r[k] for k in keys), {"keys": keys, "by": {}, "point": r})
    g["by"].setdefault(int(r["example"]), {})[float(r["budget"])] = bool(r["recovered"]) and not r["diverged"]
    if float(r["budget"]) < float(g["point"]["budget"]):
      g["point"] = r
  for g in out.values():
    g["grid"] = np.asarray(sorted({b for v in g["by"].values() for b in v}), np.float64)
  return out


def refine(config, ctx, rows: Sequence[dict]) -> list[dict]:
  """min_budget.jsonl rows of a finished grid run (module docstring); [] when there is nothing to refine."""
  steps = int(config.recovery.get("bisect_steps", 0))
  out = []
  for group, g in sorted(_groups(rows).items(), key=lambda kv: str(kv[0])):
    grid, ex = g["grid"], sorted(g["by"])
    if len(grid) < 2:
      continue
    rec = np.asarray([[g["by"][e].get(b, False) for e in ex] for b in grid])  # [G, N]
    first = np.where(rec.any(0), rec.argmax(0), -1)
    found = first >= 0
    hi = np.where(found, grid[np.maximum(first, 0)], np.inf)
    lo = np.where(first > 0, grid[np.maximum(first - 1, 0)], 0.0)
    grid_min = hi.copy()
    point = g["point"]
    variant = point["variant"]
    problems = ctx.problems(variant)
    per_example = int(np.shape(problems.row_weight)[-1]) == 1
    if steps and found.any() and per_example and getattr(ctx, "bisect", True):
      spec = ctx.spec(point["mode"], variant)
      clamps = tuple(c.replace(params=jax.tree.map(lambda a: a[0], c.params)) for c in ctx.clamps([point]))
      key = sweep.point_key(int(point.get("seed", 0)), int(point["point_id"]))
      sel = np.asarray(ex)[found]
      pbs = jax.tree.map(lambda a: np.asarray(a)[sel], problems)
      for _ in range(steps):
        mid = (lo[found] + hi[found]) / 2
        res = min_budget.recover_each(spec, ctx.params, clamps, pbs, mid, key, ids=sel)
        good = np.asarray(ctx.recovered(np.asarray(res.rows)[:, 0]), bool) & ~np.asarray(res.diverged, bool)
        hi[found] = np.where(good, mid, hi[found])
        lo[found] = np.where(good, lo[found], mid)
    refined = steps > 0 and per_example and getattr(ctx, "bisect", True)
    for i, e in enumerate(ex):
      out.append({**dict(zip(g["keys"], group)), "example": e, "grid_min_rho": float(grid_min[i]),
                  "min_rho": float(hi[i]), "lo": float(lo[i]), "bisect_steps": steps if refined else 0})
  return out
