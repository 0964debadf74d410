"""IOI post-intervention recovery, end to end (paper-method sections 5 and 7).

Phases: load model + SAE -> IOI prompts -> base logit difference -> feature ranking by attribution
through a pass-through SAE -> the sweep grid (feature-set size K, clamp value, budget, seed) crossed
with projection modes and delta variants -> work units, each one jit-compiled call of the engine
vmapped over its points and sharded over the mesh's ``data`` axis -> per-example metrics, summary
table, plots. Finished units are saved (orbax) so an interrupted run resumes.

Variants: ``shared`` (the reference: one delta for all prompts, maximising the mean logit
difference over all of them) and ``per_prompt`` (one delta per prompt, vmapped).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from recovery_jax import errors, features, intervene, metrics, report, sweep
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import attribution, engine, projections
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae import core as sae_core
from recovery_jax.tasks import ioi as ioi_task

VARIANTS = ("shared", "per_prompt")
STATIC_KEYS = ("mode", "variant")


def _log(msg: str) -> None:
  logging.info("%s", msg)
  print(msg, flush=True)


def validate(config) -> None:
  """Checks config values that need no model; errors name the field."""
  r = config.recovery
  for m in r.modes:
    if m not in projections.PROJECTIONS:
      raise errors.UserError(f"config field 'recovery.modes': {m!r} is not one of {projections.PROJECTIONS}")
  for v in r.variants:
    if v not in VARIANTS:
      raise errors.UserError(f"config field 'recovery.variants': {v!r} is not one of {VARIANTS}")
  if not r.modes or not r.variants:
    raise errors.UserError("config fields 'recovery.modes' and 'recovery.variants' must not be empty")
  if r.steps < 1:
    raise errors.UserError(f"config field 'recovery.steps'={r.steps}: expected >= 1")
  if config.task.n_prompts < 1:
    raise errors.UserError(f"config field 'task.n_prompts'={config.task.n_prompts}: expected >= 1")
  if config.clamp.mode not in intervene.CLAMP_MODES:
    raise errors.UserError(f"config field 'clamp.mode'={config.clamp.mode!r}: expected one of {intervene.CLAMP_MODES}")
  for k in config.sweep.n_features:
    if int(k) < 1:
      raise errors.UserError(f"config field 'sweep.n_features' has {k}: expected >= 1")
  for b in config.sweep.budget:
    if float(b) < 0:
      raise errors.UserError(f"config field 'sweep.budget' has {b}: expected >= 0")
  try:
    sweep.expand_grid(dict(config.sweep))
  except ValueError as e:
    raise errors.UserError(f"config field 'sweep': {e}") from e


def _snapshot_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != text:
      raise errors.UserError(f"{path}: the workdir holds a run of a different config; use a new --workdir "
                             "(resuming needs the same config)")
    return
  report.atomic_write(path, text)


def _problems(batch: ioi_task.IOIBatch, variant: str) -> engine.Problem:
  """Stacked engine problems: shared -> 1 problem of n rows; per_prompt -> n problems of 1 row."""
  n, t = batch.tokens.shape
  tokens = jnp.asarray(batch.tokens)
  mask = jnp.asarray(batch.attention_mask, bool)
  pos = transformer.default_positions(mask, n, t)
  last = jnp.full((n, 1), t - 1, jnp.int32)
  pb = engine.Problem(
      tokens=tokens, attention_mask=mask, positions=pos, delta_cols=last, delta_valid=jnp.ones((n, 1), bool),
      readout_cols=last, monitor_cols=last, monitor_valid=jnp.ones((n, 1), bool),
      targets={"pos": jnp.asarray(batch.io_ids), "neg": jnp.asarray(batch.s_ids)},
      row_weight=jnp.ones((n,), jnp.float32))
  if variant == "shared":
    return jax.tree.map(lambda a: a[None], pb)
  return jax.tree.map(lambda a: a[:, None], pb)


@functools.lru_cache(maxsize=None)
def _compiled_unit(spec: engine.RecoverySpec, mesh):
  """One jit-compiled program per static spec: G points x N problems, points sharded over data."""
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def unit(params, sae, cps, hp, key_data, problems):
    def one_point(cp, h, kd):
      k = jax.random.wrap_key_data(kd)
      n = problems.tokens.shape[0]
      return jax.vmap(lambda pb, i: engine.recover(spec, params, (sae,), (cp,), pb, h, jax.random.fold_in(k, i)))(
          problems, jnp.arange(n))
    return jax.vmap(one_point)(cps, hp, key_data)

  return jax.jit(unit, in_shardings=(repl, repl, data, data, data, repl), out_shardings=data)


@functools.lru_cache(maxsize=None)
def _compiled_attribution(spec: engine.RecoverySpec, mesh, k: int):
  """Recovery-path attribution of per-prompt deltas (paper-method 9.4): decompose each prompt's delta
  at its defended residual, replay every component under the active clamp. -> (rows [G, N, C],
  energy [G, N, C]) in ``attribution.COMPONENTS`` order."""
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def unit(params, sae, cps, deltas, h_defs, problems):
    def one_problem(cp, delta, h_def, pb):
      comp = attribution.decompose_sites(spec, (sae,), (cp,), h_def[:, 0], delta, k)
      ev = engine.evaluate(spec, params, (sae,), (cp,), pb, comp.stacked())
      energy = attribution.energy_fractions(comp)
      return ev.rows[:, 0], jnp.stack([energy[f"{n}_energy"] for n in attribution.COMPONENTS])
    per_point = lambda cp, d, h: jax.vmap(lambda dd, hh, pb: one_problem(cp, dd, hh, pb))(d, h, problems)
    return jax.vmap(per_point)(cps, deltas, h_defs)

  return jax.jit(unit, in_shardings=(repl, repl, data, data, data, repl), out_shardings=data)


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the IOI experiment of ``config`` into ``workdir``; returns the summary rows."""
  t_start = time.time()
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  _snapshot_config(config, workdir)

  _log(f"loading model {config.model!r} and SAE {config.sae!r} at {config.site}")
  params, mcfg, tok = setup_lib.load_model(config.model, config.model_processing, seed=config.seed)
  sae, scfg = setup_lib.load_sae(config.sae, mcfg, config.site, override=config.sae_override_checks)
  k_max = max(int(k) for k in config.sweep.n_features)
  if k_max > scfg.d_sae:
    raise errors.UserError(f"config field 'sweep.n_features': K={k_max} is larger than the SAE's d_sae={scfg.d_sae}")

  bos = mcfg.bos_token_id if mcfg.is_gemma else None
  batch = ioi_task.make_ioi_batch(tok, config.task.n_prompts, seed=config.task.prompt_seed,
                                  prompt_type=config.task.prompt_type, nb_templates=config.task.nb_templates or None,
                                  bos_id=bos, pad_id=mcfg.pad_token_id or 0)
  tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
  objective = lambda logits: ioi_task.logit_diff(logits, jnp.asarray(batch.io_ids), jnp.asarray(batch.s_ids))
  base_ld = np.asarray(objective(transformer.forward(params, mcfg, tokens, attention_mask=mask).logits[:, -1]))
  _log(f"{len(batch)} IOI prompts ({config.task.prompt_type}); base logit diff mean {base_ld.mean():.3f}, "
       f"correct {(base_ld > 0).sum()}/{len(batch)}")

  attr = features.attribution_scores(params, mcfg, sae, scfg, config.site, tokens, mask, batch.readout_pos, objective)
  ranking = np.asarray(features.top_positive(attr, k_max))
  _log(f"feature attribution: {int((np.asarray(attr) > 0).sum())} positive features; top {len(ranking)} kept")

  clamp_spec = intervene.ClampSpec(site=config.site, sae_cfg=scfg, mode=config.clamp.mode,
                                   positive_only=config.clamp.positive_only)
  n_valid = _preflight(params, mcfg, sae, clamp_spec, ranking, k_max, tokens, mask, objective, base_ld, config)
  if not any(n_valid.values()):
    raise errors.UserError("no valid flips: the clamp does not suppress IOI (base > 0 and defended <= 0) on any "
                           f"prompt for any (n_features, clamp_value) of the grid {sorted(n_valid)}; try more "
                           "features, another clamp value or another site")

  mesh = sweep.make_mesh(config.mesh.data, config.mesh.model)
  points = []
  for p in sweep.expand_grid(dict(config.sweep)):
    for mode in config.recovery.modes:
      for variant in config.recovery.variants:
        points.append({**p, "grid_id": p["point_id"], "mode": mode, "variant": variant})
  for i, p in enumerate(points):
    p["point_id"] = i
  n_data = mesh.shape["data"]
  unit_size = config.unit_size or len(points)
  units = sweep.make_units(points, STATIC_KEYS, unit_size)
  store = sweep.UnitStore(os.path.join(workdir, "units"))

  def compute(u: sweep.WorkUnit):
    mode, variant = u.group
    rc = RecoveryConfig(steps=config.recovery.steps, lr=config.recovery.lr, ridge=config.recovery.ridge,
                        projection=mode, semantics=config.clamp.semantics, shared_delta=variant == "shared")
    spec = engine.RecoverySpec(model_cfg=mcfg, clamps=(clamp_spec,), delta_sites=(config.site,),
                               objective=Objective("logit_diff"), config=rc, suffix_len=1).canonical()
    cps = intervene.stack_clamp_params([
        intervene.make_clamp_params(ranking[:int(p["n_features"])], float(p["clamp_value"]), k_max=k_max)
        for p in u.points])
    hp = rc.hparams(budget=np.asarray([float(p["budget"]) for p in u.points], np.float32))
    hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(u.points),)), hp)
    keys = np.stack([np.asarray(jax.random.key_data(sweep.point_key(int(p["seed"]), p["point_id"])))
                     for p in u.points])
    (cps, hp, keys), n_real = sweep.pad_to_multiple((cps, hp, keys), n_data)
    t0 = time.time()
    problems = _problems(batch, variant)
    out = _compiled_unit(spec, mesh)(params, sae, cps, hp, keys, problems)
    extra = {}
    if variant == "per_prompt" and config.recovery.attribution_top_k > 0:
      rows_c, energy_c = _compiled_attribution(spec, mesh, int(config.recovery.attribution_top_k))(
          params, sae, cps, out.delta, out.h_def, problems)
      extra = {"attr_rows": np.asarray(rows_c)[:n_real], "attr_energy": np.asarray(energy_c)[:n_real]}
    out = jax.tree.map(lambda a: np.asarray(a)[:n_real], out)
    _log(f"  unit {u.unit_id}: mode={mode} variant={variant}: {len(u.points)} points in {time.time() - t0:.1f}s")
    return {"rows_base": out.rows_base, "rows_defended": out.rows_defended, "rows": out.rows,
            "feats": out.feats[0], "refs": out.refs[0], "masks": out.masks[0], "delta": out.delta,
            "history_objective": out.history["objective"], "history_drift": out.history["drift_l2"],
            "h_def": out.h_def[:, :, 0, :, 0],
            "idx": np.asarray(cps.feature_idx)[:n_real], **extra}

  _log(f"{len(points)} grid points in {len(units)} work units on a {dict(mesh.shape)} mesh")
  results = sweep.run_units(units, compute, store, log=_log)
  store.close()

  rows, summary = _collect(config, units, results, batch, base_ld, sae, scfg)
  report.write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
  header = ["K", "clamp", "budget", "seed", "mode", "variant", "valid/N", "recovered", "rate [95% CI]",
            "mean rec. LD (valid)", "act drift (valid)", "decode drift (valid)", "pre-act drift (valid)",
            "react. frac (valid)",
            "zero-react (valid)"]
  table = report.format_table(header, [s["table_row"] for s in summary])
  attr_table = _attribution_table(units, results, summary, config)
  elapsed = time.time() - t_start
  text = (f"# IOI post-intervention recovery\n\nmodel {config.model}, SAE {config.sae} at {config.site}, "
          f"{len(batch)} prompts, clamp {config.clamp.mode} (positive_only={config.clamp.positive_only}), "
          f"{config.recovery.steps} steps, lr {config.recovery.lr}\n\n{table}\n\n{attr_table}(wall time {elapsed:.0f} s)\n")
  report.atomic_write(os.path.join(workdir, "summary.md"), text)
  report.write_jsonl(os.path.join(workdir, "summary.jsonl"), [{k: v for k, v in s.items() if k != "table_row"}
                                                              for s in summary])
  if config.plots:
    _plots(workdir, units, results, rows)
  print(text, flush=True)
  return {"summary": summary, "rows": rows}


