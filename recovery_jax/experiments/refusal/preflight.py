"""Refusal preflight: batched greedy generation (base, defended, with recovered deltas) and the
detector labels of each prompt (paper-method 6.1).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching, errors, outputs, profile
from recovery_jax.models import generate
from recovery_jax.tasks import refusal as task
from recovery_jax.tasks import refusal_defence as defence_lib
from recovery_jax.tasks import refusal_judge as judge


def _defence_edits(args) -> dict:
  """Static edit builder: the defence alone (``args = (defence, rows)``)."""
  return defence_lib.edits(args[0])


@profile.timed("generation", inside={"load": "preflight"})  # while preparing: the preflight
def generate_rows(params, mcfg, ids: np.ndarray, mask: np.ndarray, *, defence=None, rows=None, make_edits=None,
                  max_new_tokens: int, batch_size: int, stop_ids: tuple[int, ...], pad_id: int, mesh=None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Greedy generation of left-padded prompts ids/mask [N, T] in batches of ``batch_size`` ->
  (tokens [N, max_new_tokens], lengths [N]).

  defence: the defence edits (None: the base model); rows: a pytree of per-prompt edit arrays [N, ...]
  (recovered deltas) handed with the defence to ``make_edits((defence, rows))``, a static builder.
  Batches of ``batching.map_batched`` (the last padded, the padding dropped): one program serves every batch.
  """
  n_pos = int(getattr(mcfg, "n_positions", 0) or 0)
  longest = int(np.asarray(mask).sum(-1).max()) if len(mask) else 0
  if n_pos and longest + max_new_tokens > n_pos:
    raise errors.UserError(f"prompt {int(np.asarray(mask).sum(-1).argmax())} has {longest} tokens and generation adds "
                           f"up to {max_new_tokens} (config field 'generation.max_new_tokens'): more than the model's "
                           f"context of {n_pos} positions; shorten the prompt or generate fewer tokens")
  if defence is not None and make_edits is None:
    make_edits = _defence_edits
  kw = dict(max_new_tokens=max_new_tokens, stop_tokens=stop_ids, pad_id=pad_id)

  def one_batch(batch, _):
    b_ids, b_mask, b_rows = batch
    if make_edits is None:
      g = generate.generate_jit(params, mcfg, b_ids, b_mask, **kw)
    else:
      b_rows = None if b_rows is None else jax.tree.map(jnp.asarray, b_rows)
      g = generate.generate_jit(params, mcfg, b_ids, b_mask, edit_args=(defence, b_rows), make_edits=make_edits, **kw)
    return g.tokens, g.lengths

  toks, lens = batching.map_batched(one_batch, (ids, mask, rows), batch_size, mesh=mesh)
  return toks, lens.astype(np.int32)


def answer_ids(tokens: np.ndarray, length: int, stop_ids: Sequence[int]) -> list[int]:
  """Generated ids of one row before the first stop id."""
  out = []
  for t in np.asarray(tokens)[:length].tolist():
    if t in stop_ids:
      break
    out.append(int(t))
  return out


def generate_answers(params, mcfg, tok, prompts: Sequence[str], defence, *, max_new_tokens: int, batch_size: int,
                     stop_ids: tuple[int, ...], pad_id: int, mesh=None) -> tuple[list[str], np.ndarray, list[list[int]]]:
  """Greedy answers (texts, generated token counts [N], answer ids before the stop id) of chat
  prompts, batched; ``defence`` None for the base model. Every batch is left-padded to the longest
  prompt, so one program serves all batches and every defence value."""
  ids, mask, _ = task.encode_prompts(tok, prompts, pad_id)
  toks, lens = generate_rows(params, mcfg, ids, mask, defence=defence, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh)
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


def _table(counts: dict[float, dict]) -> str:
  head = ["value", "prompts", "base R", "base S", "defended R_eff", "valid", "valid: substring", "valid: safety cue",
          "valid: negative/degenerate"]
  return outputs.format_table(head, [[f"{v:g}", c["n"], c["base_refusal"], c["base_safety_cue"], c["defended_r_eff"],
                                      c["valid"], c["valid_" + judge.SUBSTRING], c["valid_" + judge.SAFETY_CUE],
                                      c["valid_" + judge.NEGATIVE]] for v, c in counts.items()])

