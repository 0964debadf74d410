"""Refusal recovery work units (paper-method 6.4, 9.4): the context they share, the list of jobs, and
one job computed: the v4 two-stage recovery, generation with the recovered delta, the detectors,
the attribution replay; the soft-suffix baseline job.

Size: the context, the job list and a job's computation share the context's fields; split further, each
piece would import the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import errors, intervene, metrics
from recovery_jax.models import sites as sites_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import attribution, engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.tasks import refusal as task
from recovery_jax.tasks import refusal_defence as defence_lib
from recovery_jax.tasks import refusal_judge as judge
from recovery_jax.tasks import refusal_recovery as rec_lib
from recovery_jax.recovery import soft_suffix as soft_lib
from recovery_jax.experiments.refusal.preflight import generate_answers, generate_rows, preflight_row


VARIANTS = ("faithful", "honest")
ATTR_COMPONENTS = ("full", "residual", "nonclamped", "topk", "clamped", "knockout")
LABELS = ("nonrefusal", "nonrefusal_eff", "cooperative", "safety_cue", "base_like", "strict", "chars", "tokens", "opening")


@dataclasses.dataclass
class RecoveryContext:
  """What the recovery stage needs from setup and preflight (host values; texts stay in memory)."""

  config: Any
  params: Any
  mcfg: Any
  tok: Any
  sites: tuple
  saes: dict
  feats: dict
  value: float  # the chosen defence strength
  prompts: list  # chat-formatted prompts, one per instruction
  base_texts: list
  base_ids: list  # base answer ids per prompt (before the stop id)
  valid: np.ndarray  # [n_prompts] bool: strict-valid at ``value`` (defence as configured)
  stop_ids: tuple
  pad_id: int
  discouraged: list
  ranking: Any = None  # refusal_features.Ranking (the K sweep's feature sets); None for a user list
  k_max: int = 0  # every defence of the run padded to this many features per site (0: the main set's)
  shapes: Any = None  # refusal_recovery.StageShapes shared by every recovery call (None: per call)
  mesh: Any = None  # batches of generation and recovery sharded over its ``data`` axis (None: one device)
  ids: Sequence[str] = ()  # the prompts' ids (prompt file rows)
  preflight: Any = None  # {"counts", "features", "rows"} of the preflight
  delta_sites: tuple = ()  # the main threat model's delta sites in forward order (): the circuit sites

  def delta_sites_for(self, job: dict) -> tuple:
    """A job's delta sites: its threat model's, else the run's (``recovery.delta_sites``), else the
    circuit sites (the delta right after each clamp)."""
    if job.get("threat"):
      return threat_sites(self.config, self.mcfg)[job["threat"]]
    return self.delta_sites or self.sites

  def features_for(self, job: dict) -> dict:
    """site -> feature ids of a job's defence: the main set, or the global top ``job['k']``."""
    return self.feats if job.get("k") is None else self.ranking.features(int(job["k"]))

  def defence_for(self, job: dict) -> tuple:
    spec = defence_lib.DefenceSpec(self.config.defence.kind, job["error_term"])
    feats = self.features_for(job)
    return defence_lib.make_defence(spec, self.saes, feats, self.value,
                                    k_max=self.k_max or max(len(v) for v in feats.values()))


def ordered_sites(sites: Sequence[str], mcfg=None) -> tuple:
  """Sites in forward (visit) order."""
  n = None if mcfg is None else mcfg.n_layers
  return tuple(sorted(sites, key=lambda s: sites_lib.visit_key(s, n)))


def threat_sites(config, mcfg=None) -> dict[str, tuple]:
  """``recovery.threats`` entries ``name:site,site,...`` -> name -> delta sites in forward order (the
  threat models a curve run compares; errors name the entry)."""
  out = {}
  for item in config.recovery.get("threats", ()):
    name, sep, rest = str(item).partition(":")
    sites = tuple(s.strip() for s in rest.split(",") if s.strip())
    if not sep or not name.strip() or not sites:
      raise errors.UserError(f"config field 'recovery.threats' has {item!r}: expected 'name:site,site,...' (e.g. "
                             "'before:blocks.11.hook_resid_post')")
    if name.strip() in out:
      raise errors.UserError(f"config field 'recovery.threats' names {name.strip()!r} twice")
    out[name.strip()] = ordered_sites(sites, mcfg)
  return out


