"""Unlearning task: question files, the 24-order builder, strict filter, valid flips, argmax success."""

import itertools
import json
import re

import numpy as np
import pytest

from recovery_jax import errors
from recovery_jax.tasks import unlearning as ul

PAPER_RE = re.compile(r"^(.*?)\n\nA. (.*?)\nB. (.*?)\nC. (.*?)\nD. (.*?)\n\nAnswer:\s*$", re.S)


class WordTokenizer:
  """Whitespace tokenizer with a growing vocabulary; a word's first two letters are its "first token"
  when ``prefix2`` (to make cloze clashes)."""

  class _Enc:
    def __init__(self, ids):
      self.ids = ids

  def __init__(self, prefix2=False):
    self.vocab, self.prefix2 = {}, prefix2

  def _id(self, w):
    return self.vocab.setdefault(w, len(self.vocab) + 10)

  def encode(self, text, add_special_tokens=False):
    words = text.replace("\n", " \n ").split(" ")
    ids = []
    for w in words:
      if not w:
        continue
      if self.prefix2 and len(w) > 2:
        ids += [self._id(w[:2]), self._id(w[2:])]
      else:
        ids.append(self._id(w))
    return self._Enc(ids)

  def decode(self, ids):
    inv = {v: k for k, v in self.vocab.items()}
    return "".join(inv[i] for i in ids)


Q = ul.Question("q1", "Which metal is yellow?", ("iron", "gold", "lead", "tin"), 1, "The yellow metal is", "chem")
Q2 = ul.Question("q2", "Which is a planet?", ("Mars", "Moon", "Sun", "comet"), 0, "The red planet is", "astro")


def test_permutations_are_the_24_itertools_orders():
  assert ul.PERMUTATIONS == tuple(itertools.permutations(range(4)))
  assert len(set(ul.PERMUTATIONS)) == 24


def test_mc_builder_all_orders_match_paper_format_and_gold_letter():
  tok = WordTokenizer()
  b = ul.build_batch(tok, [Q, Q2], "mc")
  assert len(b) == 48 and list(b.question) == [0] * 24 + [1] * 24 and list(b.perm_id[:24]) == list(range(24))
  for j, text in enumerate(b.texts):
    q = (Q, Q2)[b.question[j]]
    m = PAPER_RE.match(text.strip())
    assert m and m.group(1) == q.question
    shown = m.groups()[1:]
    assert sorted(shown) == sorted(q.choices)
    assert shown == tuple(q.choices[i] for i in ul.PERMUTATIONS[b.perm_id[j]])
    # the gold index points at the line holding the correct answer
    assert shown[b.gold[j]] == q.choices[q.answer]
  assert (b.choices == np.asarray([tok.encode(" " + l).ids[0] for l in "ABCD"])).all()
  # every letter is gold in 6 of the 24 orders
  assert np.bincount(b.gold[:24], minlength=4).tolist() == [6, 6, 6, 6]


def test_cloze_formats():
  tok = WordTokenizer()
  b = ul.build_batch(tok, [Q], "cloze")
  assert len(b) == 1 and b.texts == ("The yellow metal is",)
  assert [tok.decode([i]) for i in b.choices[0]] == list(Q.choices) and b.gold[0] == 1
  listed = ul.build_batch(tok, [Q], "cloze_listed")
  assert len(listed) == 24
  for j in range(24):
    names = [tok.decode([i]) for i in listed.choices[j]]
    assert listed.texts[j] == f"Options: {', '.join(names)}.\nThe yellow metal is"
    assert names[listed.gold[j]] == "gold"
  # left padding: every prompt ends in the last column
  assert (listed.attention_mask[:, -1] == 1).all()


def test_cloze_first_token_clash_is_reported():
  tok = WordTokenizer(prefix2=True)
  q = ul.Question("q9", "Which?", ("gold", "good", "tin", "lead"), 0, "It is")
  bad = ul.cloze_conflicts(tok, [Q2, q])
  assert len(bad) == 1 and "'q9'" in bad[0] and "'gold'" in bad[0] and "'good'" in bad[0]
  with pytest.raises(errors.UserError, match="q9"):
    ul.build_batch(tok, [q], "cloze")
  ul.build_batch(tok, [q], "mc")  # letters: no clash


