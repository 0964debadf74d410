"""SAE maths: activations per architecture, sparse forms used by the clamp, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax.sae import core
from recovery_jax.sae.config import SAEConfig

D_IN, D_SAE = 12, 40


def _params(arch, seed=0, **kw):
  r = np.random.default_rng(seed)
  p = {"W_enc": r.normal(size=(D_IN, D_SAE)) * 0.5, "W_dec": r.normal(size=(D_SAE, D_IN)) * 0.3,
       "b_dec": r.normal(size=D_IN) * 0.1, "b_enc": r.normal(size=D_SAE) * 0.1}
  if arch in ("jumprelu", "batchtopk"):
    p["threshold"] = r.uniform(0.05, 0.6, D_SAE)
  if arch == "gated":
    del p["b_enc"]
    p.update(b_gate=r.normal(size=D_SAE) * 0.2, r_mag=r.normal(size=D_SAE) * 0.2, b_mag=r.normal(size=D_SAE) * 0.2)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=5 if arch in ("topk", "batchtopk") else None, **kw)
  return p, cfg


def _x(seed=1, n=7):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, D_IN)), jnp.float32)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk", "gated"])
def test_sparse_forms_match_dense(arch):
  p, cfg = _params(arch)
  x = _x()
  idx = jnp.asarray([3, 0, 17, 39])
  z = core.encode(p, cfg, x)
  np.testing.assert_allclose(core.encode_subset(p, cfg, x, idx), z[:, idx], atol=1e-6)
  dz = jnp.asarray(np.random.default_rng(2).normal(size=(x.shape[0], 4)), jnp.float32)
  z2 = z.at[:, idx].add(dz)
  np.testing.assert_allclose(core.decode_delta(p, cfg, dz, idx, x), core.decode(p, cfg, z2, x) - core.decode(p, cfg, z, x),
                             atol=1e-5)
  # encoder_columns are the input-space gradient of the pre-activations
  jac = jax.jacobian(lambda v: core.encode_pre_subset(p, cfg, v, idx))(x[0])
  np.testing.assert_allclose(jac.T, core.encoder_columns(p, cfg, idx), atol=1e-5)
  np.testing.assert_allclose(core.error(p, cfg, x) + core.forward(p, cfg, x), x, atol=1e-5)


def test_jumprelu_strict_threshold_in_float32():
  p, cfg = _params("jumprelu")
  pre = core.encode_pre(p, cfg, _x())
  p2 = dict(p, threshold=jnp.abs(pre[0]))  # threshold == pre-activation: strict > does not fire
  z = core.encode(p2, cfg, _x())
  assert not bool(jnp.any(z[0] > 0))
  assert bool(jnp.any(core.encode(dict(p2, threshold=jnp.abs(pre[0]) - 1e-4), cfg, _x())[0] > 0))
  p3 = dict(p, threshold=p["threshold"].astype(jnp.bfloat16))
  z3 = core.encode(p3, cfg, _x())
  assert z3.dtype == jnp.float32


def test_topk_keeps_k_and_relu():
  p, cfg = _params("topk")
  z = core.encode(p, cfg, _x())
  assert int(jnp.max(jnp.sum(z > 0, -1))) <= cfg.k
  pre = core.encode_pre(p, cfg, _x())
  kth = jnp.sort(pre, -1)[:, -cfg.k][:, None]
  np.testing.assert_allclose(z, jnp.where(pre >= kth, jax.nn.relu(pre), 0.0), atol=1e-6)


def test_topk_rescale_by_decoder_norm_equals_folded():
  p, cfg = _params("topk", rescale_acts_by_decoder_norm=True)
  n = jnp.linalg.norm(p["W_dec"], axis=-1)
  folded = dict(p, W_enc=p["W_enc"] * n, b_enc=p["b_enc"] * n, W_dec=p["W_dec"] / n[:, None])
  cfg_f = cfg.replace(rescale_acts_by_decoder_norm=False)
  x = _x()
  np.testing.assert_allclose(core.encode(p, cfg, x), core.encode(folded, cfg_f, x), atol=1e-5)
  np.testing.assert_allclose(core.forward(p, cfg, x), core.forward(folded, cfg_f, x), atol=1e-5)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_runtime_normalisation_round_trip(norm):
  p, cfg = _params("standard", normalize_activations=norm)
  x = _x() * 30 + 4
  y = core.forward(p, cfg, x)
  assert y.shape == x.shape
  np.testing.assert_allclose(core.error(p, cfg, x), x - y, atol=1e-4)
