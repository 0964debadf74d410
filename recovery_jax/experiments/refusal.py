"""Refusal steering: refusal features, the defence, its preflight and the v4 recovery (paper-method 6).

Setup: load the model and one SAE per circuit site (``blocks.L.hook_resid_post``) -> instructions
(``task.prompts_file``; the shipped benign file by default) in the model's chat template -> refusal
features (``tasks.refusal_features``: a contrast vector per site, candidates by decoder cosine, a
ranking, the global top K; or a user list) -> for every defence value: batched greedy generation
(KV cache, the defence live at every step) base and defended -> the detectors (``tasks.refusal_judge``)
-> strict validity ``not R(base) and not S(base) and R_eff(defended)``, split by the R_eff rule that
fired.

Recovery (``recovery.enabled``; multiply/set defences): at the chosen strength (``recovery.strength``,
or the one with the most substring/safety-cue valid cases), the strict-valid cases with a non-empty
base answer get the v4 two-stage recovery (``tasks.refusal_recovery``; batched, one program per stage
and mode) for every ``recovery.modes`` projection; then greedy generation with the recovered delta under
the live defence, ``faithful`` (stage-1 anchor delta only) and ``honest`` (both stages at absolute
positions), and the detectors on the recovered text. Further work units: the recovery-path attribution
replay of the stage-1 delta (``attribution_modes``), the same recovery with ``error_term=drop`` (with
its own preflight), a budget sweep (both stage budgets = b) and a feature-set-size sweep (``recovery.ks``:
the global top K of the ranking, each K with its own preflight). Every recovery call of a run shares
one set of shapes (``refusal_recovery.StageShapes``: chunk size, length and suffixes of all cases) and
pads every defence to one K_max, so budgets, feature sets and case sets are traced values of one
compiled program per stage and static structure. Every job is one resumable work unit
(``workdir/units``, orbax): a rerun with the same config recomputes the preflight but no finished
unit. Diverged recoveries (non-finite objective or delta) are flagged, never counted as recovered.

Outputs in the workdir: ``config.json``, ``features.json`` (sites, candidates, scores, the chosen set),
``preflight.jsonl`` (one row per (value, prompt): labels, rule, opening category, lengths; the texts
only with ``save_text``), ``preflight.md`` (the valid count per value, split by rule),
``recovery.jsonl`` (one row per (job, case): labels, drifts, norms; texts only with ``save_text``),
``recovery.json`` / ``recovery.md`` (tables), ``recovery_vs_budget.png``, ``recovery_vs_k.png``,
``recovery_vs_drift.png`` (stage-2 objective vs drift per mode), ``summary.md`` and
``summary.jsonl`` (one row per run x mode x variant).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import errors, intervene, metrics, report, sweep
from recovery_jax.experiments import runner
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.models import chat, generate, sites as sites_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import attribution, engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.tasks import refusal as task
from recovery_jax.tasks import refusal_defence as defence_lib
from recovery_jax.tasks import refusal_features as feat_lib
from recovery_jax.tasks import refusal_judge as judge
from recovery_jax.tasks import refusal_recovery as rec_lib
from recovery_jax.tasks import refusal_soft_suffix as soft_lib
from recovery_jax.tasks import refusal_stats as stats


def validate(config) -> None:
  """Config values that need no model; errors name the field."""
  if not config.sites:
    raise errors.UserError("config field 'sites' is empty: expected blocks.L.hook_resid_post sites")
  for s in config.sites:
    if not s.endswith((".hook_resid_post", ".hook_resid_pre")):
      raise errors.UserError(f"config field 'sites' has {s!r}: the defence acts at blocks.L.hook_resid_post (the "
                             "paper) or blocks.L.hook_resid_pre sites")
  if config.defence.kind not in defence_lib.DEFENCES:
    raise errors.UserError(f"config field 'defence.kind'={config.defence.kind!r}: expected one of "
                           f"{defence_lib.DEFENCES}")
  if config.features.contrast not in feat_lib.CONTRASTS:
    raise errors.UserError(f"config field 'features.contrast'={config.features.contrast!r}: expected one of "
                           f"{feat_lib.CONTRASTS}")
  if config.features.k < 1 or config.features.n_candidates < 1:
    raise errors.UserError(f"config fields 'features.k'={config.features.k}, 'features.n_candidates'="
                           f"{config.features.n_candidates}: expected >= 1")
  if config.generation.max_new_tokens < 1 or config.generation.batch_size < 1:
    raise errors.UserError("config fields 'generation.max_new_tokens' and 'generation.batch_size' must be >= 1")
  if not config.defence.strengths:
    raise errors.UserError("config field 'defence.strengths' is empty")
  r = config.recovery
  if r.enabled:
    if config.defence.kind == "add":
      raise errors.UserError("config field 'defence.kind'='add': the recovery needs an SAE clamp defence (multiply or "
                             "set); set recovery.enabled=False for the additive steering preflight")
    for field, values, allowed in (("modes", r.modes, ("none", "encoder", "jacobian")),
                                   ("drop_modes", r.drop_modes, ("none", "encoder", "jacobian")),
                                   ("attribution_modes", r.attribution_modes, tuple(r.modes)),
                                   ("variants", r.variants, VARIANTS)):
      for v in values:
        if v not in allowed:
          raise errors.UserError(f"config field 'recovery.{field}' has {v!r}: expected one of {allowed}")
    if not r.variants:
      raise errors.UserError("config field 'recovery.variants' must not be empty")  # modes may be () (baselines only)
    for v in config.soft_suffix.variants if config.soft_suffix.enabled else ():
      if v not in soft_lib.VARIANTS:
        raise errors.UserError(f"config field 'soft_suffix.variants' has {v!r}: expected one of {soft_lib.VARIANTS}")
    if r.budget_mode not in ("none", "encoder", "jacobian"):
      raise errors.UserError(f"config field 'recovery.budget_mode'={r.budget_mode!r}: expected none, encoder or jacobian")
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
    for f in ("steps1", "steps2", "n_ans"):
      if int(r[f]) < 1:
        raise errors.UserError(f"config field 'recovery.{f}'={r[f]}: expected >= 1")


def sae_path(sae: str, site: str) -> str:
  """A config's ``sae`` for one site: ``{layer}`` and ``{site}`` filled in (named SAEs pass unchanged)."""
  if "{" not in sae:
    return sae
  return sae.format(layer=sites_lib.parse_site(site).layer, site=site)


