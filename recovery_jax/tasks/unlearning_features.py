"""Unlearning features by the SAEBench rule (paper-method 4.1, SAEBench ``get_top_features``).

Each SAE feature's *firing frequency* (fraction of tokens with z > 0; BOS and padding excluded) is
measured on a forget corpus and on a retain corpus. Features with retain frequency >=
``retain_threshold`` get forget score 0; the rest are sorted by forget frequency (descending, ties
by index), zero scores dropped, and the first ``n_features`` kept.

Corpora (offline; ``corpus_texts``), each a tuple of source names:

  questions         the forget question file as text: "{question} {answer}." and "{stem} {answer}."
  topic_glosses     WordNet glosses (``<corpus_dir>/wordnet``) that mention a gold answer of the forget
                    questions or a topic word (``TOPIC_WORDS``): text around the forgotten facts
  retain_questions  the retain question file as text (general everyday facts)
  python_doc, shakespeare, fortunes, wordnet, stdlib
                    general text from ``recovery_jax.data.corpus`` folders under ``corpus_dir``

The embedded default: forget = questions + topic_glosses, retain = shakespeare + fortunes +
python_doc + retain_questions (general text that is not about science or geography facts).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching, errors
from recovery_jax.data import corpus as corpus_lib
from recovery_jax.models import sites as sites_lib
from recovery_jax.models import transformer
from recovery_jax.sae import core as sae_core
from recovery_jax.tasks import unlearning as ul

CORPUS_SOURCES = ("python_doc", "shakespeare", "fortunes", "wordnet", "stdlib")
TEXT_SOURCES = ("questions", "topic_glosses", "retain_questions") + CORPUS_SOURCES
TOPIC_WORDS = ("chemical", "element", "planet", "capital", "continent", "ocean", "river", "mountain", "organ",
               "physics", "unit of", "mammal", "photosynthesis", "atmosphere")


def question_texts(questions: Sequence[ul.Question]) -> list[str]:
  """Declarative sentences of the facts: "{question} {answer}." and "{stem} {answer}."."""
  out = []
  for q in questions:
    a = q.choices[q.answer]
    out.append(f"{q.question} {a}.")
    if q.stem:
      out.append(f"{q.stem} {a}.")
  return out


def topic_glosses(questions: Sequence[ul.Question], wordnet_dir: str, max_docs: int) -> list[str]:
  """WordNet glosses mentioning a gold answer (whole word, case-sensitive for capitalised answers)
  or a topic word, in file order, at most ``max_docs``."""
  answers = sorted({q.choices[q.answer] for q in questions if len(q.choices[q.answer]) > 2})
  pat = re.compile(r"\b(" + "|".join(map(re.escape, answers + list(TOPIC_WORDS))) + r")\b")
  out = []
  for f in corpus_lib.list_text_files(wordnet_dir):
    with open(f, encoding="utf-8", errors="replace") as fh:
      for line in fh:
        if pat.search(line):
          out.append(line.strip())
          if len(out) >= max_docs:
            return out
  return out


def corpus_texts(sources: Sequence[str], *, questions: Sequence[ul.Question], retain: Sequence[ul.Question],
                 corpus_dir: str, max_docs: int, max_chars: int = 600, field: str = "features") -> list[str]:
  """Texts of the named sources (module docstring), at most ``max_docs`` per source."""
  out = []
  for s in sources:
    if s not in TEXT_SOURCES:
      raise errors.UserError(f"config field '{field}' has {s!r}: expected one of {TEXT_SOURCES}")
    if s == "questions":
      texts = question_texts(questions)
    elif s == "retain_questions":
      texts = question_texts(retain)
    else:
      path = os.path.join(corpus_dir, "wordnet" if s == "topic_glosses" else s)
      if not os.path.isdir(path):
        raise errors.UserError(f"config field '{field}' has {s!r} but {path!r} does not exist; build the offline "
                               "corpus with `python -m recovery_jax.data.corpus --out .cache/corpus` or set "
                               "'features.corpus_dir'")
      if s == "topic_glosses":
        texts = topic_glosses(questions, path, max_docs)
      else:
        texts = []
        for d in corpus_lib.iter_documents(corpus_lib.list_text_files(path), max_chars=max_chars):
          texts.append(d)
          if len(texts) >= max_docs:
            break
    out += texts[:max_docs]
  return out


def tokenize(tokenizer, texts: Sequence[str], seq_len: int, *, bos_id: int | None, pad_id: int):
  """Right-padded token rows [n, seq_len] (truncated) and a mask of the counted tokens (BOS and
  padding excluded)."""
  n = len(texts)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  count = np.zeros((n, seq_len), bool)
  attn = np.zeros((n, seq_len), np.int32)
  for i, t in enumerate(texts):
    ids = tokenizer.encode(t, add_special_tokens=False).ids
    row = ([bos_id] if bos_id is not None else []) + ids
    row = row[:seq_len]
    tokens[i, :len(row)] = row
    attn[i, :len(row)] = 1
    count[i, (1 if bos_id is not None else 0):len(row)] = True
  return tokens, attn, count


def firing_frequency(params, model_cfg, sae, sae_cfg, site: str, tokens, attention_mask, count_mask,
                     batch_size: int = 16) -> np.ndarray:
  """Fraction of counted tokens on which each SAE feature fires (z > 0) at ``site``: [d_sae]."""
  layer = sites_lib.parse_site(site, model_cfg.n_layers).layer

  @jax.jit
  def counts(params, sae, tok, attn, cnt):  # [b, d_sae]: each row's counted tokens where each feature fires
    out = transformer.forward(params, model_cfg, tok, attention_mask=attn, stop_layer=layer + 1, capture=(site,),
                              compute_logits=False)
    z = sae_core.encode(sae, sae_cfg, out.captures[site].astype(jnp.float32))
    return jnp.sum((z > 0) & cnt[..., None], axis=1)

  per_row = batching.map_batched(lambda b, _: counts(params, sae, *b), (tokens, attention_mask, count_mask),
                                 batch_size)
  return per_row.sum(0, dtype=np.float64) / max(int(np.asarray(count_mask).sum()), 1)


def top_features(forget_freq: np.ndarray, retain_freq: np.ndarray, retain_threshold: float, n_features: int
                 ) -> np.ndarray:
  """The SAEBench rule: zero the forget score where retain >= threshold, sort descending (stable),
  keep non-zero scores, first ``n_features``. May return fewer than ``n_features``."""
  score = np.where(np.asarray(retain_freq) >= retain_threshold, 0.0, np.asarray(forget_freq, np.float64))
  order = np.argsort(-score, kind="stable")
  order = order[score[order] > 0]
  return order[:n_features].astype(np.int32)
