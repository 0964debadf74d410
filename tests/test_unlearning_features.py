"""SAEBench unlearning feature rule: firing frequencies on a tiny model against a per-text loop, and
the retain-threshold / forget-sparsity selection against a direct implementation."""

import jax
import numpy as np
import pytest

from recovery_jax import errors
from recovery_jax.models import random_init, transformer
from recovery_jax.sae import core as sae_core, testing as sae_testing
from recovery_jax.tasks import unlearning as ul
from recovery_jax.tasks import unlearning_features as uf

SITE = "blocks.1.hook_resid_post"


def test_top_features_rule_against_a_loop():
  rng = np.random.default_rng(0)
  for _ in range(50):
    d = 40
    forget = np.where(rng.random(d) < 0.3, 0.0, rng.integers(0, 6, d) / 10)  # zeros and ties
    retain = rng.random(d) * 0.02
    thr, n = 0.01, int(rng.integers(1, 30))
    got = uf.top_features(forget, retain, thr, n)
    cand = [(forget[i], i) for i in range(d) if retain[i] < thr and forget[i] > 0]
    want = [i for _, i in sorted(cand, key=lambda t: (-t[0], t[1]))][:n]
    assert got.tolist() == want


def test_retain_threshold_removes_general_features():
  forget = np.asarray([0.9, 0.8, 0.7, 0.0])
  retain = np.asarray([0.5, 0.0, 0.001, 0.0])
  assert uf.top_features(forget, retain, 0.01, 10).tolist() == [1, 2]
  assert uf.top_features(forget, retain, 0.001, 10).tolist() == [1]
  assert uf.top_features(forget, retain, 1.0, 2).tolist() == [0, 1]


def test_firing_frequency_matches_per_text_forward():
  cfg = random_init.tiny_config("llama", vocab_size=64, n_layers=2)
  params = random_init.init_params(cfg, 0)
  sae, scfg = sae_testing.random_sae(cfg.d_model, 32, seed=3, site=SITE, enc_noise=0.0, b_enc=-0.01)
  texts = ["a b c d", "e f", "g h i j k l m n o p q r s t u v"]
  tok = WordTokenizer({w: 3 + i for i, w in enumerate("abcdefghijklmnopqrstuv")})
  tokens, attn, count = uf.tokenize(tok, texts, 12, bos_id=1, pad_id=2)
  freq = uf.firing_frequency(params, cfg, sae, scfg, SITE, tokens, attn, count, batch_size=2)
  fires, n = np.zeros(32), 0
  fwd = jax.jit(lambda p, ids: transformer.forward(p, cfg, ids, capture=(SITE,), stop_layer=2,
                                                   compute_logits=False).captures[SITE])
  for t in texts:  # unpadded, one text at a time, BOS dropped from the count
    ids = np.asarray([[1] + tok.encode(t).ids])[:, :12]
    x = fwd(params, ids)
    z = np.asarray(sae_core.encode(sae, scfg, x))[0, 1:]
    fires += (z > 0).sum(0)
    n += z.shape[0]
  np.testing.assert_allclose(freq, fires / n, atol=1e-6)
  assert 0 < freq.max() <= 1


class WordTokenizer:
  class _Enc:
    def __init__(self, ids):
      self.ids = ids

  def __init__(self, vocab):
    self.vocab = vocab

  def encode(self, text, add_special_tokens=False):
    return self._Enc([self.vocab[w] for w in text.split()])


def test_corpus_texts_sources_and_errors(tmp_path):
  qs = ul.load_questions(ul.DEFAULT_QUESTIONS)[:3]
  texts = uf.corpus_texts(("questions",), questions=qs, retain=[], corpus_dir=str(tmp_path), max_docs=100)
  assert len(texts) == 6 and texts[0].endswith(qs[0].choices[qs[0].answer] + ".")
  (tmp_path / "wordnet").mkdir()
  (tmp_path / "wordnet" / "noun.txt").write_text(
      "gold: a soft yellow metal\nchair: a seat\nplanet: a body that orbits a star\n")
  gl = uf.corpus_texts(("topic_glosses",), questions=ul.load_questions(ul.DEFAULT_QUESTIONS), retain=[],
                       corpus_dir=str(tmp_path), max_docs=10)
  assert gl == ["planet: a body that orbits a star"] or "chair: a seat" not in gl
  with pytest.raises(errors.UserError, match="'shakespeare'.*does not exist"):
    uf.corpus_texts(("shakespeare",), questions=qs, retain=[], corpus_dir=str(tmp_path), max_docs=5)
  with pytest.raises(errors.UserError, match="'features' has 'nope'"):
    uf.corpus_texts(("nope",), questions=qs, retain=[], corpus_dir=str(tmp_path), max_docs=5)
