"""TPP task data: topic classes from the offline corpora or SAEBench-format files, and cached
activations at the SAE site (paper-method 3.2).

A ``ClassData`` holds token contexts (<= ``context_len`` tokens, BOS first where the model wants
one, right-padded), an integer class label per context and a seeded train/test split. Two sources:

* ``corpus_classes``: one class per offline corpus folder (``python_doc``, ``stdlib``,
  ``shakespeare``, ``fortunes``, ``wordnet`` under ``.cache/corpus``; see
  ``recovery_jax.data.corpus``). Contexts are consecutive token windows of one document; each
  document goes to train or test as a whole (seeded), so no document is split across the two.
* ``load_saebench_file``: rows of a SAEBench-format file (``.jsonl``, ``.json`` list or ``.csv``)
  with a text field and a label field (``bias_in_bios``: ``hard_text`` / ``profession``, integer
  labels named by ``BIAS_IN_BIOS_PROFESSIONS``; ``amazon_reviews``: ``text`` / ``category``).
  Bad rows end with an error naming the file, the row and the field.

``site_activations`` runs one truncated forward (up to the site) per batch; ``pool_mask`` marks the
tokens SAEBench mean-pools over (BOS, pad and EOS ids excluded).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import NamedTuple, Sequence

import numpy as np

from recovery_jax import batching, errors, rowfile
from recovery_jax.data import corpus as corpus_lib
from recovery_jax.sae import harvest

CORPUS_CLASSES = ("python_doc", "stdlib", "shakespeare", "fortunes", "wordnet")

# The 28 professions of bias_in_bios in label order (SAEBench ``dataset_info.profession_dict``).
BIAS_IN_BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian", "dj",
    "filmmaker", "interior_designer", "journalist", "model", "nurse", "painter", "paralegal", "pastor",
    "personal_trainer", "photographer", "physician", "poet", "professor", "psychologist", "rapper",
    "software_engineer", "surgeon", "teacher", "yoga_teacher")


class ClassData(NamedTuple):
  """tokens [n, T] int32; labels [n] int32 (index into class_names); test [n] bool; class_names;
  name (the dataset's name in summaries); sources [n] str (file the context came from)."""

  tokens: np.ndarray
  labels: np.ndarray
  test: np.ndarray
  class_names: tuple[str, ...]
  name: str
  sources: tuple[str, ...]


def _rng(seed: int, name: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _window(ids: Sequence[int], context_len: int, bos_id: int | None, pad_id: int) -> np.ndarray:
  w = ([bos_id] if bos_id is not None else []) + list(ids)
  return np.asarray(w + [pad_id] * (context_len - len(w)), np.int32)


def corpus_classes(corpus_root: str, classes: Sequence[str], tokenizer, *, context_len: int = 128, n_train: int,
                   n_test: int, seed: int = 0, bos_id: int | None, pad_id: int, min_tokens: int = 32,
                   max_chars: int = 2000, name: str = "corpus_topics") -> ClassData:
  """``n_train + n_test`` contexts per class, one class per folder ``corpus_root/<class>``.

  Files are shuffled per class (seeded); each document is cut into windows of ``context_len``
  tokens (BOS included), windows shorter than ``min_tokens`` are dropped; a document goes to the test
  split with probability n_test / (n_train + n_test) until that split is full.
  """
  if len(classes) < 2:
    raise errors.UserError(f"config field 'task.classes'={tuple(classes)}: TPP needs at least 2 classes")
  body = context_len - (1 if bos_id is not None else 0)
  toks, labels, test, srcs = [], [], [], []
  for c, cls in enumerate(classes):
    folder = os.path.join(corpus_root, cls)
    try:
      files = corpus_lib.list_text_files(folder)
    except FileNotFoundError as e:
      raise errors.UserError(f"config field 'task.classes': class {cls!r}: {e} (build the offline corpus with "
                             "`python -m recovery_jax.data.corpus --out .cache/corpus`)") from e
    rng = _rng(seed, cls)
    rng.shuffle(files)
    want = {False: n_train, True: n_test}
    got = {False: [], True: []}
    p_test = n_test / max(n_train + n_test, 1)
    docs = corpus_lib.iter_documents(files, max_chars)
    chunk = []
    for doc in docs:
      chunk.append(doc)
      if len(chunk) < 64:
        continue
      _cut(chunk, tokenizer, body, min_tokens, rng, p_test, want, got)
      chunk = []
      if all(len(got[k]) >= want[k] for k in got):
        break
    if chunk:
      _cut(chunk, tokenizer, body, min_tokens, rng, p_test, want, got)
    for is_test in (False, True):
      if len(got[is_test]) < want[is_test]:
        raise errors.UserError(f"{folder}: {len(got[is_test])} {'test' if is_test else 'train'} contexts of >= "
                               f"{min_tokens} tokens, need {want[is_test]} (task.n_train / task.n_test)")
      for ids in got[is_test][:want[is_test]]:
        toks.append(_window(ids, context_len, bos_id, pad_id))
        labels.append(c)
        test.append(is_test)
        srcs.append(folder)
  return ClassData(np.stack(toks), np.asarray(labels, np.int32), np.asarray(test, bool), tuple(classes), name,
                   tuple(srcs))


def _cut(docs, tokenizer, body, min_tokens, rng, p_test, want, got) -> None:
  for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
    is_test = bool(rng.random() < p_test)
    if len(got[is_test]) >= want[is_test]:
      is_test = not is_test
      if len(got[is_test]) >= want[is_test]:
        continue
    ids = enc.ids
    for s in range(0, len(ids), body):
      w = ids[s:s + body]
      if len(w) >= min_tokens:
        got[is_test].append(w)


# ----------------------------------------------------------------------------------------------
# SAEBench-format files


def _read_rows(path: str) -> list[tuple[int, dict]]:
  """(line number, row dict) of a .jsonl / .json / .csv file, streamed (a progress record every
  ``rowfile.PROGRESS_EVERY`` rows: every row is needed for the per-class split); errors (not UTF-8,
  bad JSON) name the file and line."""
  if not os.path.exists(path):
    raise errors.UserError(f"config field 'task.data_file': {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    return list(rowfile.jsonl_rows(path, expected="one JSON object per line", max_rows=0))
  if ext == ".json":
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw[:e.start].count(b"\n") + 1
      raise errors.UserError(f"{path}, line {line}: not UTF-8 text (byte "
                             f"0x{raw[e.start]:02x}); expected a UTF-8 file (re-save it as UTF-8)") from e
    try:
      data = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
      raise errors.UserError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data, 1))
  if ext == ".csv":
    return list(rowfile.csv_rows(path, max_rows=0)[1])
  raise errors.UserError(f"config field 'task.data_file': {path!r}: expected a .jsonl, .json or .csv file")


def _label_name(value, label_names: Sequence[str] | None):
  if label_names is None:
    return str(value)
  try:
    i = int(value)
  except (TypeError, ValueError):
    return None
  return label_names[i] if 0 <= i < len(label_names) else None


def load_saebench_file(path: str, tokenizer, *, classes: Sequence[str], text_field: str, label_field: str,
                       context_len: int = 128, n_train: int, n_test: int, seed: int = 0, bos_id: int | None,
                       pad_id: int, label_names: Sequence[str] | None = None, name: str = "") -> ClassData:
  """Rows of a SAEBench-format file as ``ClassData`` (texts truncated to ``context_len`` tokens).

  label_names: integer labels -> class names (``BIAS_IN_BIOS_PROFESSIONS``); None: labels are the
  names. Per class, the rows are shuffled (seeded) and split into n_train + n_test.
  """
  rows = _read_rows(path)
  if not rows:
    raise errors.UserError(f"{path}: no rows (the file is empty or holds only blank lines / a header); expected rows "
                           f"with fields {text_field!r} and {label_field!r}")
  by_class: dict[str, list[str]] = {c: [] for c in classes}
  for line, r in rows:
    where = f"{path}: row at line {line}" if path.endswith((".jsonl", ".csv")) else f"{path}: row {line}"
    if not isinstance(r, dict):
      raise errors.UserError(f"{where}: expected an object with fields {text_field!r} and {label_field!r}, "
                             f"got {type(r).__name__}")
    for fld in (text_field, label_field):
      if fld not in r:
        raise errors.UserError(f"{where}: no field {fld!r} (fields: {sorted(r)}; set task.text_field / "
                               "task.label_field)")
    text, label = r[text_field], r[label_field]
    if not isinstance(text, str) or not text.strip():
      raise errors.UserError(f"{where}: field {text_field!r} = {text!r}: expected non-empty text")
    cls = _label_name(label, label_names)
    if cls is None:
      raise errors.UserError(f"{where}: field {label_field!r} = {label!r}: expected an integer label in "
                             f"[0, {len(label_names)})")
    if cls in by_class:
      by_class[cls].append(text)
  body = context_len - (1 if bos_id is not None else 0)
  toks, labels, test = [], [], []
  for c, cls in enumerate(classes):
    texts = by_class[cls]
    if len(texts) < n_train + n_test:
      raise errors.UserError(f"{path}: class {cls!r} (field {label_field!r}) has {len(texts)} rows, need "
                             f"n_train + n_test = {n_train + n_test}")
    order = _rng(seed, cls).permutation(len(texts))[:n_train + n_test]
    encs = tokenizer.encode_batch([texts[i] for i in order], add_special_tokens=False)
    for j, enc in enumerate(encs):
      toks.append(_window(enc.ids[:body], context_len, bos_id, pad_id))
      labels.append(c)
      test.append(j >= n_train)
  return ClassData(np.stack(toks), np.asarray(labels, np.int32), np.asarray(test, bool), tuple(classes),
                   name or os.path.splitext(os.path.basename(path))[0], (path,) * len(toks))


# ----------------------------------------------------------------------------------------------
# activations


def pool_mask(tokens: np.ndarray, exclude: Sequence[int]) -> np.ndarray:
  """[n, T] bool: tokens mean-pooled by SAEBench (not BOS, pad or EOS ids)."""
  return ~np.isin(tokens, np.asarray(list(exclude), np.int32)) if len(exclude) else np.ones(tokens.shape, bool)


def last_pooled(mask: np.ndarray) -> np.ndarray:
  """[n] int: the last pooled (non-pad) position of each row; rows without one are an error."""
  if not mask.any(-1).all():
    bad = int(np.flatnonzero(~mask.any(-1))[0])
    raise errors.UserError(f"TPP context {bad} has no token left after excluding BOS/pad/EOS")
  return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def site_activations(params, model_cfg, site: str, tokens: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Residual at ``site`` for every context: tokens [n, T] -> [n, T, d] float32 (one truncated
  forward per batch of ``batching.map_batched``: one program serves all)."""
  fn = harvest.make_site_fn(model_cfg, site)
  return batching.map_batched(lambda b, _: np.asarray(fn(params, b), np.float32), tokens, batch_size)


# ----------------------------------------------------------------------------------------------
# graded recovery and the budget a scope needs (rows; docs/settings/tpp.md)


def graded_recovery(defended, recovered) -> np.ndarray:
  """How far the delta moved the target probe's logit from its ablated value towards the decision
  boundary 0, clipped to [0, 1]: ``(recovered - defended) / (0 - defended)``; [E], [E] -> [E].

  The graded companion of the binary ``recovered`` (logit > 0): every recovered valid flip scores 1,
  a delta that does not move the logit scores 0. NaN where ``defended > 0`` (no flip to undo); for
  ``defended == 0`` it is 1 when ``recovered > 0`` else 0. Not a paper metric: paper-method 3.1 and
  10.1 report only the binary ``recovered_success`` rate (82 % / 75 % is its mean over targets)."""
  d = np.asarray(defended, np.float64)
  r = np.asarray(recovered, np.float64)
  gap = -d
  with np.errstate(divide="ignore", invalid="ignore"):
    frac = np.clip((r - d) / gap, 0.0, 1.0)
  return np.where(gap > 0, frac, np.where(gap == 0, (r > 0).astype(np.float64), np.nan))


def budget_needed(defended, w_norm, n_delta, n_pool) -> np.ndarray:
  """The smallest ||delta||_F with which any delta of the scope can bring the probe logit from
  ``defended`` to 0; [E] each -> [E].

  The probe reads the mean over the ``n_pool`` pooled tokens, so a delta row d added at ``n_delta``
  of them moves the logit by ``(n_delta / n_pool) w . d <= (n_delta / n_pool) ||w|| ||d||``
  (equality for d along w). The scope ``last`` has n_delta = 1, ``all`` (one row broadcast to every
  pooled token) n_delta = n_pool: the last-token scope needs ``n_pool`` times the budget. A
  projection (encoder modes) or the optimiser's direction can only need more; 0 where the logit is
  already > 0."""
  d = np.asarray(defended, np.float64)
  gain = np.asarray(w_norm, np.float64) * np.asarray(n_delta, np.float64) / np.asarray(n_pool, np.float64)
  return np.maximum(-d, 0.0) / gain