def _preflight(params, mcfg, sae, clamp_spec, ranking, k_max, tokens, mask, objective, base_ld, config):
  """Defended logit differences per (n_features, clamp_value): the valid-flip counts, before recovery."""
  @jax.jit
  def defended_ld(cp):
    edits = intervene.clamp_edits((clamp_spec,), (sae,), (cp,))
    return objective(transformer.forward(params, mcfg, tokens, attention_mask=mask, edits=edits).logits[:, -1])

  counts = {}
  for k in sorted({int(k) for k in config.sweep.n_features}):
    for v in sorted({float(v) for v in config.sweep.clamp_value}):
      cp = intervene.make_clamp_params(ranking[:k], v, k_max=k_max)
      ld = np.asarray(defended_ld(cp))
      counts[(k, v)] = int(((base_ld > 0) & (ld <= 0)).sum())
      _log(f"preflight K={k} clamp={v}: defended logit diff mean {ld.mean():.3f}; valid flips "
           f"{counts[(k, v)]}/{len(ld)}")
  return counts


def _pre_drift(sae, scfg, h_def, delta, idx, mask):
  """||pre_S(h_def + delta) - pre_S(h_def)|| per row: how far the clamped features' pre-activations
  moved (for TopK/JumpReLU SAEs the activations can stay at 0 while these move). h_def, delta: [B, d]."""
  pre = lambda x: np.asarray(sae_core.encode_pre_subset(sae, scfg, jnp.asarray(x), jnp.asarray(idx)))
  return np.linalg.norm(np.where(mask, pre(h_def + delta) - pre(h_def), 0.0), axis=-1)


