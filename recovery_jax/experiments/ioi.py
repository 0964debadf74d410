"""IOI post-intervention recovery on the shared runner (paper-method sections 5 and 7).

Prepare: load model + SAE -> IOI prompts -> base logit difference -> feature ranking by attribution
through a pass-through SAE -> preflight (valid flips per feature-set size and clamp value). The
runner then recovers every grid point (K, clamp value, budget, seed) x projection mode x variant
(``grid.GridSetting``).

Variants: ``shared`` (the reference: one delta for all prompts, maximising the mean logit
difference) and ``per_prompt`` (one delta per prompt, vmapped). ``clamp.error_term="drop"`` makes
the SAE a full bottleneck; ``delta_sites`` (the threat model; default: the clamp site, delta added
after the clamp) may name the residual vector *entering* the clamp instead (``blocks.{L-1}.hook_resid_post``
for a clamp at ``blocks.L.hook_resid_pre``), an upstream layer, or several sites (cross-layer), so that
delta must pass through the clamp, which re-acts on the perturbed state (``grid.delta_sites``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import config_utils as cu
from recovery_jax import errors, features, intervene, profile
from recovery_jax.experiments import grid, runner
from recovery_jax.experiments import setup as setup_lib
from recovery_jax.models import sites as sites_lib
from recovery_jax.models import transformer
from recovery_jax.recovery import api, engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.sae import cards as cards_lib
from recovery_jax.tasks import ioi as ioi_task

VARIANTS = ("shared", "per_prompt")


def check(config) -> None:
  """IOI config values that need no model; errors name the field."""
  cu.check_at_least(config, "task.n_prompts", 1)
  cu.check_one_of(config, "clamp.mode", intervene.CLAMP_MODES)
  cu.check_one_of(config, "clamp.error_term", intervene.ERROR_TERMS)
  cu.check_one_of(config, "clamp.semantics", engine.SEMANTICS)
  cu.check_at_least(config, "sweep.n_features", 1, each=True)


def prepare(config) -> grid.Grid:
  """Loads everything, ranks features, runs the preflight; the grid for the runner."""
  log = runner.log
  log(f"loading model {config.model!r} and SAE {config.sae!r} at {config.site}")
  params, mcfg, tok = setup_lib.load_model(config.model, config.model_processing, seed=config.seed)
  sae, scfg = setup_lib.load_sae(config.sae, mcfg, config.site, override=config.sae_override_checks,
                                 model_name=config.model)
  delta_sites = grid.delta_sites(config, mcfg)
  k_max = max(int(k) for k in config.sweep.n_features)
  if k_max > scfg.d_sae:
    raise errors.UserError(f"config field 'sweep.n_features': K={k_max} is larger than the SAE's d_sae={scfg.d_sae}")

  bos = mcfg.bos_token_id if mcfg.is_gemma else None
  batch = ioi_task.make_ioi_batch(tok, config.task.n_prompts, seed=config.task.prompt_seed,
                                  prompt_type=config.task.prompt_type, nb_templates=config.task.nb_templates or None,
                                  bos_id=bos, pad_id=mcfg.pad_token_id or 0)
  try:  # prompt lengths vs the model's context, the readout column on a real token: before any tracing
    api.check_prompts(batch.tokens, batch.attention_mask, model_cfg=mcfg, readout_pos=batch.readout_pos)
  except errors.UserError as e:
    raise errors.UserError(f"IOI prompts (config field 'task'): {e}") from e
  tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
  objective = lambda logits: ioi_task.logit_diff(logits, jnp.asarray(batch.io_ids), jnp.asarray(batch.s_ids))
  base_ld = np.asarray(objective(transformer.forward(params, mcfg, tokens, attention_mask=mask).logits[:, -1]))
  log(f"{len(batch)} IOI prompts ({config.task.prompt_type}); base logit diff mean {base_ld.mean():.3f}, "
      f"correct {(base_ld > 0).sum()}/{len(batch)}")

  attr = features.attribution_scores(params, mcfg, sae, scfg, config.site, tokens, mask, batch.readout_pos, objective)
  ranking = np.asarray(features.top_positive(attr, k_max))
  log(f"feature attribution: {int((np.asarray(attr) > 0).sum())} positive features; top {len(ranking)} kept")

  clamp_spec = intervene.ClampSpec(site=config.site, sae_cfg=scfg, mode=config.clamp.mode,
                                   positive_only=config.clamp.positive_only, error_term=config.clamp.error_term)
  make = lambda p: intervene.make_clamp(clamp_spec, sae, ranking[:int(p["n_features"])], float(p["clamp_value"]),
                                        k_max=k_max)
  n_valid, n_nonfinite = _preflight(params, mcfg, make, tokens, mask, objective, base_ld, config)
  if not any(n_valid.values()):
    raise errors.UserError(no_flips_message(n_valid, n_nonfinite, base_ld, scfg.source or config.sae, config.model))

  def spec(mode: str, variant: str) -> engine.RecoverySpec:
    del variant  # the layout (one shared problem or one per prompt) lives in the problems
    return engine.RecoverySpec(model_cfg=mcfg, delta_sites=delta_sites, objective=Objective("logit_diff"),
                               config=grid.recovery_config(config, mode), suffix_len=1,
                               semantics=config.clamp.semantics)

  problems = {v: ioi_task.problems(batch, v) for v in config.recovery.variants}
  where = "" if delta_sites == (config.site,) else f", delta at {', '.join(delta_sites)}"
  header = (f"model {config.model}, SAE {scfg.source or config.sae} at {config.site}{where}, {len(batch)} prompts, "
            f"clamp {config.clamp.mode} (positive_only={config.clamp.positive_only}, error term "
            f"{config.clamp.error_term}), {config.recovery.steps} steps, lr {config.recovery.lr}")
  if len(ranking) < k_max:  # top_positive keeps only features with positive attribution
    header += (f"; only {len(ranking)} features have positive attribution, so a K above {len(ranking)} "
               f"clamps those {len(ranking)}")
  return grid.Grid(
      title="IOI post-intervention recovery", header=header, params=params, problems=problems.__getitem__,
      spec=spec, clamps=lambda points: (intervene.stack_clamps([make(p) for p in points]),),
      valid=lambda rb, rd: (rb > 0) & (rd <= 0), recovered=lambda rr: rr > 0,
      examples=[{"prompt": i, "text": batch.texts[i], "template": batch.templates[i]} for i in range(len(batch))],
      objective_name="LD", annotate=lambda workdir: feature_card_links(
          params, mcfg, tok, sae, scfg, config.site, ranking[:int(config.get("cards", 0))], workdir))


def feature_card_links(params, mcfg, tok, sae, scfg, site: str, feature_ids, workdir: str) -> list[str]:
  """Feature cards (held-out contexts, logit lens, frequency) of the top clamped features, written to
  ``workdir/cards/cards.{md,html,json}``; the summary line that links them ([] when no ids)."""
  feature_ids = [int(f) for f in feature_ids]
  if not feature_ids:
    return []
  windows = cards_lib.heldout_windows(mcfg, tok, n_windows=64, seq_len=64, batch=16)
  made = cards_lib.feature_cards(params, mcfg, tok, sae, scfg, site, feature_ids, windows)
  cards_lib.write_cards(made, os.path.join(workdir, "cards"))
  top = ", ".join(f"{c.feature} (freq {c.frequency:.3f})" for c in made)
  return [f"Feature cards of the {len(made)} top clamped features by attribution at {site}: "
          f"[cards/cards.md](cards/cards.md), [cards/cards.html](cards/cards.html) ({top})."]


def no_flips_message(n_valid: dict, n_nonfinite: dict, base_ld, sae: str, model: str) -> str:
  """Why no grid point has a valid flip: non-finite scores (naming the SAE file and model) before the
  clamp's failure to suppress IOI is blamed."""
  n_base = int((~np.isfinite(np.asarray(base_ld))).sum())
  if n_base:
    return (f"no valid flips: the base logit difference is non-finite (NaN/inf) on {n_base}/{len(base_ld)} prompts "
            f"before any clamp: the model {model!r} gives non-finite scores (check its weights and dtype)")
  bad = {k: v for k, v in n_nonfinite.items() if v}
  if bad:
    return ("no valid flips: the defended logit difference is non-finite (NaN/inf) for (n_features, clamp_value) "
            + ", ".join(f"{k}: {v}/{len(base_ld)} prompts" for k, v in sorted(bad.items()))
            + f"; the clamp itself is not at fault: the SAE {sae!r} produces non-finite values (NaN/inf weights, or an "
            "overflow in its dtype)")
  return ("no valid flips: the clamp does not suppress IOI (base > 0 and defended <= 0) on any prompt for any "
          f"(n_features, clamp_value) of the grid {sorted(n_valid)}; try more features, another clamp value or "
          "another site")


