"""TPP data: corpus classes (document-level seeded split), SAEBench-format files and their errors,
pooling masks, cached activations."""

import json
import re

import numpy as np
import pytest

from recovery_jax import errors
from recovery_jax.models import loading
from recovery_jax.tasks import tpp

BOS, PAD = 1, 2


@pytest.fixture(scope="module")
def tok():
  return loading.smollm2_tokenizer()


def _corpus(root, classes=("alpha", "beta", "gamma"), n_docs=30):
  for k, c in enumerate(classes):
    d = root / c
    d.mkdir(parents=True)
    paras = [f"{c} document {i}: " + " ".join(f"{c} page{i}x{j}" for j in range(20 + k * 3))
             for i in range(n_docs)]
    (d / "a.txt").write_text("\n\n".join(paras[:n_docs // 2]) + "\n")
    (d / "b.txt").write_text("\n\n".join(paras[n_docs // 2:]) + "\n")
  return str(root)


def test_corpus_classes_split_by_document_and_seed(tmp_path, tok):
  root = _corpus(tmp_path / "corpus")
  kw = dict(context_len=32, n_train=12, n_test=6, bos_id=BOS, pad_id=PAD, min_tokens=8, max_chars=200)
  data = tpp.corpus_classes(root, ("alpha", "beta", "gamma"), tok, seed=0, **kw)
  assert data.tokens.shape == (3 * 18, 32) and (data.tokens[:, 0] == BOS).all()
  assert np.bincount(data.labels).tolist() == [18, 18, 18]
  assert [int(data.test[data.labels == c].sum()) for c in range(3)] == [6, 6, 6]
  for c, name in enumerate(("alpha", "beta", "gamma")):  # each context holds its class's words only
    text = tok.decode(data.tokens[data.labels == c][0][1:].tolist())
    assert name in text and not any(o in text for o in ("alpha", "beta", "gamma") if o != name)
  # a document never lands in both splits (its contexts all name it: "page<i>x")
  docs = lambda m: {(lab, p) for r, lab in zip(data.tokens[m], data.labels[m])
                    for p in re.findall(r"page(\d+)x", tok.decode(r[1:].tolist()))}
  assert docs(data.test) and docs(~data.test) and not docs(data.test) & docs(~data.test)
  again = tpp.corpus_classes(root, ("alpha", "beta", "gamma"), tok, seed=0, **kw)
  np.testing.assert_array_equal(again.tokens, data.tokens)
  other = tpp.corpus_classes(root, ("alpha", "beta", "gamma"), tok, seed=1, **kw)
  assert not np.array_equal(other.tokens, data.tokens)
  with pytest.raises(errors.UserError, match="need 600"):
    tpp.corpus_classes(root, ("alpha", "beta"), tok, **{**kw, "n_train": 600})
  with pytest.raises(errors.UserError, match="delta"):
    tpp.corpus_classes(root, ("alpha", "delta"), tok, **kw)


def test_pool_mask_and_last_pooled_position():
  tokens = np.array([[BOS, 5, 6, 7, PAD, PAD], [BOS, 5, 6, 7, 8, 9]])
  mask = tpp.pool_mask(tokens, (BOS, PAD))
  assert mask.tolist() == [[False, True, True, True, False, False], [False] + [True] * 5]
  assert tpp.last_pooled(mask).tolist() == [3, 5]
  with pytest.raises(errors.UserError, match="context 0"):
    tpp.last_pooled(tpp.pool_mask(np.array([[BOS, PAD]]), (BOS, PAD)))


def test_graded_recovery_against_a_loop():
  """graded = clip((rec - def) / -def, 0, 1) for a flip (def <= 0), written here case by case."""
  d = np.array([-2.0, -2.0, -2.0, -2.0, -0.5, 0.0, 0.0, 1.0])
  r = np.array([-2.0, -1.5, 0.5, -3.0, -0.1, 0.2, 0.0, 2.0])
  want = []
  for dd, rr in zip(d, r):
    if dd > 0:
      want.append(np.nan)
    elif dd == 0:
      want.append(1.0 if rr > 0 else 0.0)
    else:
      u = (rr - dd) / (0.0 - dd)
      want.append(0.0 if u < 0 else 1.0 if u > 1 else u)
  got = tpp.graded_recovery(d, r)
  np.testing.assert_allclose(got, want, equal_nan=True)
  assert got[2] == 1.0 and got[1] == pytest.approx(0.25) and got[4] == pytest.approx(0.8)


def test_budget_needed_is_the_delta_that_brings_the_probe_to_zero():
  """A row of norm budget_needed along w at the last pooled token (scope last) or at every pooled
  token (scope all) puts the probe's pooled logit at 0; any other direction of that norm falls short."""
  from recovery_jax.recovery import probe
  rng = np.random.default_rng(0)
  n, t, d = 4, 7, 6
  h = rng.normal(size=(n, t, d)).astype(np.float32)
  mask = rng.random((n, t)) < 0.7
  mask[:, 1] = True
  w = rng.normal(size=d).astype(np.float32)
  logit = lambda x: np.asarray(probe.probe_logit(x, mask, w, 0.0), np.float64)
  b = -logit(h).max() - 1.0
  defended = logit(h) + b
  n_pool, last = mask.sum(-1), tpp.last_pooled(mask)
  unit = w / np.linalg.norm(w)
  for scope in ("last", "all"):
    need = tpp.budget_needed(defended, np.linalg.norm(w), 1 if scope == "last" else n_pool, n_pool)
    for direction in (unit, rng.normal(size=d)):
      x = h.copy()
      for i in range(n):
        row = need[i] * direction / np.linalg.norm(direction)
        if scope == "last":
          x[i, last[i]] += row
        else:
          x[i, mask[i]] += row
      got = logit(x) + b
      if direction is unit:
        np.testing.assert_allclose(got, 0.0, atol=1e-4)
      else:
        assert (got < 1e-4).all()
  np.testing.assert_allclose(tpp.budget_needed(defended, 2.0, 1, n_pool) / tpp.budget_needed(defended, 2.0, n_pool,
                                                                                              n_pool), n_pool)
  assert tpp.budget_needed(np.array([0.5]), 1.0, 1, 10)[0] == 0.0


def test_saebench_file_loader_and_errors(tmp_path, tok):
  rows = [{"hard_text": f"A bio number {i} about work {i % 3}.", "profession": [0, 6, 26][i % 3]} for i in range(30)]
  path = tmp_path / "bios.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  kw = dict(text_field="hard_text", label_field="profession", context_len=16, n_train=6, n_test=3, bos_id=BOS,
            pad_id=PAD, label_names=tpp.BIAS_IN_BIOS_PROFESSIONS)
  data = tpp.load_saebench_file(str(path), tok, classes=("accountant", "dentist", "teacher"), **kw)
  assert data.tokens.shape == (27, 16) and data.name == "bios" and int(data.test.sum()) == 9
  assert data.class_names == ("accountant", "dentist", "teacher")
  csv_path = tmp_path / "reviews.csv"
  csv_path.write_text("text,category\n" + "".join(f"review {i},{'Toys' if i % 2 else 'Books'}\n" for i in range(20)))
  data = tpp.load_saebench_file(str(csv_path), tok, classes=("Toys", "Books"), text_field="text",
                                label_field="category", context_len=8, n_train=5, n_test=2, bos_id=BOS, pad_id=PAD)
  assert np.bincount(data.labels).tolist() == [7, 7]

  def bad(lines, match, name="bad.jsonl", **over):
    p = tmp_path / name
    p.write_text(lines)
    with pytest.raises(errors.UserError, match=match) as e:
      tpp.load_saebench_file(str(p), tok, classes=("accountant", "dentist"), **{**kw, **over})
    assert str(p) in str(e.value)

  good = json.dumps(rows[0]) + "\n"
  bad(good + '{"hard_text": "x"}\n', "line 2: no field 'profession'")
  bad(good + '{"hard_text": "", "profession": 0}\n', "line 2: field 'hard_text' = ''")
  bad(good + '{"hard_text": "y", "profession": 99}\n', "line 2: field 'profession' = 99")
  bad(good + "{not json\n", "line 2: not valid JSON")
  bad(good * 3, "class 'accountant' .* has 3 rows, need n_train \+ n_test = 9")
  bad("text,category\nfine,Toys\n,Books\n", r"line 3: field 'text' = ''", name="bad.csv", text_field="text",
      label_field="category", label_names=None)
  bad("", "no rows")

