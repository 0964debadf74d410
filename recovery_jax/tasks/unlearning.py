"""Multiple-choice and cloze question tasks for output-level unlearning (paper-method section 4.1).

A question has a stem (``question``), four ``choices`` and the index of the correct one
(``answer``); ``stem`` is an optional cloze sentence whose next word is the answer. Formats:

  mc            the paper's prompt ``{question}\\n\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\n\\nAnswer:``,
                choices read as the letter tokens " A" .. " D"; all 24 choice orders
  cloze         ``{stem}``, choices read as the first tokens of " {choice}"; the prompt does not
                depend on the choice order, so there is one order (perm 0)
  cloze_listed  ``Options: {c0}, {c1}, {c2}, {c3}.\\n{stem}``: the choices listed in each of the 24
                orders before the stem, read as their first tokens (the order logic of ``mc`` for a
                model that cannot answer lettered questions)

Orders are ``itertools.permutations(range(4))`` (perm_id 0..23, the reference's order); in order
``perm`` position j shows choice ``perm[j]``, so the gold position is ``perm.index(answer)``.
``orders(fmt, which)`` picks the orders asked: all 24 (the paper's), the original and reversed
(``both``), or the original only.
Success is the argmax over the four choice tokens' logits at the last prompt token (not a positive
margin); the strict filter keeps a question only if the base model is correct in every order; a
valid flip is one (question, order) of a kept question with base correct and defended wrong.

Question files: JSONL (one object per line) or CSV (header row) with the fields
``question``, ``choices`` (JSONL: a list of 4 strings; CSV: columns ``A``, ``B``, ``C``, ``D``),
``answer`` (0-3 or a letter A-D), and optional ``id``, ``stem``, ``topic``. A bad row raises a
``UserError`` naming the file, the row (1-based line) and the field.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from typing import Sequence

import numpy as np

from recovery_jax import errors, rowfile

LETTERS = ("A", "B", "C", "D")
PERMUTATIONS = tuple(itertools.permutations(range(4)))  # 24 orders, perm_id = index
FORMATS = ("mc", "cloze", "cloze_listed")
ORDERS = ("all", "both", "original")  # task.orders (``orders``)
REVERSED = PERMUTATIONS.index((3, 2, 1, 0))  # 23
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_QUESTIONS = os.path.join(DATA_DIR, "unlearning_questions.jsonl")
DEFAULT_RETAIN = os.path.join(DATA_DIR, "retain_questions.jsonl")


@dataclasses.dataclass(frozen=True)
class Question:
  qid: str
  question: str
  choices: tuple[str, str, str, str]
  answer: int
  stem: str = ""
  topic: str = ""


# ----------------------------------------------------------------------------------------------
# files


def _answer_index(value, where: str) -> int:
  if isinstance(value, bool):
    value = None
  if isinstance(value, int) and 0 <= value < 4:
    return value
  if isinstance(value, str):
    v = value.strip()
    if v.upper() in LETTERS:
      return LETTERS.index(v.upper())
    if v in ("0", "1", "2", "3"):
      return int(v)
  raise errors.UserError(f"{where}: field 'answer'={value!r}: expected 0-3 or a letter A-D")


def _question(obj: dict, where: str, default_id: str) -> Question:
  for f in ("question", "choices", "answer"):
    if f not in obj:
      raise errors.UserError(f"{where}: missing field {f!r} (fields: question, choices, answer; optional id, stem, "
                             "topic)")
  q = obj["question"]
  if not isinstance(q, str) or not q.strip():
    raise errors.UserError(f"{where}: field 'question'={q!r}: expected a non-empty string")
  ch = obj["choices"]
  if not isinstance(ch, (list, tuple)) or len(ch) != 4 or not all(isinstance(c, str) and c.strip() for c in ch):
    raise errors.UserError(f"{where}: field 'choices'={ch!r}: expected a list of 4 non-empty strings")
  if len({c.strip() for c in ch}) != 4:
    raise errors.UserError(f"{where}: field 'choices'={ch!r}: the 4 choices must differ")
  stem = obj.get("stem", "") or ""
  if not isinstance(stem, str):
    raise errors.UserError(f"{where}: field 'stem'={stem!r}: expected a string")
  return Question(str(obj.get("id", "") or default_id), q.strip(), tuple(c.strip() for c in ch),
                  _answer_index(obj["answer"], where), stem.strip(), str(obj.get("topic", "") or ""))


def load_questions(path: str, *, max_rows: int = rowfile.MAX_ROWS) -> list[Question]:
  """Questions of a JSONL or CSV file (by extension; see the module docstring), streamed; a file of more
  than ``max_rows`` rows (0: no cap) is an error. Errors (not UTF-8, bad JSON, a missing field, no
  rows, duplicate ids) name the file and the 1-based row (line)."""
  if not os.path.exists(path):
    raise errors.UserError(f"question file {path!r} does not exist (a .jsonl or .csv file)")
  hint = f"use a question file of at most {max_rows} rows (e.g. its first {max_rows})"
  want = "one JSON object per line with fields question, choices, answer"
  out = []
  if path.endswith(".csv"):
    header, rows = rowfile.csv_rows(path, max_rows=max_rows, cap_hint=hint)
    need = {"question", "A", "B", "C", "D", "answer"}
    missing = need - set(header)
    if missing:
      raise errors.UserError(f"{path}, row 1 (header): missing column(s) {sorted(missing)}; expected question, A, B, "
                             "C, D, answer (optional id, stem, topic)")
    for i, row in rows:
      obj = {k: row[k] for k in ("question", "answer", "id", "stem", "topic") if row.get(k) is not None}
      obj["choices"] = [row.get(k) or "" for k in LETTERS]
      out.append(_question(obj, f"{path}, row {i}", f"row{i}"))
  elif path.endswith(".jsonl") or path.endswith(".json"):
    for i, obj in rowfile.jsonl_rows(path, expected=want, max_rows=max_rows, cap_hint=hint, unit="row"):
      if not isinstance(obj, dict):
        raise errors.UserError(f"{path}, row {i}: expected a JSON object, got {type(obj).__name__}")
      out.append(_question(obj, f"{path}, row {i}", f"row{i}"))
  else:
    raise errors.UserError(f"question file {path!r}: expected a .jsonl or .csv file")
  if not out:
    raise errors.UserError(f"question file {path!r} holds no questions (empty, or only blank lines / a header); "
                           f"expected {want if not path.endswith('.csv') else 'a header row and one question per row'}")
  dup = sorted(i for i, c in collections.Counter(q.qid for q in out).items() if c > 1)
  if dup:
    raise errors.UserError(f"question file {path!r}: duplicate id(s) {dup[:5]}")
  return out


# ----------------------------------------------------------------------------------------------
# prompts


def ordered(q: Question, perm: Sequence[int]) -> tuple[str, ...]:
  """The choices in order ``perm`` (position j shows choice perm[j])."""
  return tuple(q.choices[i] for i in perm)


def gold_position(q: Question, perm: Sequence[int]) -> int:
  """Where the correct choice sits in order ``perm`` (the reference's ``perm.index(gold)``)."""
  return tuple(perm).index(q.answer)


def mc_prompt(q: Question, perm: Sequence[int] = (0, 1, 2, 3)) -> str:
  """The paper's lettered prompt (paper-method 4.1)."""
  c = ordered(q, perm)
  return f"{q.question}\n\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\n\nAnswer:"


def prompt(q: Question, fmt: str, perm: Sequence[int] = (0, 1, 2, 3)) -> str:
  if fmt == "mc":
    return mc_prompt(q, perm)
  if not q.stem:
    raise errors.UserError(f"question {q.qid!r} has no 'stem': the {fmt} format needs one")
  if fmt == "cloze":
    return q.stem
  if fmt == "cloze_listed":
    return f"Options: {', '.join(ordered(q, perm))}.\n{q.stem}"
  raise errors.UserError(f"format {fmt!r}: expected one of {FORMATS}")


def orders(fmt: str, which: str = "all") -> tuple[int, ...]:
  """perm_ids a format asks each question in (``task.orders``):

    all       every order the format has: the 24 permutations for ``mc`` / ``cloze_listed`` (the
              paper's protocol, paper-method 4.1), perm 0 only for ``cloze`` (its prompt ignores the order)
    both      the original order and the reversed one (perm 0 = (0, 1, 2, 3), perm 23 = (3, 2, 1, 0)):
              every choice moves, the gold one to position 3 - answer
    original  perm 0 only

  The strict filter and the valid flips apply per (question, order) as in the paper: a question is
  kept when the base model is right in every order asked, a flip is one order where it is right and
  the defended model wrong. ``both`` is an error for ``cloze``, which shows no options.
  """
  if fmt not in FORMATS:
    raise errors.UserError(f"config field 'task.format'={fmt!r}: expected one of {FORMATS}")
  if which not in ORDERS:
    raise errors.UserError(f"config field 'task.orders'={which!r}: expected one of {ORDERS}")
  if fmt == "cloze":
    if which == "both":
      raise errors.UserError("config field 'task.orders'='both' with task.format='cloze': the cloze prompt shows no "
                             "options, so both orders are the same prompt and answer; use task.format=cloze_listed "
                             "(the options listed before the stem) to ask in both orders")
    return (0,)
  return {"all": tuple(range(len(PERMUTATIONS))), "both": (0, REVERSED), "original": (0,)}[which]


def order_name(perm_id: int) -> str:
  """The order as the original choice indices shown at positions A..D, e.g. perm 23 -> "3210"."""
  return "".join(str(i) for i in PERMUTATIONS[perm_id])


def first_token(tokenizer, text: str) -> int:
  return tokenizer.encode(" " + text, add_special_tokens=False).ids[0]


def letter_ids(tokenizer) -> tuple[int, ...]:
  """Token ids of " A" .. " D" (each must be one token)."""
  out = []
  for l in LETTERS:
    ids = tokenizer.encode(" " + l, add_special_tokens=False).ids
    if len(ids) != 1:
      raise errors.UserError(f"the tokenizer splits {' ' + l!r} into {len(ids)} tokens; the mc format needs one")
    out.append(ids[0])
  return tuple(out)


def cloze_conflicts(tokenizer, questions: Sequence[Question]) -> list[str]:
  """One line per question whose choices' first tokens are not distinct (they cannot be told apart
  by the argmax over first tokens), naming the question and the clashing choices."""
  out = []
  for q in questions:
    ids = [first_token(tokenizer, c) for c in q.choices]
    if len(set(ids)) < 4:
      clash = [f"{c!r}->{tokenizer.decode([i])!r}" for c, i in zip(q.choices, ids) if ids.count(i) > 1]
      out.append(f"question {q.qid!r}: choices share a first token: {', '.join(clash)}")
  return out


def choice_ids(tokenizer, q: Question, fmt: str, perm: Sequence[int]) -> tuple[int, ...]:
  """The four token ids read at the readout, in display order."""
  if fmt == "mc":
    return letter_ids(tokenizer)
  return tuple(first_token(tokenizer, c) for c in ordered(q, perm))


@dataclasses.dataclass(frozen=True)
class ChoiceBatch:
  """Left-padded prompts (readout at the last column) of every (question, order).

  tokens / attention_mask [n, T]; choices [n, 4] token ids in display order; gold [n] index into
  choices; question [n] index into the question list; perm_id [n]; texts: the prompts.
  """

  tokens: np.ndarray
  attention_mask: np.ndarray
  choices: np.ndarray
  gold: np.ndarray
  question: np.ndarray
  perm_id: np.ndarray
  texts: tuple[str, ...]

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def take(self, idx) -> "ChoiceBatch":
    idx = np.asarray(idx, int)
    return ChoiceBatch(self.tokens[idx], self.attention_mask[idx], self.choices[idx], self.gold[idx],
                       self.question[idx], self.perm_id[idx], tuple(self.texts[i] for i in idx))


def build_batch(tokenizer, questions: Sequence[Question], fmt: str, *, bos_id: int | None = None, pad_id: int = 0,
                perm_ids: Sequence[int] | None = None) -> ChoiceBatch:
  """Every question in every order of ``fmt`` (or ``perm_ids``), question-major."""
  perm_ids = orders(fmt) if perm_ids is None else tuple(perm_ids)
  if fmt != "mc":
    bad = cloze_conflicts(tokenizer, questions)
    if bad:
      raise errors.UserError(f"{len(bad)} question(s) cannot be scored in the {fmt} format:\n  " + "\n  ".join(bad))
  rows, ch, gold, qi, pi, texts = [], [], [], [], [], []
  for i, q in enumerate(questions):
    for p in perm_ids:
      perm = PERMUTATIONS[p]
      text = prompt(q, fmt, perm)
      ids = tokenizer.encode(text, add_special_tokens=False).ids
      rows.append(([bos_id] if bos_id is not None else []) + ids)
      ch.append(choice_ids(tokenizer, q, fmt, perm))
      gold.append(gold_position(q, perm))
      qi.append(i)
      pi.append(p)
      texts.append(text)
  t = max(len(r) for r in rows)
  tokens = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for j, r in enumerate(rows):
    tokens[j, t - len(r):] = r
    mask[j, t - len(r):] = 1
  return ChoiceBatch(tokens, mask, np.asarray(ch, np.int32), np.asarray(gold, np.int32), np.asarray(qi, np.int32),
                     np.asarray(pi, np.int32), tuple(texts))


# ----------------------------------------------------------------------------------------------
# behaviour


def choice_logits(logits: np.ndarray, choices: np.ndarray) -> np.ndarray:
  """logits [n, V] at the readout, choices [n, 4] -> [n, 4]."""
  return np.take_along_axis(np.asarray(logits), np.asarray(choices), axis=-1)


def predicted(cl: np.ndarray) -> np.ndarray:
  """Argmax over the four choice logits [..., 4] -> [...] (first index on ties, like torch.argmax)."""
  return np.argmax(np.asarray(cl), axis=-1)


def correct(cl: np.ndarray, gold: np.ndarray) -> np.ndarray:
  """Success by argmax: [..., 4], [...] -> bool [...]."""
  return predicted(cl) == np.asarray(gold)


def margin(cl: np.ndarray, gold: np.ndarray) -> np.ndarray:
  """The recovery objective ``choice_margin``: l[gold] - mean(other three) -> [...]. Its sign is *not*
  the success criterion (gold can trail one choice while beating the mean of three)."""
  cl = np.asarray(cl, np.float64)
  gold = np.broadcast_to(np.asarray(gold), cl.shape[:-1])
  g = np.take_along_axis(cl, gold[..., None], axis=-1)[..., 0]
  return g - (cl.sum(-1) - g) / (cl.shape[-1] - 1)


def argmax_margin(cl: np.ndarray, gold: np.ndarray) -> np.ndarray:
  """l[gold] - max(other choices): > 0 exactly when the argmax is gold (ties count as wrong)."""
  cl = np.asarray(cl, np.float64)
  gold = np.broadcast_to(np.asarray(gold), cl.shape[:-1])
  g = np.take_along_axis(cl, gold[..., None], axis=-1)[..., 0]
  others = np.where(np.arange(cl.shape[-1]) == gold[..., None], -np.inf, cl)
  return g - others.max(-1)


def strict_filter(ok: np.ndarray, question: np.ndarray, n_questions: int) -> np.ndarray:
  """bool [n_questions]: the base model is correct in every order of the question (``ok`` [n] per
  (question, order) example, ``question`` [n] its question index); questions without examples fail."""
  ok, question = np.asarray(ok, bool), np.asarray(question)
  seen = np.bincount(question, minlength=n_questions)
  good = np.bincount(question, weights=ok.astype(float), minlength=n_questions)
  return (seen > 0) & (good == seen)


def valid_flips(base_ok: np.ndarray, defended_ok: np.ndarray, question: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
  """bool [n]: base correct, defended wrong, and (when ``kept`` [n_questions] is given: the strict
  protocol) the question passes the strict filter."""
  v = np.asarray(base_ok, bool) & ~np.asarray(defended_ok, bool)
  if kept is not None:
    v &= np.asarray(kept, bool)[np.asarray(question)]
  return v
