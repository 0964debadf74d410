"""The engine grid: the ``Setting`` base of the settings whose unit is one ``engine.recover_grid`` call.

IOI, unlearning and TPP prepare a ``Grid`` (params, the stacked problems per variant, the spec per
(mode, variant), the clamps of a list of grid points, the behaviour predicates, per-example fields);
``GridSetting`` turns it into work units and rows:

  grid      config.sweep (feature-set size, clamp value, budget, seed, ...) x recovery.modes x
            recovery.variants; (mode, variant) is static structure, everything else is traced
  units     each work unit is one ``engine.recover_grid`` call vmapped over its points and sharded
            over the mesh's ``data`` axis; point g's key is ``sweep.point_key(seed, point_id)``
  rows      one JSON line per (point, example): behaviour before/after, validity, recovery,
            Table-1 metrics, delta norms, divergence, path attribution
  render    summary.md / summary.jsonl / plots from the rows alone (``summary.render``)

Examples: a problem stack [N, B, ...] flattens to N * B examples (shared delta: N = 1 problem of
B prompts; per-example: N problems of 1 prompt).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import config_utils as cu
from recovery_jax import errors, intervene, metrics, outputs, profile, sweep
from recovery_jax.experiments import bisect as bisect_lib
from recovery_jax.experiments import runner
from recovery_jax.experiments import setting as setting_lib
from recovery_jax.experiments import summary as summary_lib
from recovery_jax.models import sites as sites_lib
from recovery_jax.recovery import attribution, engine, projections
from recovery_jax.recovery.optimizer import BUDGET_SCALES, RecoveryConfig

STATIC_KEYS = ("mode", "variant")


@dataclasses.dataclass
class Grid:
  """A grid setting's prepared context: what ``GridSetting.prepare`` returns once model, SAE, data and
  features are ready.

  problems: variant -> stacked engine problems [N, ...] (B rows each).
  spec: (mode, variant) -> RecoverySpec.
  clamps: grid points -> tuple of Clamps whose params are stacked over the points.
  valid: (rows_base [E], rows_defended [E]) -> bool [E]; recovered: rows [E] -> bool [E].
  examples: one dict of static per-example fields (prompt text, template, ...) per example.
  annotate: None, or ``workdir -> markdown lines`` run once by the writing process after the grid
    (e.g. feature cards of the clamped features); the lines go under the summary's tables.
  data: the setting's own prepared state (e.g. unlearning's batch and replay programs), or None.
  bisect: whether ``recovery.bisect_steps`` may refine each example's minimum relative budget by re-running
    the engine (``experiments.bisect``; False where success is scored by a replay of its own).
  """

  title: str
  header: str
  params: Any
  problems: Callable[[str], engine.Problem]
  spec: Callable[[str, str], engine.RecoverySpec]
  clamps: Callable[[Sequence[dict]], tuple]
  valid: Callable[[np.ndarray, np.ndarray], np.ndarray]
  recovered: Callable[[np.ndarray], np.ndarray]
  examples: list[dict]
  objective_name: str = "objective"
  annotate: Callable[[str], list[str]] | None = None
  data: Any = None
  bisect: bool = True  # success is ``recovered(engine rows)``, so ``bisect.refine`` may re-run the engine


class GridSetting(setting_lib.Setting):
  """A setting on the engine grid: subclasses supply ``variants``, ``check(config)`` (their own fields)
  and ``prepare(config, workdir, mesh) -> Grid``; they may extend ``compute_unit`` (same result keys,
  plus their own) and ``example_fields`` (extra per-example row fields from a unit result)."""

  variants: tuple = ()

  def check(self, config) -> None:
    """The setting's own config fields (the grid's are checked by ``validate``)."""

  def validate(self, config) -> None:
    self.check(config)
    validate_grid(config, self.variants)

  def units(self, config, ctx: Grid) -> list[sweep.WorkUnit]:
    points = grid_points(config)
    return sweep.make_units(points, STATIC_KEYS, config.unit_size or len(points))

  def compute_unit(self, config, ctx: Grid, mesh, unit: sweep.WorkUnit) -> dict[str, Any]:
    return compute_unit(ctx, config, mesh, unit)

  def example_fields(self, ctx: Grid, result: dict, j: int) -> list[dict] | None:
    """Extra fields of point j's rows, one dict per example (None: none)."""
    del ctx, result, j
    return None

  def unit_rows(self, config, ctx: Grid, unit: sweep.WorkUnit, result: dict) -> tuple[list[dict], list[dict]]:
    rows, curves = [], []
    for j, p in enumerate(unit.points):
      r, c = point_rows(ctx, p, result, j, budget_scale=config.recovery.get("budget_scale", "absolute"))
      for row, extra in zip(r, self.example_fields(ctx, result, j) or ()):
        row.update(extra)
      rows += r
      curves.append(c)
    return rows, curves

  def finish(self, config, ctx: Grid, workdir: str, rows, curves, wall_s: float) -> dict[str, Any]:
    """run.json (title, header, objective, feature-card links of ``ctx.annotate``, wall time)."""
    refined = bisect_lib.refine(config, ctx, rows)  # each example's minimum relative budget (every process)
    if runner.is_writer():
      if refined:
        outputs.write_jsonl(os.path.join(workdir, "min_budget.jsonl"), refined)
      links = ctx.annotate(workdir) if ctx.annotate is not None else []
      outputs.atomic_write(os.path.join(workdir, "run.json"), json.dumps(
          {"title": ctx.title, "header": ctx.header, "objective_name": ctx.objective_name,
           "attribution_top_k": int(config.recovery.get("attribution_top_k", 0)), "links": list(links),
           "wall_s": wall_s}))
    return {"summary": summary_lib.summarize(rows)}

  def render(self, workdir: str, plots: bool = True) -> str:
    return summary_lib.render(workdir, plots=plots)[0]