def defence_k_max(config, feats: dict, ranking) -> int:
  """Features per site every defence of the run is padded to: the most at one site over the main set
  and the K sweep's sets, so all of them share one compiled program."""
  sets = [feats] + [ranking.features(int(k)) for k in (config.recovery.get("ks", ()) if ranking is not None else ())]
  return max(len(v) for fs in sets for v in fs.values())


def run_shapes(config, tok, prompts: Sequence[str], base_ids: Sequence[Sequence[int]], discouraged,
               pad_id: int) -> rec_lib.StageShapes | None:
  """The recovery shapes of every prompt with a base answer (any job's cases are a subset): chunk =
  ``recovery.batch_size``, else ``max_cases``, else all of them."""
  idx = [i for i, a in enumerate(base_ids) if len(a)]
  if not idx:
    return None
  r = config.recovery
  batch = int(r.batch_size) or min(int(r.max_cases) or len(idx), len(idx))
  return rec_lib.stage_shapes([tok.encode(prompts[i], add_special_tokens=False).ids for i in idx],
                              [base_ids[i] for i in idx], discouraged, v4_config(config, "none"), batch, pad_id)


def v4_config(config, mode: str, budget: float | None = None, budget_scale: str | None = None
              ) -> rec_lib.TwoStageConfig:
  """The two-stage recovery of ``config.recovery`` for one projection mode: ``stage1`` / ``stage2`` give
  each stage's steps, lr and budget, the knobs both share are set once; ``budget`` sets both stages.
  The ``encoder`` mode also projects the delta itself after each step (v4's encoder mode,
  ``recovery.encoder_project_params``; paper-method Q6)."""
  r = config.recovery
  shared = dict(jacobian_probes=int(r.jacobian_probes), correction_steps=int(r.correction_steps),
                checkpoint_every=int(r.checkpoint_every),
                budget_scale=budget_scale or str(r.get("budget_scale", "absolute")))
  if mode.startswith("encoder"):
    shared["project_params"] = bool(r.get("encoder_project_params", True))
  stage = lambda s: rec_lib.v4_stage(mode, int(s.steps), float(s.lr), float(s.budget if budget is None else budget),
                                     **shared)
  return rec_lib.TwoStageConfig(stage1=stage(r.stage1), stage2=stage(r.stage2), n_ans=int(r.n_ans))


def recovery_jobs(config) -> list[dict]:
  """The recovery work units: every mode (main), the error-term-dropped defence (``drop_modes``),
  the budget sweep (``budget_mode`` at each of ``budgets``, both stages; a budget equal to the main
  run's is read from the main run), the soft suffix and the K sweep (``budget_mode`` with the global
  top K features, each its own preflight; K = ``features.k`` is read from the main run)."""
  r = config.recovery
  keep = config.defence.error_term
  jobs = [dict(run="main", mode=m, error_term=keep, budget=None, attribution=m in tuple(r.attribution_modes))
          for m in r.modes]
  if keep == "keep":
    jobs += [dict(run="error term dropped", mode=m, error_term="drop", budget=None, attribution=False)
             for m in r.drop_modes]
  same = lambda b: float(b) == float(r.stage1.budget) == float(r.stage2.budget) and r.budget_mode in tuple(r.modes)
  jobs += [dict(run="budget", mode=r.budget_mode, error_term=keep, budget=float(b), attribution=False)
           for b in r.budgets if not same(b)]
  ss = config.get("soft_suffix")
  if ss is not None and ss.enabled:
    jobs += [dict(run="soft suffix", mode=v, error_term=keep, budget=None, attribution=False) for v in ss.variants]
  main_k = lambda k: int(k) == int(config.features.k) and r.budget_mode in tuple(r.modes)
  jobs += [dict(run="K", mode=r.budget_mode, error_term=keep, budget=None, attribution=False, k=int(k))
           for k in r.get("ks", ()) if not main_k(k)]
  cv = r.get("curve")
  if cv is not None and cv.rhos:  # last: unit ids of earlier workdirs stay valid
    jobs += [dict(run="curve", mode=m, error_term=keep, budget=None, attribution=False, threat=t)
             for t in cv.threats for m in cv.modes]
  return jobs


