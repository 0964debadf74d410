"""TPP's own sections: per-target and per-dataset recovery summaries (unweighted: mean of per-target
means, the paper's aggregation; weighted: per example; binary recovery beside the graded one and the
median budget the scope needs), the one-sided sign tests of encoder vs none over targets, and
``tpp.md`` (probe accuracies, the TPP metric table, the recovery rows), from the rows alone."""

from __future__ import annotations

import numpy as np

from recovery_jax import metrics, outputs


def _target_stats(rows) -> dict:
  v = [r for r in rows if r["valid"]]
  nv = len(v)
  mean = lambda k: float(np.mean([r[k] for r in v])) if nv else float("nan")
  # rows of runs before the graded fields: NaN (rendered "-")
  opt = lambda k, f: float(f([r.get(k, np.nan) for r in v])) if nv else float("nan")
  return {"n_examples": len(rows), "n_valid": nv, "n_recovered": sum(r["recovered"] for r in v),
          "recovery": mean("recovered"), "graded": opt("graded_recovery", np.mean),
          "reactivation": mean("reactivated_fraction_within_eligible"),
          "act_drift": mean("act_drift_l2"), "decode_drift": mean("decode_drift_l2"),
          "zero_react": mean("zero_reactivation"), "budget_needed_median": opt("budget_needed", np.median)}


STATS = ("recovery", "graded", "reactivation", "act_drift", "decode_drift", "zero_react", "budget_needed_median")


def tpp_summary(rows) -> dict:
  """Per (grid point, mode, variant): per-target stats, per-dataset and all-target rows (unweighted:
  mean over targets with valid flips; weighted: over examples), and per (grid point, variant) the
  sign tests of encoder vs none over targets (paper 10.1: lower recovery / reactivation / drift,
  higher zero-reactivation)."""
  groups: dict[tuple, dict[tuple, list]] = {}
  for r in rows:
    groups.setdefault((r["grid_id"], r["variant"], r["mode"]), {}).setdefault((r["dataset"], r["target"]), []).append(r)
  out = {"points": [], "sign_tests": []}
  for (gid, variant, mode), by_t in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
    targets = {f"{d}/{t}": _target_stats(rs) for (d, t), rs in by_t.items()}
    datasets = {}
    for d in sorted({d for d, _ in by_t}):
      ts = [targets[f"{d}/{t}"] for dd, t in by_t if dd == d]
      datasets[d] = _aggregate(ts, [r for (dd, _), rs in by_t.items() if dd == d for r in rs])
    allrows = [r for rs in by_t.values() for r in rs]
    first = allrows[0]
    out["points"].append({"grid_id": gid, "variant": variant, "mode": mode, "n_features": first.get("n_features"),
                          "budget": first.get("budget"), "targets": targets, "datasets": datasets,
                          "all": _aggregate(list(targets.values()), allrows)})
  by = {(p["grid_id"], p["variant"], p["mode"]): p for p in out["points"]}
  for (gid, variant, mode), p in by.items():
    if mode != "encoder" or (gid, variant, "none") not in by:
      continue
    none = by[(gid, variant, "none")]["targets"]
    keys = [k for k in p["targets"] if k in none and p["targets"][k]["n_valid"] and none[k]["n_valid"]]
    tests = {}
    for stat, sign in (("recovery", -1), ("reactivation", -1), ("act_drift", -1), ("zero_react", 1)):
      k = sum(1 for t in keys if sign * (p["targets"][t][stat] - none[t][stat]) > 0)
      tests[stat] = {"k": k, "n": len(keys), "p": metrics.sign_test_p(k, len(keys)) if keys else float("nan"),
                     "direction": "encoder lower" if sign < 0 else "encoder higher"}
    out["sign_tests"].append({"grid_id": gid, "variant": variant, **tests})
  return out


def _aggregate(target_stats: list[dict], rows: list[dict]) -> dict:
  ts = [s for s in target_stats if s["n_valid"]]
  unw = {k: float(np.mean([s[k] for s in ts])) if ts else float("nan") for k in STATS}
  w = _target_stats(rows)
  k, nv = w["n_recovered"], w["n_valid"]
  lo, hi = metrics.wilson_interval(k, nv) if nv else (float("nan"), float("nan"))
  return {"n_targets": len(ts), "n_valid": nv, "n_recovered": k, "ci": [lo, hi], "unweighted": unw,
          "weighted": {s: w[s] for s in STATS}}


