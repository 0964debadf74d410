"""The refusal defence: multi-site live clamps and additive steering; KV-cached defended generation equals a
full recompute at every step (tiny random model, random SAEs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax.models import generate, random_init, transformer
from recovery_jax.sae import testing as sae_testing
from recovery_jax.tasks import refusal_defence as D

SITES = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")


@pytest.fixture(scope="module")
def setup():
  params, cfg = random_init.random_model("llama", seed=3, n_layers=3, d_model=32)
  saes = {s: sae_testing.random_sae(32, 48, architecture="jumprelu", seed=i + 5, site=s, threshold=0.05)
          for i, s in enumerate(SITES)}
  feats = {SITES[0]: [1, 4, 7, 9], SITES[1]: [0, 3]}
  return params, cfg, saes, feats


def _full_recompute(params, cfg, prompt, mask, new, defence):
  """Greedy next tokens of every step from one uncached defended forward over prompt + generated tokens:
  by causality the logits at column t are those of a full recompute of the sequence up to t."""
  n = new.shape[1]
  seq = jnp.concatenate([prompt, jnp.asarray(new[:, :-1])], axis=1)
  m = jnp.concatenate([mask, jnp.ones((seq.shape[0], n - 1), jnp.int32)], axis=1)
  logits = transformer.forward(params, cfg, seq, attention_mask=m, edits=D.edits(defence)).logits
  return np.asarray(jnp.argmax(logits[:, -n:], -1)), np.asarray(logits[:, -n:])


@pytest.mark.parametrize("kind,value", [("multiply", 3.0), ("set", 4.0), ("add", 6.0)])
def test_cached_defended_generation_equals_full_recompute(setup, kind, value):
  params, cfg, saes, feats = setup
  defence = D.make_defence(D.DefenceSpec(kind), saes, feats, value)
  prompt, mask = generate.left_pad([[5, 9, 11, 3, 7, 2], [8, 1, 4]], pad_id=0)
  n = 10
  gen = generate.generate_jit(params, cfg, prompt, mask, edit_args=defence, max_new_tokens=n, make_edits=D.edits)
  new = np.asarray(gen.tokens)
  full, logits = _full_recompute(params, cfg, prompt, mask, new, defence)
  assert (new == full).all()
  top2 = np.sort(logits, -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # no near-ties: the comparison is meaningful
  base = np.asarray(generate.generate_jit(params, cfg, prompt, mask, max_new_tokens=n).tokens)
  assert (base != new).any()  # the defence acts


def test_multiply_clamp_matches_explicit_formula(setup):
  params, cfg, saes, feats = setup
  del params, cfg
  site = SITES[0]
  sae, scfg = saes[site]
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  (clamp,) = D.make_defence(D.DefenceSpec("multiply"), {site: saes[site]}, {site: feats[site]}, 3.0)
  idx = np.asarray(feats[site])
  from recovery_jax.sae import core
  z = core.encode(sae, scfg, x)
  want = x + ((3.0 - 1.0) * z[..., idx]) @ sae["W_dec"][idx]
  assert np.asarray(z[..., idx] > 0).any()
  np.testing.assert_allclose(clamp(x, None), want, atol=1e-5)
  # set: active-or-not features to v
  (sclamp,) = D.make_defence(D.DefenceSpec("set"), {site: saes[site]}, {site: feats[site]}, 2.0)
  np.testing.assert_allclose(sclamp(x, None), x + (2.0 - z[..., idx]) @ sae["W_dec"][idx], atol=1e-5)
  # add: a fixed vector, v * sum W_dec[S], at every position
  (steer,) = D.make_defence(D.DefenceSpec("add"), {site: saes[site]}, {site: feats[site]}, 2.0, k_max=6)
  np.testing.assert_allclose(steer(x, None), x + 2.0 * sae["W_dec"][idx].sum(0), atol=1e-5)
  # drop: the SAE as a bottleneck, D(z')
  (bclamp,) = D.make_defence(D.DefenceSpec("multiply", "drop"), {site: saes[site]}, {site: feats[site]}, 3.0)
  np.testing.assert_allclose(bclamp(x, None), core.decode(sae, scfg, z.at[..., idx].multiply(3.0)), atol=1e-5)


def test_bad_defences():
  with pytest.raises(ValueError, match="expected one of"):
    D.DefenceSpec("ablate")
  with pytest.raises(ValueError, match="no SAE pass"):
    D.DefenceSpec("add", "drop")
  with pytest.raises(ValueError, match="no SAE for site"):
    D.make_defence(D.DefenceSpec(), {}, {"blocks.0.hook_resid_post": [1]}, 3.0)