# ----------------------------------------------------------------------------------------------
# config


def validate_grid(config, variants: Sequence[str]) -> None:
  """Checks the grid's config fields (no model needed); errors name the field."""
  r = config.recovery
  cu.check_each_one_of(config, "recovery.modes", projections.PROJECTIONS)
  cu.check_each_one_of(config, "recovery.variants", variants)
  if not r.modes or not r.variants:
    raise errors.UserError("config fields 'recovery.modes' and 'recovery.variants' must not be empty")
  cu.check_at_least(config, "recovery.steps", 1)
  if "budget_scale" in r:
    cu.check_one_of(config, "recovery.budget_scale", BUDGET_SCALES)
  if "budget" in config.sweep:
    cu.check_at_least(config, "sweep.budget", 0, each=True)
  try:
    sweep.expand_grid(dict(config.sweep))
  except ValueError as e:
    raise errors.UserError(f"config field 'sweep': {e}") from e


def grid_points(config) -> list[dict]:
  """config.sweep x recovery.modes x recovery.variants; ``grid_id`` is the sweep point."""
  points = []
  for p in sweep.expand_grid(dict(config.sweep)):
    for mode in config.recovery.modes:
      for variant in config.recovery.variants:
        points.append({**p, "grid_id": p["point_id"], "mode": mode, "variant": variant})
  for i, p in enumerate(points):
    p["point_id"] = i
  return points