def _defence_edits(args) -> dict:
  """Static edit builder: the defence alone (``args = (defence, rows)``)."""
  return defence_lib.edits(args[0])


def generate_rows(params, mcfg, ids: np.ndarray, mask: np.ndarray, *, defence=None, rows=None, make_edits=None,
                  max_new_tokens: int, batch_size: int, stop_ids: tuple[int, ...], pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Greedy generation of left-padded prompts ids/mask [N, T] in batches of ``batch_size`` ->
  (tokens [N, max_new_tokens], lengths [N]).

  defence: the defence edits (None: the base model); rows: a pytree of per-prompt edit arrays [N, ...]
  (recovered deltas) handed with the defence to ``make_edits((defence, rows))``, a static builder.
  The last batch is padded with copies of its first row (dropped), so one program serves every batch.
  """
  n = ids.shape[0]
  bs = min(batch_size, n)
  if defence is not None and make_edits is None:
    make_edits = _defence_edits
  toks, lens = [], []
  for i in range(0, n, bs):
    idx = np.arange(i, min(n, i + bs))
    idx = np.concatenate([idx, np.full(bs - len(idx), idx[0])])
    kw = dict(max_new_tokens=max_new_tokens, stop_tokens=stop_ids, pad_id=pad_id)
    if make_edits is None:
      g = generate.generate_jit(params, mcfg, ids[idx], mask[idx], **kw)
    else:
      b_rows = None if rows is None else jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[idx]), rows)
      g = generate.generate_jit(params, mcfg, ids[idx], mask[idx], edit_args=(defence, b_rows),
                                make_edits=make_edits, **kw)
    real = min(n, i + bs) - i
    toks.append(np.asarray(g.tokens)[:real])
    lens.append(np.asarray(g.lengths)[:real])
  return np.concatenate(toks), np.concatenate(lens).astype(np.int32)


def answer_ids(tokens: np.ndarray, length: int, stop_ids: Sequence[int]) -> list[int]:
  """Generated ids of one row before the first stop id."""
  out = []
  for t in np.asarray(tokens)[:length].tolist():
    if t in stop_ids:
      break
    out.append(int(t))
  return out


def generate_answers(params, mcfg, tok, prompts: Sequence[str], defence, *, max_new_tokens: int, batch_size: int,
                     stop_ids: tuple[int, ...], pad_id: int) -> tuple[list[str], np.ndarray, list[list[int]]]:
  """Greedy answers (texts, generated token counts [N], answer ids before the stop id) of chat
  prompts, batched; ``defence`` None for the base model. Every batch is left-padded to the longest
  prompt, so one program serves all batches and every defence value."""
  ids, mask, _ = task.encode_prompts(tok, prompts, pad_id)
  toks, lens = generate_rows(params, mcfg, ids, mask, defence=defence, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, stop_ids=stop_ids, pad_id=pad_id)
  texts = [task.answer_text(tok, toks[r, :lens[r]], stop_ids) for r in range(len(prompts))]
  return texts, lens, [answer_ids(toks[r], lens[r], stop_ids) for r in range(len(prompts))]


def preflight_row(base: str, defended: str) -> dict[str, Any]:
  """Labels of one prompt's base and defended answers (paper-method 6.1)."""
  fired, rule = judge.effective_refusal(defended)
  valid, _ = judge.strict_valid(base, defended)
  return {"base_refusal": judge.is_refusal(base), "base_safety_cue": judge.has_safety_cue(base),
          "base_opening": judge.opening_category(base), "defended_refusal": judge.is_refusal(defended),
          "defended_safety_cue": judge.has_safety_cue(defended), "defended_r_eff": fired, "r_eff_rule": rule,
          "defended_opening": judge.opening_category(defended), "valid": bool(valid),
          "base_chars": len(base), "defended_chars": len(defended)}


def count_valid(rows: Sequence[dict]) -> dict[str, int]:
  """Valid count, and the valid count split by the R_eff rule that fired."""
  out = {"n": len(rows), "valid": sum(r["valid"] for r in rows),
         "base_refusal": sum(r["base_refusal"] for r in rows), "base_safety_cue": sum(r["base_safety_cue"] for r in rows),
         "defended_r_eff": sum(r["defended_r_eff"] for r in rows)}
  for rule in judge.R_EFF_RULES:
    out[f"valid_{rule}"] = sum(r["valid"] and r["r_eff_rule"] == rule for r in rows)
  return out


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
  tmpl = task.template_name(mcfg)
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
  return feats, record, ranking


def _table(counts: dict[float, dict]) -> str:
  head = ("| value | prompts | base R | base S | defended R_eff | valid | valid: substring | valid: safety cue | "
          "valid: negative/degenerate |")
  lines = [head, "|" + "---|" * 9]
  for v, c in counts.items():
    lines.append(f"| {v:g} | {c['n']} | {c['base_refusal']} | {c['base_safety_cue']} | {c['defended_r_eff']} | "
                 f"{c['valid']} | {c['valid_' + judge.SUBSTRING]} | {c['valid_' + judge.SAFETY_CUE]} | "
                 f"{c['valid_' + judge.NEGATIVE]} |")
  return "\n".join(lines)


def run(config, workdir: str) -> dict[str, Any]:
  """Features, defence and preflight of ``config`` into ``workdir``; returns the counts per defence value."""
  validate(config)
  log = runner.log
  os.makedirs(workdir, exist_ok=True)
  runner.snapshot_config(config, workdir)
  t0 = time.time()
  rows_in = task.load_prompts(config.task.prompts_file, config.task.n_prompts)  # a bad file fails before loading
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
  tmpl = task.template_name(mcfg)
  stop_ids = tuple(sorted(set(chat.stop_token_ids(tmpl, tok.token_to_id)) | set(mcfg.eos_token_ids or ())))
  log(f"model {config.model}, SAEs at {', '.join(sites)} ({config.sae}); template {tmpl}, stop ids {stop_ids}")

  feats, record, ranking = _features(config, params, mcfg, tok, saes, sites, pad_id, log)
  report.atomic_write(os.path.join(workdir, "features.json"), json.dumps(record, indent=1))
  log(f"defended features: {sum(len(v) for v in feats.values())} over {len(feats)} sites")

  system = config.task.system or None
  prompts = [task.format_prompt(tmpl, r.text, system) for r in rows_in]
  g = config.generation
  kw = dict(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, stop_ids=stop_ids, pad_id=pad_id)
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
  report.atomic_write(os.path.join(workdir, "preflight.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  md = (f"# Refusal steering preflight\n\nmodel {config.model}, SAEs {config.sae} at {', '.join(sites)}; defence "
        f"{config.defence.kind} (error term {config.defence.error_term}) on {sum(len(v) for v in feats.values())} "
        f"features ({record['source']}); {len(prompts)} prompts, greedy, {g.max_new_tokens} new tokens; "
        f"{time.time() - t0:.0f} s\n\nvalid = not R(base) and not S(base) and R_eff(defended), split by the R_eff "
        f"rule that fired.\n\n{_table(counts)}\n")
  report.atomic_write(os.path.join(workdir, "preflight.md"), md)
  print(md, flush=True)
  preflight_md = md
  out = {"counts": counts, "features": feats, "rows": rows}
  summary = preflight_md
  if config.recovery.enabled:
    value = choose_strength(config, rows)
    valid = np.asarray([r["valid"] for r in rows if r["value"] == value], bool)
    order = tuple(sorted(sites, key=lambda x: sites_lib.visit_key(x, mcfg.n_layers)))
    discouraged = rec_lib.discouraged_ids(tok, config.recovery.discourage_safety_prefixes)
    ctx = RecoveryContext(config=config, params=params, mcfg=mcfg, tok=tok, sites=order, saes=saes, feats=feats,
                          value=value, prompts=prompts, base_texts=base, base_ids=base_ids, valid=valid,
                          stop_ids=stop_ids, pad_id=pad_id, discouraged=discouraged, ranking=ranking, k_max=k_max,
                          shapes=run_shapes(config, tok, prompts, base_ids, discouraged, pad_id))
    rec = recovery_stage(ctx, workdir, [r.id for r in rows_in], log)
    out["recovery"] = rec
    summary += "\n" + rec["markdown"]
    report.write_jsonl(os.path.join(workdir, "summary.jsonl"), summary_rows(rec, n_examples=len(prompts)))
    print(rec["markdown"], flush=True)
  report.atomic_write(os.path.join(workdir, "summary.md"), summary + f"\n(wall time {time.time() - t0:.0f} s)\n")
  return out


# ----------------------------------------------------------------------------------------------
# recovery, generation with the recovered delta, attribution (paper-method 6.4, 9.4)

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

  def features_for(self, job: dict) -> dict:
    """site -> feature ids of a job's defence: the main set, or the global top ``job['k']``."""
    return self.feats if job.get("k") is None else self.ranking.features(int(job["k"]))

  def defence_for(self, job: dict) -> tuple:
    spec = defence_lib.DefenceSpec(self.config.defence.kind, job["error_term"])
    feats = self.features_for(job)
    return defence_lib.make_defence(spec, self.saes, feats, self.value,
                                    k_max=self.k_max or max(len(v) for v in feats.values()))


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


def v4_config(config, mode: str, budget: float | None = None) -> rec_lib.V4Config:
  """The v4 knobs of ``config.recovery`` for one projection mode; ``budget`` sets both stages."""
  r = config.recovery
  kw = dict(projection=mode, steps1=int(r.steps1), lr1=float(r.lr1), budget1=float(r.budget1), steps2=int(r.steps2),
            lr2=float(r.lr2), budget2=float(r.budget2), n_ans=int(r.n_ans), jacobian_probes=int(r.jacobian_probes),
            correction_steps=int(r.correction_steps), checkpoint_every=int(r.checkpoint_every))
  if budget is not None:
    kw.update(budget1=float(budget), budget2=float(budget))
  return rec_lib.V4Config(**kw)


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
  same = lambda b: float(b) == float(r.budget1) == float(r.budget2) and r.budget_mode in tuple(r.modes)
  jobs += [dict(run="budget", mode=r.budget_mode, error_term=keep, budget=float(b), attribution=False)
           for b in r.budgets if not same(b)]
  ss = config.get("soft_suffix")
  if ss is not None and ss.enabled:
    jobs += [dict(run="soft suffix", mode=v, error_term=keep, budget=None, attribution=False) for v in ss.variants]
  main_k = lambda k: int(k) == int(config.features.k) and r.budget_mode in tuple(r.modes)
  jobs += [dict(run="K", mode=r.budget_mode, error_term=keep, budget=None, attribution=False, k=int(k))
           for k in r.get("ks", ()) if not main_k(k)]  # last: unit ids of earlier workdirs stay valid
  return jobs


def _prefixes(config, job: dict) -> tuple:
  """Label-key prefixes of a job's rows: the generation variants, or ``soft`` for the soft suffix."""
  return ("soft",) if job["run"] == "soft suffix" else tuple(config.recovery.variants)


def compute_soft(ctx: RecoveryContext, job: dict) -> dict[str, np.ndarray]:
  """The OABD-style soft-suffix baseline (``tasks.refusal_soft_suffix``) on the valid cases, variant
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
  res = soft_lib.run(ctx.params, ctx.mcfg, ctx.tok, defence, prompt_ids, [ctx.base_ids[i] for i in idx],
                     ctx.discouraged, cfg, max_new_tokens=config.generation.max_new_tokens, stop_ids=ctx.stop_ids,
                     pad_id=ctx.pad_id, seed=config.seed)
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
  """Static edit builder (cached per sites and variant, so generation compiles once):
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
  """One clamp per delta site for the decomposition (a site without defended features gets a clamp
  with no real feature: all of its SAE features count as non-clamped)."""
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


def _generate_with(ctx: RecoveryContext, defence, idx: np.ndarray, d1, d2, ans_valid, variant: str
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Texts, lengths and tokens of prompts ``idx`` generated under the defence with deltas added at
  absolute positions (anchor = prompt_len - 1; answer = prompt_len + j)."""
  g = ctx.config.generation
  ids, mask, plen = task.encode_prompts(ctx.tok, [ctx.prompts[i] for i in idx], ctx.pad_id)
  p = d2.shape[2]
  rows = (np.asarray(d1, np.float32), np.asarray(d2, np.float32), (plen - 1).astype(np.int32),
          (plen[:, None] + np.arange(p)[None]).astype(np.int32), np.asarray(ans_valid, bool))
  toks, lens = generate_rows(ctx.params, ctx.mcfg, ids, mask, defence=defence, rows=rows,
                             make_edits=_recovered_builder(ctx.sites, variant), max_new_tokens=g.max_new_tokens,
                             batch_size=g.batch_size, stop_ids=ctx.stop_ids, pad_id=ctx.pad_id)
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
                                    stop_ids=ctx.stop_ids, pad_id=ctx.pad_id)
    pre = [preflight_row(b, d) for b, d in zip(ctx.base_texts, dtexts)]
    valid = np.asarray([p["valid"] for p in pre], bool)
    out["pre_valid"] = valid.astype(np.int8)
    out["pre_rule"] = np.asarray([(judge.R_EFF_RULES.index(p["r_eff_rule"]) if p["r_eff_rule"] else -1)
                                  for p in pre], np.int32)
  idx = select_cases(valid, ctx.base_ids, int(r.max_cases))
  out["n_cases"] = np.asarray([len(idx)], np.int32)
  if not len(idx):
    return out
  out["case"] = idx.astype(np.int32)
  v4 = v4_config(config, job["mode"], job["budget"])
  prompt_ids = [ctx.tok.encode(ctx.prompts[i], add_special_tokens=False).ids for i in idx]
  answers = [ctx.base_ids[i] for i in idx]
  res = rec_lib.recover_two_stage(ctx.params, ctx.mcfg, defence, ctx.sites, prompt_ids, answers, ctx.discouraged, v4,
                                  jax.random.key(config.seed), ctx.pad_id, batch_size=int(r.batch_size) or None,
                                  shapes=ctx.shapes)
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
  texts_out = {}
  for v in r.variants:
    texts, lens, toks = _generate_with(ctx, defence, idx, d1, d2, ans_valid, v)
    for k, a in label_texts(texts, bases, lens).items():
      out[f"{v}_{k}"] = a
    nd, nh = norms[v]
    out[f"{v}_delta_norm"] = np.sqrt(nd)
    out[f"{v}_rel_delta_norm"] = np.sqrt(nd) / (np.sqrt(nh) + metrics.EPS)
    if config.save_text:
      out[f"{v}_gen_tokens"], out[f"{v}_gen_lengths"] = toks.astype(np.int32), lens.astype(np.int32)
    texts_out[v] = texts
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
  spec = engine.RecoverySpec(ctx.mcfg, ctx.sites, Objective("teacher_forced"), RecoveryConfig(), suffix_len=None,
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
    texts, lens, _ = _generate_with(ctx, defence, idx, part, np.zeros_like(d2), ans_valid, "faithful")
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


def _case_rows(ctx: RecoveryContext, job: dict, res: dict, ids: Sequence[str]) -> list[dict]:
  """One row per recovered case of a job: labels, drifts, norms (texts only with ``save_text``)."""
  if "case" not in res:
    return []
  rows = []
  variants = _prefixes(ctx.config, job)
  for j, i in enumerate(np.asarray(res["case"]).tolist()):
    row = {"run": job["run"], "mode": job["mode"], "error_term": job["error_term"], "budget": job["budget"],
           "k": job.get("k"), "prompt": int(i), "id": ids[i], "diverged": bool(res["diverged"][j])}
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


def summarize_recovery(config, jobs: Sequence[dict], results: dict, case_rows: Sequence[dict],
                       n_valid: int | None = None) -> dict:
  """Per (run, mode, variant) summaries, the attribution rows, the budget curve and the K curve
  (``n_valid``: the main defence's strict-valid count, its K row's preflight)."""
  variants = tuple(config.recovery.variants)
  of = lambda i: [r for r in case_rows if r["_job"] == i]
  groups, attr, budget, ks = [], [], [], []
  for i, job in enumerate(jobs):
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
    r_ = config.recovery
    b = job["budget"]
    if job["run"] == "budget" or (job["run"] == "main" and job["mode"] == r_.budget_mode
                                  and float(r_.budget1) == float(r_.budget2)
                                  and float(r_.budget1) in [float(x) for x in r_.budgets]):
      b = float(r_.budget1) if b is None else b
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
  return {"groups": groups, "attribution": attr, "budget": budget, "k": ks}


def _curve_point(s: dict) -> dict:
  return {"recovered": s["recovered"], "base_like": s["base_like"]["k"], "strict": s["strict"]["k"],
          "drift_rel": s["drift_rel"]["mean"], "delta_norm": s["delta_norm"]["mean"]}


def render_recovery(config, value: float, n_valid: int, n_prompts: int, summ: dict, wall_s: float) -> str:
  """recovery.md: the recovery, attribution and budget tables."""
  r = config.recovery
  v4 = v4_config(config, "jacobian")
  drop = [g for g in summ["groups"] if g["run"] == "error term dropped"]
  out = [f"# Refusal recovery (v4 two-stage)\n",
         f"defence {strength_label(config.defence.kind, value)} (error term {config.defence.error_term}); "
         f"{n_valid} strict-valid cases of {n_prompts} prompts"
         + (f" (first {r.max_cases} recovered)" if r.max_cases else "") +
         f"; stage 1 {v4.steps1} steps lr {v4.lr1} budget {v4.budget1}, stage 2 {v4.steps2} steps lr {v4.lr2} budget "
         f"{v4.budget2} on {v4.n_ans} answer positions; lambda_act {v4.lambda_act}, jacobian probes "
         f"{v4.jacobian_probes}, corrections {v4.correction_steps}; greedy generation, "
         f"{config.generation.max_new_tokens} new tokens, the defence live; {wall_s:.0f} s.\n",
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
         stats.recovery_table(summ["groups"]), ""]
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


def recovery_stage(ctx: RecoveryContext, workdir: str, ids: Sequence[str], log) -> dict:
  """Every recovery job as a resumable work unit (``workdir/units``), then rows, summaries and files."""
  t0 = time.time()
  jobs = recovery_jobs(ctx.config)
  units = [sweep.WorkUnit(i, (j["run"], j["mode"], j["budget"] if j.get("k") is None else j["k"]), (j,))
           for i, j in enumerate(jobs)]
  log(f"recovery: {int(ctx.valid.sum())} strict-valid cases at {strength_label(ctx.config.defence.kind, ctx.value)}; "
      f"{len(units)} work units ({', '.join(_job_name(j) for j in jobs)})")
  store = sweep.UnitStore(os.path.join(workdir, "units"))
  try:
    results = sweep.run_units(units, lambda u: compute_job(ctx, u.points[0]), store, log=log,
                              progress=ctx.config.get("progress", False))
  finally:
    store.close()
  case_rows = []
  for i, job in enumerate(jobs):
    for row in _case_rows(ctx, job, results[i], ids):
      row["_job"] = i
      case_rows.append(row)
  summ = summarize_recovery(ctx.config, jobs, results, case_rows, n_valid=int(ctx.valid.sum()))
  for row in case_rows:
    del row["_job"]
  n_div = sum(r["diverged"] for r in case_rows)
  if n_div:
    log(f"warning: {n_div} of {len(case_rows)} recovered cases diverged (non-finite objective or delta); reported "
        "in recovery.jsonl and the tables, never counted as recovered")
  report.write_jsonl(os.path.join(workdir, "recovery.jsonl"), case_rows)
  report.atomic_write(os.path.join(workdir, "recovery.json"), json.dumps(
      {"strength": ctx.value, "n_valid": int(ctx.valid.sum()), "jobs": jobs, **summ}, indent=1, default=float))
  md = render_recovery(ctx.config, ctx.value, int(ctx.valid.sum()), len(ctx.prompts), summ, time.time() - t0)
  report.atomic_write(os.path.join(workdir, "recovery.md"), md)
  if ctx.config.plots and summ["budget"]:
    stats.plot_budget(os.path.join(workdir, "recovery_vs_budget.png"), summ["budget"],
                      f"refusal recovery vs budget ({ctx.config.recovery.budget_mode})")
  if ctx.config.plots:
    stats.plot_drift(os.path.join(workdir, "recovery_vs_drift.png"), case_rows,
                     "refusal recovery vs drift (main run, valid cases)")
  if ctx.config.plots and summ["k"]:
    stats.plot_k(os.path.join(workdir, "recovery_vs_k.png"), summ["k"],
                 f"refusal recovery vs feature-set size ({ctx.config.recovery.budget_mode})")
  return {"markdown": md, **summ, "rows": case_rows}


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


def render_finished(workdir: str) -> str:
  """Tables of the recovery work units finished so far in ``workdir`` (a run still going, or one
  stopped early): reads ``config.json`` and ``units`` only, writes ``recovery_partial.md``."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  jobs = recovery_jobs(config)
  store = sweep.UnitStore(os.path.join(workdir, "units"))
  try:
    done = sorted(store.finished())
    results = {i: store.load(i) for i in done}
  finally:
    store.close()
  with open(os.path.join(workdir, "preflight.jsonl")) as f:
    pre = [json.loads(l) for l in f if l.strip()]
  ids = {r["prompt"]: r["id"] for r in pre}
  ctx = RecoveryContext(config=config, params=None, mcfg=None, tok=None, sites=(), saes={}, feats={}, value=0.0,
                        prompts=[], base_texts=[], base_ids=[], valid=np.zeros(0, bool), stop_ids=(), pad_id=0,
                        discouraged=[])
  ctx.config.save_text = False
  sub_jobs = [jobs[i] for i in done]
  case_rows = []
  for k, i in enumerate(done):
    for row in _case_rows(ctx, jobs[i], results[i], ids):
      row["_job"] = k
      case_rows.append(row)
  value = choose_strength(config, pre)  # the strength the run recovered at
  n_valid = sum(r["valid"] for r in pre if r["value"] == value)
  summ = summarize_recovery(config, sub_jobs, {k: results[i] for k, i in enumerate(done)}, case_rows, n_valid=n_valid)
  md = render_recovery(config, value, n_valid, len({r["prompt"] for r in pre}), summ, float("nan"))
  md = (f"(partial: {len(done)} of {len(jobs)} work units finished: "
        f"{', '.join(_job_name(jobs[i]) for i in done)})\n\n" + md)
  report.atomic_write(os.path.join(workdir, "recovery_partial.md"), md)
  return md
