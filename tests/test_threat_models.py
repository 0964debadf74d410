"""Threat models: where the delta enters relative to the clamps (issue 25).

``after``: the delta right after the only clamp (no clamp acts on it); ``before``: the delta on the vector
the clamped SAE reads (``blocks.0.hook_resid_post`` is the input of ``blocks.1.hook_resid_pre``), so the
clamp re-acts on every perturbed state; ``cross``: deltas at both. A tiny GPT-2 with one SAE whose
feature 0 is built to lie along the objective's gradient: the optimiser wants to move it, and we can
say exactly what each threat model and projection allows.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from recovery_jax import intervene
from recovery_jax.intervene import ClampSpec
from recovery_jax.models import generate as gen
from recovery_jax.models import transformer
from recovery_jax.models.random_init import random_tokens
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae import core as sae_core
from recovery_jax.sae.testing import random_sae
from recovery_jax.tasks import refusal_recovery as rec_lib

CLAMP = "blocks.1.hook_resid_pre"
THREATS = {"after": (CLAMP,), "before": ("blocks.0.hook_resid_post",),
           "cross": ("blocks.0.hook_resid_post", CLAMP)}
T, COL, V = 8, 7, 0.5  # tokens, the delta / readout / monitor column, the clamp value of feature 0


@pytest.fixture(scope="module")
def world(tiny_gpt2):
  """(params, cfg, clamp, problem): feature 0's encoder row and decoder row are the unit gradient u of
  the logit difference w.r.t. the residual at ``CLAMP`` (so w_0 . d_0 = 1) and it is active there
  (pre-activation 1); the defence sets it to V."""
  params, cfg = tiny_gpt2
  toks = random_tokens(5, 1, T)
  targets = {"pos": np.array([3]), "neg": np.array([40])}

  def logit_diff(x):
    out = transformer.forward(params, cfg, jnp.asarray(toks),
                              edits={CLAMP: lambda h, p: h.at[:, COL].add(x)})
    return out.logits[0, COL, 3] - out.logits[0, COL, 40]

  g = jax.grad(logit_diff)(jnp.zeros((cfg.d_model,)))
  u = g / jnp.linalg.norm(g)
  h = transformer.forward(params, cfg, jnp.asarray(toks), capture=(CLAMP,)).captures[CLAMP][0, COL]
  sae, scfg = random_sae(cfg.d_model, 16, seed=4, site=CLAMP)
  sae = dict(sae, W_enc=sae["W_enc"].at[:, 0].set(u), W_dec=sae["W_dec"].at[0].set(u),
             b_enc=sae["b_enc"].at[0].set(1.0 - jnp.dot(u, h)))
  clamp = intervene.make_clamp(ClampSpec(CLAMP, scfg, mode="set", positive_only=True), sae, [0], V)
  col = np.array([[COL]])
  pb = engine.Problem(tokens=jnp.asarray(toks), attention_mask=jnp.ones((1, T), bool),
                      positions=jnp.arange(T)[None], delta_cols=col, delta_valid=np.ones((1, 1), bool),
                      readout_cols=col, monitor_cols=col, monitor_valid=np.ones((1, 1), bool),
                      targets=targets, row_weight=np.ones((1,), np.float32))
  return params, cfg, clamp, pb


def _recover(world, threat: str, projection: str, semantics: str = "live"):
  params, cfg, clamp, pb = world
  rc = RecoveryConfig(steps=12, lr=0.2, budget=2.0, projection=projection, jacobian_probes=2)
  spec = engine.RecoverySpec(cfg, THREATS[threat], Objective("logit_diff"), rc, suffix_len=1, semantics=semantics)
  return engine.recover(spec, params, (clamp,), pb, rc.hparams(), jax.random.key(0))


def _drift(out) -> float:
  """|c_0 - V| of the clamped feature at the monitor column, after the clamp (and the delta there)."""
  return float(jnp.abs(out.feats[0][0, 0, 0] - V))


def test_the_clamp_re_acts_on_a_delta_that_passes_through_it(world):
  """``before``: the monitored feature is the SAE's encoding of clamp(h + delta), computed here
  independently; it stays exactly at V whatever delta does (w_0 . d_0 = 1, so the set clamp
  cancels the delta's move of feature 0). ``after``: the same optimiser moves it (the delta is
  added behind the clamp), unless the projection keeps it (encoder_exact: null space of w_0;
  jacobian_exact: null space of the features' Jacobian)."""
  params, cfg, clamp, pb = world
  before = _recover(world, "before", "none")
  delta = before.delta[0, 0]  # [d]
  assert float(jnp.linalg.norm(delta)) > 1.0 and float(before.objective) > float(before.objective_defended)
  h = transformer.forward(params, cfg, pb.tokens, edits={"blocks.0.hook_resid_post":
                                                         lambda x, p: x.at[:, COL].add(delta)},
                          capture=(CLAMP,)).captures[CLAMP][:, COL]  # the clamp's input
  want = sae_core.encode(clamp.sae, clamp.spec.sae_cfg, clamp(h[:, None], None)[:, 0])[0, 0]
  np.testing.assert_allclose(float(before.feats[0][0, 0, 0]), float(want), atol=1e-5)
  assert _drift(before) < 1e-4, "the clamp must re-act: feature 0 stays at V"

  after = _recover(world, "after", "none")
  assert _drift(after) > 0.2, "behind the clamp, the unprojected delta moves feature 0"
  for projection in ("encoder_exact", "jacobian_exact"):
    assert _drift(_recover(world, "after", projection)) < 1e-4, projection
  # cross-layer: the delta at blocks.0 passes the clamp; the one behind it is what moves feature 0
  assert _drift(_recover(world, "cross", "none")) > 0.2


def test_frozen_semantics_would_not_re_act(world):
  """With the clamp's change frozen (a constant offset: the weaker defence of a delta-free clamp),
  the cross-layer delta at blocks.0 is not cancelled any more: frozen and live differ exactly where
  a clamp sits downstream of a delta."""
  live = _recover(world, "cross", "none", "live")
  frozen = _recover(world, "cross", "none", "frozen")
  assert not np.allclose(np.asarray(live.delta), np.asarray(frozen.delta), atol=1e-4)


@pytest.mark.parametrize("threat", sorted(THREATS))
def test_generation_with_clamp_and_delta_cached_equals_recompute(world, threat):
  """Greedy generation under the live clamp with a delta at the threat's sites (refusal's generation
  edits, absolute positions: the anchor and the answer positions) gives the same tokens with the KV
  cache as with the full forward recomputed at every step."""
  params, cfg, clamp, pb = world
  sites = THREATS[threat]
  n_new, p = 5, 3
  rng = np.random.default_rng(1)
  d1 = jnp.asarray(rng.normal(size=(1, len(sites), 1, cfg.d_model)), jnp.float32) * 3.0
  d2 = jnp.asarray(rng.normal(size=(1, len(sites), p, cfg.d_model)), jnp.float32) * 3.0
  anchor, ans_pos, ans_valid = np.array([COL]), (COL + 1 + np.arange(p))[None], np.ones((1, p), bool)
  edits = rec_lib.generation_edits(intervene.clamp_edits((clamp,)), sites, d1, d2, anchor, ans_pos, ans_valid,
                                   "honest")
  toks = pb.tokens
  cached = np.asarray(gen.generate(params, cfg, toks, max_new_tokens=n_new, pad_id=0, edits=edits).tokens)[0]
  buf = list(np.asarray(toks[0]))
  for _ in range(n_new):  # the reference: the whole sequence again at every step
    logits = transformer.forward(params, cfg, jnp.asarray([buf]), edits=edits).logits[0, -1]
    buf.append(int(jnp.argmax(logits)))
  np.testing.assert_array_equal(cached, np.asarray(buf[T:]))
  plain = np.asarray(gen.generate(params, cfg, toks, max_new_tokens=n_new, pad_id=0,
                                  edits=intervene.clamp_edits((clamp,))).tokens)[0]
  assert np.any(plain != cached), "the delta should change what is generated"


@pytest.mark.parametrize("field, value, words", [
    ("recovery.delta_sites", ("blocks.1.hook_mlp_out",), "recovery.delta_sites"),
    ("recovery.threats", ("nocolon",), "name:site"),
    ("recovery.threats", ("a:blocks.0.hook_resid_post", "a:blocks.1.hook_resid_post"), "twice"),
    ("recovery.curve.threats", ("sideways",), "recovery.curve.threats"),
    ("recovery.curve.rhos", (0.0,), "rho > 0"),
])
def test_bad_threat_fields_are_named(field, value, words):
  from recovery_jax import config_utils, errors  # pylint: disable=import-outside-toplevel
  from recovery_jax.experiments import refusal  # pylint: disable=import-outside-toplevel
  config = config_utils.load_config_file("configs/refusal.py:tiny")
  config.recovery.curve.rhos = (0.1,)
  parent, _, leaf = field.rpartition(".")
  node = config
  for part in parent.split("."):
    node = node[part]
  node[leaf] = value
  with pytest.raises(errors.UserError, match=words):
    refusal.validate(config)