def _prefixes(config, job: dict) -> tuple:
  """Label-key prefixes of a job's rows: the generation variants, or ``soft`` for the soft suffix."""
  return ("soft",) if job["run"] == "soft suffix" else tuple(config.recovery.variants)


def compute_soft(ctx: RecoveryContext, job: dict) -> dict[str, np.ndarray]:
  """The OABD-style soft-suffix baseline (``recovery.soft_suffix.run_refusal``) on the valid cases, variant
  ``job['mode']``: labels of its generations (prefix ``soft``), drift, suffix norms."""
  config, sc = ctx.config, ctx.config.soft_suffix
  defence = ctx.defence_for(job)
  idx = select_cases(ctx.valid, ctx.base_ids, int(config.recovery.max_cases))
  out: dict[str, np.ndarray] = {"n_cases": np.asarray([len(idx)], np.int32)}
  if not len(idx):
    return out
  cfg = soft_lib.RefusalSuffixConfig(variant=job["mode"], suffix_len=int(sc.suffix_len), steps=int(sc.steps),
                                     lr=float(sc.lr), budget=float(sc.budget), n_ans=int(sc.n_ans),
                                     n_pref=int(sc.n_pref), w_pref=float(sc.w_pref), w_anti=float(sc.w_anti),
                                     behavior_weight=float(sc.behavior_weight))
  prompt_ids = [ctx.tok.encode(ctx.prompts[i], add_special_tokens=False).ids for i in idx]
  res = soft_lib.run_refusal(ctx.params, ctx.mcfg, ctx.tok, defence, prompt_ids, [ctx.base_ids[i] for i in idx],
                             ctx.discouraged, cfg, max_new_tokens=config.generation.max_new_tokens,
                             stop_ids=ctx.stop_ids, pad_id=ctx.pad_id, seed=config.seed)
  toks, lens = res["gen_tokens"], res["gen_lengths"]
  texts = [task.answer_text(ctx.tok, toks[r, :lens[r]], ctx.stop_ids) for r in range(len(idx))]
  for k, a in label_texts(texts, [ctx.base_texts[i] for i in idx], lens).items():
    out[f"soft_{k}"] = a
  init_norm = np.sqrt(cfg.suffix_len) * float(np.linalg.norm(np.asarray(
      transformer.embed(ctx.params, ctx.mcfg, jnp.asarray([ctx.tok.encode(cfg.init_text, add_special_tokens=False).ids]))
  )))
  nan = np.full(len(idx), np.nan)
  out.update(case=idx.astype(np.int32), diverged=(~np.isfinite(res["suffix_norm"])
                                                  | ~np.isfinite(res["behaviour_final"])).astype(np.int8),
             drift_rel=res["drift_rel"], floor_rel=res["floor_rel"], reactivation=nan, act_drift_l2=nan,
             drift1_rel=nan, objective1=res["behaviour_final"].astype(np.float64), objective2=nan,
             soft_delta_norm=res["suffix_norm"].astype(np.float64),
             soft_rel_delta_norm=res["suffix_norm"].astype(np.float64) / (init_norm + metrics.EPS))
  if config.save_text:
    out["soft_gen_tokens"], out["soft_gen_lengths"] = toks.astype(np.int32), lens.astype(np.int32)
  return out


_BUILDERS: dict = {}


def _recovered_builder(sites: tuple, variant: str):
  """Static edit builder (cached per delta sites and variant, so generation compiles once):
  ``(defence, (delta1, delta2, anchor, ans_pos, ans_valid)) -> edits``."""
  key = (tuple(sites), variant)
  if key not in _BUILDERS:
    def build(args):
      defence, (d1, d2, anchor, ans_pos, ans_valid) = args
      return rec_lib.generation_edits(defence_lib.edits(defence), key[0], d1, d2, anchor, ans_pos, ans_valid,
                                      key[1])
    _BUILDERS[key] = build
  return _BUILDERS[key]


