"""The refusal setting: validation, model/SAE/feature loading, the defence preflight at every strength
(``prepare``), and the recovery jobs as the runner's work units (``Refusal``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
import numpy as np

import jax

from recovery_jax import config_utils as cu
from recovery_jax import errors, outputs, sweep
from recovery_jax.experiments import runner
from recovery_jax.experiments import setting as setting_lib
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.models import chat, generate, sites as sites_lib
from recovery_jax.tasks import refusal as task
from recovery_jax.tasks import refusal_defence as defence_lib
from recovery_jax.tasks import refusal_features as feat_lib
from recovery_jax.tasks import refusal_la_ig as la_ig_lib
from recovery_jax.tasks import refusal_judge as judge
from recovery_jax.tasks import refusal_recovery as rec_lib
from recovery_jax.recovery import soft_suffix as soft_lib
from recovery_jax.recovery.optimizer import BUDGET_SCALES
from recovery_jax.experiments.refusal.preflight import _table, count_valid, generate_answers, preflight_row
from recovery_jax.experiments.refusal import curve as curve_lib
from recovery_jax.experiments.refusal.jobs import (RecoveryContext, VARIANTS, choose_strength, compute_job,
                                                   defence_k_max, ordered_sites, recovery_jobs, run_shapes,
                                                   threat_sites)
from recovery_jax.experiments.refusal.results import _job_name, case_rows, render, strength_label


MODES = ("none", "encoder", "jacobian")  # the projections the two-stage recovery runs


def validate(config) -> None:
  """Config values that need no model; errors name the field."""
  if not config.sites:
    raise errors.UserError("config field 'sites' is empty: expected blocks.L.hook_resid_post sites")
  for s in config.sites:
    if not s.endswith((".hook_resid_post", ".hook_resid_pre")):
      raise errors.UserError(f"config field 'sites' has {s!r}: the defence acts at blocks.L.hook_resid_post (the "
                             "paper) or blocks.L.hook_resid_pre sites")
  cu.check_one_of(config, "defence.kind", defence_lib.DEFENCES)
  cu.check_one_of(config, "features.contrast", feat_lib.CONTRASTS)
  cu.check_one_of(config, "generation.stop", generate.STOP_OPTIONS)
  cu.check_one_of(config, "features.selection", la_ig_lib.SELECTIONS)
  if config.features.list and config.features.selection == "la_ig":
    raise errors.UserError("config field 'features.selection'='la_ig' ranks the contrast's candidates, and a user "
                           "'features.list' skips the selection; set features.selection='contrast' or features.list=''")
  for name in ("features.k", "features.n_candidates", "generation.max_new_tokens", "generation.batch_size"):
    cu.check_at_least(config, name, 1)
  if not config.defence.strengths:
    raise errors.UserError("config field 'defence.strengths' is empty")
  r = config.recovery
  if r.enabled:
    if config.defence.kind == "add":
      raise errors.UserError("config field 'defence.kind'='add': the recovery needs an SAE clamp defence (multiply or "
                             "set); set recovery.enabled=False for the additive steering preflight")
    for name, allowed in (("recovery.modes", MODES), ("recovery.drop_modes", MODES),
                          ("recovery.attribution_modes", tuple(r.modes)), ("recovery.variants", VARIANTS)):
      cu.check_each_one_of(config, name, allowed)
    if not r.variants:
      raise errors.UserError("config field 'recovery.variants' must not be empty")  # modes may be () (baselines only)
    if config.soft_suffix.enabled:
      cu.check_each_one_of(config, "soft_suffix.variants", soft_lib.VARIANTS)
    cu.check_one_of(config, "recovery.budget_mode", MODES)
    if "budget_scale" in r:
      cu.check_one_of(config, "recovery.budget_scale", BUDGET_SCALES)
    for b in r.budgets:
      if float(b) <= 0:
        raise errors.UserError(f"config field 'recovery.budgets' has {b}: expected > 0")
    ks = tuple(r.get("ks", ()))
    if ks and config.features.list:
      raise errors.UserError("config field 'recovery.ks': the K sweep takes the global top K of the contrast ranking; "
                             "with a user 'features.list' set recovery.ks=()")
    n_pairs = int(config.features.n_candidates) * len(config.sites)
    for k in ks:
      if not 1 <= int(k) <= n_pairs:
        raise errors.UserError(f"config field 'recovery.ks' has {k}: expected 1 <= K <= features.n_candidates x "
                               f"sites = {n_pairs}")
    for name in ("recovery.stage1.steps", "recovery.stage2.steps", "recovery.n_ans"):
      cu.check_at_least(config, name, 1)
    _validate_threats(config)


def _check_delta_sites(field: str, sites) -> None:
  """Delta sites are residual sites; attribution needs a circuit SAE on each one's residual vector."""
  for s in sites:
    if not str(s).endswith((".hook_resid_post", ".hook_resid_pre")):
      raise errors.UserError(f"config field {field!r} has {s!r}: expected blocks.L.hook_resid_pre or "
                             "blocks.L.hook_resid_post sites")
    try:
      sites_lib.parse_site(s)
    except ValueError as e:
      raise errors.UserError(f"config field {field!r}: {e}") from e


