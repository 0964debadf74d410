"""TPP latent-level recovery on the shared runner (paper-method sections 3, 7 and 10.1).

Setup: load model + SAE -> class data (offline corpus topics, or a SAEBench-format file) ->
residual at the SAE site (one truncated forward per batch) -> mean-pooled train inputs and SAE
latents -> one-vs-rest probes (JAX/optax, vmapped over classes) -> latent effects -> the TPP
metric table for N in ``task.tpp_ns`` -> recovery problems: every positive test example of every
target class, with that class's probe.

Recovery runs on the probe path (``recovery.probe.recover_probe_grid``: SAE/probe algebra on the
cached test activations, no transformer forward), vmapped over grid points and problems; each
problem carries its own clamp (the zero-ablation of its class's top-N latents at every position,
error kept). Valid flip: clean probe logit > 0 and ablated <= 0; recovered: the probe logit of the
pooled ``h_def + delta`` > 0. Variants are the delta scope: ``last`` (one row at the last non-pad
position) and ``all`` (one row broadcast to every pooled position; its relative delta norm compares
the one row with the defended residual at all those positions). Drift and reactivation are over the
clamped latents at the delta columns (``task.monitor="delta"``: with the ``last`` scope no other
position changes) or at every pooled position (``"pooled"``, paper-method Q3: the same reactivated
entries over a larger eligible set).

Beside the runner's summary the app writes ``tpp.md`` / ``tpp.json``: probe accuracies, the TPP
metric table, and summaries per target and per dataset (unweighted: mean of per-target means;
weighted: per example) with the one-sided sign test of encoder vs none over targets.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching, errors, intervene, metrics, outputs, sweep
from recovery_jax.experiments import runner
from recovery_jax.experiments import summary as summary_lib
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.recovery import api
from recovery_jax.recovery import probe as probe_lib
from recovery_jax.sae import core as sae_core
from recovery_jax.sae import harvest
from recovery_jax.tasks import tpp as tpp_task
from recovery_jax.tasks import tpp_probes as tp

VARIANTS = ("last", "all")
SOURCES = ("corpus", "file")
MONITOR = ("pooled", "delta")


def validate(config) -> None:
  """TPP config values that need no model; errors name the field."""
  t = config.task
  if t.source not in SOURCES:
    raise errors.UserError(f"config field 'task.source'={t.source!r}: expected one of {SOURCES}")
  if len(t.classes) < 2:
    raise errors.UserError(f"config field 'task.classes'={tuple(t.classes)}: expected at least 2 classes")
  for name in ("n_train", "n_test", "context_len"):
    if int(t[name]) < 1:
      raise errors.UserError(f"config field 'task.{name}'={t[name]}: expected >= 1")
  for c in t.targets:
    if c not in t.classes:
      raise errors.UserError(f"config field 'task.targets' has {c!r}: not one of task.classes {tuple(t.classes)}")
  if t.monitor not in MONITOR:
    raise errors.UserError(f"config field 'task.monitor'={t.monitor!r}: expected one of {MONITOR}")
  for k in config.sweep.n_features:
    if int(k) < 1:
      raise errors.UserError(f"config field 'sweep.n_features' has {k}: expected >= 1")
  if t.label_names not in ("", "bias_in_bios"):
    raise errors.UserError(f"config field 'task.label_names'={t.label_names!r}: expected '' or 'bias_in_bios'")


def _resolve(path: str) -> str:
  """A relative corpus root: from the working directory, else from the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(root, path)


def load_data(config, tok, bos_id, pad_id) -> tpp_task.ClassData:
  t = config.task
  kw = dict(context_len=int(t.context_len), n_train=int(t.n_train), n_test=int(t.n_test), seed=int(t.seed),
            bos_id=bos_id, pad_id=pad_id)
  if t.source == "corpus":
    return tpp_task.corpus_classes(_resolve(t.corpus_root), tuple(t.classes), tok, **kw)
  if not t.data_file or t.data_file.startswith("REQUIRED"):
    raise errors.UserError(f"config field 'task.data_file': {t.data_file or 'empty'} (a SAEBench-format file)")
  names = tpp_task.BIAS_IN_BIOS_PROFESSIONS if t.label_names == "bias_in_bios" else None
  return tpp_task.load_saebench_file(t.data_file, tok, classes=tuple(t.classes), text_field=t.text_field,
                                     label_field=t.label_field, label_names=names, **kw)