def label_texts(texts: Sequence[str], bases: Sequence[str], lengths: np.ndarray) -> dict[str, np.ndarray]:
  """Detector labels of recovered texts against their base answers (paper-method 6.1): arrays [N]."""
  out = {k: [] for k in LABELS}
  for t, b, n in zip(texts, bases, lengths):
    q = judge.quality(t, b)
    out["nonrefusal"].append(q.weak_nonrefusal)
    out["nonrefusal_eff"].append(not judge.effective_refusal(t)[0])
    out["cooperative"].append(q.cooperative)
    out["safety_cue"].append(judge.has_safety_cue(t))
    out["base_like"].append(q.base_like)
    out["strict"].append(q.strict_base_like)
    out["chars"].append(len(t))
    out["tokens"].append(int(n))
    out["opening"].append(judge.OPENINGS.index(judge.opening_category(t)))
  return {k: np.asarray(v, np.int32) for k, v in out.items()}


def _attr_clamps(ctx: RecoveryContext, error_term: str) -> tuple:
  """One clamp per circuit site for the decomposition of the delta at the delta site on the same
  residual vector (a site without defended features gets a clamp with no real feature: all of its
  SAE features count as non-clamped)."""
  k_max = max(len(v) for v in ctx.feats.values())
  out = []
  for s in ctx.sites:
    sae, scfg = ctx.saes[s]
    kind = ctx.config.defence.kind
    cs = intervene.ClampSpec(site=s, sae_cfg=scfg, mode=kind, positive_only=kind == "multiply", error_term=error_term)
    f = list(ctx.feats.get(s, []))
    out.append(intervene.make_clamp(cs, sae, f or [0], ctx.value, k_max=k_max,
                                    feature_mask=None if f else [False]))
  return tuple(out)


