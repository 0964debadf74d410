"""The minimum relative budget per example: how small a perturbation undoes the defence.

For per-example problems under ``budget_scale="relative"``, ``search`` finds each example's smallest
rho on a grid at which it recovers (the whole grid in one call: the problems tiled over the grid,
each copy at its budget), then narrows it by bisection between the last grid value that failed and the
first that recovered, each example at its own budget (``recover_each``). An example's key is
``fold_in(key, id)`` at every rho, so its Jacobian probes are the same along the search. Recovery need
not be monotone in rho; the search reports the first grid value that recovered and keeps the
bracket's invariant (recovered at ``hi``, not at ``lo``).

``from_rows`` reduces an app's rows (a relative-budget sweep) to the grid minimum per example, and
``median_ci`` gives the median with a percentile-bootstrap interval (examples that never recover
count as +inf, i.e. beyond the grid).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from recovery_jax.recovery import engine
from recovery_jax.recovery.problem import Problem, RecoverySpec


class MinBudget(NamedTuple):
  grid: np.ndarray  # [G] the rho grid, ascending
  recovered: np.ndarray  # [G, N] bool: recovered (and not diverged) at each grid rho
  min_rho: np.ndarray  # [N] the smallest rho found to recover (+inf: none on the grid)
  lo: np.ndarray  # [N] the largest rho known not to recover below min_rho (0 below the grid)


def recover_each(spec: RecoverySpec, params, clamps, problems: Problem, budgets, key, ids=None):
  """``engine.recover_examples`` of N stacked problems, problem i at budget ``budgets[i]`` ([N]; rho
  when the spec's budget scale is relative); one program for every budget vector."""
  n = int(np.shape(problems.delta_cols)[0])
  hps = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n,)), spec.config.hparams())._replace(
      budget=np.asarray(budgets, np.float32).reshape(n))
  return engine.recover_examples(spec, params, tuple(clamps), problems, hps, key, ids, per_example_hp=True)


def search(spec: RecoverySpec, params, clamps, problems: Problem, key, grid: Sequence[float],
           recovered: Callable[[np.ndarray], np.ndarray], bisect_steps: int = 4, ids=None) -> MinBudget:
  """Each example's minimum relative budget: the first rho of ``grid`` at which ``recovered(rows)``
  ([N, 1] recovered scores -> bool) holds without divergence, then ``bisect_steps`` bisections of
  (previous grid rho, that rho]. Problems must be per-example (one row each)."""
  if spec.config.budget_scale != "relative":
    raise ValueError("min_budget.search: the spec's RecoveryConfig needs budget_scale='relative' (rho budgets)")
  if np.shape(problems.row_weight)[-1] != 1:
    raise ValueError(f"min_budget.search: per-example problems only (one row each); got "
                     f"{np.shape(problems.row_weight)[-1]} rows per problem")
  grid = np.sort(np.asarray(grid, np.float64))
  n, g = int(np.shape(problems.delta_cols)[0]), len(grid)
  ids = np.asarray(engine.problem_ids(problems, ids))

  def ok(budgets, reps=1):  # budgets [reps * N] for the problems tiled reps times (same ids, same keys)
    tiled = jax.tree.map(lambda a: np.concatenate([np.asarray(a)] * reps), problems)
    out = recover_each(spec, params, clamps, tiled, budgets, key, np.tile(ids, reps))
    rows = np.asarray(out.rows).reshape(reps, n, -1)
    good = np.stack([np.asarray(recovered(r), bool).reshape(n) for r in rows])
    return good & ~np.asarray(out.diverged, bool).reshape(reps, n)

  rec = ok(np.repeat(grid, n), reps=g)  # [G, N]: every grid rho in one call
  first = np.where(rec.any(0), rec.argmax(0), -1)
  found = first >= 0
  hi = np.where(found, grid[np.maximum(first, 0)], np.inf)
  lo = np.where(first > 0, grid[np.maximum(first - 1, 0)], 0.0)
  for _ in range(bisect_steps if found.any() else 0):
    mid = np.where(found, (lo + hi) / 2, grid[0])
    good = ok(mid)[0]
    hi = np.where(found & good, mid, hi)
    lo = np.where(found & ~good, mid, lo)
  return MinBudget(grid, rec, hi, lo)


def from_rows(rows: Sequence[dict], group_keys: Sequence[str]) -> dict[tuple, list[float]]:
  """An app's relative-budget rows -> per group (the values of ``group_keys``), the grid minimum rho
  of every valid example (+inf where no budget recovered it). Rows carry ``budget``, ``example``,
  ``valid`` and ``recovered``."""
  by_example: dict[tuple, dict[int, list[tuple[float, bool]]]] = {}
  for r in rows:
    if r.get("budget_scale") != "relative" or not r["valid"]:
      continue
    group = tuple(r.get(k) for k in group_keys)
    by_example.setdefault(group, {}).setdefault(int(r["example"]), []).append((float(r["budget"]), bool(r["recovered"])))
  return {g: [min((b for b, rec in v if rec), default=float("inf")) for _, v in sorted(ex.items())]
          for g, ex in by_example.items()}


def rho(value) -> float:
  """A minimum rho read back from JSON: ``min_budget.jsonl`` stores +inf (never recovered) as null."""
  return float("inf") if value is None else float(value)


def median_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
  """(median, lo, hi): the median with a 95 % percentile-bootstrap interval (NumPy generator);
  +inf values (never recovered) take part as the largest."""
  xs = np.asarray(values, np.float64)
  if xs.size == 0:
    return float("nan"), float("nan"), float("nan")
  boots = np.sort(np.median(xs[np.random.default_rng(seed).integers(0, xs.size, (n_boot, xs.size))], axis=-1))
  return float(np.median(xs)), float(boots[int(0.025 * (n_boot - 1))]), float(boots[int(0.975 * (n_boot - 1))])