def _collect(config, units, results, batch, base_ld, sae, scfg):
  """Per-example rows and per-point summaries from unit results."""
  rows, summary = [], []
  w_dec = np.asarray(sae["W_dec"])
  for u in units:
    res = results[u.unit_id]
    for j, p in enumerate(u.points):
      if p["variant"] == "shared":
        get = lambda a: np.asarray(a[j, 0])  # [B, ...]
      else:
        get = lambda a: np.asarray(a[j, :, 0])
      rb, rd, rr = get(res["rows_base"]), get(res["rows_defended"]), get(res["rows"])
      feats, refs, masks = get(res["feats"])[:, 0], get(res["refs"])[:, 0], get(res["masks"])[:, 0]
      idx = np.asarray(res["idx"][j])
      ex = metrics.example_metrics(feats, refs, masks, w_dec[idx])
      valid = (rb > 0) & (rd <= 0)
      recovered = rr > 0
      delta = np.asarray(res["delta"][j])
      h_def = get(res["h_def"])  # [B, d]
      d_rows = np.broadcast_to(delta.reshape(-1, delta.shape[-1]), h_def.shape)  # shared: one row for all
      pre_drift = _pre_drift(sae, scfg, h_def, d_rows, idx, masks)
      for b in range(len(rb)):
        d_b = delta[0] if p["variant"] == "shared" else delta[b]
        rows.append({**{k: p[k] for k in ("point_id", "grid_id", "mode", "variant", "n_features", "clamp_value",
                                           "budget", "seed")},
                     "prompt": b, "text": batch.texts[b], "template": batch.templates[b],
                     "base_ld": rb[b], "defended_ld": rd[b], "recovered_ld": rr[b], "valid": valid[b],
                     "recovered": recovered[b], "act_drift_l2": ex["act_drift_l2"][b],
                     "decode_drift_l2": ex["decode_drift_l2"][b], "pre_act_drift_l2": pre_drift[b],
                     "reactivated_fraction_within_eligible": ex["reactivated_fraction_within_eligible"][b],
                     "zero_reactivation": bool(recovered[b] and ex["n_reactivated"][b] == 0),
                     "delta_norm": float(np.linalg.norm(d_b))})
      nv = int(valid.sum())
      k_rec = int((recovered & valid).sum())
      lo, hi = metrics.wilson_interval(k_rec, nv) if nv else (float("nan"), float("nan"))
      vm = lambda a: float(np.mean(a[valid])) if nv else float("nan")
      zr = int((recovered & valid & (ex["n_reactivated"] == 0)).sum())
      s = {"point_id": p["point_id"], "mode": p["mode"], "variant": p["variant"], "n_features": p["n_features"],
           "clamp_value": p["clamp_value"], "budget": p["budget"], "seed": p["seed"], "n_prompts": len(rb),
           "n_valid": nv, "n_recovered": k_rec, "rate": k_rec / nv if nv else float("nan"), "ci": [lo, hi],
           "mean_recovered_ld_valid": vm(rr), "act_drift_valid": vm(ex["act_drift_l2"]),
           "decode_drift_valid": vm(ex["decode_drift_l2"]),
           "reactivation_valid": vm(ex["reactivated_fraction_within_eligible"]), "zero_react_valid": zr,
           "pre_act_drift_valid": vm(pre_drift),
           "act_drift_all": float(np.mean(ex["act_drift_l2"]))}
      rate = f"{s['rate']:.2f} [{lo:.2f}, {hi:.2f}]" if nv else "-"
      s["table_row"] = [int(p["n_features"]), float(p["clamp_value"]), float(p["budget"]), int(p["seed"]), p["mode"],
                        p["variant"], f"{nv}/{len(rb)}", f"{k_rec}/{nv}", rate, s["mean_recovered_ld_valid"],
                        s["act_drift_valid"], s["decode_drift_valid"], s["pre_act_drift_valid"], s["reactivation_valid"],
                        f"{zr}/{nv}"]
      summary.append(s)
  return rows, summary