def _generate_with(ctx: RecoveryContext, defence, idx: np.ndarray, d1, d2, ans_valid, variant: str,
                   delta_sites: tuple) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Texts, lengths and tokens of prompts ``idx`` generated under the defence with deltas added at
  absolute positions (anchor = prompt_len - 1; answer = prompt_len + j)."""
  g = ctx.config.generation
  ids, mask, plen = task.encode_prompts(ctx.tok, [ctx.prompts[i] for i in idx], ctx.pad_id)
  p = d2.shape[2]
  rows = (np.asarray(d1, np.float32), np.asarray(d2, np.float32), (plen - 1).astype(np.int32),
          (plen[:, None] + np.arange(p)[None]).astype(np.int32), np.asarray(ans_valid, bool))
  toks, lens = generate_rows(ctx.params, ctx.mcfg, ids, mask, defence=defence, rows=rows,
                             make_edits=_recovered_builder(delta_sites, variant), max_new_tokens=g.max_new_tokens,
                             batch_size=g.batch_size, stop_ids=ctx.stop_ids, pad_id=ctx.pad_id, mesh=ctx.mesh)
  texts = [task.answer_text(ctx.tok, toks[r, :lens[r]], ctx.stop_ids) for r in range(len(idx))]
  return texts, lens, toks


def _sq(x: np.ndarray) -> np.ndarray:
  """Sum of squares per case: [N, ...] -> [N] (float64)."""
  x = np.asarray(x, np.float64)
  return np.sum(np.square(x).reshape(x.shape[0], -1), axis=1)


def compute_job(ctx: RecoveryContext, job: dict) -> dict[str, np.ndarray]:
  """One recovery work unit: (its own preflight for another error term,) the v4 two-stage recovery of
  every valid case, generation with the recovered delta per variant, the detectors, and (``attribution``)
  the replay of each component of the stage-1 delta. Returns host arrays [N] (N = cases) only: labels,
  norms, drifts, divergence; generated tokens only with ``save_text``."""
  if job["run"] == "soft suffix":
    return compute_soft(ctx, job)
  config, r = ctx.config, ctx.config.recovery
  defence = ctx.defence_for(job)
  out: dict[str, np.ndarray] = {}
  valid = ctx.valid
  if job["error_term"] != config.defence.error_term or job.get("k") is not None:  # another defence: own validity
    g = config.generation
    dtexts, _, _ = generate_answers(ctx.params, ctx.mcfg, ctx.tok, ctx.prompts, defence,
                                    max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                                    stop_ids=ctx.stop_ids, pad_id=ctx.pad_id, mesh=ctx.mesh)
    pre = [preflight_row(b, d) for b, d in zip(ctx.base_texts, dtexts)]
    valid = np.asarray([p["valid"] for p in pre], bool)
    out["pre_valid"] = valid.astype(np.int8)
    out["pre_rule"] = np.asarray([(judge.R_EFF_RULES.index(p["r_eff_rule"]) if p["r_eff_rule"] else -1)
                                  for p in pre], np.int32)
  idx = select_cases(valid, ctx.base_ids, int(r.max_cases))
  out["n_cases"] = np.asarray([len(idx)], np.int32)
  if not len(idx):
    return out
  v4 = v4_config(config, job["mode"], job["budget"])
  out.update(_recover_cases(ctx, job, defence, v4, idx))
  return out


def _recover_cases(ctx: RecoveryContext, job: dict, defence, v4: rec_lib.TwoStageConfig, idx: np.ndarray,
                   budgets: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The two-stage recovery of cases ``idx`` [N] (repeats allowed: a budget curve tiles them, each copy
  at its own ``budgets[i]``) at the job's delta sites, generation with the recovered delta per variant,
  the detectors, drift and norms, and (``attribution``) the component replay: host arrays [N]."""
  config, r = ctx.config, ctx.config.recovery
  dsites = ctx.delta_sites_for(job)
  out: dict[str, np.ndarray] = {"case": idx.astype(np.int32)}
  prompt_ids = [ctx.tok.encode(ctx.prompts[i], add_special_tokens=False).ids for i in idx]
  answers = [ctx.base_ids[i] for i in idx]
  res = rec_lib.recover_two_stage(ctx.params, ctx.mcfg, defence, dsites, prompt_ids, answers, ctx.discouraged, v4,
                                  jax.random.key(config.seed), ctx.pad_id, batch_size=int(r.batch_size) or None,
                                  shapes=ctx.shapes, ids=idx, mesh=ctx.mesh, budgets=budgets)
  s1, s2 = res.stage1, res.stage2
  d1, d2 = np.asarray(s1.delta, np.float32), np.asarray(s2.delta, np.float32)  # [N, S, 1, d], [N, S, P, d]
  ans_valid = np.arange(v4.n_ans)[None] < np.minimum(v4.n_ans, [len(a) for a in answers])[:, None]  # [N, P]
  d2 = d2 * ans_valid[:, None, :, None]
  n1, n2 = _sq(d1), _sq(d2)
  diverged = (np.asarray(s1.diverged, bool) | np.asarray(s2.diverged, bool) | ~np.isfinite(n1) | ~np.isfinite(n2)
              | ~np.isfinite(np.asarray(s1.objective, np.float64)) | ~np.isfinite(np.asarray(s2.objective, np.float64)))
  fin = lambda x: np.where(np.isfinite(x), x, 0.0).astype(np.float32)
  d1, d2 = fin(d1) * ~diverged[:, None, None, None], fin(d2) * ~diverged[:, None, None, None]
  out["diverged"] = diverged.astype(np.int8)
  ex2 = metrics.example_metrics(*(tuple(np.asarray(a)[:, 0] for a in part) for part in (s2.feats, s2.refs, s2.masks)))
  ex1 = metrics.example_metrics(*(tuple(np.asarray(a)[:, 0] for a in part) for part in (s1.feats, s1.refs, s1.masks)))
  out.update(drift_rel=ex2["relative_l2"], floor_rel=ex2["floor_violation_relative_l2"],
             act_drift_l2=ex2["act_drift_l2"], reactivation=ex2["reactivated_fraction_within_eligible"],
             drift1_rel=ex1["relative_l2"], objective1=np.asarray(s1.objective, np.float64),
             objective2=np.asarray(s2.objective, np.float64))
  h1 = _sq(np.asarray(s1.h_def)[:, :, 0])
  h2 = _sq(np.asarray(s2.h_def)[:, :, 0] * ans_valid[:, None, :, None])
  norms = {"faithful": (n1, h1), "honest": (n1 + n2, h1 + h2)}
  bases = [ctx.base_texts[i] for i in idx]
  for v in r.variants:
    texts, lens, toks = _generate_with(ctx, defence, idx, d1, d2, ans_valid, v, dsites)
    for k, a in label_texts(texts, bases, lens).items():
      out[f"{v}_{k}"] = a
    nd, nh = norms[v]
    out[f"{v}_delta_norm"] = np.sqrt(nd)
    out[f"{v}_rel_delta_norm"] = np.sqrt(nd) / (np.sqrt(nh) + metrics.EPS)
    if config.save_text:
      out[f"{v}_gen_tokens"], out[f"{v}_gen_lengths"] = toks.astype(np.int32), lens.astype(np.int32)
  if job["attribution"]:
    out.update(attribution_replay(ctx, defence, job, idx, s1, d1, d2, ans_valid, bases))
  return out


