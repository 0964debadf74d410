"""TPP recovery on the probe path (SAE/probe algebra on cached activations) against the transformer
path where both apply, per-problem clamps on the grid, and the broadcast delta scope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax import intervene
from recovery_jax.models import random_init, transformer
from recovery_jax.recovery import api, probe
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae import testing as sae_testing

SITE = "blocks.1.hook_resid_post"  # the last layer: no layer runs after the probe site
B, T = 4, 6


@pytest.fixture(scope="module")
def setting():
  """A tiny llama whose readout is a linear probe: ln_final with eps 1e12 and weight 1e6 is the
  identity to float32 precision, and W_U's columns 0 / 1 are (w, 0), so the logit difference of
  tokens 0 and 1 at the last position is w . h_last (the probe on a one-token pool)."""
  cfg = random_init.tiny_config("llama", vocab_size=32, n_layers=2, norm_eps=1e12)
  params = random_init.init_params(cfg, jax.random.key(0))
  d = cfg.d_model
  w = np.asarray(jax.random.normal(jax.random.key(1), (d,))) / np.sqrt(d)
  params["ln_final"]["w"] = jnp.full((d,), 1e6, jnp.float32)
  if "unembed" in params:
    params["unembed"]["W_U"] = params["unembed"]["W_U"].at[:, 0].set(w).at[:, 1].set(0.0)
  else:
    params["embed"]["W_E"] = params["embed"]["W_E"].at[0].set(w).at[1].set(0.0)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (B, T), 2, 32), np.int32)
  h = transformer.forward(params, cfg, tokens, capture=(SITE,)).captures[SITE]
  sae, scfg = sae_testing.random_sae(d, 48, seed=3, site=SITE)
  z = np.asarray(jax.vmap(lambda x: intervene.make_clamp(
      intervene.ClampSpec(SITE, scfg, mode="zero"), sae, np.arange(48)).features(x))(h))[:, -1]
  feats = np.argsort(-(z > 0).sum(0) * (z.mean(0) * (np.asarray(sae["W_dec"]) @ w)))[:6]
  return params, cfg, tokens, np.asarray(h), sae, scfg, w, feats


def _probe_problems(h, w, t_pool):
  n, t, d = h.shape
  pool = np.zeros((n, 1, t), bool)
  pool[:, :, t - t_pool:] = True
  last = np.full((n, 1, 1), t - 1, np.int32)
  return probe.ProbeProblem(
      h=jnp.asarray(h)[:, None], pool_mask=jnp.asarray(pool), positions=jnp.broadcast_to(jnp.arange(t), (n, 1, t)),
      probe_w=jnp.broadcast_to(jnp.asarray(w, jnp.float32), (n, d)), probe_b=jnp.zeros((n,)),
      delta_cols=jnp.asarray(last), delta_valid=jnp.ones((n, 1, 1), bool), monitor_cols=jnp.asarray(last),
      monitor_valid=jnp.ones((n, 1, 1), bool), row_weight=jnp.ones((n, 1)))


@pytest.mark.parametrize("mode", ["none", "encoder", "encoder_exact"])
def test_probe_path_equals_transformer_path(setting, mode):
  params, cfg, tokens, h, sae, scfg, w, feats = setting
  rc = RecoveryConfig(steps=15, lr=0.1, budget=3.0, projection=mode)
  ref = api.recover_site(params, cfg, sae, scfg, site=SITE, tokens=tokens, delta_pos=T - 1, readout_pos=T - 1,
                         objective=Objective("logit_diff"), targets={"pos": np.zeros(B, np.int32),
                                                                     "neg": np.ones(B, np.int32)},
                         feature_idx=feats, clamp_mode="zero", config=rc, shared=False)
  clamp = intervene.make_clamp(intervene.ClampSpec(SITE, scfg, mode="zero"), sae, feats)
  out = probe.recover_probe_examples(probe.ProbeSpec(rc), clamp, _probe_problems(h, w, 1), rc.hparams(),
                                     jax.random.PRNGKey(0))
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)
  close(out.rows_base[:, 0], ref.rows_base)
  close(out.rows_defended[:, 0], ref.rows_defended)
  assert (np.asarray(ref.rows_defended) < np.asarray(ref.rows_base)).any()  # the ablation bites
  close(out.rows[:, 0], ref.rows)
  close(out.delta.reshape(B, -1), np.asarray(ref.delta).reshape(B, -1))
  close(out.feats[0][:, 0], ref.feats[0])
  close(out.refs[0][:, 0], ref.refs[0])
  assert float(np.abs(np.asarray(out.delta)).max()) > 1e-2  # it moved


def test_grid_with_a_clamp_per_problem_equals_one_class_at_a_time(setting):
  """recover_probe_grid over 2 points x 4 problems, problems 0-1 of class A and 2-3 of class B
  (own probe and latents), equals recover_probe_examples run per class and per budget."""
  _, _, _, h, sae, scfg, w, feats = setting
  rc = RecoveryConfig(steps=8, lr=0.1, projection="encoder")
  spec = intervene.ClampSpec(SITE, scfg, mode="zero")
  w2 = -w[::-1].copy()
  sets = [feats[:4], feats[2:5]]
  ws = [w, w, w2, w2]
  pbs = _probe_problems(h, w, 3)._replace(probe_w=jnp.asarray(np.stack(ws), jnp.float32))
  per = [intervene.make_clamp(spec, sae, sets[i // 2], k_max=5) for i in range(B)]
  budgets = np.array([0.5, 3.0], np.float32)
  grid = intervene.stack_clamps([intervene.stack_clamps(per)] * 2)
  hp = jax.tree.map(lambda a: jnp.broadcast_to(a, (2,)), rc.hparams(budget=budgets))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(2))
  out = probe.recover_probe_grid(probe.ProbeSpec(rc), grid, pbs, hp, keys)
  assert out.rows.shape == (2, B, 1)
  for g in range(2):
    for c in range(2):
      rows = slice(2 * c, 2 * c + 2)
      sub = jax.tree.map(lambda a: a[rows], pbs)
      # problem i of the class sits at index 2c + i of the grid: same key fold
      for i in range(2):
        one = jax.tree.map(lambda a: a[i:i + 1], sub)
        ref = probe.recover_probe_examples(probe.ProbeSpec(rc), intervene.make_clamp(spec, sae, sets[c], k_max=5), one,
                                           rc.hparams(budget=budgets[g]), jax.random.fold_in(keys[g], 2 * c + i))
        np.testing.assert_allclose(np.asarray(out.rows[g, 2 * c + i]), np.asarray(ref.rows[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.delta[g, 2 * c + i]), np.asarray(ref.delta[0]), rtol=1e-5,
                                   atol=1e-5)
  norms = np.linalg.norm(np.asarray(out.delta).reshape(2, B, -1), axis=-1)
  assert (norms[0] <= 0.5 + 1e-4).all() and norms[1].max() > 0.5 + 1e-3  # the budget is per point


def test_broadcast_scope(setting):
  """A broadcast delta over one column is the one-row delta; over all columns it adds the same row
  at each of them (pooled logit moves by w . delta)."""
  _, _, _, h, sae, scfg, w, feats = setting
  rc = RecoveryConfig(steps=6, lr=0.1, projection="none")
  clamp = intervene.make_clamp(intervene.ClampSpec(SITE, scfg, mode="zero"), sae, feats)
  pbs = _probe_problems(h, w, 3)
  key = jax.random.PRNGKey(0)
  one = probe.recover_probe_examples(probe.ProbeSpec(rc), clamp, pbs, rc.hparams(), key)
  bc = probe.recover_probe_examples(probe.ProbeSpec(rc, broadcast=True), clamp, pbs, rc.hparams(), key)
  np.testing.assert_allclose(np.asarray(bc.rows), np.asarray(one.rows), rtol=1e-5, atol=1e-5)
  cols = jnp.broadcast_to(jnp.arange(T), (B, 1, T))
  allp = pbs._replace(delta_cols=cols, delta_valid=jnp.ones((B, 1, T), bool))
  out = probe.recover_probe_examples(probe.ProbeSpec(rc, broadcast=True), clamp, allp, rc.hparams(), key)
  assert out.delta.shape == (B, 1, 1, h.shape[-1])
  h_def = np.asarray(clamp(jnp.asarray(h), jnp.broadcast_to(jnp.arange(T), (B, T))))
  d = np.asarray(out.delta)[:, 0, 0]
  assert (d @ w > 0.05).all()  # the broadcast row moved the pooled logit
  want = h_def[:, T - 3:].mean(1) @ w + d @ w  # the same row at every pooled column
  np.testing.assert_allclose(np.asarray(out.rows[:, 0]), want, rtol=1e-4, atol=1e-4)


def test_before_threat_the_ablation_re_acts_on_h_plus_delta(setting):
  """``ProbeSpec(before=True)``: delta goes into the residual the clamp reads; the recovered rows and the
  monitored features are the probe and the SAE on clamp(h + delta), computed here independently."""
  params, cfg, tokens, h, sae, scfg, w, feats = setting
  rc = RecoveryConfig(steps=10, lr=0.1, budget=3.0, projection="none")
  clamp = intervene.make_clamp(intervene.ClampSpec(SITE, scfg, mode="zero"), sae, feats)
  pbs = _probe_problems(h, w, 1)
  out = probe.recover_probe_examples(probe.ProbeSpec(rc, before=True), clamp, pbs, rc.hparams(), jax.random.PRNGKey(0))
  after = probe.recover_probe_examples(probe.ProbeSpec(rc), clamp, pbs, rc.hparams(), jax.random.PRNGKey(0))
  x = jnp.asarray(h, jnp.float32).at[:, -1].add(jnp.asarray(out.delta)[:, 0, 0])  # [B, T, d] h + delta at the last token
  x = clamp(x, jnp.broadcast_to(jnp.arange(T), (B, T)))
  np.testing.assert_allclose(np.asarray(out.rows[:, 0]), np.asarray(x[:, -1] @ jnp.asarray(w, jnp.float32)), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.feats[0][:, 0, 0]), np.asarray(clamp.features(x[:, -1])), atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.rows_defended), np.asarray(after.rows_defended), atol=1e-6)
  assert not np.allclose(np.asarray(out.delta), np.asarray(after.delta), atol=1e-3)  # the clamp is in the path