def test_strict_filter_and_valid_flips():
  question = np.repeat(np.arange(3), 24)
  base = np.ones(72, bool)
  base[24 + 5] = False  # question 1 fails one order
  kept = ul.strict_filter(base, question, 4)  # question 3 has no examples
  assert kept.tolist() == [True, False, True, False]
  defended = base.copy()
  defended[[0, 3, 30, 50]] = False
  v = ul.valid_flips(base, defended, question, kept)
  assert np.flatnonzero(v).tolist() == [0, 3, 50]  # 30 belongs to the question the strict filter drops
  assert np.flatnonzero(ul.valid_flips(base, defended, question, None)).tolist() == [0, 3, 30, 50]


def test_orders_field_all_both_original_and_errors():
  assert ul.orders("mc") == ul.orders("mc", "all") == tuple(range(24))
  assert ul.orders("cloze_listed", "both") == (0, 23) and ul.PERMUTATIONS[23] == (3, 2, 1, 0)
  assert ul.orders("mc", "original") == ul.orders("cloze", "all") == ul.orders("cloze", "original") == (0,)
  with pytest.raises(errors.UserError, match=r"'task.orders'='both' with task.format='cloze'.*cloze_listed"):
    ul.orders("cloze", "both")
  with pytest.raises(errors.UserError, match=r"'task.orders'='sideways': expected one of"):
    ul.orders("mc", "sideways")


def test_both_orders_reverse_the_options_and_move_the_gold():
  """Original and reversed order: the prompt lists the options backwards, the choice tokens are read in
  display order, and the gold index is 3 - answer; the strict filter asks for both, a flip is one order."""
  tok = WordTokenizer()
  b = ul.build_batch(tok, [Q, Q2], "cloze_listed", perm_ids=ul.orders("cloze_listed", "both"))
  assert list(b.perm_id) == [0, 23, 0, 23] and list(b.question) == [0, 0, 1, 1]
  assert b.texts[0] == "Options: iron, gold, lead, tin.\nThe yellow metal is"
  assert b.texts[1] == "Options: tin, lead, gold, iron.\nThe yellow metal is"
  assert list(b.gold) == [1, 2, 0, 3] and [ul.order_name(p) for p in b.perm_id] == ["0123", "3210"] * 2
  assert (b.choices[1] == b.choices[0][::-1]).all() and (b.choices[3] == b.choices[2][::-1]).all()
  mc = ul.build_batch(tok, [Q], "mc", perm_ids=(0, ul.REVERSED))
  assert PAPER_RE.match(mc.texts[1]).groups()[1:] == ("tin", "lead", "gold", "iron") and list(mc.gold) == [1, 2]
  base = np.array([True, True, True, False])  # question 2 fails its reversed order
  kept = ul.strict_filter(base, b.question, 2)
  assert kept.tolist() == [True, False]
  assert ul.valid_flips(base, np.array([True, False, False, False]), b.question, kept).tolist() == [False, True,
                                                                                                  False, False]


def test_every_order_maps_the_answer_index_to_the_right_choice():
  """Property over random questions and all 24 orders: the gold position shows the correct choice, its
  choice token is the correct choice's first token, and the order name lists the shown choices."""
  rng = np.random.default_rng(0)
  tok = WordTokenizer()
  words = [f"w{i}" for i in range(40)]
  for trial in range(30):
    ch = tuple(rng.choice(words, 4, replace=False).tolist())
    q = ul.Question(f"r{trial}", "Which?", ch, int(rng.integers(4)), "It is")
    for pid, perm in enumerate(ul.PERMUTATIONS):
      g = ul.gold_position(q, perm)
      shown = ul.ordered(q, perm)
      assert shown[g] == q.choices[q.answer] and sorted(shown) == sorted(q.choices)
      ids = ul.choice_ids(tok, q, "cloze_listed", perm)
      assert ids[g] == ul.first_token(tok, q.choices[q.answer])
      assert tuple(q.choices[int(c)] for c in ul.order_name(pid)) == shown
      assert ul.prompt(q, "cloze_listed", perm).startswith("Options: " + ", ".join(shown) + ".")


