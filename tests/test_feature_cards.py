"""Feature cards against a brute-force recomputation on a tiny model; markdown/HTML escaping."""

import html.parser

import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax.data import corpus as corpus_lib
from recovery_jax.models import transformer
from recovery_jax.sae import cards as cards_lib, core, harvest, testing
from recovery_jax.sae.config import SAEConfig

SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def setup():
  params, cfg = testing.tiny_model(0)
  tok = testing.byte_tokenizer()
  r = np.random.default_rng(0)
  d, f = cfg.d_model, 24
  w = r.normal(size=(d, f)).astype(np.float32) / np.sqrt(d)
  sae = {"W_enc": w, "W_dec": r.normal(size=(f, d)).astype(np.float32), "b_enc": np.full(f, -1.5, np.float32),
         "b_dec": np.zeros(d, np.float32), "threshold": np.full(f, 0.2, np.float32)}
  sae_cfg = SAEConfig("jumprelu", d, f, apply_b_dec_to_input=False, hook_name=SITE, model_name=cfg.name,
                      prepend_bos=True, source="tiny/sae")
  docs = [d for _, t in corpus_lib.stdlib_docstrings(6) for d in corpus_lib.iter_documents_from_text(t)]
  windows = list(harvest.token_windows(docs, tok, 32, bos_id=cfg.bos_token_id, sep_id=cfg.eos_token_ids[0],
                                       pad_id=cfg.pad_token_id))[:40]
  batches = [np.stack(windows[i:i + 16]) for i in range(0, len(windows), 16)]
  return params, cfg, tok, sae, sae_cfg, batches


def test_cards_match_brute_force(setup):
  params, cfg, tok, sae, sae_cfg, batches = setup
  feats = [3, 0, 17]
  cards = cards_lib.feature_cards(params, cfg, tok, sae, sae_cfg, SITE, feats, batches, n_contexts=4, before=5,
                                  after=2, n_logits=5)
  toks = np.concatenate(batches)
  x = transformer.forward(params, cfg, jnp.asarray(toks), capture=(SITE,)).captures[SITE]
  z = np.asarray(core.encode(sae, sae_cfg, x))
  keep = ~np.isin(toks, [testing.BOS, testing.EOS]) & (np.arange(toks.shape[1]) >= 2)
  # the direction through ln_final (RMSNorm) and the tied unembedding
  dirs = sae["W_dec"] / np.sqrt(np.mean(sae["W_dec"] ** 2, -1, keepdims=True) + cfg.norm_eps)
  dirs = dirs * np.asarray(params["ln_final"]["w"])
  logits = dirs @ np.asarray(params["embed"]["W_E"]).T
  for c, f in zip(cards, feats):
    zf = np.where(keep, z[..., f], 0.0)
    assert c.feature == f and c.site == SITE and c.n_tokens == keep.sum()
    assert c.frequency == pytest.approx((zf > 0).sum() / keep.sum())
    assert 0 < c.frequency < 0.5, c.frequency  # the SAE is sparse but this feature fires
    assert c.max_act == pytest.approx(zf.max(), rel=1e-5)
    np.testing.assert_allclose([ctx.value for ctx in c.contexts], np.sort(zf.ravel())[::-1][:4], rtol=1e-5)
    b, t = np.unravel_index(np.argmax(zf), zf.shape)
    top = c.contexts[0]
    assert top.tokens[top.peak] == tok.decode([int(toks[b, t])], skip_special_tokens=False)
    assert len(top.tokens) == min(t, 5) + 1 + min(toks.shape[1] - 1 - t, 2)
    np.testing.assert_allclose(top.acts, zf[b, max(0, t - 5):t + 3], rtol=1e-5, atol=1e-6)
    order = np.argsort(-logits[f])
    assert [p for p, _ in c.promoted] == [tok.decode([int(i)], skip_special_tokens=False) for i in order[:5]]
    assert [p for p, _ in c.suppressed] == [tok.decode([int(i)], skip_special_tokens=False) for i in order[::-1][:5]]
    np.testing.assert_allclose([v for _, v in c.promoted], logits[f][order[:5]], rtol=1e-4, atol=1e-4)


def test_cards_reject_bad_ids(setup):
  params, cfg, tok, sae, sae_cfg, batches = setup
  with pytest.raises(ValueError, match=r"feature ids \[24\] are outside \[0, d_sae=24\) of tiny/sae"):
    cards_lib.feature_cards(params, cfg, tok, sae, sae_cfg, SITE, [1, 24], batches)


class _Checker(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.stack, self.text = [], []

  def handle_starttag(self, tag, attrs):
    if tag not in ("meta",):
      self.stack.append(tag)

  def handle_endtag(self, tag):
    assert self.stack and self.stack.pop() == tag, (tag, self.stack)

  def handle_data(self, data):
    self.text.append(data)


def test_writing_escapes_text(tmp_path):
  evil = "<script>alert('x')</script>"
  card = cards_lib.Card(site="blocks.1.hook_resid_pre", feature=5, frequency=0.01, n_tokens=100, max_act=2.0,
                        mean_active=1.0, contexts=(cards_lib.Context(("a|b", evil, "\n", "*x*"), (0.0, 2.0, 1.0, 0.5), 1),),
                        promoted=(("&amp;", 1.5), ("`", 1.0)), suppressed=(("<", -1.0),), sae="x<y")
  paths = cards_lib.write_cards([card], tmp_path)
  page = paths["html"].read_text()
  assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;amp;" in page
  chk = _Checker()
  chk.feed(page)
  assert chk.stack == []  # balanced tags: the text cannot open elements
  assert evil in "".join(chk.text)  # the browser shows the token text as written
  md = paths["markdown"].read_text()
  row = [line for line in md.splitlines() if line.startswith("| 2 ")][0]
  assert row.count("|") - row.count("\\|") == 3  # the token's pipe cannot split the table row
  assert "**\\<script\\>" in row and "\\n" in row
  import json
  assert json.loads(paths["json"].read_text())[0]["contexts"][0]["peak"] == 1
