"""LA-IG feature selection (tasks/refusal_la_ig.py): the batched, jitted attribution against an independent
per-example implementation (plain loops over examples and interpolation steps, jax.grad per example at the
full feature vector, unpadded rows, hooks that store and ablate), local/global top K, the overlap of two
selections, the config option and its wiring into the refusal app's feature selection."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax import config_utils, errors
from recovery_jax.models import transformer
from recovery_jax.sae import core, testing as sae_testing
from recovery_jax.tasks import refusal_features as F
from recovery_jax.tasks import refusal_la_ig as L

SITES = ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")
ROWS = ([5, 17, 33, 2, 60], [8, 9, 10, 11, 12], [40, 41, 3, 90, 23])  # three prompts, unpadded (one length: one compile)
REFUSAL_ID = 7
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tiny_llama):
  params, cfg = tiny_llama
  saes = {SITES[0]: sae_testing.random_sae(32, 48, seed=3, site=SITES[0], b_dec=0.1, apply_b_dec_to_input=True),
          SITES[1]: sae_testing.random_sae(32, 48, architecture="jumprelu", seed=4, site=SITES[1], threshold=0.05)}
  rng = np.random.default_rng(0)
  cands = {s: rng.choice(48, 6, replace=False).astype(np.int32) for s in SITES}
  direction = rng.standard_normal(32).astype(np.float32)
  return params, cfg, saes, cands, direction


def _left_pad(rows, pad=0, extra=2):
  """Left-padded ids, mask [N, max len + extra]: every row has padding, so the mask and positions matter."""
  t = max(map(len, rows)) + extra
  ids = np.full((len(rows), t), pad, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  return ids, mask


def _batched(params, cfg, saes, cands, direction, sites=SITES, rows=ROWS):
  spec = L.Spec(sites, tuple(saes[s][1] for s in sites))
  return L.attribution(params, cfg, spec, tuple(saes[s][0] for s in sites), tuple(jnp.asarray(cands[s]) for s in sites),
                       jnp.asarray(direction), REFUSAL_ID, *_left_pad(rows))


def _reference(params, cfg, saes, cands, direction, steps=10):
  """Upstream's linear_attribution (ind_jailbreak) + find_features' position mean, one unpadded example at a
  time, with the SAEs at ``blocks.l.hook_resid_post`` (``saes`` keyed by layer l). Each pass is jitted per
  example (hooks store into a dict during the trace; no vmap, no batching)."""
  r_hat = direction / np.linalg.norm(direction)
  ablate = lambda x: x - (x @ r_hat)[..., None] * r_hat
  post = lambda l: f"blocks.{l}.hook_resid_post"

  @jax.jit
  def patched_and_clean(ids):
    stored = {}
    def ablate_hook(l):  # upstream ablate_hook(store=True, store_error=True): the error against the un-ablated act
      def fn(act, _):
        if l in saes:
          p, c = saes[l]
          f = core.encode(p, c, ablate(act))
          stored[l] = (f, act - core.decode(p, c, f, ablate(act)))
        return ablate(act)
      return fn
    logits = transformer.forward(params, cfg, ids, edits={post(l): ablate_hook(l) for l in range(cfg.n_layers)}).logits
    clean = transformer.forward(params, cfg, ids, capture=tuple(post(l) for l in saes))
    return logits[0, -1], stored, {l: core.encode(*saes[l], clean.captures[post(l)]) for l in saes}

  @jax.jit
  def grad_at(ids, alpha, stored, jb):
    def metric(eps):
      def patch_hook(l):  # upstream sae_grad_patch_IG, the interpolated features perturbed by eps
        def fn(act, _):
          p, c = saes[l]
          f = core.encode(p, c, act)
          res = act - core.decode(p, c, f, act)
          f = (1 - alpha) * f + alpha * stored[l][0]
          res = (1 - alpha) * res + alpha * stored[l][1]
          return core.decode(p, c, f + eps[l], act) + res
        return fn
      logits = transformer.forward(params, cfg, ids, edits={post(l): patch_hook(l) for l in saes}).logits[0, -1]
      return logits[jb] - logits[REFUSAL_ID]
    return jax.grad(metric)({l: jnp.zeros(stored[l][0].shape) for l in saes})

  scores, jbs = {l: [] for l in saes}, []
  for row in ROWS:
    ids = jnp.asarray([row])
    last, stored, f_clean = patched_and_clean(ids)
    jb = int(np.argmax(np.asarray(last)))
    jbs.append(jb)
    grads = {l: np.zeros((len(row), 48)) for l in saes}
    for step in range(steps):
      g = grad_at(ids, step / steps, stored, jb)
      for l in saes:
        grads[l] += np.asarray(g[l][0], np.float64)
    for l in saes:
      attr = np.asarray(stored[l][0][0] - f_clean[l][0], np.float64) * grads[l] / steps  # [T, d_sae]
      scores[l].append(attr[1:, cands[l]].mean(0))  # positions after the first
  return {l: np.stack(v) for l, v in scores.items()}, np.asarray(jbs)


def test_attribution_equals_per_example_reference(setup):
  """Sites blocks.1.hook_resid_pre and blocks.1.hook_resid_post; the reference puts the first SAE at
  blocks.0.hook_resid_post, the same point of the stream (upstream hooks resid_post only)."""
  params, cfg, saes, cands, direction = setup
  got = _batched(params, cfg, saes, cands, direction)
  want, jbs = _reference(params, cfg, {0: saes[SITES[0]], 1: saes[SITES[1]]}, {0: cands[SITES[0]], 1: cands[SITES[1]]},
                         direction)
  np.testing.assert_array_equal(np.asarray(got.jailbreak), jbs)
  for l, s in enumerate(SITES):
    assert np.abs(want[l]).max() > 1e-3  # the candidates carry attribution (the test is not vacuous)
    np.testing.assert_allclose(np.asarray(got.scores[s]), want[l], atol=1e-5, rtol=1e-4)
  assert (np.asarray(got.metric_patched) >= 0).all()  # the jailbreak token is the patched argmax


def test_top_k_local_and_global():
  scores = np.array([[0.1, 0.5, 0.5, -1.0, 0.3],
                     [2.0, -0.2, 0.0, 0.4, 0.4],
                     [0.0, 0.1, 0.9, 0.9, -3.0]], np.float32)
  local, glob = L.top_k(scores, 3)
  assert np.asarray(local).tolist() == [[1, 2, 4], [0, 3, 4], [2, 3, 1]]  # ties: the lower pair index first
  mean = scores.mean(0)  # [0.7, 0.1333, 0.4667, 0.1, -0.7667]
  assert np.asarray(glob).tolist() == [0, 2, 1]
  for row, top in zip(scores, np.asarray(local)):  # every chosen score >= every other one
    assert row[top].min() >= np.delete(row, top).max()
  assert mean[np.asarray(glob)].min() >= np.delete(mean, np.asarray(glob)).max()
  assert np.asarray(L.top_k(scores, 9)[1]).tolist() == [0, 2, 1, 3, 4]  # K above P: every pair


def _ranking(top):
  return F.Ranking(vectors={}, candidates={}, cosines={}, scores={}, top=tuple((s, f, 0.0) for s, f in top))


def test_compare_overlap_and_jaccard():
  a = _ranking([("b.1", 3), ("b.1", 5), ("b.2", 7), ("b.2", 9), ("b.2", 1)])
  b = _ranking([("b.2", 7), ("b.1", 3), ("b.2", 2), ("b.1", 4), ("b.1", 5)])
  c = L.compare(a, b, 4)  # A = {1:3, 1:5, 2:7, 2:9}, B = {2:7, 1:3, 2:2, 1:4}
  assert (c["intersection"], c["overlap"], c["jaccard"]) == (2, 0.5, pytest.approx(2 / 6))
  assert c["only_contrast"] == [["b.1", 5], ["b.2", 9]] and c["only_la_ig"] == [["b.2", 2], ["b.1", 4]]
  same = L.compare(a, a, 5)
  assert (same["overlap"], same["jaccard"]) == (1.0, 1.0)


def test_selection_option_validated():
  from recovery_jax.experiments.refusal import app
  c = config_utils.load_config_file("configs/refusal.py:tiny", root=ROOT)
  assert c.features.selection == "contrast"
  assert config_utils.load_config_file("configs/refusal.py:la_ig", root=ROOT).features.selection == "la_ig"
  app.validate(c)
  c.features.selection = "la-ig"
  with pytest.raises(errors.UserError, match=r"features.selection'='la-ig': expected one of \('contrast', 'la_ig'\)"):
    app.validate(c)
  c.features.selection, c.features.list = "la_ig", "1:3,2:4"
  with pytest.raises(errors.UserError, match="features.selection"):
    app.validate(c)


def test_app_features_la_ig_and_comparison():
  """The refusal app's feature selection with features.selection=la_ig and compare_selection (tiny model)."""
  from recovery_jax.experiments import setup as setup_lib
  from recovery_jax.experiments.refusal import app
  c = config_utils.load_config_file("configs/refusal.py:tiny", ["features.selection=la_ig", "features.compare_selection=True",
                                    "features.contrast=system", "features.n_contrast=2", "features.n_candidates=3",
                                    "features.k=3"], root=ROOT)
  params, mcfg, tok = setup_lib.load_model(c.model, seed=c.seed)
  saes = {s: setup_lib.load_sae(c.sae, mcfg, s) for s in c.sites}
  feats, record, ranking = app._features(c, params, mcfg, tok, saes, tuple(c.sites), 2, lambda *_: None)
  la, cmp = record["la_ig"], record["comparison"]
  assert record["selection"] == "la_ig" and la["rows"] == 2 and len(la["local"]) == 2
  assert all(len(row) == 3 for row in la["local"])
  assert [list(p) for p in cmp["la_ig"]] == [[s, f] for s, f, _ in ranking.top[:3]] == [t[:2] for t in la["top"]]
  assert feats == {s: [f for s_, f in cmp["la_ig"] if s_ == s] for s in c.sites if any(s_ == s for s_, _ in cmp["la_ig"])}
  inter = {tuple(p) for p in cmp["contrast"]} & {tuple(p) for p in cmp["la_ig"]}
  assert cmp["intersection"] == len(inter) and cmp["overlap"] == pytest.approx(len(inter) / 3)
  means = [x for s in c.sites for x in la["scores"][s]]
  assert [t[2] for t in la["top"]] == sorted(means, reverse=True)[:3]  # the global set: top 3 of the mean