def select_cases(valid: np.ndarray, base_ids: Sequence[Sequence[int]], max_cases: int = 0) -> np.ndarray:
  """Indices of the valid prompts with a non-empty base answer (the teacher-forcing target), the
  first ``max_cases`` if > 0."""
  idx = np.asarray([i for i in np.flatnonzero(valid) if len(base_ids[i])], np.int64)
  return idx[:max_cases] if max_cases > 0 else idx


_DECOMPOSE: dict = {}


def attribution_replay(ctx: RecoveryContext, defence, job: dict, idx, s1, d1, d2, ans_valid, bases) -> dict:
  """Paper-method 9.4 on the stage-1 (anchor) delta, the only part the faithful generation sees: each
  component replayed alone under the defence, generated and judged; energy fractions and norms."""
  k = int(ctx.config.recovery.attribution_top_k)
  clamps = _attr_clamps(ctx, job["error_term"])
  dsites = ctx.delta_sites_for(job)
  spec = engine.RecoverySpec(ctx.mcfg, dsites, Objective("teacher_forced"), RecoveryConfig(), suffix_len=None,
                             semantics="live")
  key = (spec, k)
  if key not in _DECOMPOSE:
    one = lambda cl, h, d: attribution.decompose_sites(spec, cl, h, d, k)
    _DECOMPOSE[key] = jax.jit(jax.vmap(lambda cl, h, d: (one(cl, h, d), attribution.energy_fractions(one(cl, h, d))),
                                       in_axes=(None, 0, 0)))
  h_def = jnp.asarray(np.asarray(s1.h_def)[:, :, 0], jnp.float32)  # [N, S, 1, d]
  comps, energy = _DECOMPOSE[key](clamps, h_def, jnp.asarray(d1))
  out = {}
  for c in ATTR_COMPONENTS:
    part = np.asarray(getattr(comps, c), np.float32)
    texts, lens, _ = _generate_with(ctx, defence, idx, part, np.zeros_like(d2), ans_valid, "faithful", dsites)
    lab = label_texts(texts, bases, lens)
    for name in ("nonrefusal", "nonrefusal_eff", "base_like", "strict"):
      out[f"attr_{c}_{name}"] = lab[name]
    out[f"attr_{c}_energy"] = np.asarray(energy[f"{c}_energy"], np.float64)
    out[f"attr_{c}_norm"] = np.asarray(energy[f"{c}_norm"], np.float64)
  return out


def choose_strength(config, rows: Sequence[dict]) -> float:
  """``recovery.strength`` if set (it must be one of ``defence.strengths``), else the strength with the
  most strict-valid cases refused by the substring or safety-cue rule (then the most valid; the first
  on ties)."""
  values = [float(v) for v in config.defence.strengths]
  want = float(config.recovery.strength)
  if want:
    if want not in values:
      raise errors.UserError(f"config field 'recovery.strength'={want:g} is not one of 'defence.strengths' {values}")
    return want
  real = lambda v: sum(r["valid"] and r["r_eff_rule"] in (judge.SUBSTRING, judge.SAFETY_CUE)
                       for r in rows if r["value"] == v)
  allv = lambda v: sum(r["valid"] for r in rows if r["value"] == v)
  return max(values, key=lambda v: (real(v), allv(v), -values.index(v)))