def _validate_threats(config) -> None:
  """recovery.delta_sites, recovery.threats and recovery.curve (the threat-model budget curves)."""
  r = config.recovery
  dsites = tuple(r.get("delta_sites", ()))
  _check_delta_sites("recovery.delta_sites", dsites)
  if r.attribution_modes:
    for s in dsites:
      if not any(sites_lib.same_residual(s, c) for c in config.sites):
        raise errors.UserError(f"config field 'recovery.attribution_modes': the attribution decomposes the delta at "
                               f"delta site {s!r} in an SAE on its residual vector, and no circuit site "
                               f"({', '.join(config.sites)}) is; set recovery.attribution_modes=()")
  threats = threat_sites(config)
  for name, sites in threats.items():
    _check_delta_sites(f"recovery.threats ({name})", sites)
  cv = r.get("curve")
  if cv is None or not cv.rhos:
    return
  for rho in cv.rhos:
    if not 0 < float(rho):
      raise errors.UserError(f"config field 'recovery.curve.rhos' has {rho}: expected rho > 0 (a fraction of the "
                             "defended residual norm)")
  cu.check_each_one_of(config, "recovery.curve.modes", MODES)
  cu.check_each_one_of(config, "recovery.curve.threats", tuple(threats))
  cu.check_at_least(config, "recovery.curve.bisect_steps", 0)


def sae_path(sae: str, site: str) -> str:
  """A config's ``sae`` for one site: ``{layer}`` and ``{site}`` filled in (named SAEs pass unchanged)."""
  if "{" not in sae:
    return sae
  return sae.format(layer=sites_lib.parse_site(site).layer, site=site)


