"""TPP probe pipeline against independent NumPy implementations on tiny data (no scikit-learn)."""

import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax import intervene
from recovery_jax.sae import core as sae_core
from recovery_jax.sae import testing as sae_testing
from recovery_jax.tasks import tpp_probes as tp


def _np_train(x, idx, y, order, w0, b0, l1, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
  """Per-class loop: BCE-with-logits (analytic gradient) + l1 * sum|w|, torch-style AdamW."""
  ws, bs = [], []
  for c in range(idx.shape[0]):
    w, b = w0[c].astype(np.float64), float(b0[c])
    mw, vw, mb, vb = np.zeros_like(w), np.zeros_like(w), 0.0, 0.0
    for t, batch in enumerate(order[c], 1):
      batch = batch[batch >= 0]
      xb, yb = x[idx[c, batch]].astype(np.float64), y[c, batch]
      p = 1.0 / (1.0 + np.exp(-(xb @ w + b)))
      gw = xb.T @ (p - yb) / len(batch) + l1 * np.sign(w)
      gb = float(np.mean(p - yb))
      w, b = w * (1 - lr * wd), b * (1 - lr * wd)
      mw, vw = b1 * mw + (1 - b1) * gw, b2 * vw + (1 - b2) * gw ** 2
      mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb ** 2
      w = w - lr * (mw / (1 - b1 ** t)) / (np.sqrt(vw / (1 - b2 ** t)) + eps)
      b = b - lr * (mb / (1 - b1 ** t)) / (np.sqrt(vb / (1 - b2 ** t)) + eps)
    ws.append(w)
    bs.append(b)
  return np.stack(ws), np.asarray(bs)


def test_probes_vmapped_over_classes_equal_a_numpy_loop():
  rng = np.random.default_rng(0)
  c, per, d = 3, 9, 5
  labels = np.repeat(np.arange(c), per)
  x = rng.normal(size=(c * per, d)).astype(np.float32) + 2.0 * np.eye(c, d)[labels]
  idx, y = tp.ovr_sets(labels, c, seed=3)
  order = tp.batch_order(c, idx.shape[1], epochs=4, batch_size=4, seed=4)  # 18 = 4 + 4 + 4 + 4 + 2: a padded batch
  assert (order == -1).any()
  init = tp.init_probes(c, d, seed=5)
  got = tp.train_probes(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(y), jnp.asarray(order), init, l1=1e-2, lr=5e-2)
  ref_w, ref_b = _np_train(x, idx, y, order, np.asarray(init.w), np.asarray(init.b), 1e-2, 5e-2, 0.01)
  np.testing.assert_allclose(np.asarray(got.w), ref_w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.b), ref_b, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(got.w) - np.asarray(init.w)).max() > 0.1  # it trained
  acc = tp.accuracies(x, idx, y, got)
  assert acc.shape == (c,) and (acc > 0.8).all()


def test_ovr_sets_are_balanced_one_vs_rest():
  labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
  idx, y = tp.ovr_sets(labels, 3, seed=0)
  assert idx.shape == (3, 6)
  for c in range(3):
    pos = idx[c][y[c] == 1]
    assert (labels[pos] == c).all() and len(set(pos)) == 3
    assert (labels[idx[c][y[c] == 0]] != c).all()


