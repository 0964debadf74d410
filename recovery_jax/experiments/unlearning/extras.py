"""Unlearning beyond the grid (paper-method 5): the post-hoc drift summary, the retain check, the
budget diagnostic, the soft-suffix baseline rows, and their markdown sections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import os

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching, intervene, outputs, profile
from recovery_jax.experiments import grid
from recovery_jax.recovery import api, engine, soft_suffix
from recovery_jax.recovery.objectives import Objective
from recovery_jax.tasks import unlearning as ul

if TYPE_CHECKING:
  from recovery_jax.experiments.unlearning.app import Context


EPS = 1e-8


@profile.timed(None, inside={"load": "preflight"})  # base / defended scoring while preparing
def over_rows(fn, batch, batch_size: int):
  """``fn(tokens, attention_mask, choices)`` over the rows of ``batch`` (``batching.map_batched``)."""
  return batching.map_batched(lambda b, _: fn(*b), (batch.tokens, batch.attention_mask, batch.choices), batch_size)


def posthoc_metrics(z0: np.ndarray, zrec: np.ndarray) -> dict[str, np.ndarray]:
  """Paper-method 4.4 at the readout, per example: z0 / zrec [..., K] -> drift_abs, violation_abs
  (increase, direction +1), ref_norm, and the relative versions (NaN where ||z0|| = 0: undefined)."""
  d = np.asarray(zrec, np.float64) - np.asarray(z0, np.float64)
  drift = np.linalg.norm(d, axis=-1)
  viol = np.linalg.norm(np.maximum(d, 0.0), axis=-1)
  ref = np.linalg.norm(np.asarray(z0, np.float64), axis=-1)
  rel = lambda v: np.where(ref > 0, v / (ref + EPS), np.nan)
  return {"drift_abs": drift, "violation_abs": viol, "ref_norm": ref, "drift_rel": rel(drift),
          "violation_rel": rel(viol)}


def posthoc_summary(rows: list[dict]) -> list[dict]:
  """Per grid point, over valid flips: the post-hoc drift / violation (paper-method 4.4, 10.2)."""
  out = []
  for pid in sorted({r["point_id"] for r in rows}):
    v = [r for r in rows if r["point_id"] == pid and r["valid"]]
    d = np.asarray([r["posthoc_drift_abs"] for r in v]) if v else np.zeros(0)
    viol = np.asarray([r["posthoc_violation_abs"] for r in v]) if v else np.zeros(0)
    rec = [r for r in v if r["recovered"]]
    r0 = next(r for r in rows if r["point_id"] == pid)
    out.append({"point_id": pid, "mode": r0["mode"], "n_features": r0.get("n_features"),
                "clamp_value": r0.get("clamp_value"), "budget": r0.get("budget"), "n_valid": len(v),
                "n_recovered": len(rec),
                "zero_violation_recovered": sum(1 for r in rec if r["posthoc_violation_abs"] <= 1e-3),
                "drift_abs_mean": float(d.mean()) if len(d) else None,
                "drift_abs_median": float(np.median(d)) if len(d) else None,
                "drift_abs_max": float(d.max()) if len(d) else None,
                "n_drift_nonzero": int((d > 1e-6).sum()), "frac_violation_gt_1e-3": float((viol > 1e-3).mean())
                if len(viol) else None, "n_ref_zero": sum(1 for r in v if not r["posthoc_ref_norm"] > 0)})
  return out


def retain_check(config, ctx: Context) -> list[dict]:
  """Accuracy on the retain questions (and the forget candidates' questions) under each defence vs base."""
  rb = ctx.retain_batch
  bs = config.eval_batch_size
  base = ul.correct(over_rows(lambda t, m, c: ctx.fw.base(ctx.params, t, m, c), rb, bs), rb.gold)
  out = []
  for key, pre in ctx.preflight.items():
    k, v = key.split("|")
    clamp = ctx.make({"n_features": int(k), "clamp_value": float(v)})
    cl, _ = over_rows(lambda t, m, c: ctx.fw.defended(ctx.params, clamp, t, m, c), rb, bs)
    d = ul.correct(cl, rb.gold)
    out.append({"n_features": int(k), "clamp_value": float(v), "retain_n": len(rb),
                "retain_base_acc": float(base.mean()), "retain_defended_acc": float(d.mean()),
                "retain_ratio": float(d.mean() / base.mean()) if base.mean() > 0 else None,
                "forget_defended_acc": pre["defended_accuracy"]})
  return out


def budget_diagnostic(config, ctx: Context, workdir: str) -> dict:
  """Paper-method 4.5: the first ``n_flips`` valid flips of the first grid point, budgets as one
  compiled grid per mode; per-step drift at the readout (engine history) and post-hoc success."""
  dg = config.diagnostic
  p0 = {"n_features": int(config.sweep.n_features[0]), "clamp_value": float(config.sweep.clamp_value[0])}
  clamp0 = ctx.make(p0)
  b = ctx.batch
  cl_def, _ = ctx.fw.defended(ctx.params, clamp0, b.tokens, b.attention_mask, b.choices)
  valid = ul.correct(ctx.cl_base, b.gold) & ~ul.correct(np.asarray(cl_def), b.gold)
  idx = np.flatnonzero(valid)[:dg.n_flips]
  if not len(idx):
    return {}
  sub = b.take(idx)
  end = sub.tokens.shape[1] - 1
  pbs = api.site_problems(sub.tokens, sub.attention_mask, end, end, {"choices": sub.choices, "gold": sub.gold},
                          shared=False)
  budgets = np.asarray([float(x) for x in dg.budgets], np.float32)
  g = len(budgets)
  clamps = intervene.stack_clamps([clamp0] * g)
  out = {"flips": [{"question": ctx.questions[int(sub.question[i])].qid, "perm_id": int(sub.perm_id[i])}
                   for i in range(len(sub))], "budgets": budgets.tolist(), "modes": {}}
  curves = {}
  for mode in dg.modes:
    spec = engine.RecoverySpec(model_cfg=ctx.mcfg, delta_sites=(config.site,),
                               objective=Objective(config.recovery.objective),
                               config=grid.recovery_config(config, mode), suffix_len=1,
                               semantics=config.clamp.semantics)
    hp = spec.config.hparams(budget=budgets)
    hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (g,)), hp)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(config.seed), i))(jnp.arange(g))
    o = engine.recover_grid(spec, ctx.params, (clamps,), pbs, hp, keys)
    deltas = np.asarray(o.delta)[:, :, 0, 0].reshape(g, len(sub), -1)
    cl_rec, zrec = ctx.fw.replay(ctx.params, clamps, sub.tokens, sub.attention_mask, sub.choices, deltas)
    _, z0 = ctx.fw.replay(ctx.params, clamps, sub.tokens, sub.attention_mask, sub.choices, np.zeros_like(deltas))
    rec = ul.correct(np.asarray(cl_rec), sub.gold)  # [G, N]
    ph = posthoc_metrics(np.asarray(z0), np.asarray(zrec))
    drift_steps = np.asarray(o.history["drift_l2"])  # [G, N, steps]
    out["modes"][mode] = [{"budget": float(budgets[i]), "recovered": int(rec[i].sum()), "n": len(sub),
                           "drift_abs_mean": float(ph["drift_abs"][i].mean()),
                           "delta_norm_mean": float(np.linalg.norm(deltas[i], axis=-1).mean()),
                           "drift_per_step_flip0": drift_steps[i, 0].round(6).tolist()} for i in range(g)]
    curves[f"{mode}, budget {budgets[-1]:g}"] = drift_steps[-1, 0]
  if config.plots and curves:
    outputs.plot_curves(os.path.join(workdir, "budget_trajectory_drift.png"), curves,
                        "drift ||E_S(h_def+delta) - E_S(h_def)|| at the readout", "trajectory drift (first flip)")
  return out


