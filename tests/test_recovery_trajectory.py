"""Trajectory test: the engine against an independent per-example implementation.

The reference side is written here with plain JAX (the model forward and autodiff only) and NumPy
(clamp, projections, Adam, clipping, Gram-Schmidt), following the reference's step order
(paper-method 1.4 / 6.4). Setting: refusal-v4-like live clamps at two layers, a delta at both
layers and two positions, a readout two columns later, drift monitored at two columns; the engine
runs from its prefix cache (suffix of 3 columns). Same delta after 20 steps for every projection
mode.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from recovery_jax.models.random_init import random_model, random_tokens
from recovery_jax.sae.testing import random_sae
from recovery_jax import intervene
from recovery_jax.models import transformer
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig

STEPS = 20
T = 8
DELTA_COLS = [4, 5]
READOUT = 6
MONITOR = [5, 6]
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
FEATS = ([2, 5, 7, 11], [1, 3, 4, 8])
MULT = 3.0
POS_ID, NEG_ID = 5, 9
KEY = jax.random.PRNGKey(3)


@pytest.fixture(scope="module")
def setting():
  params, cfg = random_model("llama", n_layers=2, d_model=32, seed=4)
  saes = [random_sae(cfg.d_model, 40, seed=10 + i, site=s) for i, s in enumerate(SITES)]
  toks = random_tokens(7, 1, T)
  return params, cfg, saes, toks


# ----------------------------------------------------------------------------------------------
# independent implementation


def _np_sae(p):
  return {k: np.asarray(v, np.float64) for k, v in p.items()}


def _dense_clamp(p, feats, x):
  """Reference clamp_sae_safe (multiply, all positions): D(z') + (x - D(z)), error not detached."""
  z = jax.nn.relu(x @ p["W_enc"] + p["b_enc"])
  zc = z.at[..., jnp.asarray(feats)].multiply(MULT)
  dec = lambda zz: zz @ p["W_dec"] + p["b_dec"]
  return dec(zc) + (x - dec(z))


def _make_reference(setting):
  params, cfg, saes, toks = setting
  sp = [p for p, _ in saes]
  tok = jnp.asarray(toks)

  def run(delta):  # delta [2, 2, d]
    def edit(i):
      def fn(x, positions):
        x = _dense_clamp(sp[i], FEATS[i], x)
        return x.at[0, jnp.asarray(DELTA_COLS)].add(delta[i])
      return fn
    out = transformer.forward(params, cfg, tok, edits={SITES[0]: edit(0), SITES[1]: edit(1)}, capture=SITES)
    obj = out.logits[0, READOUT, POS_ID] - out.logits[0, READOUT, NEG_ID]
    cs = [jax.nn.relu(out.captures[s][0, jnp.asarray(MONITOR)] @ sp[i]["W_enc"][:, jnp.asarray(FEATS[i])]
                      + sp[i]["b_enc"][jnp.asarray(FEATS[i])]) for i, s in enumerate(SITES)]
    return obj, jnp.concatenate([c.reshape(-1) for c in cs])

  run_j = jax.jit(run)
  vjp_rows = jax.jit(lambda d, cts_o, cts_c: jax.vmap(jax.vjp(run, d)[1])((cts_o, cts_c))[0])
  jac_c = jax.jit(jax.jacrev(lambda d: run(d)[1]))
  r = np.asarray(run_j(jnp.zeros((2, 2, cfg.d_model)))[1], np.float64)
  a_cols = [np.asarray(sp[i]["W_enc"], np.float64)[:, FEATS[i]] for i in range(2)]
  return run_j, vjp_rows, jac_c, r, a_cols


def _pen_and_grad_c(c, r, lam, eps=1e-6):
  """v4 relative_mse averaged over the two layers; gradient w.r.t. c."""
  n = len(c) // 2
  total, grad = 0.0, np.zeros_like(c)
  for sl in (slice(0, n), slice(n, 2 * n)):
    d = c[sl] - r[sl]
    den = np.mean(r[sl] ** 2) + eps
    total += np.mean(d ** 2) / den
    grad[sl] = 2 * d / d.size / den
  return total / 2, lam * grad / 2


def _reference_trajectory(ref, mode, cfg_r: RecoveryConfig, d_model):
  run_j, vjp_rows, jac_c, r, a_cols = ref
  shape = (2, 2, d_model)
  delta = np.zeros(shape)
  m, v = np.zeros(shape), np.zeros(shape)
  b1, b2, eps, lr, budget, lam = 0.9, 0.999, 1e-8, cfg_r.lr, cfg_r.budget, cfg_r.lambda_act
  # per-site encoder projectors
  ridge_p = [np.eye(d_model) - a @ np.linalg.solve(a.T @ a + cfg_r.ridge * np.eye(a.shape[1]), a.T) for a in a_cols]
  exact_p = []
  for a in a_cols:
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    q = u[:, s > s.max() * max(a.shape) * np.finfo(np.float32).eps]
    exact_p.append(np.eye(d_model) - q @ q.T)
  enc_p = exact_p if mode == "encoder_exact" else ridge_p
  rows_proj = lambda g, ps: np.stack([g[i] @ ps[i].T for i in range(2)])
  n_c = len(r)

  def clip(d):
    n = np.linalg.norm(d)
    return d * (budget / (n + 1e-8)) if n > budget else d

  for t in range(STEPS):
    d_j = jnp.asarray(delta, jnp.float32)
    obj, c = run_j(d_j)
    c = np.asarray(c, np.float64)
    _, pen_ct = _pen_and_grad_c(c, r, lam)
    if mode in ("jacobian", "jacobian_exact"):
      if mode == "jacobian":
        probes = []
        dr = c - r
        if np.linalg.norm(dr) > 1e-8:
          probes.append(dr / np.linalg.norm(dr))
        g = np.asarray(jax.random.normal(jax.random.fold_in(KEY, t), (cfg_r.jacobian_probes, n_c)), np.float64)
        probes += list(g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-8))
        probes = np.stack(probes)
      else:
        probes = np.zeros((0, n_c))
      cts_o = np.concatenate([[-1.0, 0.0], np.zeros(len(probes))])
      cts_c = np.concatenate([np.zeros((1, n_c)), pen_ct[None], probes])
      grads = np.asarray(vjp_rows(d_j, jnp.asarray(cts_o, jnp.float32), jnp.asarray(cts_c, jnp.float32)), np.float64)
      g_obj, g_pen = grads[0].reshape(-1), grads[1].reshape(-1)
      if mode == "jacobian":
        basis = []
        for q in grads[2:].reshape(len(probes), -1):
          for b in basis:
            q = q - np.dot(q, b) * b
          if np.linalg.norm(q) > 1e-7:
            basis.append(q / np.linalg.norm(q))
        proj = lambda x: x - sum((np.dot(x, b) * b for b in basis), np.zeros_like(x))
      else:
        jac = np.asarray(jac_c(d_j), np.float64).reshape(n_c, -1)
        u, s, _ = np.linalg.svd(jac.T, full_matrices=False)
        qb = u[:, s > s.max() * max(jac.shape) * np.finfo(np.float32).eps]
        proj = lambda x: x - qb @ (qb.T @ x)
      grad = (proj(g_obj) + g_pen).reshape(shape)
    else:
      cts_o = np.array([-1.0])
      grad = np.asarray(vjp_rows(d_j, jnp.asarray(cts_o, jnp.float32), jnp.asarray(pen_ct[None], jnp.float32)),
                        np.float64)[0]
      if mode in ("encoder", "encoder_exact"):
        grad = rows_proj(grad, enc_p)
    # Adam (torch formula)
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad ** 2
    upd = -lr * (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    if mode == "jacobian_exact":
      upd = proj(upd.reshape(-1)).reshape(shape)
    new = delta + upd
    if mode == "encoder_exact":
      new = rows_proj(new, enc_p)
    delta = clip(new)
    if mode in ("jacobian", "jacobian_exact"):
      for _ in range(cfg_r.correction_steps):
        _, c2 = run_j(jnp.asarray(delta, jnp.float32))
        _, gc = _pen_and_grad_c(np.asarray(c2, np.float64), r, 1.0)
        gd = np.asarray(vjp_rows(jnp.asarray(delta, jnp.float32), jnp.zeros((1,)), jnp.asarray(gc[None], jnp.float32)),
                        np.float64)[0]
        delta = clip(delta - cfg_r.correction_lr * gd)
  return delta


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(setting):
  return _make_reference(setting)


def _engine_run(setting, mode):
  params, cfg, saes, toks = setting
  rc = RecoveryConfig(steps=STEPS, lr=0.05, budget=1.5, projection=mode, lambda_act=0.5, drift_penalty="relative_mse",
                      jacobian_probes=3, correction_steps=2, correction_lr=0.05, record_delta=True)
  clamps = tuple(intervene.make_clamp(intervene.ClampSpec(s, saes[i][1], mode="multiply", positive_only=False),
                                      saes[i][0], FEATS[i], MULT) for i, s in enumerate(SITES))
  spec = engine.RecoverySpec(cfg, SITES, Objective("logit_diff"), rc, suffix_len=3, semantics="live")
  pb = engine.Problem(
      tokens=jnp.asarray(toks), attention_mask=jnp.ones((1, T), bool), positions=jnp.arange(T)[None],
      delta_cols=jnp.asarray([DELTA_COLS]), delta_valid=jnp.ones((1, 2), bool), readout_cols=jnp.asarray([[READOUT]]),
      monitor_cols=jnp.asarray([MONITOR]), monitor_valid=jnp.ones((1, 2), bool),
      targets={"pos": jnp.asarray([POS_ID]), "neg": jnp.asarray([NEG_ID])}, row_weight=jnp.ones((1,)))
  out = jax.jit(engine.recover, static_argnums=0)(spec, params, clamps, pb, rc.hparams(), KEY)
  return out, rc


@pytest.mark.parametrize("mode", ["none", "encoder", "encoder_exact", "jacobian", "jacobian_exact"])
def test_same_delta_after_20_steps(setting, reference, mode):
  out, rc = _engine_run(setting, mode)
  ref_delta = _reference_trajectory(reference, mode, rc, setting[1].d_model)
  ours = np.asarray(out.delta_last, np.float64)
  assert np.linalg.norm(ours) > 0.1  # it moved
  np.testing.assert_allclose(ours, ref_delta, atol=2e-4 * rc.budget, rtol=2e-3)
  assert np.all(np.asarray(out.history["delta_norm"]) <= rc.budget * (1 + 1e-5))