def test_argmax_success_differs_from_positive_margin():
  cl = np.asarray([[5.0, 4.9, 0.0, 0.0]])
  gold = np.asarray([1])
  assert ul.margin(cl, gold)[0] > 0  # beats the mean of the others ...
  assert not ul.correct(cl, gold)[0]  # ... but is not the argmax
  assert ul.argmax_margin(cl, gold)[0] < 0


def test_argmax_margin_sign_is_argmax_success_against_a_loop():
  rng = np.random.default_rng(0)
  cl = rng.normal(size=(500, 4)).round(1)  # rounding makes ties
  gold = rng.integers(0, 4, 500)
  for row, g, am, ok, mg in zip(cl, gold, ul.argmax_margin(cl, gold), ul.correct(cl, gold), ul.margin(cl, gold)):
    best = max(range(4), key=lambda i: (row[i], -i))  # first maximum
    assert ok == (best == g)
    assert (am > 0) == all(row[g] > row[i] for i in range(4) if i != g)
    assert mg == pytest.approx(row[g] - np.mean([row[i] for i in range(4) if i != g]))


def _write(tmp_path, name, lines):
  p = tmp_path / name
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_load_jsonl_and_csv(tmp_path):
  row = {"id": "a", "question": "Q?", "choices": ["w", "x", "y", "z"], "answer": "C", "stem": "S"}
  qs = ul.load_questions(_write(tmp_path, "q.jsonl", [json.dumps(row)]))
  assert qs == [ul.Question("a", "Q?", ("w", "x", "y", "z"), 2, "S", "")]
  qs = ul.load_questions(_write(tmp_path, "q.csv", ["question,A,B,C,D,answer", "Q?,w,x,y,z,3"]))
  assert qs[0].choices == ("w", "x", "y", "z") and qs[0].answer == 3 and qs[0].qid == "row2"


@pytest.mark.parametrize("name,lines,match", [
    ("bad.jsonl", ['{"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 0}',
                   '{"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 7}'],
     r"bad.jsonl, row 2: field 'answer'=7"),
    ("bad.jsonl", ['{"question": "Q", "choices": ["a", "b", "c"], "answer": 0}'], r"row 1: field 'choices'"),
    ("bad.jsonl", ['', '{"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 0', ], r"row 2: not valid JSON"),
    ("bad.jsonl", ['{"question": "Q", "answer": 0}'], r"row 1: missing field 'choices'"),
    ("bad.jsonl", ['{"question": "Q", "choices": ["a", "a", "c", "d"], "answer": 0}'], r"must differ"),
    ("bad.csv", ["question,A,B,C,answer", "Q,a,b,c,0"], r"bad.csv, row 1 \(header\): missing column\(s\) \['D'\]"),
    ("bad.csv", ["question,A,B,C,D,answer", "Q,a,b,c,d,0", "Q,a,b,c,d,E"], r"bad.csv, row 3: field 'answer'='E'"),
    ("bad.txt", ["x"], r"expected a .jsonl or .csv"),
])
def test_bad_files_name_file_row_and_field(tmp_path, name, lines, match):
  with pytest.raises(errors.UserError, match=match):
    ul.load_questions(_write(tmp_path, name, lines))


def test_shipped_question_files():
  forget = ul.load_questions(ul.DEFAULT_QUESTIONS)
  retain = ul.load_questions(ul.DEFAULT_RETAIN)
  assert len(forget) >= 100 and len(retain) >= 30
  assert all(q.stem for q in forget + retain)
  assert not {q.question for q in forget} & {q.question for q in retain}
  from recovery_jax.models import loading
  tok = loading.smollm2_tokenizer()
  assert ul.cloze_conflicts(tok, forget + retain) == []
  assert len(set(ul.letter_ids(tok))) == 4
