"""Refusal task: instruction prompts, chat formatting and the answer text (paper-method section 6.1).

The repository ships only benign everyday instructions (``data/refusal_prompts.jsonl``); a researcher
points ``task.prompts_file`` at their own JSONL or CSV file (AdvBench or HarmBench rows, say) for the
paper's setting. A row's instruction is read from the first present field of ``INSTRUCTION_FIELDS``
(``instruction``, ``goal`` (AdvBench), ``prompt``, ``behavior`` (HarmBench)); a JSONL line may also
be a bare JSON string. A bad row raises ``errors.UserError`` naming the file and line.

Prompts are the model's own chat template (``models.chat``): SmolLM2's ChatML (with its default
system turn unless ``system`` is given) or Gemma's turns, ending with the generation prompt, so the
last prompt token is the ``anchor`` (``prompt_len - 1``) of the paper.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from recovery_jax import errors, rowfile
from recovery_jax.models import chat

INSTRUCTION_FIELDS = ("instruction", "goal", "prompt", "behavior")
SHIPPED_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                               "refusal_prompts.jsonl")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction: its text, an id (from the file, or ``{file}:{line}``) and where it came from."""

  text: str
  id: str
  source: str


def _pick(row: dict, where: str) -> str:
  for f in INSTRUCTION_FIELDS:
    if f in row:
      v = row[f]
      if not isinstance(v, str) or not v.strip():
        raise errors.UserError(f"{where}: field {f!r} is {v!r}; expected a non-empty string")
      return v.strip()
  raise errors.UserError(f"{where}: none of the fields {INSTRUCTION_FIELDS} is present (fields: {sorted(row)})")


def load_prompts(path: str = "", limit: int = 0, *, max_rows: int = rowfile.MAX_ROWS) -> list[Instruction]:
  """Instructions from a JSONL or CSV file (``""``: the shipped benign file); the first ``limit`` if > 0.

  JSONL: one JSON object (or string) per non-blank line. CSV: a header row naming one of
  ``INSTRUCTION_FIELDS``. The file is streamed: reading stops after ``limit`` rows, and a file of more
  than ``max_rows`` rows (0: no cap) is an error. Errors (not UTF-8, bad JSON, a missing field, no
  rows) name the file and the 1-based line.
  """
  path = path or SHIPPED_PROMPTS
  if not os.path.exists(path):
    raise errors.UserError(f"config field 'task.prompts_file': {path!r} does not exist (a .jsonl or .csv file)")
  ext = os.path.splitext(path)[1].lower()
  hint = (f"take the first N rows with config field 'task.n_prompts' (N <= {max_rows}), or use a file of at most "
          f"{max_rows} rows")
  want = f"one JSON object per line with a field {' / '.join(INSTRUCTION_FIELDS)}"
  out: list[Instruction] = []
  if ext in (".jsonl", ".json"):
    for n, row in rowfile.jsonl_rows(path, expected=want, max_rows=max_rows, cap_hint=hint):
      where = f"{path}, line {n}"
      if isinstance(row, str):
        row = {"instruction": row}
      if not isinstance(row, dict):
        raise errors.UserError(f"{where}: a JSON {type(row).__name__}; expected an object with an instruction field")
      out.append(Instruction(_pick(row, where), str(row.get("id", f"{os.path.basename(path)}:{n}")), path))
      if 0 < limit <= len(out):
        break
  elif ext == ".csv":
    header, rows = rowfile.csv_rows(path, max_rows=max_rows, cap_hint=hint)
    if not header or not set(INSTRUCTION_FIELDS) & set(header):
      raise errors.UserError(f"{path}, line 1: the header {header} names none of {INSTRUCTION_FIELDS}; expected a "
                             "header row naming the instruction column")
    for n, row in rows:
      out.append(Instruction(_pick(row, f"{path}, line {n}"), str(row.get("id") or f"{os.path.basename(path)}:{n}"),
                             path))
      if 0 < limit <= len(out):
        break
  else:
    raise errors.UserError(f"config field 'task.prompts_file': {path!r} has extension {ext!r}; expected .jsonl or .csv")
  if not out:
    raise errors.UserError(f"{path}: no instructions (the file is empty or holds only blank lines); expected "
                           + (want if ext != ".csv" else "a header row and one instruction per row"))
  return out


def format_prompt(model: str, instruction: str, system: str | None = None) -> str:
  """The chat prompt for one user instruction, ending with the assistant's generation prompt.

  ``model`` names the template (``chat.template_for``); ``system`` replaces SmolLM2's default system
  turn (for Gemma it is prepended to the user turn, as Gemma's template does).
  """
  messages = ([{"role": "system", "content": system}] if system is not None else [])
  messages.append({"role": "user", "content": instruction})
  return chat.apply_chat_template(model, messages)


def template_name(model_cfg) -> str:
  """Chat template for a loaded model: Gemma turns for the gemma families, ChatML otherwise (the tiny
  random models use the SmolLM2 tokenizer)."""
  return "gemma" if model_cfg.is_gemma else "chatml"


def encode_prompts(tok, texts: Sequence[str], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-padded ids [B, T], mask [B, T] and prompt lengths [B] of chat-formatted prompts (no special
  tokens added: the templates carry their own)."""
  rows = [tok.encode(t, add_special_tokens=False).ids for t in texts]
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask, np.asarray([len(r) for r in rows], np.int32)


def answer_text(tok, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
  """Decoded answer of generated ids, cut before the first stop id, without special-token skipping
  (the reference decodes with ``skip_special_tokens=False``), then stripped."""
  ids = [int(i) for i in ids]
  for j, i in enumerate(ids):
    if i in stop_ids:
      ids = ids[:j]
      break
  return tok.decode(ids, skip_special_tokens=False).strip()