def soft_suffix_rows(config, ctx: Context) -> list[dict]:
  """The soft-suffix baseline on the valid flips of the first grid point, per variant."""
  sc = config.soft_suffix
  p0 = {"n_features": int(config.sweep.n_features[0]), "clamp_value": float(config.sweep.clamp_value[0])}
  clamp0 = ctx.make(p0)
  b = ctx.batch
  cl_def, _ = ctx.fw.defended(ctx.params, clamp0, b.tokens, b.attention_mask, b.choices)
  idx = np.flatnonzero(ul.correct(ctx.cl_base, b.gold) & ~ul.correct(np.asarray(cl_def), b.gold))
  if sc.max_flips:
    idx = idx[:sc.max_flips]
  rows = []
  for variant in sc.variants:
    cfg = soft_suffix.SuffixConfig(variant=variant, suffix_len=sc.suffix_len, steps=sc.steps, lr=sc.lr,
                                   budget=sc.budget, noise=sc.noise, init_text=sc.init_text,
                                   objective=sc.objective, batch_size=sc.batch_size)
    res = soft_suffix.run(ctx.params, ctx.mcfg, ctx.tok, clamp0, b.take(idx), cfg, seed=config.seed)
    for i, e in enumerate(idx):
      rows.append({"variant": variant, "example": int(e), "question": ctx.questions[int(b.question[e])].qid,
                   "perm_id": int(b.perm_id[e]), **{k: (v[i].item() if hasattr(v[i], "item") else v[i])
                                                     for k, v in res.items()}})
  return rows