def delta_sites(config, mcfg) -> tuple[str, ...]:
  """The threat model of a grid setting: ``config.delta_sites`` (residual sites, any layer; () = the clamp
  site ``config.site``, the delta right after the clamp) in forward order. A site visited before the clamp
  (the residual entering it, an upstream layer) makes the delta pass through the clamp, which then acts
  on the perturbed state; several sites give the cross-layer form. Errors name the field."""
  sites = tuple(config.get("delta_sites", ())) or (config.site,)
  for s in sites:
    try:
      parsed = sites_lib.parse_site(s, mcfg.n_layers)
    except ValueError as e:
      raise errors.UserError(f"config field 'delta_sites': {e}") from e
    if parsed.hook not in ("hook_resid_pre", "hook_resid_post"):
      raise errors.UserError(f"config field 'delta_sites' has {s!r}: expected blocks.L.hook_resid_pre or "
                             "blocks.L.hook_resid_post sites")
  ordered = tuple(sorted(set(sites), key=lambda x: sites_lib.visit_key(x, mcfg.n_layers)))
  if len(ordered) != len(sites):
    raise errors.UserError(f"config field 'delta_sites' names a site twice: {sites}")
  return ordered


def recovery_config(config, mode: str) -> RecoveryConfig:
  r = config.recovery
  return RecoveryConfig(steps=r.steps, lr=r.lr, ridge=r.ridge, projection=mode,
                        budget_scale=r.get("budget_scale", "absolute"))


# ----------------------------------------------------------------------------------------------
# one work unit


def compute_unit(setting: Grid, config, mesh, u: sweep.WorkUnit) -> dict[str, Any]:
  """Recovers every point of a unit (one compiled program) and, for per-example deltas, replays
  the path-attribution components of each delta under the active clamps."""
  mode, variant = u.group
  spec = setting.spec(mode, variant)
  clamps = setting.clamps(u.points)
  hp = spec.config.hparams(budget=np.asarray([float(p.get("budget", spec.config.budget)) for p in u.points],
                                             np.float32))
  hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(u.points),)), hp)
  keys = np.stack([np.asarray(jax.random.key_data(sweep.point_key(int(p.get("seed", 0)), p["point_id"])))
                   for p in u.points])
  (cparams, hp, keys), n_real = sweep.pad_to_multiple((tuple(c.params for c in clamps), hp, keys),
                                                      mesh.shape["data"])
  clamps = tuple(c.replace(params=cp) for c, cp in zip(clamps, cparams))
  problems = setting.problems(variant)
  out = runner.gather(engine.recover_grid(spec, setting.params, clamps, problems, hp, keys, mesh=mesh), f"unit:{u.unit_id}")
  res = unit_result(spec, clamps, out)
  if "pre_drift" in res:  # one delta site, with a clamp at it (``unit_result``)
    k = int(config.recovery.get("attribution_top_k", 0))
    if variant != "shared" and k > 0:
      with profile.phase("evaluation"):  # the path-attribution replay
        res["attr_rows"], res["attr_energy"] = _attribution(spec, k)(setting.params, clamps, out.delta, out.h_def,
                                                                     problems)
  return jax.tree.map(lambda a: np.asarray(a)[:n_real], res)


def unit_result(spec: engine.RecoverySpec, clamps: tuple, out: engine.RecoveryOutput) -> dict[str, Any]:
  """The result layout of a recovered grid (``point_rows`` reads it): the engine's rows, clamped-feature
  states (keyed by monitored clamp), delta [G, N, S, P, d], h_def, per-step histories, divergence and
  budgets; the monitored clamp's decoder rows and the delta site's pre-activation drift where there is
  one of each. Device arrays (the caller gathers them)."""
  res = {"rows_base": out.rows_base, "rows_defended": out.rows_defended, "rows": out.rows,
         "feats": _keyed(out.feats), "refs": _keyed(out.refs), "masks": _keyed(out.masks), "delta": out.delta,
         "h_def": out.h_def,
         "history_objective": out.history["objective"], "history_delta_norm": out.history["delta_norm"],
         "history_drift_l2": out.history["drift_l2"], "diverged": out.diverged, "budget": out.budget}
  mon = engine.monitored(clamps)
  if len(mon) == 1:
    res["dec_rows"] = jax.vmap(lambda c: c.decoder_rows(), in_axes=(intervene.clamp_axes(clamps)[mon[0]],))(
        clamps[mon[0]])
  site_clamp = attribution.clamp_at(spec, clamps, spec.delta_sites[0]) if len(spec.delta_sites) == 1 else None
  if site_clamp is not None:
    res["pre_drift"] = _pre_drift(site_clamp, out.h_def, out.delta)
  return res


