"""Refusal recovery results: per-case rows of finished units, the summary tables and plots, the
resumable recovery stage, and the re-rendering of a finished run (``render_finished``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence
import numpy as np

from recovery_jax import errors, outputs, sweep
from recovery_jax.tasks import refusal as task
from recovery_jax.tasks import refusal_judge as judge
from recovery_jax.tasks import refusal_stats as stats
from recovery_jax.experiments.refusal import curve as curve_lib
from recovery_jax.experiments.refusal.jobs import ATTR_COMPONENTS, LABELS, RecoveryContext, _prefixes, choose_strength, recovery_jobs, v4_config


def case_rows(ctx: RecoveryContext, unit_id: int, job: dict, res: dict, ids: Sequence[str]) -> list[dict]:
  """One row per recovered case of job ``unit_id``: labels, drifts, norms (texts only with ``save_text``)."""
  if "case" not in res:
    return []
  rows = []
  variants = _prefixes(ctx.config, job)
  for j, i in enumerate(np.asarray(res["case"]).tolist()):
    row = {"job": unit_id, "run": job["run"], "mode": job["mode"], "error_term": job["error_term"], "budget": job["budget"],
           "k": job.get("k"), "prompt": int(i), "id": ids[i], "diverged": bool(res["diverged"][j])}
    if job["run"] == "curve":  # a point of a threat model's relative-budget curve
      row.update(threat=job["threat"], budget=float(res["rho"][j]), budget_scale="relative")
    for k in ("drift_rel", "floor_rel", "reactivation", "act_drift_l2", "drift1_rel", "objective1", "objective2"):
      row[k] = float(res[k][j])
    for v in variants:
      for k in LABELS:
        if f"{v}_{k}" not in res:  # a unit of an earlier version (resumed)
          continue
        x = int(res[f"{v}_{k}"][j])
        row[f"{v}_{k}"] = judge.OPENINGS[x] if k == "opening" else (x if k in ("chars", "tokens") else bool(x))
      row[f"{v}_delta_norm"] = float(res[f"{v}_delta_norm"][j])
      row[f"{v}_rel_delta_norm"] = float(res[f"{v}_rel_delta_norm"][j])
      if ctx.config.save_text:
        row[f"{v}_text"] = task.answer_text(ctx.tok, res[f"{v}_gen_tokens"][j][:res[f"{v}_gen_lengths"][j]],
                                            ctx.stop_ids)
    for c in ATTR_COMPONENTS:
      if f"attr_{c}_nonrefusal" in res:
        for k in ("nonrefusal", "nonrefusal_eff", "base_like", "strict"):
          if f"attr_{c}_{k}" in res:
            row[f"attr_{c}_{k}"] = bool(res[f"attr_{c}_{k}"][j])
        row[f"attr_{c}_energy"] = float(res[f"attr_{c}_energy"][j])
        row[f"attr_{c}_norm"] = float(res[f"attr_{c}_norm"][j])
    rows.append(row)
  return rows


def summarize_recovery(config, jobs: dict[int, dict], results: dict[int, dict], rows_all: Sequence[dict],
                       n_valid: int | None = None) -> dict:
  """Per (run, mode, variant) summaries, the attribution rows, the budget curve and the K curve of the
  finished jobs (unit id -> job, unit id -> result; ``n_valid``: the main defence's strict-valid count,
  its K row's preflight)."""
  variants = tuple(config.recovery.variants)
  of = lambda i: [r for r in rows_all if r["job"] == i]
  groups, attr, budget, ks, curve = [], [], [], [], []
  for i, job in sorted(jobs.items()):
    rows = of(i)
    if job["run"] == "soft suffix":
      groups.append({"run": "soft suffix (OABD)", "mode": "-", "variant": job["mode"],
                     "summary": stats.summarize_group(rows, "soft")})
    if job["run"] in ("main", "error term dropped"):
      for v in variants:
        g = {"run": job["run"], "mode": job["mode"], "variant": v, "summary": stats.summarize_group(rows, v)}
        if "pre_valid" in results[i]:
          g["preflight_valid"] = int(np.asarray(results[i]["pre_valid"]).sum())
        groups.append(g)
    if job["attribution"] and rows:
      ok = [r for r in rows if not r["diverged"]]
      for c in ATTR_COMPONENTS:
        attr.append({"mode": job["mode"], "component": c,
                     "recovered": stats.rate([r[f"attr_{c}_nonrefusal"] for r in ok], len(rows)),
                     "recovered_eff": (stats.rate([r[f"attr_{c}_nonrefusal_eff"] for r in ok], len(rows))
                                       if all(f"attr_{c}_nonrefusal_eff" in r for r in ok) else None),
                     "base_like": sum(r[f"attr_{c}_base_like"] for r in ok),
                     "strict": sum(r[f"attr_{c}_strict"] for r in ok),
                     "energy": stats.mean_ci([r[f"attr_{c}_energy"] for r in ok])["mean"],
                     "norm": stats.mean_ci([r[f"attr_{c}_norm"] for r in ok])["mean"]})
    if job["run"] == "curve" and "min_rho" in results[i]:
      curve.append(curve_lib.curve_group(config, job, rows, results[i]))
    r_ = config.recovery
    b = job["budget"]
    if job["run"] == "budget" or (job["run"] == "main" and job["mode"] == r_.budget_mode
                                  and float(r_.stage1.budget) == float(r_.stage2.budget)
                                  and float(r_.stage1.budget) in [float(x) for x in r_.budgets]):
      b = float(r_.stage1.budget) if b is None else b
      for v in variants:
        budget.append({"budget": b, "variant": v, **_curve_point(stats.summarize_group(rows, v))})
    if job["run"] == "K" or (job["run"] == "main" and job["mode"] == r_.budget_mode and tuple(r_.get("ks", ()))
                             and job["error_term"] == config.defence.error_term):
      pre = (int(np.asarray(results[i]["pre_valid"]).sum()) if "pre_valid" in results[i]
             else (n_valid if n_valid is not None else "-"))
      for v in variants:
        ks.append({"k": int(job["k"]) if job["run"] == "K" else int(config.features.k), "variant": v,
                   "preflight_valid": pre, **_curve_point(stats.summarize_group(rows, v))})
  budget.sort(key=lambda x: (x["variant"], x["budget"]))
  ks.sort(key=lambda x: (x["variant"], x["k"]))
  return {"groups": groups, "attribution": attr, "budget": budget, "k": ks, "curve": curve}


def _curve_point(s: dict) -> dict:
  return {"recovered": s["recovered"], "base_like": s["base_like"]["k"], "strict": s["strict"]["k"],
          "drift_rel": s["drift_rel"]["mean"], "delta_norm": s["delta_norm"]["mean"]}


def render_recovery(config, value: float, n_valid: int, n_prompts: int, summ: dict, wall_s: float) -> str:
  """recovery.md: the recovery, attribution and budget tables."""
  r = config.recovery
  v4 = v4_config(config, "jacobian")
  drop = [g for g in summ["groups"] if g["run"] == "error term dropped"]
  out = ["# Refusal recovery (v4 two-stage)\n",
         f"defence {strength_label(config.defence.kind, value)} (error term {config.defence.error_term}); "
         f"{n_valid} strict-valid cases of {n_prompts} prompts"
         + (f" (first {r.max_cases} recovered)" if r.max_cases else "") +
         f"; stage 1 {v4.stage1.steps} steps lr {v4.stage1.lr} budget {v4.stage1.budget}, stage 2 {v4.stage2.steps} "
         f"steps lr {v4.stage2.lr} budget {v4.stage2.budget} on {v4.n_ans} answer positions; lambda_act "
         f"{v4.stage1.lambda_act}, jacobian probes {v4.stage1.jacobian_probes}, corrections "
         f"{v4.stage1.correction_steps}; greedy generation, "
         f"{config.generation.max_new_tokens} new tokens, the defence live; {wall_s:.0f} s.\n"
         + ("Budgets are relative (recovery.budget_scale=relative): each is rho, and a case's delta is bounded by "
            "rho * ||h_def||_F at its delta positions.\n" if v4.stage1.budget_scale == "relative" else ""),
         "recovered = not R(recovered text) (substring judge only, as the reference); not R_eff = no substring "
         "refusal, safety cue or negative/degenerate opening (the preflight's refusal rule, the meaningful "
         "recovery where the defended text refused only by a negative/degenerate opening); cooperative = not R "
         "and not S; "
         "diverged cases (non-finite objective or delta) count as not recovered and are left out of the means. "
         "`faithful` generates with the stage-1 (anchor) delta only (the reference, Q12); `honest` adds stage 2's "
         "delta at its absolute answer positions. Drift (relative L2 of the defended features over sites x the "
         "first answer positions x S, post-defence) is the stage-2 teacher-forced state for both variants; the "
         "relative delta norm is exact, ||delta|| / ||h_def|| over the variant's delta positions. Intervals: "
         "Wilson 95% (W) and the reference's bootstrap (B, 2000 resamples); means with bootstrap intervals.\n",
         stats.recovery_table(summ["groups"]) if summ["groups"] else "(no main recovery runs: recovery.modes=())", ""]
  if config.plots and any(g["run"] == "main" and g["summary"]["recovered"]["n"] for g in summ["groups"]):
    out.append("![stage-2 objective vs drift per mode](recovery_vs_drift.png)\n")
  if drop:
    out.append(f"Error term dropped (each SAE a full bottleneck, x' = D(z')): its own preflight at "
               f"{strength_label(config.defence.kind, value)} gives {drop[0].get('preflight_valid', '-')} strict-valid "
               f"of {n_prompts}; recovered on those.\n")
  if any(g["run"].startswith("soft suffix") for g in summ["groups"]):
    sc = config.soft_suffix
    out.append(f"Soft suffix (OABD-style, paper-method 9.2): {sc.suffix_len} soft embeddings after the generation "
               f"prompt, {sc.steps} Adam steps lr {sc.lr}, ||suffix - init|| <= {sc.budget}, the defence live on every "
               "column; `faithful` detaches the monitor term (the reference), `corrected` keeps it differentiable; "
               "greedy generation without a KV cache. Its delta norms are ||suffix - init|| (relative: / ||init||) and "
               "its drift compares the post-defence answer features with the optimised vs the initial suffix.\n")
  if summ["attribution"]:
    out += ["## Recovery-path attribution (stage-1 delta; each component replayed alone under the defence, "
            f"faithful generation; top-k = {r.attribution_top_k})\n", stats.attribution_table(summ["attribution"]), ""]
  if summ["budget"]:
    out += [f"## Budget sweep ({r.budget_mode}; both stage budgets = b)\n", stats.budget_table(summ["budget"]), "",
            "![recovery vs budget](recovery_vs_budget.png)\n"]
  if summ.get("curve"):
    out += [curve_lib.curve_section(config, summ["curve"])]
  if summ.get("k"):
    out += [f"## Feature-set size sweep ({r.budget_mode}; the global top K features of the ranking, "
            f"{strength_label(config.defence.kind, value)}, each K with its own preflight over {n_prompts} prompts; "
            "recovered on its strict-valid cases" + (f", the first {r.max_cases}" if r.max_cases else "") + ")\n",
            stats.k_table(summ["k"]), "", "![recovery vs K](recovery_vs_k.png)\n"]
  return "\n".join(out) + "\n"


def strength_label(kind: str, value: float) -> str:
  """'multiply x3' or 'set v = 4': how a defence strength reads in logs and tables."""
  return f"{kind} x{value:g}" if kind == "multiply" else f"{kind} v = {value:g}"


def _job_name(j: dict) -> str:
  return (f"{j['run']}:{j['mode']}" + ("" if j["budget"] is None else f"@{j['budget']:g}")
          + ("" if j.get("k") is None else f"@K={j['k']}"))


def summary_rows(summ: dict, n_examples: int | None = None) -> list[dict]:
  """summary.jsonl rows (one per run x mode x variant) in the runner's vocabulary; ``n_examples`` the
  prompts of the preflight (the valid cases are a subset of them)."""
  out = []
  for g in summ["groups"]:
    s = g["summary"]
    rec = s["recovered"]
    out.append({"setting": "refusal", "run": g["run"], "mode": g["mode"], "variant": g["variant"],
                **({"n_examples": n_examples} if n_examples is not None else {}), "n_valid": s["valid"], "n_recovered": rec["k"], "rate": rec["rate"], "ci": rec["wilson"],
                "bootstrap_ci": rec["bootstrap"], "n_base_like": s["base_like"]["k"], "n_strict": s["strict"]["k"],
                "rel_delta_norm_valid": s["rel_delta_norm"]["mean"], "act_drift_rel_valid": s["drift_rel"]["mean"],
                "reactivation_valid": s["reactivation"]["mean"], "n_diverged": s["diverged"]})
  return out


def render_finished(workdir: str, plots: bool = True) -> str:
  """Re-renders a refusal run from ``config.json``, ``preflight.jsonl`` / ``preflight.md`` and the
  finished recovery units alone (no model): with every unit finished, ``recovery.md``, the plots,
  ``summary.md`` and ``summary.jsonl`` as the run wrote them; with some missing (a run still going,
  or one stopped early) ``recovery_partial.md``, which names the finished units. Returns the recovery
  tables (``recovery.md`` or the partial ones); a run without recovery returns its preflight.md."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  need = [os.path.join(workdir, n) for n in ("config.json", "preflight.jsonl", "preflight.md")]
  missing = [p for p in need if not os.path.exists(p)]
  if missing:
    raise errors.UserError(f"{workdir}: not a refusal run with a finished preflight (missing {', '.join(missing)})")
  with open(need[0]) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(need[1]) as f:
    pre = [json.loads(l) for l in f if l.strip()]
  with open(need[2]) as f:
    preflight_md = f.read()
  n_prompts = len({r["prompt"] for r in pre})
  if not config.recovery.enabled:
    outputs.atomic_write(os.path.join(workdir, "summary.md"), preflight_md)
    return preflight_md
  jobs = recovery_jobs(config)
  store = sweep.UnitStore(os.path.join(workdir, "units"))
  try:
    done = sorted(store.finished())
    results = {i: store.load(i) for i in done}
  finally:
    store.close()
  ids = {r["prompt"]: r["id"] for r in pre}
  ctx = RecoveryContext(config=config, params=None, mcfg=None, tok=None, sites=(), saes={}, feats={}, value=0.0,
                        prompts=[], base_texts=[], base_ids=[], valid=np.zeros(0, bool), stop_ids=(), pad_id=0,
                        discouraged=[])
  ctx.config.save_text = False
  rows = [row for i in done for row in case_rows(ctx, i, jobs[i], results[i], ids)]
  value = choose_strength(config, pre)  # the strength the run recovered at
  n_valid = sum(r["valid"] for r in pre if r["value"] == value)
  summ = summarize_recovery(config, {i: jobs[i] for i in done}, results, rows, n_valid=n_valid)
  run_json = os.path.join(workdir, "run.json")
  wall_s = float("nan")
  if os.path.exists(run_json):
    with open(run_json) as f:
      wall_s = float(json.load(f).get("wall_s", "nan"))
  md = render_recovery(config, value, n_valid, n_prompts, summ, wall_s)
  if len(done) < len(jobs):
    md = (f"(partial: {len(done)} of {len(jobs)} work units finished: "
          f"{', '.join(_job_name(jobs[i]) for i in done)})\n\n" + md)
    outputs.atomic_write(os.path.join(workdir, "recovery_partial.md"), md)
    return md
  outputs.atomic_write(os.path.join(workdir, "recovery.md"), md)
  outputs.atomic_write(os.path.join(workdir, "recovery.json"), json.dumps(
      {"strength": value, "n_valid": n_valid, "jobs": jobs, **summ}, indent=1, default=float))
  if plots:
    stats.plot_drift(os.path.join(workdir, "recovery_vs_drift.png"), rows,
                     "refusal recovery vs drift (main run, valid cases)")
    if summ["budget"]:
      stats.plot_budget(os.path.join(workdir, "recovery_vs_budget.png"), summ["budget"],
                        f"refusal recovery vs budget ({config.recovery.budget_mode})")
    if summ.get("curve"):
      curve_lib.plot_curves(os.path.join(workdir, "recovery_vs_rho.png"), summ["curve"], config.recovery.variants[0])
    if summ["k"]:
      stats.plot_k(os.path.join(workdir, "recovery_vs_k.png"), summ["k"],
                   f"refusal recovery vs feature-set size ({config.recovery.budget_mode})")
  outputs.atomic_write(os.path.join(workdir, "summary.md"), preflight_md + "\n" + md)
  outputs.write_jsonl(os.path.join(workdir, "summary.jsonl"), summary_rows(summ, n_examples=n_prompts))
  return md


def render(workdir: str, plots: bool = True) -> str:
  """``python -m recovery_jax.report`` for a refusal run (``render_finished``): the summary of a
  finished run, the partial recovery tables of an unfinished one."""
  md = render_finished(workdir, plots=plots)
  path = os.path.join(workdir, "summary.md")
  if md.startswith("(partial:") or not os.path.exists(path):
    return md
  with open(path) as f:
    return f.read()