def _pooled_stats(params, mcfg, site, sae, scfg, tokens, mask, batch):
  """Pooled residual [n, d] and pooled SAE latents [n, d_sae], without keeping [n, T, d]."""
  def one_batch(b, _):
    toks, m = b
    h = tpp_task.site_activations(params, mcfg, site, toks, batch)
    return np.asarray(tp.mean_pool(jnp.asarray(h), jnp.asarray(m))), tp.pooled_latents(sae, scfg, h, m, batch)
  return batching.map_batched(one_batch, (tokens, mask), 8 * batch)


def setup(config, workdir: str) -> runner.Setting:
  """Loads everything, trains the probes, computes the TPP table; the Setting for the runner."""
  log, t = runner.log, config.task
  log(f"loading model {config.model!r} and SAE {config.sae!r} at {config.site}")
  params, mcfg, tok = setup_lib.load_model(config.model, seed=config.seed)
  sae, scfg = setup_lib.load_sae(config.sae, mcfg, config.site, override=config.sae_override_checks,
                                 model_name=config.model)
  k_max = max(int(k) for k in config.sweep.n_features)
  if k_max > scfg.d_sae:
    raise errors.UserError(f"config field 'sweep.n_features': N={k_max} is larger than the SAE's d_sae={scfg.d_sae}")
  bos = mcfg.bos_token_id if harvest.wants_bos(mcfg) else None
  pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_ids or (0,))[0]
  data = load_data(config, tok, bos, pad)
  api.check_prompts(data.tokens, model_cfg=mcfg)  # ids, and the padded length vs the model's context
  exclude = harvest.excluded_ids(mcfg)
  mask = tpp_task.pool_mask(data.tokens, exclude)
  tpp_task.last_pooled(mask)  # every context keeps a token
  c = len(data.class_names)
  log(f"{data.name}: {c} classes x ({t.n_train} train + {t.n_test} test) contexts of <= {t.context_len} tokens")

  tr, te = ~data.test, data.test
  pooled_tr, zbar_tr = _pooled_stats(params, mcfg, config.site, sae, scfg, data.tokens[tr], mask[tr],
                                     int(t.activation_batch))
  h_te = tpp_task.site_activations(params, mcfg, config.site, data.tokens[te], int(t.activation_batch))
  mask_te, labels_te, labels_tr = mask[te], data.labels[te], data.labels[tr]
  probes = tp.fit_probes(pooled_tr, labels_tr, c, l1=float(t.probe_l1), lr=float(t.probe_lr),
                         epochs=int(t.probe_epochs), batch_size=int(t.probe_batch), seed=int(t.seed))
  idx_tr, y_tr = tp.ovr_sets(labels_tr, c, int(t.seed))
  idx_te, y_te = tp.ovr_sets(labels_te, c, int(t.seed) + 1)
  acc_train = tp.accuracies(pooled_tr, idx_tr, y_tr, probes)
  w_dec = np.asarray(sae_core.effective_decoder(sae, scfg), np.float32)
  effects = tp.latent_effects(zbar_tr, idx_tr, y_tr, probes, w_dec)
  clamp_spec = intervene.ClampSpec(site=config.site, sae_cfg=scfg, mode="zero", positive_only=True)
  ns = [int(n) for n in t.tpp_ns if int(n) <= scfg.d_sae]
  acc_test, table = tp.tpp_table(clamp_spec, sae, effects, probes, h_te, mask_te, idx_te, y_te, ns,
                                 int(t.activation_batch))
  log("probe accuracy (test): " + ", ".join(f"{n} {a:.3f}" for n, a in zip(data.class_names, acc_test)))
  for row in table:
    log(f"TPP N={row.n}: metric {row.total:.4f} (intended {row.intended.mean():.4f}, unintended "
        f"{row.unintended.mean():.4f})")
  tpp_info = {"dataset": data.name, "classes": list(data.class_names), "probe_acc_train": acc_train.tolist(),
              "probe_acc_test": acc_test.tolist(),
              "n_positive_effects": [int((effects[i] > 0).sum()) for i in range(c)],
              "tpp": [{"n": r.n, "total": r.total, "intended": r.intended.tolist(),
                       "unintended": r.unintended.tolist()} for r in table]}
  if runner.is_writer():
    outputs.atomic_write(os.path.join(workdir, "tpp_metric.json"), json.dumps(tpp_info, indent=1))

  targets = [data.class_names.index(x) for x in (t.targets or data.class_names)]
  ex_idx = np.concatenate([np.flatnonzero(labels_te == k) for k in targets])
  ex_cls = labels_te[ex_idx]
  problems = {v: _problems(h_te[ex_idx], mask_te[ex_idx], probes, ex_cls, v, t.monitor) for v in VARIANTS}
  clamps_of_n = {}

  def clamps(points):
    per_point = []
    for p in points:
      n = int(p["n_features"])
      if n not in clamps_of_n:
        clamps_of_n[n] = tp.class_clamps(clamp_spec, sae, effects, n, k_max)
      cl = clamps_of_n[n]
      per_point.append(cl.replace(params=jax.tree.map(lambda a: a[ex_cls], cl.params)))
    return (intervene.stack_clamps(per_point),)

  header = (f"model {config.model}, SAE {scfg.source or config.sae} at {config.site}; {data.name}: "
            f"{c} classes, {t.n_train} train + {t.n_test} test contexts each; probe test accuracy "
            + ", ".join(f"{n} {a:.3f}" for n, a in zip(data.class_names, acc_test))
            + f"; zero-ablation of each class's top-N latents at every position (error kept); "
            f"{config.recovery.steps} steps, lr {config.recovery.lr}; TPP metric "
            + ", ".join(f"N={r.n}: {r.total:.3f}" for r in table))
  examples = [{"target": data.class_names[k], "dataset": data.name, "test_index": int(i)}
              for i, k in zip(ex_idx, ex_cls)]
  return runner.Setting(
      title="TPP latent-level recovery", header=header, params=None, problems=problems.__getitem__,
      spec=lambda mode, variant: probe_lib.ProbeSpec(runner.recovery_config(config, mode), variant == "all"),
      clamps=clamps, valid=lambda rb, rd: (rb > 0) & (rd <= 0), recovered=lambda rr: rr > 0, examples=examples,
      objective_name="probe logit", compute=compute_unit)


