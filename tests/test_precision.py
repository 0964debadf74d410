"""Compute dtype (``ModelConfig.dtype``): bf16 activations with float32 norms, softmax and logits.

Fast tests on tiny random models; one slow test bounds bf16 against f32 on real SmolLM2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax.models import random_init, transformer

BF16 = jnp.bfloat16
_forward = jax.jit(transformer.forward, static_argnums=1, static_argnames=("capture",))


@functools.lru_cache(maxsize=None)
def _model(family, seed=0):
  cfg = random_init.tiny_config(family, vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=64)
  params = random_init.init_params(cfg, jax.random.key(seed))
  # about fan-in scale (embeddings N(0, 1), matrices ~N(0, 1/32)) so that logits are of order one
  def scale(path, a):
    name = jax.tree_util.keystr(path)
    return a * (50.0 if "W_E" in name else 8.0 if a.ndim >= 3 else 1.0)
  return jax.tree_util.tree_map_with_path(scale, params), cfg


def _tokens(b=2, t=12, vocab=96, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _cast(params, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), params)


def _cos(a, b):
  a, b = np.asarray(a, np.float64).reshape(-1, a.shape[-1]), np.asarray(b, np.float64).reshape(-1, b.shape[-1])
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_norms_compute_in_float32(family):
  cfg = random_init.tiny_config(family, d_model=64)
  rng = np.random.default_rng(0)
  x = jnp.asarray(300.0 + rng.standard_normal((4, 64)), BF16)  # large mean: bf16 statistics would be coarse
  p = {"w": jnp.asarray(1 + 0.1 * rng.standard_normal(64), BF16)}
  if family == "gpt2":
    p["b"] = jnp.asarray(0.1 * rng.standard_normal(64), BF16)
  y = transformer._norm(cfg, p, x)
  want = transformer._norm(cfg, _cast(p, jnp.float32), x.astype(jnp.float32)).astype(BF16)
  assert y.dtype == BF16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_logits_accumulate_in_float32():
  params, cfg = _model("llama")
  params = _cast(params, BF16)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, cfg.d_model)), BF16)
  logits = transformer.unembed(params, cfg, x)
  assert logits.dtype == jnp.float32
  want = np.asarray(x, np.float64) @ np.asarray(params["embed"]["W_E"], np.float64).T  # tied
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)
  ids = jnp.asarray([[3, 7], [1, 90]])
  at = transformer.final_logits_at(params, cfg, x, ids)
  full = transformer.final_logits(params, cfg, x)
  assert at.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(at), np.take_along_axis(np.asarray(full), np.asarray(ids)[:, None], -1),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_forward_close_to_f32(family):
  params, cfg = _model(family)
  tokens = _tokens()
  site = "blocks.1.hook_resid_post"
  ref = _forward(params, cfg, tokens, capture=(site,))
  out = _forward(_cast(params, BF16), cfg.replace(dtype="bfloat16"), tokens, capture=(site,))
  assert out.logits.dtype == jnp.float32
  assert out.resid.dtype == BF16 and out.captures[site].dtype == BF16
  err = np.abs(np.asarray(out.logits) - np.asarray(ref.logits)).max() / np.abs(np.asarray(ref.logits)).max()
  assert 1e-4 < err < 0.05, err  # bf16 really ran, and stayed close
  assert _cos(out.logits, ref.logits).min() > 0.999
  assert _cos(out.captures[site], ref.captures[site]).min() > 0.999


def test_bf16_params_with_f32_compute_equal_rounded_weights():
  """The Q26 default on accelerators: bf16 storage, f32 arithmetic == f32 forward of the rounded weights."""
  params, cfg = _model("gemma2")
  tokens = _tokens()
  a = _forward(_cast(params, BF16), cfg, tokens)
  b = _forward(_cast(_cast(params, BF16), jnp.float32), cfg, tokens)
  assert a.resid.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=1e-6, atol=1e-6)


def test_f32_edit_in_bf16_stream_keeps_dtype_and_gradient():
  """An edit that adds a float32 delta (as the recovery engine does) is rounded back into the bf16
  stream, and the delta's gradient matches f32 arithmetic in direction."""
  params, cfg = _model("llama")
  tokens = _tokens()
  site = "blocks.1.hook_resid_pre"

  def readout(delta, p, c):
    edit = {site: lambda x, pos: x + delta[:, None, :]}  # float32 delta on a cfg.dtype stream
    out = transformer.forward(p, c, tokens, edits=edit, capture=(site,))
    return out.logits[:, -1, 5].sum() - out.logits[:, -1, 9].sum(), out

  delta = jnp.asarray(np.random.default_rng(3).standard_normal((2, cfg.d_model)), jnp.float32)
  step = jax.jit(jax.value_and_grad(readout, has_aux=True), static_argnums=2)
  (v16, out16), g16 = step(delta, _cast(params, BF16), cfg.replace(dtype="bfloat16"))
  (v32, _), g32 = step(delta, params, cfg)
  assert out16.captures[site].dtype == BF16 and out16.resid.dtype == BF16
  assert g16.dtype == jnp.float32 and np.isfinite(np.asarray(g16)).all()
  assert abs(float(v16) - float(v32)) < 0.05 * abs(float(v32)) + 0.05
  assert _cos(g16, g32).min() > 0.99


@pytest.mark.slow
def test_bf16_bounded_on_smollm2():
  """SmolLM2-135M-Instruct: bf16 weights (f32 compute), and bf16 weights + bf16 activations, against f32.

  Measured on two sentences (26 positions): f32 compute cos >= 0.99984, max rel. error 0.011, KL 5e-4;
  bf16 compute cos >= 0.9981, max rel. error 0.055, KL 0.010; argmax agreement 26/26 for both.
  Bounds below leave about 2-3x margin.
  """
  from recovery_jax.models import loading  # pylint: disable=import-outside-toplevel

  try:
    params, cfg, tok = loading.load_model("smollm2-135m-instruct")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  sentences = ["The capital of France is Paris, and the capital of Germany is",
               "Then, Mary and John went to the store. John gave a book to"]
  ids = [tok.encode(s, add_special_tokens=False).ids for s in sentences]
  n = min(map(len, ids))
  tokens = jnp.asarray([i[:n] for i in ids], jnp.int32)
  run = jax.jit(lambda p, c: transformer.forward(p, c, tokens).logits, static_argnums=1)
  ref = np.asarray(run(params, cfg), np.float64)
  bf = _cast(params, BF16)
  bounds = {"float32": (0.9995, 0.03, 0.002), "bfloat16": (0.995, 0.12, 0.03)}
  for dtype, (cos_min, rel_max, kl_max) in bounds.items():
    out = np.asarray(run(bf, cfg.replace(dtype=dtype)), np.float64)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    lp, lq = jax.nn.log_softmax(ref), jax.nn.log_softmax(out)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).max())
    agree = (out.argmax(-1) == ref.argmax(-1)).mean()
    assert _cos(out, ref).min() > cos_min, (dtype, _cos(out, ref).min())
    assert 1e-4 < rel < rel_max, (dtype, rel)
    assert kl < kl_max, (dtype, kl)
    assert agree >= 0.9, (dtype, agree)
