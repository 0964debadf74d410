"""Recovery-path attribution: components sum back to delta; replay under the active clamp."""

import numpy as np
import jax
import jax.numpy as jnp

from recovery_jax.models.random_init import random_model, random_tokens
from recovery_jax.sae.testing import random_sae
from recovery_jax import intervene
from recovery_jax.recovery import api, attribution, engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae import core as sae_core

SITE = "blocks.1.hook_resid_pre"


def test_components_sum_back_to_delta():
  sae, scfg = random_sae(32, 40, seed=4)
  h = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 2, 32))
  delta = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 32))
  idx, mask = jnp.asarray([1, 5, 9, 0]), jnp.asarray([True, True, True, False])
  clamp = intervene.Clamp(intervene.ClampSpec(SITE, scfg), sae, intervene.ClampParams(idx, mask, jnp.asarray(0.0)))
  comp = attribution.decompose(clamp, h, delta, k=4)
  np.testing.assert_allclose(np.asarray(comp.clamped + comp.nonclamped + comp.residual), np.asarray(delta), atol=1e-5)
  np.testing.assert_allclose(np.asarray(comp.sae_feature + comp.residual), np.asarray(delta), atol=1e-5)
  np.testing.assert_allclose(np.asarray(comp.knockout + comp.topk), np.asarray(delta), atol=1e-6)
  # the feature component is D(E(h + delta)) - D(E(h)) (un-normalised SAE)
  recon = lambda x: sae_core.decode(sae, scfg, sae_core.encode(sae, scfg, x))
  np.testing.assert_allclose(np.asarray(comp.sae_feature), np.asarray(recon(h + delta) - recon(h)), atol=1e-4)
  # the clamped component uses exactly the features of S (feature 0 is padding, not in S)
  dz = np.asarray(comp.dz)
  w = np.asarray(sae["W_dec"])
  np.testing.assert_allclose(np.asarray(comp.clamped), dz[..., [1, 5, 9]] @ w[[1, 5, 9]], atol=1e-5)
  # top-k: the 4 largest |dz| outside S, per (example, position)
  for i in range(3):
    for p in range(2):
      outside = np.abs(dz[i, p]).copy()
      outside[[1, 5, 9]] = -1
      top = np.argsort(-outside)[:4]
      np.testing.assert_allclose(np.asarray(comp.topk[i, p]), dz[i, p, top] @ w[top], atol=1e-5)
  e = attribution.energy_fractions(comp)
  assert float(e["full_energy"]) == 1.0


def test_replay_under_active_clamp():
  params, cfg = random_model("llama", n_layers=2, seed=6)
  sae, scfg = random_sae(cfg.d_model, 40, seed=7, site=SITE)
  toks = random_tokens(3, 1, 7)
  targets = {"pos": np.array([4]), "neg": np.array([50])}
  rc = RecoveryConfig(steps=6, lr=0.2, budget=3.0, projection="none")
  out = api.recover_site(params, cfg, sae, scfg, site=SITE, tokens=toks, delta_pos=6, readout_pos=6,
                         objective=Objective("logit_diff"), targets=targets, feature_idx=[1, 2, 3, 5],
                         clamp_value=-2.0, config=rc)
  spec = engine.RecoverySpec(cfg, (SITE,), Objective("logit_diff"), rc, suffix_len=1)
  clamp = intervene.make_clamp(intervene.ClampSpec(SITE, scfg), sae, [1, 2, 3, 5], -2.0)
  pb = jax.tree.map(lambda a: a[0], api.site_problems(toks, None, 6, 6, targets, shared=False))
  comp = attribution.decompose_sites(spec, (clamp,), out.h_def[0, :, 0], out.delta[0], k=5)
  assert comp.full.shape == (1, 1, cfg.d_model)
  np.testing.assert_allclose(np.asarray(comp.clamped + comp.nonclamped + comp.residual), np.asarray(out.delta[0]),
                             atol=1e-5)
  ev = attribution.replay(spec, params, (clamp,), pb, comp)
  assert set(ev) == set(attribution.COMPONENTS)
  # replaying the full delta reproduces the recovered objective; the other components are evaluated too
  np.testing.assert_allclose(float(ev["full"].objective), float(out.objective[0]), atol=1e-5)
  np.testing.assert_allclose(float(ev["full"].objective), float(out.rows[0]), atol=1e-5)
  assert all(np.isfinite(float(v.objective)) for v in ev.values())