def _features(config, params, mcfg, tok, saes, sites, pad_id, log) -> tuple[dict, dict, Any]:
  """The defended feature set (site -> ids), its record for features.json and the ranking (None for a
  user list)."""
  f = config.features
  if f.list:
    if f.list.startswith("REQUIRED"):
      raise errors.UserError(f"config field 'features.list': {f.list}")
    try:
      feats = feat_lib.parse_feature_list(f.list, sites)
    except ValueError as e:
      raise errors.UserError(f"config field 'features.list': {e}") from e
    return feats, {"source": "user list", "features": feats}, None
  tmpl = config.model  # chat.load_template: the model file's own chat template (or its family's fallback)
  if f.contrast == "files":
    if not (f.harmful_file and f.harmless_file):
      raise errors.UserError("config fields 'features.harmful_file' and 'features.harmless_file' are required for "
                             "features.contrast='files'")
    n = f.n_contrast or None
    pos = [task.format_prompt(tmpl, r.text) for r in task.load_prompts(f.harmful_file)[:n]]
    neg = [task.format_prompt(tmpl, r.text) for r in task.load_prompts(f.harmless_file)[:n]]
    sides = feat_lib.side(tok, pos, pad_id), feat_lib.side(tok, neg, pad_id)
  else:
    rows = task.load_prompts(f.contrast_file)
    rows = rows[-f.n_contrast:] if f.n_contrast else rows  # the file's last rows; the preflight uses its first
    if f.contrast == "openings":
      prompts = [task.format_prompt(tmpl, r.text) for r in rows]
      sides = (feat_lib.opening_side(tok, prompts, feat_lib.REFUSAL_OPENING, pad_id),
               feat_lib.opening_side(tok, prompts, feat_lib.COMPLIANCE_OPENING, pad_id))
    else:
      sides = (feat_lib.side(tok, [task.format_prompt(tmpl, r.text, feat_lib.DECLINING_SYSTEM) for r in rows], pad_id),
               feat_lib.side(tok, [task.format_prompt(tmpl, r.text, feat_lib.HELPFUL_SYSTEM) for r in rows], pad_id))
  refuse = feat_lib.site_means(params, mcfg, sides[0], sites, saes)
  comply = feat_lib.site_means(params, mcfg, sides[1], sites, saes)
  ranking = feat_lib.rank(saes, refuse, comply, f.n_candidates, f.vector_site)
  contrast, la = ranking, None
  if f.selection == "la_ig" or f.compare_selection:  # LA-IG on the contrast's refusal-side prompts
    la_prompts = (pos if f.contrast == "files" else prompts if f.contrast == "openings"
                  else [task.format_prompt(tmpl, r.text, feat_lib.DECLINING_SYSTEM) for r in rows])
    la = la_ig_lib.select(params, mcfg, tok, saes, contrast, la_prompts, pad_id, f.k, f.vector_site)
    log(f"LA-IG on {len(la_prompts)} prompts (direction {la.record['direction_site']}): top "
        f"{', '.join(f'{s_}:{f_}' for s_, f_, _ in la.ranking.top[:f.k])}")
    ranking = la.ranking if f.selection == "la_ig" else ranking
  feats = ranking.features(f.k)
  for s in sites:
    log(f"contrast {f.contrast} at {s}: |v| {np.linalg.norm(ranking.vectors[s]):.3f}, top cosine "
        f"{ranking.cosines[s][0]:.3f}, chosen {len(feats.get(s, []))}")
  record = {"source": f"contrast {f.contrast}", "n_contrast_rows": int(sides[0].ids.shape[0]),
            "vector_norm": {s: float(np.linalg.norm(v)) for s, v in ranking.vectors.items()},
            "candidates": {s: ranking.candidates[s].tolist() for s in sites},
            "cosines": {s: np.round(ranking.cosines[s], 5).tolist() for s in sites},
            "scores": {s: np.round(ranking.scores[s], 6).tolist() for s in sites},
            "top": [[s, f_, round(x, 6)] for s, f_, x in ranking.top[:max([f.k, *config.recovery.get("ks", ())])]],
            "features": feats}
  record["selection"] = f.selection  # "scores" and "top" are the chosen ranking's
  if f.selection == "la_ig":
    record["source"] = f"LA-IG over the contrast {f.contrast} candidates"
  if la is not None:
    record["la_ig"] = la.record
  if f.compare_selection:
    record["comparison"] = la_ig_lib.compare(contrast, la.ranking, f.k)
    log(f"contrast vs LA-IG top {f.k}: overlap {record['comparison']['overlap']:.2f}, Jaccard "
        f"{record['comparison']['jaccard']:.2f}")
  return feats, record, ranking