def _keyed(parts: tuple) -> dict:
  """A tuple over monitored clamps as a dict with sortable keys (orbax keeps dicts as they are)."""
  return {f"{i:03d}": a for i, a in enumerate(parts)}


def _unkeyed(d: dict) -> tuple:
  return tuple(d[k] for k in sorted(d))


@jax.jit
def _pre_drift(clamp, h_def, delta):
  """||pre_S(h_def + delta) - pre_S(h_def)|| per row of a one-site delta: how far the clamped
  features' pre-activations moved (for TopK/JumpReLU SAEs the activations can stay at 0 while these
  move). h_def [G, N, 1, B, P, d], delta [G, N, 1, P, d] -> [G, N, B]."""
  def one(c, h, d):
    x, dd = h[:, 0], d[:, 0][:, None]  # [N, B, P, d], [N, 1, P, d]
    diff = jnp.where(c.mask, c.pre_features(x + dd) - c.pre_features(x), 0.0)
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=(-2, -1)))
  return jax.vmap(one, in_axes=(intervene.clamp_axes((clamp,))[0], 0, 0))(clamp, h_def, delta)


_ATTRIBUTION = {}


def _attribution(spec: engine.RecoverySpec, k: int):
  """jit: (params, clamps [G], deltas [G, N, ...], h_def [G, N, ...], problems of one row) ->
  (rows [G, N, C], energy [G, N, C]): each of ``attribution.COMPONENTS`` of every per-example delta
  replayed alone under the active clamps (paper-method 9.4)."""
  if (spec, k) in _ATTRIBUTION:
    return _ATTRIBUTION[(spec, k)]

  def one_problem(params, clamps, delta, h_def, pb):
    comp = attribution.decompose_sites(spec, clamps, h_def[:, 0], delta, k)
    ev = engine.evaluate(spec, params, clamps, pb, comp.stacked())
    energy = attribution.energy_fractions(comp)
    return ev.rows[:, 0], jnp.stack([energy[f"{n}_energy"] for n in attribution.COMPONENTS])

  def fn(params, clamps, deltas, h_defs, problems):
    per_point = lambda cl, d, h: jax.vmap(lambda dd, hh, pb: one_problem(params, cl, dd, hh, pb))(d, h, problems)
    return jax.vmap(per_point, in_axes=(intervene.clamp_axes(clamps), 0, 0))(clamps, deltas, h_defs)

  _ATTRIBUTION[(spec, k)] = jax.jit(fn)
  return _ATTRIBUTION[(spec, k)]


# ----------------------------------------------------------------------------------------------
# rows


def _flat_rows(a: np.ndarray) -> np.ndarray:
  """[N, B, ...] -> [N * B, ...]."""
  return a.reshape((-1,) + a.shape[2:])


