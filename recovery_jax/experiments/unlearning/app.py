"""Output-level unlearning recovery on the shared runner (paper-method sections 4, 7, 9.1).

Prepare: load model + SAE -> forget questions in the configured format (``mc``: the paper's lettered
prompt in 24 orders; ``cloze`` / ``cloze_listed``: ``tasks.unlearning``) -> base choice logits and the
strict filter (base correct in every order) -> features by the SAEBench rule on offline forget /
retain corpora (``tasks.unlearning_features``; or ``features.feature_ids``) -> preflight: defended
choice logits per (n_features, clamp_value) and the valid flips (base correct, defended wrong).

Defence: set to ``clamp_value`` (-m) on positive activations at an early ``hook_resid_post``, all
positions including BOS, error kept, frozen semantics (paper-method 1.3A). Recovery: one delta row
at the last position per flip (``per_example``), objective ``choice_margin`` (``choice_ce`` as an
option), 150 steps, lr 0.08, budget 20, projection modes from ``recovery.modes``.

After every work unit the post-hoc evaluator (paper-method 4.4) replays each delta in an independent
defended forward: choice logits (success = argmax over the four choice tokens, so the rows the
runner sees are ``l[gold] - max(other choices)``, > 0 exactly when gold is the argmax), and the
clamped features at the readout, z0 = E_S(h_def) and zrec = E_S(h_def + delta): absolute drift
||zrec - z0||, violation ||ReLU(zrec - z0)|| (reactivation), relative drift only where ||z0|| > 0.

Beside the grid (``Unlearning.finish``, into ``unlearning.json``): the retain check (accuracy on held-out general questions under the
defence vs the base model), the budget / trajectory diagnostic (paper-method 4.5: budgets
``diagnostic.budgets`` as one compiled grid on the first ``diagnostic.n_flips`` valid flips, per-step
drift at the readout, plotted) and the soft-suffix baseline (``recovery.soft_suffix``, paper-method
9.1, ``faithful`` and ``corrected``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from recovery_jax import config_utils as cu
from recovery_jax import errors, intervene, outputs, profile, sweep
from recovery_jax.experiments import grid, runner
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.experiments import summary as summary_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import api, engine, soft_suffix
from recovery_jax.recovery.objectives import Objective
from recovery_jax.tasks import unlearning as ul
from recovery_jax.tasks import unlearning_features as uf
from recovery_jax.experiments.unlearning.extras import (budget_diagnostic, over_rows, posthoc_metrics, posthoc_summary,
                                                         render_extras, retain_check, soft_suffix_rows)


VARIANTS = ("per_example",)


OBJECTIVES = ("choice_margin", "choice_ce")


def validate(config) -> None:
  """Config values that need no model; errors name the field."""
  ul.orders(config.task.format, config.task.get("orders", "all"))  # task.format and task.orders
  cu.check_one_of(config, "recovery.objective", OBJECTIVES)
  cu.check_one_of(config, "clamp.mode", intervene.CLAMP_MODES)
  cu.check_one_of(config, "clamp.semantics", engine.SEMANTICS)
  if not config.site.endswith("hook_resid_post") and not config.site.endswith("hook_resid_pre"):
    raise errors.UserError(f"config field 'site'={config.site!r}: expected a blocks.L.hook_resid_post (or _pre) site")
  cu.check_at_least(config, "sweep.n_features", 1, each=True)
  cu.check_at_least(config, "diagnostic.budgets", 0, each=True)
  cu.check_each_one_of(config, "soft_suffix.variants", soft_suffix.VARIANTS)


@dataclasses.dataclass
class Forwards:
  """Jitted forwards of one model / clamp layout. Every function takes params (never folded in)."""

  mcfg: Any
  site: str

  def __post_init__(self):
    mcfg, site = self.mcfg, self.site

    def choice_logits(params, tokens, mask, choices, clamp=None, delta=None):
      """[B, T] -> choice logits at the last column [B, 4] and, with a clamp, its features there
      after the clamp (and delta) [B, K]."""
      fwd = transformer.forward if clamp is None else intervene.clamp(transformer.forward, clamp)
      edits = {}
      if delta is not None:
        edits[site] = lambda x, positions: x.at[:, -1].add(delta.astype(x.dtype))
      out = fwd(params, mcfg, tokens, attention_mask=mask, edits=edits, capture=(site,) if clamp is not None else (),
                stop_layer=None, compute_logits=False)
      cl = transformer.final_logits_at(params, mcfg, out.resid[:, -1:], choices)[:, 0]
      z = clamp.features(out.captures[site][:, -1]) * clamp.mask if clamp is not None else None
      return cl, z

    self.base = jax.jit(lambda p, t, m, c: choice_logits(p, t, m, c)[0])
    self.defended = jax.jit(lambda p, cl, t, m, c: choice_logits(p, t, m, c, clamp=cl))
    self._with_delta = jax.jit(lambda p, cl, t, m, c, d: choice_logits(p, t, m, c, clamp=cl, delta=d))

  def replay(self, params, clamps, tokens, mask, choices, deltas):
    """The post-hoc replay of deltas [G, N, d] under stacked clamps [G]: (choice logits [G, N, 4],
    features at the readout [G, N, K])."""
    axes = intervene.clamp_axes((clamps,))[0]
    fn = jax.vmap(lambda c, d: self._with_delta(params, c, tokens, mask, choices, d), in_axes=(axes, 0))
    return fn(clamps, deltas)


@dataclasses.dataclass
class Context:
  """What the unlearning setting needs beside the grid (``Grid.data``): the model, the clamp builder, the flips and the batches."""

  params: Any
  mcfg: Any
  tok: Any
  sae: Any
  scfg: Any
  make: Any  # point dict -> Clamp
  fw: Forwards
  batch: ul.ChoiceBatch  # candidate flips (recovered in the grid)
  cl_base: np.ndarray  # [N, 4]
  questions: list
  retain_batch: ul.ChoiceBatch | None
  preflight: dict
  features: np.ndarray
  feature_info: dict
  bos: int | None


def _bos(config, mcfg) -> int | None:
  b = config.task.bos
  if b == "auto":
    return mcfg.bos_token_id if mcfg.is_gemma else None
  if b == "always":
    if mcfg.bos_token_id is None:
      raise errors.UserError("config field 'task.bos'='always' but the model has no bos_token_id")
    return mcfg.bos_token_id
  if b == "never":
    return None
  raise errors.UserError(f"config field 'task.bos'={b!r}: expected auto, always or never")


def _select_features(config, params, mcfg, tok, sae, scfg, questions, retain, bos, k_max) -> tuple[np.ndarray, dict]:
  f = config.features
  if f.feature_ids:
    ids = np.asarray([int(i) for i in f.feature_ids], np.int32)
    if (ids < 0).any() or (ids >= scfg.d_sae).any() or len(set(ids.tolist())) != len(ids):
      raise errors.UserError(f"config field 'features.feature_ids': expected distinct ids in [0, {scfg.d_sae})")
    return ids, {"rule": "given", "n": len(ids)}
  kw = dict(questions=questions, retain=retain, corpus_dir=f.corpus_dir, max_docs=f.max_docs)
  forget_txt = uf.corpus_texts(f.forget_sources, field="features.forget_sources", **kw)
  retain_txt = uf.corpus_texts(f.retain_sources, field="features.retain_sources", **kw)
  pad = mcfg.pad_token_id or 0
  freq = {}
  for name, texts in (("forget", forget_txt), ("retain", retain_txt)):
    toks, attn, cnt = uf.tokenize(tok, texts, f.seq_len, bos_id=bos, pad_id=pad)
    freq[name] = uf.firing_frequency(params, mcfg, sae, scfg, config.site, toks, attn, cnt, f.batch_size)
  ids = uf.top_features(freq["forget"], freq["retain"], f.retain_threshold, k_max)
  info = {"rule": "saebench", "forget_docs": len(forget_txt), "retain_docs": len(retain_txt),
          "retain_threshold": f.retain_threshold, "n_candidates": int(((freq["retain"] < f.retain_threshold)
                                                                     & (freq["forget"] > 0)).sum()),
          "forget_freq": freq["forget"][ids].round(5).tolist(), "retain_freq": freq["retain"][ids].round(5).tolist()}
  runner.log(f"features (SAEBench rule): {len(forget_txt)} forget / {len(retain_txt)} retain texts; "
             f"{info['n_candidates']} features pass retain < {f.retain_threshold}; kept {len(ids)}")
  if len(ids) < k_max:
    raise errors.UserError(f"config field 'sweep.n_features': only {len(ids)} features fire on the forget corpus "
                           f"with retain frequency < {f.retain_threshold}; need {k_max} (lower n_features or raise "
                           "'features.retain_threshold')")
  return ids, info


def prepare(config) -> Context:
  """Loads everything, picks features, runs the preflight; the flips the grid recovers."""
  log = runner.log
  questions = ul.load_questions(config.task.questions_file or ul.DEFAULT_QUESTIONS,
                                max_rows=int(config.task.get("max_rows", 50_000)))
  if config.task.max_questions:
    questions = questions[:config.task.max_questions]
  retain = ul.load_questions(config.task.retain_file or ul.DEFAULT_RETAIN) if config.retain_check else []
  log(f"loading model {config.model!r} and SAE {config.sae!r} at {config.site}")
  params, mcfg, tok = setup_lib.load_model(config.model, config.model_processing, seed=config.seed)
  if config.sae == "random":
    from recovery_jax.sae import testing as sae_testing  # pylint: disable=import-outside-toplevel
    sae, scfg = sae_testing.random_sae(mcfg.d_model, 256, architecture="jumprelu", seed=config.seed + 1,
                                       site=config.site, model_name=mcfg.name, enc_noise=0.0, b_enc=0.0,
                                       threshold=0.05)
  else:
    sae, scfg = setup_lib.load_sae(config.sae, mcfg, config.site, override=config.sae_override_checks,
                                   model_name=config.model)
  k_max = max(int(k) for k in config.sweep.n_features)
  if k_max > scfg.d_sae:
    raise errors.UserError(f"config field 'sweep.n_features': K={k_max} is larger than the SAE's d_sae={scfg.d_sae}")
  bos, pad = _bos(config, mcfg), mcfg.pad_token_id or 0
  fmt = config.task.format
  perm_ids = ul.orders(fmt, config.task.get("orders", "all"))
  batch = ul.build_batch(tok, questions, fmt, bos_id=bos, pad_id=pad, perm_ids=perm_ids)
  api.check_prompts(batch.tokens, batch.attention_mask, model_cfg=mcfg)  # ids and lengths vs the model
  fw = Forwards(mcfg, config.site)
  bs = config.eval_batch_size
  cl_base = over_rows(lambda t, m, c: fw.base(params, t, m, c), batch, bs)
  ok = ul.correct(cl_base, batch.gold)
  kept = ul.strict_filter(ok, batch.question, len(questions)) if config.task.strict else None
  n_orders = len(perm_ids)
  log(f"{len(questions)} questions x {n_orders} order(s) ({fmt}): base accuracy {ok.mean():.3f}; "
      + (f"strict filter (correct in all {n_orders}) keeps {int(kept.sum())}" if kept is not None
         else "strict filter off"))

  feats, info = _select_features(config, params, mcfg, tok, sae, scfg, questions, retain, bos, k_max)
  clamp_spec = intervene.ClampSpec(site=config.site, sae_cfg=scfg, mode=config.clamp.mode,
                                   positive_only=config.clamp.positive_only, error_term=config.clamp.error_term)
  make = lambda p: intervene.make_clamp(clamp_spec, sae, feats[:int(p["n_features"])], float(p["clamp_value"]),
                                        k_max=k_max)
  pre, union = {}, np.zeros(len(batch), bool)
  for k in sorted({int(k) for k in config.sweep.n_features}):
    for v in sorted({float(v) for v in config.sweep.clamp_value}):
      clamp = make({"n_features": k, "clamp_value": v})
      cl_def, _ = over_rows(lambda t, m, c: fw.defended(params, clamp, t, m, c), batch, bs)
      dok = ul.correct(cl_def, batch.gold)
      valid = ul.valid_flips(ok, dok, batch.question, kept)
      union |= valid
      per_q = np.bincount(batch.question[valid], minlength=len(questions))
      pre[(k, v)] = {"valid": int(valid.sum()), "defended_accuracy": float(dok.mean()),
                     "questions_with_flips": int((per_q > 0).sum())}
      log(f"preflight K={k} clamp={v}: defended accuracy {dok.mean():.3f}; valid flips {int(valid.sum())} "
          f"over {pre[(k, v)]['questions_with_flips']} questions")
  if not union.any():
    raise errors.UserError("no valid flips: the defence does not flip any strictly-correct (question, order) for any "
                           f"(n_features, clamp_value) of the grid {sorted(pre)}; try more features, another clamp "
                           "value, another site or task.strict=False")
  idx = np.flatnonzero(union)
  if config.task.max_flips and len(idx) > config.task.max_flips:
    idx = idx[:config.task.max_flips]
  rb = None
  if retain:
    rb = ul.build_batch(tok, retain, fmt, bos_id=bos, pad_id=pad, perm_ids=perm_ids)
  return Context(params, mcfg, tok, sae, scfg, make, fw, batch.take(idx), cl_base[idx], questions, rb,
                 {f"{k}|{v}": d for (k, v), d in pre.items()}, feats, info, bos)


def make_grid(config, ctx: Context) -> grid.Grid:
  b = ctx.batch
  end = b.tokens.shape[1] - 1
  targets = {"choices": b.choices, "gold": b.gold}
  problems = api.site_problems(b.tokens, b.attention_mask, end, end, targets, shared=False)
  objective = Objective(config.recovery.objective)
  dsites = grid.delta_sites(config, ctx.mcfg)

  def spec(mode: str, variant: str) -> engine.RecoverySpec:
    del variant
    return engine.RecoverySpec(model_cfg=ctx.mcfg, delta_sites=dsites, objective=objective,
                               config=grid.recovery_config(config, mode), suffix_len=1,
                               semantics=config.clamp.semantics)

  header = (f"model {config.model}, SAE {ctx.scfg.source or config.sae} at {config.site}"
            + ("" if dsites == (config.site,) else f", delta at {', '.join(dsites)}") + ", format "
            f"{config.task.format} ({len(ctx.questions)} questions, strict={config.task.strict}), {len(b)} candidate "
            f"flips, clamp {config.clamp.mode} (positive_only={config.clamp.positive_only}, all positions incl. BOS, "
            f"{config.clamp.semantics}), objective {config.recovery.objective}, {config.recovery.steps} steps, lr "
            f"{config.recovery.lr}; success = argmax over the 4 choice tokens (scores: l[gold] - max other)")
  examples = [{"question": ctx.questions[int(b.question[i])].qid, "perm_id": int(b.perm_id[i]),
               "order": ul.order_name(int(b.perm_id[i])), "gold": int(b.gold[i])} for i in range(len(b))]
  return grid.Grid(
      title="Unlearning post-intervention recovery", header=header, params=ctx.params,
      problems=lambda v: problems, spec=spec,
      clamps=lambda points: (intervene.stack_clamps([ctx.make(p) for p in points]),),
      valid=lambda rb, rd: (rb > 0) & (rd <= 0), recovered=lambda rr: rr > 0, examples=examples,
      objective_name="l[gold]-max other", data=ctx, bisect=False)  # success is the replay's argmax, not the engine rows


def compute_unit(setting: grid.Grid, ctx: Context, config, mesh, u: sweep.WorkUnit) -> dict:
  """The grid's unit, then the post-hoc replay of every delta: the engine's rows become the
  argmax margins (base, defended, recovered) and the post-hoc quantities join the result."""
  res = grid.compute_unit(setting, config, mesh, u)
  b = ctx.batch
  clamps = setting.clamps(u.points)[0]
  g = len(u.points)
  deltas = np.asarray(res["delta"])[:, :, 0, 0]  # [G, N, P=1, d] of the one site
  deltas = deltas.reshape(g, len(b), -1)
  zero = np.zeros_like(deltas)
  with profile.phase("evaluation"):  # the post-hoc replay
    cl_def, z0 = ctx.fw.replay(ctx.params, clamps, b.tokens, b.attention_mask, b.choices, zero)
    cl_rec, zrec = ctx.fw.replay(ctx.params, clamps, b.tokens, b.attention_mask, b.choices, deltas)
  cl_base = np.broadcast_to(ctx.cl_base, cl_def.shape)
  am = lambda cl: ul.argmax_margin(np.asarray(cl), b.gold)[..., None].astype(np.float32)  # [G, N, 1]
  res["objective_rows"] = np.asarray(res["rows"])
  res["objective_rows_defended"] = np.asarray(res["rows_defended"])
  res["rows_base"], res["rows_defended"], res["rows"] = am(cl_base), am(cl_def), am(cl_rec)
  res.update(cl_base=np.asarray(cl_base), cl_def=np.asarray(cl_def), cl_rec=np.asarray(cl_rec), z0=np.asarray(z0),
             zrec=np.asarray(zrec))
  return res


def extra_fields(res: dict, j: int, b: ul.ChoiceBatch) -> list[dict]:
  """Per-example post-hoc fields of point j."""
  ph = posthoc_metrics(res["z0"][j], res["zrec"][j])
  out = []
  for e in range(len(b)):
    out.append({
        "pred_base": int(np.argmax(res["cl_base"][j][e])), "pred_defended": int(np.argmax(res["cl_def"][j][e])),
        "pred_recovered": int(np.argmax(res["cl_rec"][j][e])),
        "objective_recovered": float(res["objective_rows"][j][e, 0]),
        "objective_defended": float(res["objective_rows_defended"][j][e, 0]),
        "margin_recovered": float(ul.margin(res["cl_rec"][j][e], b.gold[e])),
        "posthoc_drift_abs": float(ph["drift_abs"][e]), "posthoc_violation_abs": float(ph["violation_abs"][e]),
        "posthoc_ref_norm": float(ph["ref_norm"][e]),
        "posthoc_drift_rel": None if np.isnan(ph["drift_rel"][e]) else float(ph["drift_rel"][e]),
        "posthoc_violation_rel": None if np.isnan(ph["violation_rel"][e]) else float(ph["violation_rel"][e])})
  return out


class Unlearning(grid.GridSetting):
  """The grid with the post-hoc replay in every unit; the retain check, budget diagnostic and soft
  suffix after it (``unlearning.json``)."""

  name, variants = "unlearning", VARIANTS

  def check(self, config) -> None:
    validate(config)

  def prepare(self, config, workdir: str, mesh) -> grid.Grid:
    del workdir, mesh
    return make_grid(config, prepare(config))

  def compute_unit(self, config, ctx: grid.Grid, mesh, unit: sweep.WorkUnit) -> dict:
    return compute_unit(ctx, ctx.data, config, mesh, unit)

  def example_fields(self, ctx: grid.Grid, result: dict, j: int) -> list[dict]:
    return extra_fields(result, j, ctx.data.batch)

  def finish(self, config, ctx: grid.Grid, workdir: str, rows, curves, wall_s: float) -> dict[str, Any]:
    uctx = ctx.data
    extras = {"preflight": uctx.preflight, "features": uctx.features.tolist(), "feature_info": uctx.feature_info,
              "posthoc": posthoc_summary(rows)}
    if uctx.retain_batch is not None:
      extras["retain_check"] = retain_check(config, uctx)
    if config.diagnostic.enabled:
      runner.log("budget / trajectory diagnostic")
      extras["budget_diagnostic"] = budget_diagnostic(config, uctx, workdir)
    if config.soft_suffix.enabled:
      runner.log("soft-suffix baseline")
      ss = soft_suffix_rows(config, uctx)
      if runner.is_writer():
        outputs.write_jsonl(os.path.join(workdir, "soft_suffix.jsonl"), ss)
      extras["soft_suffix"] = soft_suffix.summarize(ss)
    if runner.is_writer():
      outputs.atomic_write(os.path.join(workdir, "unlearning.json"), json.dumps(extras, indent=1))
    return {**super().finish(config, ctx, workdir, rows, curves, wall_s), **extras}

  def render(self, workdir: str, plots: bool = True) -> str:
    """The grid's sections from the rows, then the unlearning sections (post-hoc, retain check, budget
    diagnostic, soft suffix) from ``unlearning.json`` (no model)."""
    path = os.path.join(workdir, "unlearning.json")
    if not os.path.exists(path):
      raise errors.UserError(f"{workdir}: not a finished unlearning run (missing {path})")
    text, _ = summary_lib.render(workdir, plots=plots)
    with open(path) as f:
      text += render_extras(json.load(f))
    outputs.atomic_write(os.path.join(workdir, "summary.md"), text)
    return text


SETTING = Unlearning()


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the unlearning experiment of ``config`` into ``workdir``; returns the rows, summary and extras."""
  return runner.run(config, workdir, SETTING)


def render(workdir: str, plots: bool = True) -> str:
  return SETTING.render(workdir, plots)
