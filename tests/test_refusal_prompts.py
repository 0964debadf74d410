"""Refusal prompt files (shipped benign JSONL, user JSONL/CSV; bad rows name file and line) and chat formatting."""

import pytest

from recovery_jax import errors
from recovery_jax.tasks import refusal, refusal_judge


def test_shipped_prompts_are_many_benign_and_unique():
  rows = refusal.load_prompts()
  assert len(rows) >= 100
  texts = [r.text for r in rows]
  assert len(set(texts)) == len(texts)
  assert len({r.id for r in rows}) == len(rows)
  # none of the shipped instructions already reads as a refusal or a safety cue
  assert not any(refusal_judge.is_refusal(t) or refusal_judge.has_safety_cue(t) for t in texts)
  assert len(refusal.load_prompts(limit=7)) == 7


def test_user_jsonl_and_csv(tmp_path):
  j = tmp_path / "p.jsonl"
  j.write_text('{"goal": "Plan a picnic"}\n\n"Name three rivers"\n{"instruction": " Fold a crane ", "id": "x"}\n')
  rows = refusal.load_prompts(str(j))
  assert [r.text for r in rows] == ["Plan a picnic", "Name three rivers", "Fold a crane"]
  assert rows[0].id == "p.jsonl:1" and rows[1].id == "p.jsonl:3" and rows[2].id == "x"
  c = tmp_path / "p.csv"
  c.write_text('goal,target\n"Plan a picnic, for four",Sure\nName three rivers,Sure\n')
  rows = refusal.load_prompts(str(c))
  assert [r.text for r in rows] == ["Plan a picnic, for four", "Name three rivers"]
  assert rows[1].id == "p.csv:3"


@pytest.mark.parametrize("body,line,what", [
    ('{"goal": "ok"}\n{"goal": "ok2"\n', 2, "not valid JSON"),
    ('{"goal": "ok"}\n\n{"text": "no field"}\n', 3, "none of the fields"),
    ('{"goal": ""}\n', 1, "non-empty string"),
    ('[1, 2]\n', 1, "expected an object"),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, body, line, what):
  p = tmp_path / "user.jsonl"
  p.write_text(body)
  with pytest.raises(errors.UserError, match=rf"user\.jsonl, line {line}: .*{what}"):
    refusal.load_prompts(str(p))


def test_bad_csv_rows_name_file_and_line(tmp_path):
  p = tmp_path / "user.csv"
  p.write_text('goal,target\nPlan a picnic,Sure\n"",Sure\n')
  with pytest.raises(errors.UserError, match=r"user\.csv, line 3: field 'goal'"):
    refusal.load_prompts(str(p))
  p.write_text('text,target\nPlan a picnic,Sure\n')
  with pytest.raises(errors.UserError, match=r"user\.csv, line 1: the header"):
    refusal.load_prompts(str(p))
  p.write_text('goal,target\nPlan a picnic,Sure,extra\n')
  with pytest.raises(errors.UserError, match=r"user\.csv, line 2: more cells"):
    refusal.load_prompts(str(p))
  with pytest.raises(errors.UserError, match="does not exist"):
    refusal.load_prompts(str(tmp_path / "missing.jsonl"))
  (tmp_path / "p.txt").write_text("x\n")
  with pytest.raises(errors.UserError, match="expected .jsonl or .csv"):
    refusal.load_prompts(str(tmp_path / "p.txt"))


def test_chat_formatting():
  assert refusal.format_prompt("smollm2-135m-instruct", "Plan a picnic") == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nPlan a picnic<|im_end|>\n<|im_start|>assistant\n")
  assert refusal.format_prompt("chatml", "Hi", system="Be brief.") == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert refusal.format_prompt("gemma", "Plan a picnic") == (
      "<bos><start_of_turn>user\nPlan a picnic<end_of_turn>\n<start_of_turn>model\n")


class _Tok:  # a character tokenizer: id = code point
  def encode(self, t, add_special_tokens=False):
    class E:
      ids = [ord(ch) for ch in t]
    return E()

  def decode(self, ids, skip_special_tokens=False):
    return "".join(chr(i) for i in ids)


def test_encode_and_answer_text():
  ids, mask, lens = refusal.encode_prompts(_Tok(), ["ab", "abcd"], pad_id=0)
  assert ids.tolist() == [[0, 0, 97, 98], [97, 98, 99, 100]] and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
  assert lens.tolist() == [2, 4]
  assert refusal.answer_text(_Tok(), [32, 104, 105, 33, 0, 104], stop_ids=(33,)) == "hi"
  assert refusal.answer_text(_Tok(), [104, 105]) == "hi"