def _problems(h, mask, probes, cls, variant, monitor) -> probe_lib.ProbeProblem:
  """One problem per example (B = 1): [N, 1, ...]."""
  n, t, _ = h.shape
  cols = np.broadcast_to(np.arange(t, dtype=np.int32), (n, t))
  last = tpp_task.last_pooled(mask)[:, None].astype(np.int32)
  if variant == "last":
    dcols, dvalid = last, np.ones((n, 1), bool)
  else:
    dcols, dvalid = cols, mask
  mcols, mvalid = (cols, mask) if monitor == "pooled" else (dcols, dvalid)
  one = lambda a: jnp.asarray(a)[:, None]
  return probe_lib.ProbeProblem(
      h=one(h), pool_mask=one(mask), positions=one(cols), probe_w=jnp.asarray(probes.w)[cls],
      probe_b=jnp.asarray(probes.b)[cls], delta_cols=one(dcols), delta_valid=one(dvalid), monitor_cols=one(mcols),
      monitor_valid=one(mvalid), row_weight=jnp.ones((n, 1), jnp.float32))


@jax.jit
def _drifts(clamps, out_feats, out_refs, out_masks, h_def, delta):
  """decode drift ||(E_S(h_def+delta) - E_S(h_def)) W_dec[S]|| over the monitored columns and
  pre-activation drift at the delta columns, per (point, problem, row): [G, N, B] each."""
  axes = intervene.clamp_axes((clamps,))[0]

  def one(c, f, r, m, h, d):  # f/r/m [B, M, K]; h [1, B, P, d]; d [1, P', d]
    dd = jnp.einsum("bmk,kd->bmd", jnp.where(m, f - r, 0.0), c.decoder_rows())
    x = h[0]
    pre = jnp.where(c.mask, c.pre_features(x + d[0][None]) - c.pre_features(x), 0.0)
    return jnp.sqrt(jnp.sum(dd * dd, axis=(-2, -1))), jnp.sqrt(jnp.sum(pre * pre, axis=(-2, -1)))

  per_point = lambda c, f, r, m, h, d: jax.vmap(one, in_axes=(axes, 0, 0, 0, 0, 0))(c, f, r, m, h, d)
  return jax.vmap(per_point, in_axes=(axes, 0, 0, 0, 0, 0))(clamps, out_feats, out_refs, out_masks, h_def, delta)


