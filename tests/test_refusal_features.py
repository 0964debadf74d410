"""Refusal features: batched contrast means against a per-example implementation, the cosine candidates and
the ranking against plain numpy, the global top K, user feature lists."""

import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax.models import random_init, transformer
from recovery_jax.sae import core, testing as sae_testing
from recovery_jax.tasks import refusal_features as F

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


class _Tok:  # id = byte value % 97 (the tiny model's vocabulary)
  def encode(self, t, add_special_tokens=False):
    class E:
      ids = [b % 97 for b in t.encode()]
    return E()


@pytest.fixture(scope="module")
def setup():
  params, cfg = random_init.random_model("llama", seed=1, n_layers=2, d_model=32)
  saes = {s: sae_testing.random_sae(32, 40, seed=i + 2, site=s, b_enc=-0.01) for i, s in enumerate(SITES)}
  return params, cfg, saes


def _per_example(params, cfg, saes, texts, n_last):
  """Mean over rows of each row's mean residual / SAE activation over its last n tokens, one row at a time."""
  tok = _Tok()
  res = {s: [] for s in SITES}
  act = {s: [] for s in SITES}
  for t, n in zip(texts, n_last):
    ids = jnp.asarray([tok.encode(t).ids])
    out = transformer.forward(params, cfg, ids, capture=SITES)
    for s in SITES:
      x = out.captures[s][0, -n:]
      res[s].append(np.asarray(x).mean(0))
      act[s].append(np.asarray(core.encode(*saes[s], x)).mean(0))
  return {s: np.mean(v, 0) for s, v in res.items()}, {s: np.mean(v, 0) for s, v in act.items()}


def test_site_means_equal_per_example(setup):
  params, cfg, saes = setup
  texts = ["plan a picnic", "fold", "name three rivers please", "tea", "a b c d e"]
  n_last = [3, 1, 5, 2, 4]
  side = F.side(_Tok(), texts, pad_id=0, n_select=n_last)
  got = F.site_means(params, cfg, side, SITES, saes, batch_size=2)  # three chunks, the last padded
  want = _per_example(params, cfg, saes, texts, n_last)
  for s in SITES:
    np.testing.assert_allclose(got[0][s], want[0][s], atol=2e-5)
    np.testing.assert_allclose(got[1][s], want[1][s], atol=2e-5)


def test_opening_side_selects_the_opening_tokens():
  s = F.opening_side(_Tok(), ["ab", "abcd"], "xyz", pad_id=0)
  assert s.select.sum(1).tolist() == [3, 3]
  assert s.select[:, -3:].all() and not s.select[:, :-3].any()


def test_rank_candidates_scores_and_top(setup):
  _, _, saes = setup
  rng = np.random.default_rng(0)
  refuse = ({s: rng.standard_normal(32) for s in SITES}, {s: rng.random(40) for s in SITES})
  comply = ({s: rng.standard_normal(32) for s in SITES}, {s: rng.random(40) for s in SITES})
  r = F.rank(saes, refuse, comply, n_candidates=5)
  pool = []
  for s in SITES:
    v = refuse[0][s] - comply[0][s]
    w = np.asarray(saes[s][0]["W_dec"], np.float64)
    cos = [float(w[i] @ v / np.linalg.norm(w[i]) / np.linalg.norm(v)) for i in range(40)]
    ids = sorted(range(40), key=lambda i: -cos[i])[:5]
    assert r.candidates[s].tolist() == ids
    for j, i in enumerate(ids):
      want = (refuse[1][s][i] - comply[1][s][i]) * float(w[i] @ v / np.linalg.norm(v))
      assert r.scores[s][j] == pytest.approx(want, rel=1e-6)
      pool.append((s, i, want))
  top = sorted(pool, key=lambda p: -p[2])
  assert [(s, f) for s, f, _ in r.top] == [(s, f) for s, f, _ in top]
  feats = r.features(3)
  assert sum(len(v) for v in feats.values()) == 3
  assert {(s, f) for s, v in feats.items() for f in v} == {(s, f) for s, f, _ in top[:3]}
  # one site's vector for all sites (the paper's layer-15 vector)
  r15 = F.rank(saes, refuse, comply, n_candidates=5, vector_site=SITES[1])
  v = refuse[0][SITES[1]] - comply[0][SITES[1]]
  w = np.asarray(saes[SITES[0]][0]["W_dec"])
  assert r15.candidates[SITES[0]][0] == int(np.argmax(w @ v / np.linalg.norm(w, axis=1)))


def test_parse_feature_list():
  assert F.parse_feature_list("0:3, 1:4,0:7", SITES) == {SITES[0]: [3, 7], SITES[1]: [4]}
  with pytest.raises(ValueError, match="'2:1'.*not a circuit layer"):
    F.parse_feature_list("2:1", SITES)
  with pytest.raises(ValueError, match="'x'.*layer:feature"):
    F.parse_feature_list("x", SITES)