def render_extras(ex: dict) -> str:
  """The unlearning sections of summary.md: post-hoc evaluator, retain check, budget diagnostic, soft suffix."""
  fmt = lambda x: "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
  out = ["\n## Post-hoc evaluator (valid flips; readout position)\n",
         "Absolute L2 over the clamped features; relative values only where ||z0|| > 0 (n_ref_zero counts "
         "flips with ||z0|| = 0, where they are undefined).\n",
         outputs.format_table(["mode", "K", "clamp", "budget", "valid", "recovered", "rec. with violation<=1e-3",
                              "drift mean", "drift median", "drift max", "drift>0", "frac viol>1e-3", "ref zero"],
                              [[s["mode"], s["n_features"], s["clamp_value"], s["budget"], s["n_valid"],
                               s["n_recovered"], s["zero_violation_recovered"], fmt(s["drift_abs_mean"]),
                               fmt(s["drift_abs_median"]), fmt(s["drift_abs_max"]), s["n_drift_nonzero"],
                               fmt(s["frac_violation_gt_1e-3"]), s["n_ref_zero"]] for s in ex["posthoc"]])]
  if "retain_check" in ex:
    out += ["\n## Retain check (held-out general questions)\n",
            outputs.format_table(["K", "clamp", "retain n", "base acc", "defended acc", "ratio", "forget defended acc"],
                                 [[r["n_features"], r["clamp_value"], r["retain_n"], fmt(r["retain_base_acc"]),
                                  fmt(r["retain_defended_acc"]), fmt(r["retain_ratio"]),
                                  fmt(r["forget_defended_acc"])] for r in ex["retain_check"]])]
  bd = ex.get("budget_diagnostic")
  if bd:
    rows = [[m, e["budget"], f"{e['recovered']}/{e['n']}", fmt(e["drift_abs_mean"]), fmt(e["delta_norm_mean"])]
            for m, es in bd["modes"].items() for e in es]
    out += [f"\n## Budget / trajectory diagnostic ({len(bd['flips'])} flips)\n",
            outputs.format_table(["mode", "budget", "recovered", "post-hoc drift mean", "||delta|| mean"], rows)]
  if ex.get("soft_suffix"):
    out += ["\n## Soft-suffix baseline (OABD-style, readout at the last suffix position)\n",
            soft_suffix.render(ex["soft_suffix"])]
  return "\n".join(out) + "\n"