def point_rows(setting: Grid, p: dict, res: dict, j: int, budget_scale: str = "absolute") -> tuple[list[dict], dict]:
  """Per-example rows of point j of a unit result, and the point's curve (``budget_scale``: how the
  point's budget reads, ``recovery.budget_scale``)."""
  n, b = res["rows_base"].shape[1:3]
  e_of = lambda a: _flat_rows(np.asarray(a[j]))  # [N, B, ...] -> [E, ...]
  per_problem = lambda a: np.repeat(np.asarray(a[j]), b, axis=0)  # [N, ...] -> [E, ...]
  rb, rd, rr = e_of(res["rows_base"]), e_of(res["rows_defended"]), e_of(res["rows"])
  delta = per_problem(res["delta"])  # [E, n_sites, P, d]
  finite = lambda a: np.isfinite(np.asarray(a, np.float64).reshape(n * b, -1)).all(-1)  # [E]
  scores_ok = finite(rb) & finite(rd)  # a non-finite base/defended score is never a valid flip
  # divergence is never recovery: the engine's flag, or a non-finite score or delta
  diverged = per_problem(res["diverged"]).astype(bool) | ~scores_ok | ~finite(rr) | ~finite(delta)
  valid = np.asarray(setting.valid(rb, rd), bool) & scores_ok
  recovered = np.asarray(setting.recovered(rr), bool) & ~diverged
  feats, refs, masks = (tuple(e_of(f) for f in _unkeyed(res[k])) for k in ("feats", "refs", "masks"))
  ex = metrics.example_metrics(feats, refs, masks, res["dec_rows"][j] if "dec_rows" in res else None)
  h_def = np.moveaxis(np.asarray(res["h_def"][j]), 2, 1)  # [N, B, n_sites, P, d]
  h_def = h_def.reshape((n * b,) + h_def.shape[2:])
  hist = np.asarray(res["history_delta_norm"][j])  # [N, steps]
  budget = np.asarray(res["budget"][j], np.float64).reshape(n, 1)  # per problem
  at_budget = np.repeat((hist >= budget * (1 - 1e-4)).sum(-1), b)
  bound = np.repeat(budget[:, 0], b)  # [E] the bound on ||delta||_F (rho * ||h_def|| when relative)
  rows = []
  for e in range(n * b):
    r = {k: p[k] for k in p if k not in ("point_id",)}
    r.update(point_id=p["point_id"], example=e, **setting.examples[e],
             base=rb[e], defended=rd[e], recovered_score=rr[e], valid=valid[e], recovered=recovered[e],
             diverged=diverged[e], act_drift_l2=ex["act_drift_l2"][e], ref_norm=ex["ref_norm"][e],
             act_drift_rel=ex["relative_l2"][e],
             reactivated_fraction_within_eligible=ex["reactivated_fraction_within_eligible"][e],
             n_reactivated=int(ex["n_reactivated"][e]),
             zero_reactivation=bool(recovered[e] and ex["n_reactivated"][e] == 0),
             delta_norm=float(np.linalg.norm(delta[e])),
             rel_delta_norm=float(metrics.relative_delta_norm(delta[e][None], h_def[e][None])[0]),
             steps_at_budget=int(at_budget[e]), budget_bound=float(bound[e]), budget_scale=budget_scale)
    if "decode_drift_l2" in ex:
      r["decode_drift_l2"] = ex["decode_drift_l2"][e]
    if "pre_drift" in res:
      r["pre_act_drift_l2"] = e_of(res["pre_drift"])[e]
    if "decode_drift" in res:  # a task's own decode drift (per-example decoder rows)
      r["decode_drift_l2"] = float(e_of(res["decode_drift"])[e])
    if "attr_rows" in res:
      rows_c, energy_c = np.asarray(res["attr_rows"][j]), np.asarray(res["attr_energy"][j])  # [N, C]
      for c, name in enumerate(attribution.COMPONENTS):
        r[f"attr_{name}_recovered"] = bool(setting.recovered(rows_c[e // b, c:c + 1])[0])
        r[f"attr_{name}_energy"] = float(energy_c[e // b, c])
    rows.append(r)
  curve = {"point_id": p["point_id"], "grid_id": p["grid_id"], "name": f"{p['mode']} ({p['variant']})",
           "objective": np.asarray(res["history_objective"][j]).mean(0).tolist(), "delta_norm": hist.mean(0).tolist()}
  if "history_drift_l2" in res:  # per step, mean over problems (TensorBoard curves)
    curve["drift_l2"] = np.asarray(res["history_drift_l2"][j]).mean(0).tolist()
  return rows, curve
