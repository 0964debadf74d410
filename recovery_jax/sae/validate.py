"""Load-time check that an SAE fits the model it is attached to.

``quick_check`` runs the truncated model on a few hundred tokens of benign text, encodes the
activations at the SAE's hook and reports explained variance, L0 and the fraction of latents that
never fired. When the SAE does not fit (explained variance below ``min_explained_variance``, L0
outside a plausible range, or nearly all latents silent) it warns loudly, through absl logging
and Python ``warnings`` both, naming the file and the figures.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from absl import logging

from recovery_jax.sae import formats, harvest, metrics
from recovery_jax.sae.config import SAEConfig

# Plain, benign sentences: enough tokens for a rough fit check when the caller brings no text.
DEFAULT_TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "A function returns a value to its caller; when no return statement runs, it returns None.",
    "Rivers carry sediment from the mountains to the sea, building deltas over thousands of years.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise, then bake it.",
    "The committee met on Tuesday to discuss the budget for next year and agreed on three changes.",
    "Photosynthesis converts light energy into chemical energy stored in sugars inside plant cells.",
    "She walked along the beach at sunset, watching the waves roll in and the gulls circle overhead.",
    "Use a dictionary when you need to look up values by key quickly, and a list for ordered items.",
    "The train to the city leaves every half hour, and the journey takes about forty minutes.",
    "Mathematics studies numbers, shapes and patterns, and it is used in science and engineering.",
    "In the old story, the fox praised the crow's singing until the crow dropped its piece of cheese.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature on mountains.",
)


class SAEFitWarning(UserWarning):
  """The SAE reconstructs the attached model's activations poorly."""


def activations_for_texts(model_params, model_cfg, tokenizer, hook_name: str, texts: Sequence[str], *,
                          seq_len: int = 64, prepend_bos: bool | str = "auto", batch_size: int = 8,
                          outlier_factor: float = 10.0) -> np.ndarray:
  """Activations [n, d] at ``hook_name`` of the kept positions, selected as the trainer does (no
  BOS/EOS/pad, no first text position, no massive-norm outliers)."""
  use_bos = harvest.wants_bos(model_cfg, prepend_bos)
  bos = model_cfg.bos_token_id if use_bos else None
  sep = model_cfg.eos_token_ids[0] if model_cfg.eos_token_ids else None
  pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else (sep or 0)
  windows = harvest.token_windows(list(texts), tokenizer, seq_len, bos_id=bos, sep_id=sep, pad_id=pad)
  parts = [a for a, _ in harvest.iter_activation_batches(model_params, model_cfg, hook_name, windows,
                                                         batch_size=batch_size, exclude=harvest.excluded_ids(model_cfg),
                                                         n_skip=harvest.n_skip_for(use_bos), outlier_factor=outlier_factor)]
  return np.concatenate(parts)


def quick_check(params, sae_cfg: SAEConfig, model_params, model_cfg, tokenizer=None, *, texts: Sequence[str] | None = None,
                activations: np.ndarray | None = None, hook_name: str | None = None,
                min_explained_variance: float = 0.5, max_dead_fraction: float = 0.99,
                min_l0: float = 0.5, max_l0_frac: float = 0.5, warn: bool = True) -> dict[str, float]:
  """Explained variance, L0 and dead fraction of the SAE on the attached model; warns on a bad fit.

  Give ``activations`` [n, d_in] directly, or a ``tokenizer`` (and optionally ``texts``; default: a
  few hundred tokens of built-in benign sentences). A fit is bad when explained variance is below
  ``min_explained_variance``, mean L0 below ``min_l0`` or above ``max_l0_frac * d_sae``, or more than
  ``max_dead_fraction`` of the latents never fire.
  """
  hook = hook_name or sae_cfg.hook_name
  if activations is None:
    if tokenizer is None:
      raise ValueError("quick_check needs activations or a tokenizer")
    activations = activations_for_texts(model_params, model_cfg, tokenizer, hook, texts or DEFAULT_TEXTS,
                                        prepend_bos=sae_cfg.prepend_bos if sae_cfg.prepend_bos is not None else "auto")
  m = metrics.evaluate(params, sae_cfg, metrics.batched(activations))
  problems = []
  if not m["explained_variance"] >= min_explained_variance:
    problems.append(f"explained variance {m['explained_variance']:.3f} < {min_explained_variance}")
  if m["l0"] < min_l0:
    problems.append(f"mean L0 {m['l0']:.2f} < {min_l0} (almost nothing fires)")
  if m["l0"] > max_l0_frac * sae_cfg.d_sae:
    problems.append(f"mean L0 {m['l0']:.1f} > {max_l0_frac:.0%} of d_sae={sae_cfg.d_sae}")
  if m["dead_fraction"] > max_dead_fraction:
    problems.append(f"{m['dead_fraction']:.1%} of latents never fired")
  m["ok"] = not problems
  if problems and warn:
    msg = (f"SAE {sae_cfg.source or '<in-memory>'} at {hook} does not fit model "
           f"{model_cfg.name or model_cfg.family!r} on {m['tokens']} tokens: " + "; ".join(problems) +
           " (wrong hook/layer, wrong model, missing BOS or normalisation?)")
    logging.warning(msg)
    warnings.warn(msg, SAEFitWarning, stacklevel=2)
  else:
    logging.info("SAE %s fits %s at %s: %s", sae_cfg.source, model_cfg.name, hook, metrics.format_metrics(m))
  return m


def load_and_check(path: str, model_params, model_cfg, tokenizer=None, *, hook_name: str | None = None,
                   override: bool = False, texts: Sequence[str] | None = None, check: bool = True,
                   **kw) -> tuple[dict, SAEConfig, dict | None]:
  """``formats.load_sae`` + ``check_compatible`` + (optionally) ``quick_check``: (params, cfg, report)."""
  params, cfg = formats.load_sae(path, model_cfg=model_cfg, hook_name=hook_name, override=override, **kw)
  report = None
  if check and tokenizer is not None:
    report = quick_check(params, cfg, model_params, model_cfg, tokenizer, texts=texts)
  return params, cfg, report