def _attribution_table(units, results, summary, config) -> str:
  """Recovery-path attribution (per-prompt deltas, valid prompts): how many recover when only one
  component of delta is replayed under the clamp, and the component's energy ||c||^2 / ||delta||^2."""
  by_id = {s["point_id"]: s for s in summary}
  rows = []
  for u in units:
    res = results[u.unit_id]
    if "attr_rows" not in res:
      continue
    for j, p in enumerate(u.points):
      s = by_id[p["point_id"]]
      rb, rd = np.asarray(res["rows_base"][j, :, 0]), np.asarray(res["rows_defended"][j, :, 0])
      valid = (rb > 0) & (rd <= 0)
      if not valid.any():
        continue
      rec, energy = np.asarray(res["attr_rows"][j]), np.asarray(res["attr_energy"][j])  # [N, C]
      cells = [f"{int((rec[valid, c] > 0).sum())}/{int(valid.sum())} ({energy[valid, c].mean():.2f})"
               for c in range(len(attribution.COMPONENTS))]
      rows.append([s["n_features"], s["clamp_value"], s["budget"], s["mode"], *cells])
      s["attribution"] = {n: {"recovered": int((rec[valid, c] > 0).sum()), "energy": float(energy[valid, c].mean())}
                          for c, n in enumerate(attribution.COMPONENTS)}
  if not rows:
    return ""
  header = ["K", "clamp", "budget", "mode", *[f"{n} replay" for n in attribution.COMPONENTS]]
  return ("Recovery-path attribution (per-prompt deltas, valid prompts; recovered when only that component "
          f"is replayed under the clamp, mean energy fraction in brackets; top-k = "
          f"{config.recovery.attribution_top_k}):\n\n{report.format_table(header, rows)}\n\n")


