"""Output-level unlearning recovery on the shared runner (paper-method sections 4, 7, 9.1).

Setup: load model + SAE -> forget questions in the configured format (``mc``: the paper's lettered
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

Beside the grid (``run``): the retain check (accuracy on held-out general questions under the
defence vs the base model), the budget / trajectory diagnostic (paper-method 4.5: budgets
``diagnostic.budgets`` as one compiled grid on the first ``diagnostic.n_flips`` valid flips, per-step
drift at the readout, plotted) and the soft-suffix baseline (``recovery.soft_suffix``, paper-method
9.1, ``faithful`` and ``corrected``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import errors, intervene, report, sweep
from recovery_jax.experiments import runner
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.experiments import summary as summary_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import api, engine, soft_suffix
from recovery_jax.recovery.objectives import Objective
from recovery_jax.tasks import unlearning as ul
from recovery_jax.tasks import unlearning_features as uf

VARIANTS = ("per_example",)
OBJECTIVES = ("choice_margin", "choice_ce")
EPS = 1e-8


def validate(config) -> None:
  """Config values that need no model; errors name the field."""
  ul.orders(config.task.format)
  if config.recovery.objective not in OBJECTIVES:
    raise errors.UserError(f"config field 'recovery.objective'={config.recovery.objective!r}: expected one of "
                           f"{OBJECTIVES}")
  if config.clamp.mode not in intervene.CLAMP_MODES:
    raise errors.UserError(f"config field 'clamp.mode'={config.clamp.mode!r}: expected one of {intervene.CLAMP_MODES}")
  if config.clamp.semantics not in engine.SEMANTICS:
    raise errors.UserError(f"config field 'clamp.semantics'={config.clamp.semantics!r}: expected one of "
                           f"{engine.SEMANTICS}")
  if not config.site.endswith("hook_resid_post") and not config.site.endswith("hook_resid_pre"):
    raise errors.UserError(f"config field 'site'={config.site!r}: expected a blocks.L.hook_resid_post (or _pre) site")
  for k in config.sweep.n_features:
    if int(k) < 1:
      raise errors.UserError(f"config field 'sweep.n_features' has {k}: expected >= 1")
  for b in config.diagnostic.budgets:
    if float(b) < 0:
      raise errors.UserError(f"config field 'diagnostic.budgets' has {b}: expected >= 0")
  for m in config.soft_suffix.variants:
    if m not in soft_suffix.VARIANTS:
      raise errors.UserError(f"config field 'soft_suffix.variants' has {m!r}: expected one of {soft_suffix.VARIANTS}")


# ----------------------------------------------------------------------------------------------
# forwards used outside the engine (preflight, post-hoc evaluator, retain check)


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


def batched(fn, n: int, batch_size: int, *arrays):
  """``fn`` over row chunks of ``arrays`` (padded to full chunks, so one compile), concatenated."""
  outs = []
  for s in range(0, n, batch_size):
    sl = slice(s, min(n, s + batch_size))
    pad = batch_size - (sl.stop - sl.start)
    part = [np.concatenate([a[sl], np.repeat(a[sl][-1:], pad, 0)]) if pad else a[sl] for a in arrays]
    o = fn(*part)
    outs.append(jax.tree.map(lambda x: np.asarray(x)[:batch_size - pad], o))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


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


# ----------------------------------------------------------------------------------------------
# setup


@dataclasses.dataclass
class Context:
  """What ``run`` needs beside the Setting: the model, the clamp builder, the flips and the batches."""

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
  questions = ul.load_questions(config.task.questions_file or ul.DEFAULT_QUESTIONS)
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
  batch = ul.build_batch(tok, questions, fmt, bos_id=bos, pad_id=pad)
  fw = Forwards(mcfg, config.site)
  bs = config.eval_batch_size
  cl_base = batched(lambda t, m, c: fw.base(params, t, m, c), len(batch), bs, batch.tokens,
                    batch.attention_mask, batch.choices)
  ok = ul.correct(cl_base, batch.gold)
  kept = ul.strict_filter(ok, batch.question, len(questions)) if config.task.strict else None
  n_orders = len(ul.orders(fmt))
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
      cl_def, _ = batched(lambda t, m, c: fw.defended(params, clamp, t, m, c), len(batch), bs, batch.tokens,
                          batch.attention_mask, batch.choices)
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
    rb = ul.build_batch(tok, retain, fmt, bos_id=bos, pad_id=pad)
  return Context(params, mcfg, tok, sae, scfg, make, fw, batch.take(idx), cl_base[idx], questions, rb,
                 {f"{k}|{v}": d for (k, v), d in pre.items()}, feats, info, bos)


def make_setting(config, ctx: Context) -> runner.Setting:
  b = ctx.batch
  end = b.tokens.shape[1] - 1
  targets = {"choices": b.choices, "gold": b.gold}
  problems = api.site_problems(b.tokens, b.attention_mask, end, end, targets, shared=False)
  objective = Objective(config.recovery.objective)

  def spec(mode: str, variant: str) -> engine.RecoverySpec:
    del variant
    return engine.RecoverySpec(model_cfg=ctx.mcfg, delta_sites=(config.site,), objective=objective,
                               config=runner.recovery_config(config, mode), suffix_len=1,
                               semantics=config.clamp.semantics)

  header = (f"model {config.model}, SAE {ctx.scfg.source or config.sae} at {config.site}, format "
            f"{config.task.format} ({len(ctx.questions)} questions, strict={config.task.strict}), {len(b)} candidate "
            f"flips, clamp {config.clamp.mode} (positive_only={config.clamp.positive_only}, all positions incl. BOS, "
            f"{config.clamp.semantics}), objective {config.recovery.objective}, {config.recovery.steps} steps, lr "
            f"{config.recovery.lr}; success = argmax over the 4 choice tokens (scores: l[gold] - max other)")
  examples = [{"question": ctx.questions[int(b.question[i])].qid, "perm_id": int(b.perm_id[i]),
               "gold": int(b.gold[i])} for i in range(len(b))]
  return runner.Setting(
      title="Unlearning post-intervention recovery", header=header, params=ctx.params,
      problems=lambda v: problems, spec=spec,
      clamps=lambda points: (intervene.stack_clamps([ctx.make(p) for p in points]),),
      valid=lambda rb, rd: (rb > 0) & (rd <= 0), recovered=lambda rr: rr > 0, examples=examples,
      objective_name="l[gold]-max other")


# ----------------------------------------------------------------------------------------------
# the grid with the post-hoc evaluator


def compute_unit(setting: runner.Setting, ctx: Context, config, mesh, u: sweep.WorkUnit) -> dict:
  """The runner's unit, then the post-hoc replay of every delta: the runner's rows become the
  argmax margins (base, defended, recovered) and the post-hoc quantities join the result."""
  res = runner.compute_unit(setting, config, mesh, u)
  b = ctx.batch
  clamps = setting.clamps(u.points)[0]
  g = len(u.points)
  deltas = np.asarray(res["delta"])[:, :, 0, 0]  # [G, N, P=1, d] of the one site
  deltas = deltas.reshape(g, len(b), -1)
  zero = np.zeros_like(deltas)
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


# ----------------------------------------------------------------------------------------------
# retain check, budget diagnostic, soft suffix


def retain_check(config, ctx: Context) -> list[dict]:
  """Accuracy on the retain questions (and the forget candidates' questions) under each defence vs base."""
  rb = ctx.retain_batch
  bs = config.eval_batch_size
  base = ul.correct(batched(lambda t, m, c: ctx.fw.base(ctx.params, t, m, c), len(rb), bs, rb.tokens,
                            rb.attention_mask, rb.choices), rb.gold)
  out = []
  for key, pre in ctx.preflight.items():
    k, v = key.split("|")
    clamp = ctx.make({"n_features": int(k), "clamp_value": float(v)})
    cl, _ = batched(lambda t, m, c: ctx.fw.defended(ctx.params, clamp, t, m, c), len(rb), bs, rb.tokens,
                    rb.attention_mask, rb.choices)
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
                               config=runner.recovery_config(config, mode), suffix_len=1,
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
    report.plot_curves(os.path.join(workdir, "budget_trajectory_drift.png"), curves,
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


# ----------------------------------------------------------------------------------------------
# run


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the unlearning experiment of ``config`` into ``workdir``; returns the summary and rows."""
  t_start = time.time()
  validate(config)
  runner.validate(config, VARIANTS)
  os.makedirs(workdir, exist_ok=True)
  runner.snapshot_config(config, workdir)
  ctx = prepare(config)
  setting = make_setting(config, ctx)

  rows, curves = runner.grid_rows(config, workdir, setting,
                                  compute=lambda s, c, mesh, u: compute_unit(s, ctx, c, mesh, u),
                                  extra_fields=lambda res, j: extra_fields(res, j, ctx.batch))

  extras = {"preflight": ctx.preflight, "features": ctx.features.tolist(), "feature_info": ctx.feature_info,
            "posthoc": posthoc_summary(rows)}
  if ctx.retain_batch is not None:
    extras["retain_check"] = retain_check(config, ctx)
  if config.diagnostic.enabled:
    runner.log("budget / trajectory diagnostic")
    extras["budget_diagnostic"] = budget_diagnostic(config, ctx, workdir)
  if config.soft_suffix.enabled:
    runner.log("soft-suffix baseline")
    ss = soft_suffix_rows(config, ctx)
    report.write_jsonl(os.path.join(workdir, "soft_suffix.jsonl"), ss)
    extras["soft_suffix"] = soft_suffix.summarize(ss)
  if not runner.is_writer():
    return {"summary": summary_lib.summarize(rows), "rows": rows, **extras}
  report.write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
  report.atomic_write(os.path.join(workdir, "curves.json"), json.dumps(curves))
  report.atomic_write(os.path.join(workdir, "unlearning.json"), json.dumps(extras, indent=1))
  report.atomic_write(os.path.join(workdir, "run.json"), json.dumps(
      {"title": setting.title, "header": setting.header, "objective_name": setting.objective_name,
       "attribution_top_k": int(config.recovery.get("attribution_top_k", 0)), "wall_s": time.time() - t_start}))
  text, summary = summary_lib.render(workdir, plots=config.plots)
  text += render_extras(extras)
  report.atomic_write(os.path.join(workdir, "summary.md"), text)
  print(text, flush=True)
  return {"summary": summary, "rows": rows, **extras}


def render_extras(ex: dict) -> str:
  """The unlearning sections of summary.md: post-hoc evaluator, retain check, budget diagnostic, soft suffix."""
  fmt = lambda x: "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
  out = ["\n## Post-hoc evaluator (valid flips; readout position)\n",
         "Absolute L2 over the clamped features; relative values only where ||z0|| > 0 (n_ref_zero counts "
         "flips with ||z0|| = 0, where they are undefined).\n",
         report.format_table(["mode", "K", "clamp", "budget", "valid", "recovered", "rec. with violation<=1e-3",
                              "drift mean", "drift median", "drift max", "drift>0", "frac viol>1e-3", "ref zero"],
                             [[s["mode"], s["n_features"], s["clamp_value"], s["budget"], s["n_valid"],
                               s["n_recovered"], s["zero_violation_recovered"], fmt(s["drift_abs_mean"]),
                               fmt(s["drift_abs_median"]), fmt(s["drift_abs_max"]), s["n_drift_nonzero"],
                               fmt(s["frac_violation_gt_1e-3"]), s["n_ref_zero"]] for s in ex["posthoc"]])]
  if "retain_check" in ex:
    out += ["\n## Retain check (held-out general questions)\n",
            report.format_table(["K", "clamp", "retain n", "base acc", "defended acc", "ratio", "forget defended acc"],
                                [[r["n_features"], r["clamp_value"], r["retain_n"], fmt(r["retain_base_acc"]),
                                  fmt(r["retain_defended_acc"]), fmt(r["retain_ratio"]),
                                  fmt(r["forget_defended_acc"])] for r in ex["retain_check"]])]
  bd = ex.get("budget_diagnostic")
  if bd:
    rows = [[m, e["budget"], f"{e['recovered']}/{e['n']}", fmt(e["drift_abs_mean"]), fmt(e["delta_norm_mean"])]
            for m, es in bd["modes"].items() for e in es]
    out += [f"\n## Budget / trajectory diagnostic ({len(bd['flips'])} flips)\n",
            report.format_table(["mode", "budget", "recovered", "post-hoc drift mean", "||delta|| mean"], rows)]
  if ex.get("soft_suffix"):
    out += ["\n## Soft-suffix baseline (OABD-style, readout at the last suffix position)\n",
            soft_suffix.render(ex["soft_suffix"])]
  return "\n".join(out) + "\n"