@profile.timed("preflight")
def _preflight(params, mcfg, make, tokens, mask, objective, base_ld, config) -> tuple[dict, dict]:
  """Defended logit differences per (n_features, clamp_value): the valid-flip counts and the counts of
  non-finite defended scores (never valid), before recovery."""
  @jax.jit
  def defended_ld(params, clamp):  # params as an argument: not folded into the program as constants
    out = intervene.clamp(transformer.forward, clamp)(params, mcfg, tokens, attention_mask=mask)
    return objective(out.logits[:, -1])

  counts, nonfinite = {}, {}
  for k in sorted({int(k) for k in config.sweep.n_features}):
    for v in sorted({float(v) for v in config.sweep.clamp_value}):
      ld = np.asarray(defended_ld(params, make({"n_features": k, "clamp_value": v})))
      ok = np.isfinite(ld) & np.isfinite(base_ld)
      counts[(k, v)] = int((ok & (base_ld > 0) & (ld <= 0)).sum())
      nonfinite[(k, v)] = int((~np.isfinite(ld)).sum())
      runner.log(f"preflight K={k} clamp={v}: defended logit diff mean {ld.mean():.3f}; valid flips "
                 f"{counts[(k, v)]}/{len(ld)}" + (f"; {nonfinite[(k, v)]} non-finite" if nonfinite[(k, v)] else ""))
  return counts, nonfinite


class IOI(grid.GridSetting):
  name, variants = "ioi", VARIANTS

  def check(self, config) -> None:
    check(config)

  def prepare(self, config, workdir: str, mesh) -> grid.Grid:
    del workdir, mesh
    return prepare(config)


SETTING = IOI()


def run(config, workdir: str) -> dict[str, Any]:
  """Runs the IOI experiment of ``config`` into ``workdir``; returns the rows and summary."""
  return runner.run(config, workdir, SETTING)


def render(workdir: str, plots: bool = True) -> str:
  return SETTING.render(workdir, plots)