def _plots(workdir, units, results, rows):
  """Recovered logit difference vs defended-feature drift per mode (paper Figure 4), and curves."""
  scatter, curves = {}, {}
  for u in units:
    res = results[u.unit_id]
    for j, p in enumerate(u.points):
      if p["grid_id"] != 0:
        continue
      name = f"{p['mode']} ({p['variant']})"
      hist = np.asarray(res["history_objective"][j])  # [N, steps]
      curves[name] = hist.mean(0)
  for r in rows:
    if r["grid_id"] != 0 or not r["valid"]:
      continue
    key = f"{r['mode']} ({r['variant']})"
    x, y = scatter.setdefault(key, ([], []))
    x.append(r["pre_act_drift_l2"])  # activation drift is 0 for TopK SAEs whose clamped features stay out
    y.append(r["recovered_ld"])
  scatter = {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in scatter.items()}
  if scatter:
    report.plot_recovery_vs_drift(os.path.join(workdir, "recovery_vs_drift.png"), scatter,
                                  "defended-feature pre-activation drift ||pre_S(h+delta) - pre_S(h)||", "recovered logit diff",
                                  "IOI recovery vs drift (valid prompts)")
  if curves:
    report.plot_curves(os.path.join(workdir, "objective_curves.png"), curves, "objective (mean logit diff)",
                       "recovery objective per step")