def compute_unit(setting: runner.Setting, config, mesh, u: sweep.WorkUnit) -> dict[str, Any]:
  """One unit on the probe path: every point of the unit x every problem, in batches of problems
  sharded over the mesh's ``data`` axis (``batching.map_batched``; problem i of point g uses
  ``fold_in(key_g, i)`` whatever the batch or device count)."""
  mode, variant = u.group
  spec = setting.spec(mode, variant)
  (clamps,) = setting.clamps(u.points)
  g = len(u.points)
  hp = spec.config.hparams(budget=np.asarray([float(p.get("budget", spec.config.budget)) for p in u.points],
                                             np.float32))
  hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (g,)), hp)
  keys = jnp.stack([sweep.point_key(int(p.get("seed", 0)), p["point_id"]) for p in u.points])
  pbs = setting.problems(variant)
  per_problem = jax.tree.map(lambda a: np.moveaxis(np.asarray(a), 1, 0), clamps.params)  # [N, G, ...]

  def one_batch(batch, ids):
    sub, cparams = batch
    cl = clamps.replace(params=jax.tree.map(lambda a: jnp.moveaxis(jnp.asarray(a), 0, 1), cparams))
    out = probe_lib.recover_probe_grid(spec, cl, jax.tree.map(jnp.asarray, sub), hp, keys, ids=ids)
    masks = jnp.broadcast_to(out.masks[0], out.feats[0].shape)
    dec, pre = _drifts(cl, out.feats[0], out.refs[0], masks, out.h_def, out.delta)
    res = {"rows_base": out.rows_base, "rows_defended": out.rows_defended, "rows": out.rows,
           "feats": {"000": out.feats[0]}, "refs": {"000": out.refs[0]}, "masks": {"000": masks},
           "delta": out.delta, "h_def": out.h_def, "history_objective": out.history["objective"],
           "history_delta_norm": out.history["delta_norm"], "diverged": out.diverged, "decode_drift": dec,
           "pre_drift": pre}
    return jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), res)  # [G, B, ...] -> [B, G, ...]

  res = batching.map_batched(one_batch, (pbs, per_problem), int(config.task.recover_chunk) or None,
                             mesh=mesh if jax.process_count() == 1 else None)
  res = jax.tree.map(lambda a: np.moveaxis(a, 0, 1), res)  # [N, G, ...] -> [G, N, ...]
  res["budget"] = np.asarray(hp.budget)
  return res


# ----------------------------------------------------------------------------------------------
# TPP summaries


