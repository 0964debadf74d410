"""The soft suffix for multiple choice (unlearning; paper-method 9.1): objective, readout, summaries.

Layout per flip: [prompt (left-padded, T columns)] + [L soft suffix embeddings] (``core``); the
readout is the last suffix column. Variants (paper-method Q16):
  faithful   the reference's threat model: the clamp acts on the prompt columns only (the reference
             overwrites them with the frozen prompt-only defended residual, which equals clamping
             them: they do not depend on the suffix); suffix and readout columns stay unclamped. The
             loss is the behaviour term alone.
  corrected  the clamp is active on every column (the defence really is on), and the monitor term
             is differentiable: ``(1 - w_b) * max over suffix columns and clamped features of the
             pre-clamp activations / its initial value``, beside ``w_b * behaviour``.
Behaviour (maximised): ``choice_ce`` (4-way log-probability of gold at the readout) or
``choice_margin``. Success: argmax over the four choice tokens at the readout. The post-hoc quantities
follow 4.4 on this layout: z = E_S(residual at the readout after the clamp site's edit); z0 with the
initial suffix, zrec with the optimised one (for ``faithful`` the readout is unclamped, as in the
reference). Flips are optimised together as independent rows, in chunks of ``batch_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from recovery_jax import outputs
from recovery_jax.intervene import Clamp
from recovery_jax.models import transformer
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery.soft_suffix import core


@dataclasses.dataclass(frozen=True)
class SuffixConfig:
  variant: str = "faithful"
  suffix_len: int = 16
  steps: int = 300
  lr: float = 5e-4
  budget: float = 20.0
  noise: float = 0.01
  init_text: str = " !"
  objective: str = "choice_ce"
  behavior_weight: float = 0.9  # corrected only (faithful: behaviour alone)
  batch_size: int = 8

  def __post_init__(self):
    core.check_variant(self)
    if self.objective not in ("choice_ce", "choice_margin"):
      raise ValueError(f"SuffixConfig.objective={self.objective!r}: expected choice_ce or choice_margin")


def forward(params, mcfg, clamp: Clamp, variant: str, prompt_emb, prompt_mask, suffix, choices):
  """prompt_emb [B, T, d] (hook_embed values), prompt_mask [B, T], suffix [B, L, d], choices [B, 4] ->
  (choice logits at the last suffix column [B, 4], features after the clamp-site edit [B, T+L, K],
  pre-clamp features [B, T+L, K])."""
  x, mask, positions = core.stack(params, mcfg, prompt_emb, prompt_mask, suffix)
  until = prompt_emb.shape[1] if variant == "faithful" else None
  resid, post, pre = core.forward(params, mcfg, (clamp,), x, mask, positions, edit_until=until)
  cl = transformer.final_logits_at(params, mcfg, resid[:, -1:], choices)[:, 0]
  return cl, post[0], pre[0]


@dataclasses.dataclass(frozen=True)
class ChoiceObjective:
  """``core`` objective; data = (prompt_emb [B, T, d], prompt_mask [B, T], choices [B, 4], gold [B])."""

  mcfg: Any
  cfg: SuffixConfig

  def loss(self, params, clamp, data, suffix):
    emb, mask, choices, gold = data
    cl, _, pre = forward(params, self.mcfg, clamp, self.cfg.variant, emb, mask, suffix, choices)
    logits, local = cl[:, None], jnp.broadcast_to(jnp.arange(4), cl.shape)  # [B, R=1, 4]
    fn = obj_lib.choice_ce if self.cfg.objective == "choice_ce" else obj_lib.choice_margin
    beh = fn(logits, local, gold)  # [B], maximised
    return -beh, jnp.max(pre[:, emb.shape[1]:], axis=(1, 2)), beh

  def readout(self, params, clamp, data, suffix):
    """-> (choice logits [B, 4], post-edit features at the readout [B, K])."""
    emb, mask, choices, _ = data
    cl, feats, _ = forward(params, self.mcfg, clamp, self.cfg.variant, emb, mask, suffix, choices)
    return cl, feats[:, -1]


def run(params, mcfg, tokenizer, clamp: Clamp, batch, cfg: SuffixConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Optimises a soft suffix for every row of ``batch`` (a ``tasks.unlearning.ChoiceBatch``) under
  ``clamp``. Returns per-row arrays: success_init / success (argmax at the readout with the initial /
  final suffix), drift_abs, violation_abs, ref_norm (post-hoc at the readout), suffix_norm
  (||suffix - init||), objective_final."""
  def prepare(rows):
    tokens, mask, choices, gold = (jnp.asarray(a) for a in rows)
    return transformer.embed(params, mcfg, tokens).astype(jnp.float32), mask, choices, gold

  res = core.run_batched(ChoiceObjective(mcfg, cfg), params, tokenizer, clamp,
                         (batch.tokens, batch.attention_mask, batch.choices, batch.gold), prepare, seed=seed,
                         batch_size=cfg.batch_size, exact=True)
  (cl0, z0), (cl1, z1) = res["init"], res["final"]
  gold = np.asarray(batch.gold)
  diff = z1.astype(np.float64) - z0.astype(np.float64)
  return {"success_init": np.argmax(cl0, -1) == gold, "success": np.argmax(cl1, -1) == gold,
          "drift_abs": np.linalg.norm(diff, axis=-1), "violation_abs": np.linalg.norm(np.maximum(diff, 0), axis=-1),
          "ref_norm": np.linalg.norm(z0, axis=-1), "suffix_norm": res["suffix_norm"],
          "objective_final": res["history"][:, -1]}


def summarize(rows: list[dict]) -> list[dict]:
  """Per variant of ``rows`` (one dict per flip, ``run``'s fields plus ``variant``): counts, Wilson CI, means."""
  from recovery_jax import metrics  # pylint: disable=import-outside-toplevel
  out = []
  for v in dict.fromkeys(r["variant"] for r in rows):
    rs = [r for r in rows if r["variant"] == v]
    k, n = sum(bool(r["success"]) for r in rs), len(rs)
    lo, hi = metrics.wilson_interval(k, n) if n else (float("nan"), float("nan"))
    d = np.asarray([r["drift_abs"] for r in rs])
    out.append({"variant": v, "n": n, "recovered": k, "ci": [lo, hi],
                "recovered_init": sum(bool(r["success_init"]) for r in rs),
                "drift_abs_mean": float(d.mean()) if n else None, "n_drift_nonzero": int((d > 1e-6).sum()),
                "violation_abs_mean": float(np.mean([r["violation_abs"] for r in rs])) if n else None,
                "suffix_norm_mean": float(np.mean([r["suffix_norm"] for r in rs])) if n else None})
  return out


def render(summary: list[dict]) -> str:
  f = lambda x: "-" if x is None else f"{x:.4g}"
  return outputs.format_table(
      ["variant", "recovered", "rate [95% CI]", "init suffix recovered", "drift mean", "drift>0", "violation mean",
       "||suffix-init|| mean"],
      [[s["variant"], f"{s['recovered']}/{s['n']}",
        f"{s['recovered'] / s['n']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s["n"] else "-",
        f"{s['recovered_init']}/{s['n']}", f(s["drift_abs_mean"]), s["n_drift_nonzero"], f(s["violation_abs_mean"]),
        f(s["suffix_norm_mean"])] for s in summary])
