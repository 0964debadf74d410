"""Refusal steering: refusal features, the defence and its preflight (paper-method sections 6.1-6.3).

Setup: load the model and one SAE per circuit site (``blocks.L.hook_resid_post``) -> instructions
(``task.prompts_file``; the shipped benign file by default) in the model's chat template -> refusal
features (``tasks.refusal_features``: a contrast vector per site, candidates by decoder cosine, a
ranking, the global top K; or a user list) -> for every defence value: batched greedy generation
(KV cache, the defence live at every step) base and defended -> the detectors (``tasks.refusal_judge``)
-> strict validity ``not R(base) and not S(base) and R_eff(defended)``, split by the R_eff rule that
fired.

Outputs in the workdir: ``config.json``, ``features.json`` (sites, candidates, scores, the chosen set),
``preflight.jsonl`` (one row per (value, prompt): labels, rule, opening category, lengths; the texts
only with ``save_text``), ``preflight.md`` (the valid count per value, split by rule).

The recovery stage (v4 two-stage cross-layer recovery on the valid cases) is not part of this app yet.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np

from recovery_jax import errors, report
from recovery_jax.experiments import runner
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.models import chat, generate, sites as sites_lib
from recovery_jax.tasks import refusal as task
from recovery_jax.tasks import refusal_defence as defence_lib
from recovery_jax.tasks import refusal_features as feat_lib
from recovery_jax.tasks import refusal_judge as judge


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


def sae_path(sae: str, site: str) -> str:
  """A config's ``sae`` for one site: ``{layer}`` and ``{site}`` filled in (named SAEs pass unchanged)."""
  if "{" not in sae:
    return sae
  return sae.format(layer=sites_lib.parse_site(site).layer, site=site)


def generate_answers(params, mcfg, tok, prompts: Sequence[str], defence, *, max_new_tokens: int, batch_size: int,
                     stop_ids: tuple[int, ...], pad_id: int) -> tuple[list[str], np.ndarray]:
  """Greedy answers (text, generated token counts [N]) of chat prompts, batched; ``defence`` None for
  the base model. Every batch is left-padded to the longest prompt, so one program serves all batches
  and every defence value."""
  ids, mask, _ = task.encode_prompts(tok, prompts, pad_id)
  n = len(prompts)
  bs = min(batch_size, n)
  texts, lengths = [], []
  for i in range(0, n, bs):
    j = min(n, i + bs)
    b_ids, b_mask = ids[i:j], mask[i:j]
    if j - i < bs:  # pad the batch with copies of its first row (dropped below)
      b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], bs - (j - i), 0)])
      b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], bs - (j - i), 0)])
    kw = dict(max_new_tokens=max_new_tokens, stop_tokens=stop_ids, pad_id=pad_id)
    if defence is None:
      g = generate.generate_jit(params, mcfg, b_ids, b_mask, **kw)
    else:
      g = generate.generate_jit(params, mcfg, b_ids, b_mask, edit_args=defence, make_edits=defence_lib.edits, **kw)
    toks, lens = np.asarray(g.tokens), np.asarray(g.lengths)
    for r in range(j - i):
      texts.append(task.answer_text(tok, toks[r, :lens[r]], stop_ids))
      lengths.append(int(lens[r]))
  return texts, np.asarray(lengths, np.int32)


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


def _features(config, params, mcfg, tok, saes, sites, pad_id, log) -> tuple[dict, dict]:
  """The defended feature set (site -> ids) and its record for features.json."""
  f = config.features
  if f.list:
    if f.list.startswith("REQUIRED"):
      raise errors.UserError(f"config field 'features.list': {f.list}")
    try:
      feats = feat_lib.parse_feature_list(f.list, sites)
    except ValueError as e:
      raise errors.UserError(f"config field 'features.list': {e}") from e
    return feats, {"source": "user list", "features": feats}
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
            "top": [[s, f_, round(x, 6)] for s, f_, x in ranking.top[:f.k]], "features": feats}
  return feats, record


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

  feats, record = _features(config, params, mcfg, tok, saes, sites, pad_id, log)
  report.atomic_write(os.path.join(workdir, "features.json"), json.dumps(record, indent=1))
  log(f"defended features: {sum(len(v) for v in feats.values())} over {len(feats)} sites")

  system = config.task.system or None
  prompts = [task.format_prompt(tmpl, r.text, system) for r in rows_in]
  g = config.generation
  kw = dict(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, stop_ids=stop_ids, pad_id=pad_id)
  base, base_len = generate_answers(params, mcfg, tok, prompts, None, **kw)
  spec = defence_lib.DefenceSpec(config.defence.kind, config.defence.error_term)
  k_max = max(len(v) for v in feats.values())
  rows, counts = [], {}
  for value in config.defence.strengths:
    defence = defence_lib.make_defence(spec, saes, feats, float(value), k_max=k_max)
    dtexts, dlen = generate_answers(params, mcfg, tok, prompts, defence, **kw)
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
  return {"counts": counts, "features": feats, "rows": rows}