def _target_stats(rows) -> dict:
  v = [r for r in rows if r["valid"]]
  nv = len(v)
  mean = lambda k: float(np.mean([r[k] for r in v])) if nv else float("nan")
  return {"n_examples": len(rows), "n_valid": nv, "n_recovered": sum(r["recovered"] for r in v),
          "recovery": mean("recovered"), "reactivation": mean("reactivated_fraction_within_eligible"),
          "act_drift": mean("act_drift_l2"), "decode_drift": mean("decode_drift_l2"),
          "zero_react": mean("zero_reactivation")}


STATS = ("recovery", "reactivation", "act_drift", "decode_drift", "zero_react")


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
    for name, s in list(p["targets"].items()):
      rows.append(head + [name, f"{s['n_recovered']}/{s['n_valid']}", f(s["recovery"]), f(s["reactivation"]),
                          f(s["act_drift"]), f(s["decode_drift"]), f(s["zero_react"])])
    for name, a in [*((f"{d} (unweighted)", v) for d, v in p["datasets"].items()), ("all targets (unweighted)",
                                                                                     p["all"])]:
      u = a["unweighted"]
      rows.append(head + [f"**{name}**", f"{a['n_recovered']}/{a['n_valid']}", f(u["recovery"]),
                          f(u["reactivation"]), f(u["act_drift"]), f(u["decode_drift"]), f(u["zero_react"])])
    a, wt = p["all"], p["all"]["weighted"]
    rows.append(head + ["**all examples (weighted)**", f"{a['n_recovered']}/{a['n_valid']} [{f(a['ci'][0])}, "
                        f"{f(a['ci'][1])}]", f(wt["recovery"]), f(wt["reactivation"]), f(wt["act_drift"]),
                        f(wt["decode_drift"]), f(wt["zero_react"])])
  lines.append(outputs.format_table(["N", "budget", "mode", "scope", "target", "recovered/valid", "recovery",
                                    "reactivation", "act drift", "decode drift", "zero-react"], rows))
  if summary["sign_tests"]:
    lines += ["", "## Encoder vs none over targets (one-sided sign test)", ""]
    st = [[t["grid_id"], t["variant"]] + [f"{t[s]['k']}/{t[s]['n']} (p={f(t[s]['p'])})"
                                          for s in ("recovery", "reactivation", "act_drift", "zero_react")]
          for t in summary["sign_tests"]]
    lines.append(outputs.format_table(["grid point", "scope", "recovery lower", "reactivation lower",
                                      "act drift lower", "zero-react higher"], st))
  return "\n".join(lines) + "\n"


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the TPP experiment of ``config`` into ``workdir``; returns the runner's summary, rows and
  the TPP summary."""
  validate(config)
  out = runner.run(config, workdir, lambda cfg: setup(cfg, workdir), VARIANTS)
  with open(os.path.join(workdir, "tpp_metric.json")) as f:
    info = json.load(f)
  summary = tpp_summary(out["rows"])
  if runner.is_writer():
    text = render_tpp(summary, info)
    outputs.atomic_write(os.path.join(workdir, "tpp.md"), text)
    outputs.atomic_write(os.path.join(workdir, "tpp.json"), json.dumps({**info, **summary}, default=float))
    print(text, flush=True)
  out["tpp"] = summary
  return out


def render(workdir: str, plots: bool = True) -> str:
  """``python -m recovery_jax.report`` for a TPP run: summary.md from the rows, then tpp.md / tpp.json
  from the rows and ``tpp_metric.json`` (no model)."""
  text, _ = summary_lib.render(workdir, plots=plots)
  path = os.path.join(workdir, "tpp_metric.json")
  if not os.path.exists(path):
    raise errors.UserError(f"{workdir}: not a finished TPP run (missing {path})")
  with open(path) as f:
    info = json.load(f)
  summary = tpp_summary(summary_lib.read_jsonl(os.path.join(workdir, "results.jsonl")))
  tpp_text = render_tpp(summary, info)
  outputs.atomic_write(os.path.join(workdir, "tpp.md"), tpp_text)
  outputs.atomic_write(os.path.join(workdir, "tpp.json"), json.dumps({**info, **summary}, default=float))
  return text + "\n" + tpp_text