def prepare(config, workdir: str, mesh) -> RecoveryContext:
  """Model, SAEs, the defended features (``features.json``), base and defended generation at every
  strength (``preflight.jsonl`` / ``preflight.md``); the context of the recovery units."""
  log = runner.log
  t0 = time.time()
  rows_in = task.load_prompts(config.task.prompts_file, config.task.n_prompts,  # a bad file fails before loading
                              max_rows=int(config.task.get("max_rows", 50_000)))
  params, mcfg, tok = setup_lib.load_model(config.model, seed=config.seed)
  sites = tuple(config.sites)
  for s in sites:
    try:
      sites_lib.parse_site(s, mcfg.n_layers)
    except ValueError as e:
      raise errors.UserError(f"config field 'sites': {e}") from e
  if config.features.list and not config.features.list.startswith("REQUIRED"):  # SAEs only where features are
    try:
      sites = tuple(feat_lib.parse_feature_list(config.features.list, sites))
    except ValueError as e:
      raise errors.UserError(f"config field 'features.list': {e}") from e
  saes = {s: setup_lib.load_sae(sae_path(config.sae, s), mcfg, s, model_name=config.model) for s in sites}
  pad_id = int(mcfg.pad_token_id if mcfg.pad_token_id is not None else 0)
  tmpl = config.model  # chat.load_template: the model file's own chat template (or its family's fallback)
  stop_ids = generate.stop_ids(config.generation.stop, chat.template_for(tmpl), tok.token_to_id, mcfg.eos_token_ids)
  log(f"model {config.model}, SAEs at {', '.join(sites)} ({config.sae}); template {chat.load_template(tmpl).source}, "
      f"stop ids {stop_ids}")

  feats, record, ranking = _features(config, params, mcfg, tok, saes, sites, pad_id, log)
  if runner.is_writer():
    outputs.atomic_write(os.path.join(workdir, "features.json"), json.dumps(record, indent=1))
  log(f"defended features: {sum(len(v) for v in feats.values())} over {len(feats)} sites")

  system = config.task.system or None
  prompts = [task.format_prompt(tmpl, r.text, system) for r in rows_in]
  g = config.generation
  mesh = mesh if jax.process_count() == 1 else None  # several processes: every batch on this process's device
  kw = dict(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh)
  base, base_len, base_ids = generate_answers(params, mcfg, tok, prompts, None, **kw)
  spec = defence_lib.DefenceSpec(config.defence.kind, config.defence.error_term)
  k_max = defence_k_max(config, feats, ranking)
  rows, counts = [], {}
  for value in config.defence.strengths:
    defence = defence_lib.make_defence(spec, saes, feats, float(value), k_max=k_max)
    dtexts, dlen, _ = generate_answers(params, mcfg, tok, prompts, defence, **kw)
    vrows = []
    for i, r in enumerate(rows_in):
      row = {"value": float(value), "prompt": i, "id": r.id, **preflight_row(base[i], dtexts[i]),
             "base_tokens": int(base_len[i]), "defended_tokens": int(dlen[i])}
      if config.save_text:
        row.update(base_text=base[i], defended_text=dtexts[i])
      vrows.append(row)
    counts[float(value)] = count_valid(vrows)
    c = counts[float(value)]
    log(f"preflight {config.defence.kind} {value:g}: valid {c['valid']}/{c['n']} (substring "
        f"{c['valid_' + judge.SUBSTRING]}, safety cue {c['valid_' + judge.SAFETY_CUE]}, negative/degenerate "
        f"{c['valid_' + judge.NEGATIVE]}); base refusals {c['base_refusal']}")
    rows += vrows
  md = (f"# Refusal steering preflight\n\nmodel {config.model}, SAEs {config.sae} at {', '.join(sites)}; defence "
        f"{config.defence.kind} (error term {config.defence.error_term}) on {sum(len(v) for v in feats.values())} "
        f"features ({record['source']}); {len(prompts)} prompts, greedy, {g.max_new_tokens} new tokens; "
        f"{time.time() - t0:.0f} s\n\nvalid = not R(base) and not S(base) and R_eff(defended), split by the R_eff "
        f"rule that fired.\n\n{_table(counts)}\n")
  if runner.is_writer():
    outputs.atomic_write(os.path.join(workdir, "preflight.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    outputs.atomic_write(os.path.join(workdir, "preflight.md"), md)
  print(md, flush=True)
  order = ordered_sites(sites, mcfg)
  ctx = RecoveryContext(config=config, params=params, mcfg=mcfg, tok=tok, sites=order, saes=saes, feats=feats,
                        value=0.0, prompts=prompts, base_texts=base, base_ids=base_ids,
                        valid=np.zeros(len(prompts), bool), stop_ids=stop_ids, pad_id=pad_id, discouraged=[],
                        ranking=ranking, k_max=k_max, mesh=mesh, ids=[r.id for r in rows_in],
                        preflight={"counts": counts, "features": feats, "rows": rows},
                        delta_sites=ordered_sites(config.recovery.get("delta_sites", ()), mcfg))
  if config.recovery.enabled:
    ctx.value = choose_strength(config, rows)
    ctx.valid = np.asarray([r["valid"] for r in rows if r["value"] == ctx.value], bool)
    ctx.discouraged = rec_lib.discouraged_ids(tok, config.recovery.discourage_safety_prefixes)
    ctx.shapes = run_shapes(config, tok, prompts, base_ids, ctx.discouraged, pad_id)
  return ctx


class Refusal(setting_lib.Setting):
  """Units are the recovery jobs (``jobs.recovery_jobs``): each the two-stage recovery of every valid
  case, generation with the delta and the detectors (or the soft-suffix baseline); rows are cases."""

  name, rows_file = "refusal", "recovery.jsonl"

  def validate(self, config) -> None:
    validate(config)

  def prepare(self, config, workdir: str, mesh) -> RecoveryContext:
    return prepare(config, workdir, mesh)

  def units(self, config, ctx: RecoveryContext) -> list[sweep.WorkUnit]:
    if not config.recovery.enabled:
      return []
    jobs = recovery_jobs(config)
    runner.log(f"recovery: {int(ctx.valid.sum())} strict-valid cases at "
               f"{strength_label(config.defence.kind, ctx.value)}; jobs {', '.join(_job_name(j) for j in jobs)}")
    return [sweep.WorkUnit(i, (j["run"], j["mode"], j.get("threat") or (j["budget"] if j.get("k") is None else j["k"])),
                           (j,)) for i, j in enumerate(jobs)]

  def compute_unit(self, config, ctx: RecoveryContext, mesh, unit: sweep.WorkUnit) -> dict:
    job = unit.points[0]
    return curve_lib.compute_curve(ctx, job) if job["run"] == "curve" else compute_job(ctx, job)

  def unit_rows(self, config, ctx: RecoveryContext, unit: sweep.WorkUnit, result: dict):
    return case_rows(ctx, unit.unit_id, unit.points[0], result, ctx.ids), []

  def finish(self, config, ctx: RecoveryContext, workdir: str, rows, curves, wall_s: float) -> dict[str, Any]:
    """run.json (wall time); the recovery tables are rendered from the stored units (``render``)."""
    if runner.is_writer():
      outputs.atomic_write(os.path.join(workdir, "run.json"), json.dumps({"wall_s": wall_s}))
    return dict(ctx.preflight)

  def render(self, workdir: str, plots: bool = True) -> str:
    return render(workdir, plots)


SETTING = Refusal()


def run(config, workdir: str) -> dict[str, Any]:
  """Features, defence, preflight and (``recovery.enabled``) every recovery unit of ``config`` into
  ``workdir``; returns the preflight counts, features and rows, and the recovery summary."""
  return runner.run(config, workdir, SETTING)
