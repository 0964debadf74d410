"""The clamp as a function transform: no-op identity, sparse == dense form, gradients, masks."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from recovery_jax.models.random_init import random_tokens
from recovery_jax.sae.testing import random_sae
from recovery_jax import intervene
from recovery_jax.intervene import ClampSpec
from recovery_jax.models import transformer
from recovery_jax.sae import core as sae_core

SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model(tiny_llama):
  return tiny_llama


@pytest.fixture(scope="module")
def sae(model):
  return random_sae(model[1].d_model, 40, site=SITE)


@pytest.fixture(scope="module", params=["standard", "jumprelu"])
def any_sae(request, model):
  """Standard (b_dec = 0) and JumpReLU with a non-zero b_dec subtracted from its input."""
  if request.param == "jumprelu":
    return random_sae(model[1].d_model, 40, architecture="jumprelu", b_dec=0.2, apply_b_dec_to_input=True, site=SITE)
  return random_sae(model[1].d_model, 40, site=SITE)


def _x(seed=0, shape=(2, 6, 32)):
  return 2.0 * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _encode(sp, scfg, x):
  """Independent SAE encode (not sae.core): (x - b_dec?) W_enc + b_enc, then ReLU / JumpReLU (pre > t)."""
  xin = x - sp["b_dec"] if scfg.apply_b_dec_to_input else x
  pre = xin @ sp["W_enc"] + sp["b_enc"]
  if scfg.architecture == "jumprelu":
    return jnp.where(pre > sp["threshold"], pre, 0.0)
  return jnp.maximum(pre, 0.0)


def _dense(sp, scfg, spec, cp, x, detach_error=False):
  """Reference form D(z') + (x - D(z)) with the full encode, written without the package's SAE code."""
  z = _encode(sp, scfg, x)
  idx = np.asarray(cp.feature_idx)[np.asarray(cp.feature_mask)]  # the real features only
  zc = z.at[..., idx].set(intervene.clamp_values(spec, z[..., idx], cp.value))
  dec = lambda zz: zz @ sp["W_dec"] + sp["b_dec"]
  err = x - dec(z)
  if detach_error:
    err = jax.lax.stop_gradient(err)
  return dec(zc) + err


def test_clamp_values_table():
  z = jnp.array([-1.0, 0.0, 2.0])
  cfg = random_sae(4)[1]
  f = lambda mode, po, v: np.asarray(intervene.clamp_values(ClampSpec(SITE, cfg, mode=mode, positive_only=po), z, v))
  np.testing.assert_array_equal(f("set", True, -5.0), [-1.0, 0.0, -5.0])
  np.testing.assert_array_equal(f("set", False, -5.0), [-5.0, -5.0, -5.0])
  np.testing.assert_array_equal(f("multiply", True, 3.0), [-1.0, 0.0, 6.0])
  np.testing.assert_array_equal(f("multiply", False, 3.0), [-3.0, 0.0, 6.0])
  np.testing.assert_array_equal(f("zero", True, 7.0), [-1.0, 0.0, 0.0])


@pytest.mark.parametrize("mode,value,mask", [("set", -5.0, False), ("multiply", 1.0, True), ("multiply", 3.0, False),
                                             ("zero", 0.0, False)])
def test_noop_clamp_is_bitwise_identity(any_sae, mode, value, mask):
  sp, scfg = any_sae
  spec = ClampSpec(SITE, scfg, mode=mode, positive_only=False)
  cp = intervene.make_clamp_params([1, 4, 9], value, feature_mask=[mask] * 3)
  x = _x()
  out = jax.jit(lambda x: intervene.clamp_residual(spec, sp, cp, x))(x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_noop_clamp_in_forward(model, sae):
  """An all-masked clamp inside a jitted forward changes nothing, bitwise."""
  params, cfg = model
  sp, scfg = sae
  spec = ClampSpec(SITE, scfg, mode="set", positive_only=False)
  cp = intervene.make_clamp_params([1, 4, 9], -5.0, feature_mask=[False] * 3)
  toks = jnp.asarray(random_tokens(0, 2, 6))
  plain = jax.jit(lambda p: transformer.forward(p, cfg, toks).logits)(params)
  defended = jax.jit(lambda p: intervene.clamp(transformer.forward, intervene.Clamp(spec, sp, cp))(p, cfg, toks).logits)(
      params)
  np.testing.assert_array_equal(np.asarray(defended), np.asarray(plain))


@pytest.mark.parametrize("mode,po,value", [("set", True, -5.0), ("set", False, 1.5), ("multiply", False, 3.0),
                                           ("zero", True, 0.0)])
def test_sparse_equals_dense_form(any_sae, mode, po, value):
  sp, scfg = any_sae
  spec = ClampSpec(SITE, scfg, mode=mode, positive_only=po)
  cp = intervene.make_clamp_params([0, 3, 5, 8, 13], value, k_max=7)  # padded to K_max with a mask
  x = _x(1)
  np.testing.assert_allclose(np.asarray(intervene.clamp_residual(spec, sp, cp, x)),
                             np.asarray(_dense(sp, scfg, spec, cp, x)), atol=2e-5, rtol=1e-5)
  # it does change the residual (features are active)
  assert float(jnp.abs(intervene.clamp_residual(spec, sp, cp, x) - x).max()) > 1e-3


def test_gradient_semantics(any_sae):
  sp, scfg = any_sae
  cp = intervene.make_clamp_params([0, 3, 5, 8], 3.0)
  x = _x(2, (5, 32))
  # "pass": the reference clamp_sae_safe differentiated as written (error not detached)
  spec = ClampSpec(SITE, scfg, mode="multiply", positive_only=False)
  j_sparse = jax.jacfwd(lambda v: intervene.clamp_residual(spec, sp, cp, v))(x)
  j_dense = jax.jacfwd(lambda v: _dense(sp, scfg, spec, cp, v))(x)
  np.testing.assert_allclose(np.asarray(j_sparse), np.asarray(j_dense), atol=1e-5)
  # "stop": SAELens style, gradient only through the reconstruction; same value
  stop = ClampSpec(SITE, scfg, mode="multiply", positive_only=False, error_grad="stop")
  np.testing.assert_allclose(np.asarray(intervene.clamp_residual(stop, sp, cp, x)),
                             np.asarray(intervene.clamp_residual(spec, sp, cp, x)), atol=2e-5)
  j_stop = jax.jacfwd(lambda v: intervene.clamp_residual(stop, sp, cp, v))(x)
  j_ref = jax.jacfwd(lambda v: _dense(sp, scfg, stop, cp, v, detach_error=True))(x)
  np.testing.assert_allclose(np.asarray(j_stop), np.asarray(j_ref), atol=1e-5)
  assert float(jnp.abs(j_stop - j_sparse).max()) > 1e-2


def test_position_mask_and_kv_cached_decoding(model, sae):
  params, cfg = model
  sp, scfg = sae
  spec = ClampSpec(SITE, scfg, mode="set", positive_only=False, masked_positions=True)
  pm = jnp.zeros((16,), bool).at[jnp.array([2, 5, 7])].set(True)
  cp = intervene.make_clamp_params([1, 2, 6], -3.0, position_mask=pm)
  x = _x(3, (1, 9, 32))
  out = intervene.clamp_residual(spec, sp, cp, x, jnp.arange(9)[None])
  changed = np.asarray(jnp.abs(out - x).max(-1)[0] > 0)
  assert set(np.nonzero(changed)[0]) <= {2, 5, 7} and changed[[2, 5]].any()
  # the same mask means the same thing in a full forward and in prefill + one-token decoding
  defended_fn = intervene.clamp(transformer.forward, intervene.Clamp(spec, sp, cp))
  defended = jax.jit(defended_fn, static_argnums=1)
  toks = jnp.asarray(random_tokens(5, 1, 9))
  full = defended(params, cfg, toks).logits
  cache = transformer.init_cache(cfg, 1, 12)
  pre = defended(params, cfg, toks[:, :4], cache=cache)
  logits, cache = [pre.logits], pre.cache
  for t in range(4, 9):
    step = defended(params, cfg, toks[:, t:t + 1], cache=cache)
    logits.append(step.logits)
    cache = step.cache
  np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1)), np.asarray(full), atol=2e-5)
  assert float(jnp.abs(full - transformer.forward(params, cfg, toks).logits).max()) > 1e-4
  # a delta placed by absolute position lands on the same token in a full pass and while decoding
  rows = jnp.ones((1, cfg.d_model))
  edit = {SITE: intervene.add_at_positions_edit(rows, jnp.array([[6]]))}
  run = jax.jit(lambda t, c: defended_fn(params, cfg, t, cache=c, edits=edit))
  full_d = jax.jit(lambda t: defended_fn(params, cfg, t, edits=edit).logits)(toks)
  out = run(toks[:, :6], transformer.init_cache(cfg, 1, 12))
  step = run(toks[:, 6:7], out.cache)
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, :6]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(step.logits[:, 0]), np.asarray(full_d[:, 6]), atol=2e-5)
  assert float(jnp.abs(full_d[:, 6] - full[:, 6]).max()) > 1e-3


def test_transform_order_and_multiple_clamps(model, sae):
  params, cfg = model
  sp, scfg = sae
  s1 = ClampSpec(SITE, scfg, mode="set", positive_only=True)
  s2 = ClampSpec("blocks.0.hook_resid_post", scfg, mode="multiply", positive_only=False)
  c1, c2 = intervene.make_clamp_params([1, 2], -2.0), intervene.make_clamp_params([3, 4], 2.0)
  toks = jnp.asarray(random_tokens(6, 2, 7))
  add = jnp.linspace(-1, 1, cfg.d_model)
  defended = intervene.clamp(transformer.forward, (intervene.Clamp(s1, sp, c1), intervene.Clamp(s2, sp, c2)))
  out = defended(params, cfg, toks, edits={SITE: lambda x, p: x + add}, capture=(SITE,))
  # manual: clamp at layer 0 post, then at layer 1 pre the clamp runs before the caller's edit
  manual = transformer.forward(params, cfg, toks, capture=(SITE,), edits={
      "blocks.0.hook_resid_post": lambda x, p: intervene.clamp_residual(s2, sp, c2, x, p),
      SITE: lambda x, p: intervene.clamp_residual(s1, sp, c1, x, p) + add})
  np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(manual.logits))
  np.testing.assert_array_equal(np.asarray(out.captures[SITE]), np.asarray(manual.captures[SITE]))


def test_clamp_params_helpers():
  cfg = random_sae(8)[1]
  cp = intervene.make_clamp_params([3, 1], 2.0, k_max=4)
  np.testing.assert_array_equal(np.asarray(cp.feature_idx), [3, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(cp.feature_mask), [True, True, False, False])
  sae = random_sae(8)
  st = intervene.stack_clamps([intervene.make_clamp(ClampSpec(SITE, cfg), sae[0], [3, 1], 2.0, k_max=4),
                               intervene.make_clamp(ClampSpec(SITE, cfg), sae[0], [5], -1.0, k_max=4)])
  assert st.params.feature_idx.shape == (2, 4) and st.params.value.shape == (2,)
  assert st.sae["W_dec"].shape == (48, 8)  # the SAE is shared, not stacked
  with pytest.raises(ValueError, match="same ClampSpec"):
    intervene.stack_clamps([st, st.replace(spec=ClampSpec(SITE, cfg, mode="zero"))])
  with pytest.raises(ValueError):
    intervene.make_clamp_params([1, 2, 3], 0.0, k_max=2)
  with pytest.raises(ValueError):
    ClampSpec(SITE, cfg, mode="scale")
  x = jnp.ones((1, 3, 8))
  with pytest.raises(ValueError, match="position_mask"):
    intervene.clamp_residual(ClampSpec(SITE, cfg, masked_positions=True), random_sae(8)[0], cp, x, jnp.arange(3)[None])


def test_error_term_drop_is_the_clamped_reconstruction(any_sae):
  """error_term="drop": x' = D(z') exactly (the SAE as a full bottleneck), not x + D(z') - D(z)."""
  sp, scfg = any_sae
  spec = ClampSpec(SITE, scfg, mode="set", positive_only=True, error_term="drop")
  cp = intervene.make_clamp_params([0, 3, 5, 8], -2.0, k_max=6)
  x = _x(4)
  z = sae_core.encode(sp, scfg, x)
  zc = z.at[..., jnp.asarray([0, 3, 5, 8])].set(intervene.clamp_values(spec, z[..., jnp.asarray([0, 3, 5, 8])], -2.0))
  want = sae_core.decode(sp, scfg, zc)
  got = intervene.clamp_residual(spec, sp, cp, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  keep = intervene.clamp_residual(ClampSpec(SITE, scfg, mode="set"), sp, cp, x)
  err = x - sae_core.decode(sp, scfg, z)  # the two forms differ by exactly the SAE error
  np.testing.assert_allclose(np.asarray(keep - got), np.asarray(err), atol=5e-5)
  # a no-op clamp with the error dropped is the plain reconstruction, not the identity
  none = intervene.make_clamp_params([1], 0.0, feature_mask=[False])
  np.testing.assert_allclose(np.asarray(intervene.clamp_residual(spec, sp, none, x)),
                             np.asarray(sae_core.decode(sp, scfg, z)), atol=2e-5)


def test_clamp_pytree_vmaps_over_stacked_params(sae):
  """A stack of clamps vmapped over its ClampParams (SAE shared) equals each clamp applied alone."""
  sp, scfg = sae
  spec = ClampSpec(SITE, scfg, mode="set", positive_only=False)
  clamps = [intervene.make_clamp(spec, sp, f, v, k_max=3) for f, v in (([1, 2], -1.0), ([4, 7, 9], 2.0), ([3], 0.5))]
  stacked = intervene.stack_clamps(clamps)
  x = _x(5)
  out = jax.vmap(lambda c: c(x), in_axes=(intervene.clamp_axes((stacked,))[0],))(stacked)
  for i, c in enumerate(clamps):
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(c(x)), atol=1e-6)
  leaves, treedef = jax.tree.flatten(stacked)
  assert any(l is sp["W_enc"] for l in leaves)  # SAE params are leaves; the spec is static metadata
  assert jax.tree.unflatten(treedef, leaves).spec == spec


def test_effective_decoder_rows_and_encoder_columns():
  """Monitors, decode drift and projectors use the SAE's effective directions: for a TopK SAE with
  rescale_acts_by_decoder_norm (non-unit decoder rows) the decoder rows are W_dec / ||W_dec|| and
  the encoder columns are the gradient of the clamped pre-activations (not raw W_dec / W_enc)."""
  sp, scfg = random_sae(16, 32, architecture="topk", k=4, seed=3)
  sp = dict(sp, W_dec=sp["W_dec"] * jnp.linspace(0.5, 2.0, 32)[:, None])
  scfg = scfg.replace(rescale_acts_by_decoder_norm=True)
  clamp = intervene.make_clamp(ClampSpec(SITE, scfg), sp, [2, 7, 30], -1.0, k_max=4)
  rows = np.asarray(clamp.decoder_rows())
  w = np.asarray(sp["W_dec"])[[2, 7, 30]]
  np.testing.assert_allclose(rows[:3], w / np.linalg.norm(w, axis=-1, keepdims=True), atol=1e-6)
  np.testing.assert_array_equal(rows[3], 0.0)  # padded slot
  x = _x(6, (16,))
  jac = np.asarray(jax.jacfwd(clamp.pre_features)(x))  # [K, d]
  np.testing.assert_allclose(np.asarray(clamp.encoder_columns())[:, :3], jac[:3].T, atol=1e-5)
  assert float(np.abs(np.asarray(clamp.encoder_columns())[:, :3] - np.asarray(sp["W_enc"])[:, [2, 7, 30]]).max()) > 0.1