def render_tpp(summary: dict, tpp_info: dict) -> str:
  """tpp.md: probe accuracies, the TPP metric table, per-target/per-dataset rows and sign tests."""
  f = lambda x: f"{x:.3f}" if isinstance(x, float) and np.isfinite(x) else "-"
  classes = tpp_info["classes"]
  acc = outputs.format_table(["class", "probe acc (train)", "probe acc (test)", "latents with effect > 0"],
                             [[c, f(a), f(b), n] for c, a, b, n in zip(classes, tpp_info["probe_acc_train"],
                                                                       tpp_info["probe_acc_test"],
                                                                       tpp_info["n_positive_effects"])])
  tpp_rows = [[r["n"], f(r["total"]), f(float(np.mean(r["intended"]))), f(float(np.mean(r["unintended"])))]
              + [f(x) for x in r["intended"]] for r in tpp_info["tpp"]]
  tpp_tab = outputs.format_table(["N", "TPP metric", "intended", "unintended"] + [f"intended {c}" for c in classes],
                                 tpp_rows)
  lines = [f"# TPP ({tpp_info['dataset']})", "", "TPP is used here as a defence (ablate a class's latents, then "
           "recover the probe's decision), not as an SAE score: as a metric it was found unreliable for ranking SAEs "
           "(Chanin, arXiv 2605.18229).", "", "## Probes", "", acc, "", "## TPP metric (intended - unintended "
           "accuracy drop)", "", tpp_tab, "", "## Recovery", ""]
  rows = []
  for p in summary["points"]:
    head = [p["n_features"], p["budget"], p["mode"], p["variant"]]
    cells = lambda s: [f(s[k]) for k in ("recovery", "graded", "reactivation", "act_drift", "decode_drift",
                                         "zero_react", "budget_needed_median")]
    for name, s in list(p["targets"].items()):
      rows.append(head + [name, f"{s['n_recovered']}/{s['n_valid']}"] + cells(s))
    for name, a in [*((f"{d} (unweighted)", v) for d, v in p["datasets"].items()), ("all targets (unweighted)",
                                                                                     p["all"])]:
      rows.append(head + [f"**{name}**", f"{a['n_recovered']}/{a['n_valid']}"] + cells(a["unweighted"]))
    a = p["all"]
    rows.append(head + ["**all examples (weighted)**", f"{a['n_recovered']}/{a['n_valid']} [{f(a['ci'][0])}, "
                        f"{f(a['ci'][1])}]"] + cells(a["weighted"]))
  lines += ["recovery: the binary rate (probe logit > 0), as the paper's; its 82 % / 75 % (none / encoder, "
            "paper-method 10.1) is the **all targets (unweighted)** row, the mean of per-target rates (per "
            "example: 81.3 % / 74.1 %). graded: the mean of min(1, (logit_rec - logit_def) / -logit_def), how far "
            "the delta took the probe logit towards 0 (1 = recovered; not a paper metric). budget needed: the "
            "median least ||delta|| of the scope that can flip the probe, max(0, -logit_def) * n_pooled / (n_delta * ||w||) "
            "(n_delta = 1 for the last token, n_pooled for all tokens).", ""]
  lines.append(outputs.format_table(["N", "budget", "mode", "scope", "target", "recovered/valid", "recovery",
                                    "graded", "reactivation", "act drift", "decode drift", "zero-react",
                                    "budget needed"], rows))
  if summary["sign_tests"]:
    lines += ["", "## Encoder vs none over targets (one-sided sign test)", ""]
    st = [[t["grid_id"], t["variant"]] + [f"{t[s]['k']}/{t[s]['n']} (p={f(t[s]['p'])})"
                                          for s in ("recovery", "reactivation", "act_drift", "zero_react")]
          for t in summary["sign_tests"]]
    lines.append(outputs.format_table(["grid point", "scope", "recovery lower", "reactivation lower",
                                      "act drift lower", "zero-react higher"], st))
  return "\n".join(lines) + "\n"
