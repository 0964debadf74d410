"""Indirect-object identification prompts in the Easy-Transformer style, for any tokenizer.

A prompt ends just before the indirect object: "Then, Mary and John went to the store. John gave a
book to" -> IO " Mary", S " John". BABA templates name S first; ABBA templates name IO first. Names,
places and objects are kept only if they are single tokens (with their leading space) for the
model's tokenizer, so every prompt of one template has the same length. Batches are left-padded,
so the readout ("end") position is the last one for every row.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np

NAMES = (
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Lisa", "Michael", "Anna", "Paul",
    "Laura", "Mark", "Kate", "Tom", "Rachel", "Daniel", "Emily", "Chris", "Helen", "Peter", "Susan", "Jack",
    "Linda", "George", "Karen", "Steve", "Amy", "Kevin", "Julia", "Frank", "Grace", "Henry", "Lucy", "Adam",
    "Jessica", "Ryan", "Nancy", "Brian",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "station", "park", "library",
          "market", "beach", "museum")
OBJECTS = ("ring", "book", "ball", "computer", "necklace", "drink", "snack", "bottle", "letter", "basket",
           "pen", "flower")

# [A] = indirect object, [B] = subject; the prompt stops before the final " [A]".
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
)
ABBA_TEMPLATES = tuple(t.replace("[B] and [A]", "[A] and [B]", 1) for t in BABA_TEMPLATES)


@dataclasses.dataclass(frozen=True)
class IOIBatch:
  """Token batch and readout targets.

  tokens, attention_mask: [n, seq] (left-padded); io_ids, s_ids: [n]; the readout is position seq-1.
  """

  tokens: np.ndarray
  attention_mask: np.ndarray
  io_ids: np.ndarray
  s_ids: np.ndarray
  texts: tuple[str, ...]
  templates: tuple[str, ...]

  @property
  def readout_pos(self) -> int:
    return self.tokens.shape[1] - 1

  def __len__(self) -> int:
    return self.tokens.shape[0]


def single_token_words(tokenizer, words: Sequence[str]) -> list[tuple[str, int]]:
  """Words whose space-prefixed form is one token: [(word, id)]."""
  out = []
  for w in words:
    ids = tokenizer.encode(" " + w, add_special_tokens=False).ids
    if len(ids) == 1:
      out.append((w, ids[0]))
  return out


def make_ioi_batch(tokenizer, n: int, *, seed: int = 0, prompt_type: str = "mixed", nb_templates: int | None = None,
                   bos_id: int | None = None, pad_id: int = 0) -> IOIBatch:
  """``n`` seeded IOI prompts. ``prompt_type`` is BABA, ABBA or mixed (alternating).

  ``nb_templates`` limits the templates used (the reference's IOI uses 1 BABA template).
  """
  if prompt_type not in ("BABA", "ABBA", "mixed"):
    raise ValueError(f"prompt_type={prompt_type!r}: expected BABA, ABBA or mixed")
  names = single_token_words(tokenizer, NAMES)
  places = [w for w, _ in single_token_words(tokenizer, PLACES)]
  objects = [w for w, _ in single_token_words(tokenizer, OBJECTS)]
  if len(names) < 2 or not places or not objects:
    raise ValueError(f"the tokenizer has too few single-token names ({len(names)}), places ({len(places)}) or "
                     f"objects ({len(objects)}) for IOI prompts")
  k = nb_templates or len(BABA_TEMPLATES)
  if not 0 < k <= len(BABA_TEMPLATES):
    raise ValueError(f"nb_templates={nb_templates}: expected 1..{len(BABA_TEMPLATES)}")
  rng = random.Random(seed)
  texts, io_ids, s_ids, used = [], [], [], []
  for i in range(n):
    kind = prompt_type if prompt_type != "mixed" else ("BABA" if i % 2 == 0 else "ABBA")
    template = (BABA_TEMPLATES if kind == "BABA" else ABBA_TEMPLATES)[rng.randrange(k)]
    (a, a_id), (b, b_id) = rng.sample(names, 2)
    text = (template.replace("[A]", a).replace("[B]", b).replace("[PLACE]", rng.choice(places))
            .replace("[OBJECT]", rng.choice(objects)))
    texts.append(text)
    io_ids.append(a_id)
    s_ids.append(b_id)
    used.append(kind)
  rows = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
  if bos_id is not None:
    rows = [[bos_id] + r for r in rows]
  t = max(len(r) for r in rows)
  tokens = np.full((n, t), pad_id, np.int32)
  mask = np.zeros((n, t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return IOIBatch(tokens, mask, np.asarray(io_ids, np.int32), np.asarray(s_ids, np.int32), tuple(texts), tuple(used))


def logit_diff(logits, io_ids, s_ids):
  """logit[IO] - logit[S] at the readout: logits [n, vocab] -> [n]."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rows = jnp.arange(logits.shape[0])
  return logits[rows, io_ids] - logits[rows, s_ids]


def problems(batch: IOIBatch, variant: str):
  """Stacked engine problems with the delta, readout and monitor at the last column:
  ``shared`` -> 1 problem of n rows (the reference's one delta for all prompts); ``per_prompt`` ->
  n problems of 1 row (``recovery.api.site_problems``)."""
  from recovery_jax.recovery import api  # pylint: disable=import-outside-toplevel
  end = batch.tokens.shape[1] - 1
  return api.site_problems(batch.tokens, batch.attention_mask, end, end, {"pos": batch.io_ids, "neg": batch.s_ids},
                           shared=variant == "shared")