def test_latent_effects_and_top_n_against_a_loop():
  rng = np.random.default_rng(1)
  n, f, d, c = 12, 7, 4, 3
  zbar = np.abs(rng.normal(size=(n, f)))
  labels = np.repeat(np.arange(c), n // c)
  idx, y = tp.ovr_sets(labels, c)
  probes = tp.ProbeSet(rng.normal(size=(c, d)), rng.normal(size=c))
  w_dec = rng.normal(size=(f, d))
  eff = tp.latent_effects(zbar, idx, y, probes, w_dec)
  for k in range(c):
    for i in range(f):
      pos = [zbar[idx[k, m], i] for m in range(idx.shape[1]) if y[k, m] == 1]
      neg = [zbar[idx[k, m], i] for m in range(idx.shape[1]) if y[k, m] == 0]
      want = max(np.mean(pos) - np.mean(neg), 0.0) * sum(probes.w[k][j] * w_dec[i][j] for j in range(d))
      assert eff[k, i] == pytest.approx(want, abs=1e-12)
  top, mask = tp.top_latents(eff, 4)
  for k in range(c):
    positive = sorted((i for i in range(f) if eff[k, i] > 0), key=lambda i: -eff[k, i])[:4]
    assert list(top[k][mask[k]]) == positive


def test_tpp_metric_by_hand():
  clean = np.array([0.9, 0.8, 1.0])
  abl = np.array([[0.5, 0.8, 0.9],   # class 0 ablated: own drop 0.4, others 0.0 and 0.1
                  [0.9, 0.8, 1.0],   # nothing drops
                  [0.7, 0.6, 0.5]])  # own drop 0.5, others 0.2, 0.2
  row = tp.tpp_metric(5, clean, abl)
  np.testing.assert_allclose(row.intended, [0.4, 0.0, 0.5])
  np.testing.assert_allclose(row.unintended, [0.05, 0.0, 0.2])
  assert row.total == pytest.approx(((0.4 - 0.05) + 0 + (0.5 - 0.2)) / 3)


def test_ablated_pooling_equals_full_sae_zeroing_per_example():
  """The sparse clamp pooled per class == encode everything, zero the class's latents where
  positive, decode, add the error back, mean over pooled tokens (one example at a time)."""
  rng = np.random.default_rng(2)
  d, f, t = 8, 24, 6
  sae, cfg = sae_testing.random_sae(d, f, seed=3)
  h = rng.normal(size=(5, t, d)).astype(np.float32)
  mask = rng.random((5, t)) > 0.3
  mask[:, 0] = False
  effects = rng.normal(size=(2, f))
  spec = intervene.ClampSpec(site="blocks.0.hook_resid_post", sae_cfg=cfg, mode="zero")
  got = tp.ablated_pooled(tp.class_clamps(spec, sae, effects, 5, k_max=7), h, mask, batch_size=2)
  top, keep = tp.top_latents(effects, 5)
  for c in range(2):
    for e in range(5):
      x = jnp.asarray(h[e])
      z = np.asarray(sae_core.encode(sae, cfg, x))
      z2 = z.copy()
      z2[:, top[c][keep[c]]] = 0.0
      x2 = np.asarray(x) + np.asarray(sae_core.decode(sae, cfg, jnp.asarray(z2), x)) - np.asarray(
          sae_core.decode(sae, cfg, jnp.asarray(z), x))
      want = x2[mask[e]].mean(0)
      np.testing.assert_allclose(got[c, e], want, rtol=1e-4, atol=1e-5)


def test_tpp_table_equals_one_n_and_class_at_a_time():
  rng = np.random.default_rng(4)
  d, f, t, c = 8, 32, 5, 3
  sae, cfg = sae_testing.random_sae(d, f, seed=5)
  h = rng.normal(size=(12, t, d)).astype(np.float32)
  mask = np.ones((12, t), bool)
  mask[:, 0] = False
  labels = np.repeat(np.arange(c), 4)
  idx, y = tp.ovr_sets(labels, c, seed=1)
  probes = tp.ProbeSet(jnp.asarray(rng.normal(size=(c, d)), jnp.float32), jnp.zeros((c,)))
  effects = np.abs(rng.normal(size=(c, f))) * (rng.random((c, f)) > 0.4)
  spec = intervene.ClampSpec(site="blocks.0.hook_resid_post", sae_cfg=cfg, mode="zero")
  acc, rows = tp.tpp_table(spec, sae, effects, probes, h, mask, idx, y, ns=(2, 6, 30), batch_size=5)
  pooled = np.asarray(tp.mean_pool(jnp.asarray(h), jnp.asarray(mask)))
  np.testing.assert_allclose(acc, tp.accuracies(pooled, idx, y, probes))
  for row, n in zip(rows, (2, 6, 30)):
    abl = tp.ablated_pooled(tp.class_clamps(spec, sae, effects, n, k_max=n), h, mask)
    want = tp.tpp_metric(n, acc, np.stack([tp.accuracies(abl[i], idx, y, probes) for i in range(c)]))
    assert row.n == n and row.total == pytest.approx(want.total)
    np.testing.assert_allclose(row.intended, want.intended)
    np.testing.assert_allclose(row.unintended, want.unintended)
  assert any(r.total != 0 for r in rows)
