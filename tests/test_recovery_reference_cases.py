"""More of the engine against independent per-example implementations (issue 9, item 7).

The reference side uses the model forward and autodiff of JAX only; the SAE, the clamp, the
objectives, the drift terms, the projections, Adam, the budget clip, the correction steps and the
checkpoint rule are written here in NumPy / plain jnp from their definitions (paper-method 1.4,
6.4), not with the package's code.

* ``frozen``: IOI-like: a JumpReLU SAE with non-zero ``b_dec`` subtracted from its input, a set /
  positive-only clamp, one delta shared by a weighted batch of two prompts, the encoder projection,
  an l2 drift penalty and drift-constrained checkpoint selection whose feasible branch is taken.
* ``live``: refusal-v4-like: two live multiply clamps, a fixed earlier-stage delta, a second-stage
  delta at two columns, the teacher-forced answer objective, the Jacobian sketch and strong drift
  correction steps.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from recovery_jax import intervene
from recovery_jax.models import transformer
from recovery_jax.models.random_init import random_model, random_tokens
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae.testing import random_sae

KEY = jax.random.PRNGKey(11)
B1, B2, EPS_ADAM = 0.9, 0.999, 1e-8


def _adam(state, grad, t, lr):
  m, v = state
  m = B1 * m + (1 - B1) * grad
  v = B2 * v + (1 - B2) * grad ** 2
  upd = -lr * (m / (1 - B1 ** (t + 1))) / (np.sqrt(v / (1 - B2 ** (t + 1))) + EPS_ADAM)
  return (m, v), upd


def _clip(d, budget):
  n = np.linalg.norm(d)
  return d * (budget / (n + 1e-8)) if n > budget else d


def _jumprelu(p, x, feats):
  """Activations of ``feats``: pre = (x - b_dec) W_enc + b_enc, kept where pre > threshold."""
  f = jnp.asarray(feats)
  pre = (x - p["b_dec"]) @ p["W_enc"][:, f] + p["b_enc"][f]
  return jnp.where(pre > p["threshold"][f], pre, 0.0)


def _relu_feats(p, x, feats):
  f = jnp.asarray(feats)
  return jax.nn.relu(x @ p["W_enc"][:, f] + p["b_enc"][f])


# ----------------------------------------------------------------------------------------------
# frozen, shared delta, JumpReLU with b_dec, set / positive-only, encoder projection, checkpoint

SITE = "blocks.1.hook_resid_pre"
FEATS = [0, 2, 3, 5, 7, 8, 11, 13]
T, COL, VALUE = 7, 6, 0.5
STEPS, EVERY = 16, 4
POS, NEG = np.array([5, 17]), np.array([9, 30])
WEIGHT = np.array([1.0, 2.0])


@pytest.fixture(scope="module")
def frozen_setting():
  params, cfg = random_model("llama", n_layers=2, seed=21)
  sae, scfg = random_sae(cfg.d_model, 40, architecture="jumprelu", seed=22, b_dec=0.3, threshold=0.05,
                         apply_b_dec_to_input=True, site=SITE)
  return params, cfg, sae, scfg, random_tokens(23, 2, T)


def _frozen_reference(setting, rc: RecoveryConfig):
  """Trajectory of the reference: (deltas after each step [STEPS, d], objective and rel drift of
  each evaluated delta [STEPS + 1])."""
  params, cfg, sae, scfg, toks = setting
  d = cfg.d_model
  f = jnp.asarray(FEATS)

  def clamp(x):  # sparse form of D(z') + (x - D(z)) with z' = VALUE where z > 0 on S
    z = _jumprelu(sae, x, FEATS)
    dz = jnp.where(z > 0, VALUE, z) - z
    return x + dz @ sae["W_dec"][f]

  h = transformer.forward(params, cfg, jnp.asarray(toks), stop_layer=1, compute_logits=False).resid
  h_def = clamp(h)  # frozen: the defended residual at the site, computed once

  def run(delta):
    edit = {SITE: lambda x, p: h_def.at[:, COL].add(delta)}
    out = transformer.forward(params, cfg, jnp.asarray(toks), edits=edit)
    lg = out.logits[:, COL]
    rows = lg[jnp.arange(2), POS] - lg[jnp.arange(2), NEG]
    obj = jnp.sum(rows * WEIGHT) / WEIGHT.sum()
    return obj, _jumprelu(sae, h_def[:, COL] + delta, FEATS)

  r = np.asarray(run(jnp.zeros(d))[1], np.float64)
  assert (r > 0).sum() >= 3 and (np.asarray(_jumprelu(sae, h[:, COL], FEATS)) > 0.5).sum() >= 3  # the clamp bites

  def loss(delta):
    obj, c = run(delta)
    sq = jnp.sum(jnp.square(c - r))
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)  # zero gradient at c == r
    return -obj + rc.lambda_act * norm, (obj, c)

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  a = np.asarray(sae["W_enc"], np.float64)[:, FEATS]
  proj = np.eye(d) - a @ np.linalg.solve(a.T @ a + rc.ridge * np.eye(a.shape[1]), a.T)
  delta, state = np.zeros(d), (np.zeros(d), np.zeros(d))
  deltas, objs, rels = [], [], []
  for t in range(STEPS):
    (_, (obj, c)), g = grad_fn(jnp.asarray(delta, jnp.float32))
    c = np.asarray(c, np.float64)
    objs.append(float(obj))
    rels.append(np.linalg.norm(c - r) / (np.linalg.norm(r) + 1e-8))
    state, upd = _adam(state, proj @ np.asarray(g, np.float64), t, rc.lr)
    delta = _clip(delta + upd, rc.budget)
    deltas.append(delta)
  obj, c = run(jnp.asarray(delta, jnp.float32))
  objs.append(float(obj))
  rels.append(np.linalg.norm(np.asarray(c, np.float64) - r) / (np.linalg.norm(r) + 1e-8))
  return np.stack(deltas), np.asarray(objs), np.asarray(rels)


def _best_snapshot(objs, rels, tau, weight):
  """The v4 drift-constrained rule over snapshots s in {0, EVERY-1, 2 EVERY-1, ..., STEPS-1}; the
  delta after step s is the one evaluated at step s + 1."""
  best = None
  for s in [0] + [s for s in range(STEPS) if (s + 1) % EVERY == 0]:
    obj, rel = objs[s + 1], rels[s + 1]
    score, fallback = (obj if rel <= tau else -np.inf), obj - weight * rel
    if best is None or (score == -np.inf and best[1] == -np.inf and fallback > best[2]) or score > best[1]:
      best = (s, score, fallback)
  return best[0]


def test_frozen_shared_jumprelu_checkpoint_matches_reference(frozen_setting):
  params, cfg, sae, scfg, toks = frozen_setting
  base = RecoveryConfig(steps=STEPS, lr=0.15, budget=2.5, projection="encoder", ridge=0.3, lambda_act=0.05,
                        checkpoint="drift_constrained", checkpoint_every=EVERY, checkpoint_penalty_weight=5.0)
  deltas, objs, rels = _frozen_reference(frozen_setting, base)
  snaps = [0] + [s for s in range(STEPS) if (s + 1) % EVERY == 0]
  snap_rels = sorted(rels[s + 1] for s in snaps)
  tau = float(0.5 * (snap_rels[1] + snap_rels[2]))  # two snapshots feasible, the rest not
  rc = base.replace(checkpoint_tau=tau)
  best = _best_snapshot(objs, rels, tau, rc.checkpoint_penalty_weight)
  assert rels[best + 1] <= tau and best != STEPS - 1  # the feasible branch picks an earlier snapshot
  assert max(objs[s + 1] for s in snaps) > objs[best + 1]  # plain best-objective would pick another

  spec = engine.RecoverySpec(cfg, (SITE,), Objective("logit_diff"), rc, suffix_len=1, semantics="frozen")
  clamp = intervene.make_clamp(intervene.ClampSpec(SITE, scfg, mode="set", positive_only=True), sae, FEATS, VALUE,
                               k_max=10)
  col = jnp.full((2, 1), COL)
  pb = engine.Problem(tokens=jnp.asarray(toks), attention_mask=jnp.ones((2, T), bool),
                      positions=jnp.broadcast_to(jnp.arange(T), (2, T)), delta_cols=col,
                      delta_valid=jnp.ones((2, 1), bool), readout_cols=col, monitor_cols=col,
                      monitor_valid=jnp.ones((2, 1), bool), targets={"pos": jnp.asarray(POS), "neg": jnp.asarray(NEG)},
                      row_weight=jnp.asarray(WEIGHT, jnp.float32))
  out = jax.jit(engine.recover, static_argnums=0)(spec, params, (clamp,), pb, rc.hparams(), KEY)
  np.testing.assert_allclose(np.asarray(out.history["objective"]), objs[:STEPS], atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out.delta_last)[0, 0], deltas[-1], atol=2e-4 * rc.budget, rtol=2e-3)
  assert int(out.best_step) == best
  np.testing.assert_allclose(np.asarray(out.delta)[0, 0], deltas[best], atol=2e-4 * rc.budget, rtol=2e-3)
  np.testing.assert_allclose(float(out.objective), objs[best + 1], atol=2e-4)


# ----------------------------------------------------------------------------------------------
# live, fixed earlier-stage delta, teacher-forced objective, Jacobian sketch, corrections

LSITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
LFEATS = ([1, 4, 6, 9], [2, 3, 5, 8])
LT, FIXED_COL, DCOLS, RCOLS, MCOLS = 8, 3, [4, 5], [4, 5, 6], [4, 5]
MULT, LSTEPS = 3.0, 12


@pytest.fixture(scope="module")
def live_setting():
  params, cfg = random_model("llama", n_layers=2, seed=31)
  saes = [random_sae(cfg.d_model, 40, seed=32 + i, b_dec=0.2, site=s) for i, s in enumerate(LSITES)]
  toks = random_tokens(33, 1, LT)
  fixed = 0.4 * np.asarray(jax.random.normal(jax.random.PRNGKey(34), (2, 1, cfg.d_model)))
  return params, cfg, saes, toks, fixed


def _live_reference(setting, rc: RecoveryConfig):
  params, cfg, saes, toks, fixed = setting
  sp = [p for p, _ in saes]
  tok = jnp.asarray(toks)
  answer = tok[0, 5:8]  # readout columns 4, 5, 6 predict tokens 5, 6, 7

  def clamp(i, x):  # standard SAE (b_dec not subtracted at the input), multiply on every entry
    f = jnp.asarray(LFEATS[i])
    z = _relu_feats(sp[i], x, LFEATS[i])
    return x + (MULT * z - z) @ sp[i]["W_dec"][f]

  def run(delta, with_fixed=True):  # delta [2 sites, 2 cols, d]
    def edit(i):
      def fn(x, positions):
        x = clamp(i, x)
        if with_fixed:
          x = x.at[0, FIXED_COL].add(fixed[i, 0])
        return x.at[0, jnp.asarray(DCOLS)].add(delta[i])
      return fn
    out = transformer.forward(params, cfg, tok, edits={LSITES[0]: edit(0), LSITES[1]: edit(1)}, capture=LSITES)
    logp = jax.nn.log_softmax(out.logits[0, jnp.asarray(RCOLS)], axis=-1)
    obj = jnp.mean(logp[jnp.arange(3), answer])
    cs = [_relu_feats(sp[i], out.captures[s][0, jnp.asarray(MCOLS)], LFEATS[i]) for i, s in enumerate(LSITES)]
    return obj, jnp.concatenate([c.reshape(-1) for c in cs])

  d = cfg.d_model
  zero = jnp.zeros((2, 2, d))
  # drift references: the clamp-only defended run (no fixed delta, no delta)
  r = np.asarray(jax.jit(lambda z: run(z, with_fixed=False))(zero)[1], np.float64)
  run_j = jax.jit(run)
  vjp_rows = jax.jit(lambda dl, co, cc: jax.vmap(jax.vjp(run, dl)[1])((co, cc))[0])
  n = len(r) // 2

  def pen_grad(c, lam):  # relative_mse averaged over the two layers: gradient w.r.t. c
    g = np.zeros_like(c)
    for sl in (slice(0, n), slice(n, 2 * n)):
      g[sl] = 2 * (c[sl] - r[sl]) / n / (np.mean(r[sl] ** 2) + 1e-6)
    return lam * g / 2

  shape = (2, 2, d)
  delta, state = np.zeros(shape), (np.zeros(shape), np.zeros(shape))
  objs = []
  for t in range(LSTEPS):
    dj = jnp.asarray(delta, jnp.float32)
    obj, c = run_j(dj)
    objs.append(float(obj))
    c = np.asarray(c, np.float64)
    probes = []
    dr = c - r
    if np.linalg.norm(dr) > 1e-8:
      probes.append(dr / np.linalg.norm(dr))
    g = np.asarray(jax.random.normal(jax.random.fold_in(KEY, t), (rc.jacobian_probes, len(r))), np.float64)
    probes = np.stack(probes + list(g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-8)))
    cts_o = np.concatenate([[-1.0, 0.0], np.zeros(len(probes))])
    cts_c = np.concatenate([np.zeros((1, len(r))), pen_grad(c, rc.lambda_act)[None], probes])
    grads = np.asarray(vjp_rows(dj, jnp.asarray(cts_o, jnp.float32), jnp.asarray(cts_c, jnp.float32)), np.float64)
    basis = []
    for q in grads[2:].reshape(len(probes), -1):
      for b in basis:
        q = q - np.dot(q, b) * b
      if np.linalg.norm(q) > 1e-7:
        basis.append(q / np.linalg.norm(q))
    g_obj = grads[0].reshape(-1)
    g_obj = g_obj - sum((np.dot(g_obj, b) * b for b in basis), np.zeros_like(g_obj))
    state, upd = _adam(state, (g_obj + grads[1].reshape(-1)).reshape(shape), t, rc.lr)
    delta = _clip(delta + upd, rc.budget)
    for _ in range(rc.correction_steps):
      _, c2 = run_j(jnp.asarray(delta, jnp.float32))
      gc = pen_grad(np.asarray(c2, np.float64), 1.0)  # d/dc of the unweighted penalty (mean of 2 layers)
      gd = np.asarray(vjp_rows(jnp.asarray(delta, jnp.float32), jnp.zeros((1,)), jnp.asarray(gc[None], jnp.float32)),
                      np.float64)[0]
      delta = _clip(delta - rc.correction_lr * gd, rc.budget)
  return delta, np.asarray(objs)


def test_live_fixed_delta_teacher_forced_corrections_match_reference(live_setting):
  params, cfg, saes, toks, fixed = live_setting
  rc = RecoveryConfig(steps=LSTEPS, lr=0.08, budget=2.0, projection="jacobian", lambda_act=0.5,
                      drift_penalty="relative_mse", jacobian_probes=3, correction_steps=3, correction_lr=0.3)
  ref_delta, ref_objs = _live_reference(live_setting, rc)
  clamps = tuple(intervene.make_clamp(intervene.ClampSpec(s, saes[i][1], mode="multiply", positive_only=False),
                                      saes[i][0], LFEATS[i], MULT) for i, s in enumerate(LSITES))
  spec = engine.RecoverySpec(cfg, LSITES, Objective("teacher_forced", w_ans=1.0, n_ans=3), rc, suffix_len=3,
                             semantics="live")
  pb = engine.Problem(
      tokens=jnp.asarray(toks), attention_mask=jnp.ones((1, LT), bool), positions=jnp.arange(LT)[None],
      delta_cols=jnp.asarray([DCOLS]), delta_valid=jnp.ones((1, 2), bool), readout_cols=jnp.asarray([RCOLS]),
      monitor_cols=jnp.asarray([MCOLS]), monitor_valid=jnp.ones((1, 2), bool),
      targets={"next_tokens": jnp.asarray(toks[:, 5:8]), "answer_len": jnp.asarray([3])}, row_weight=jnp.ones((1,)),
      fixed_delta=jnp.asarray(fixed, jnp.float32), fixed_cols=jnp.asarray([[FIXED_COL]]),
      fixed_valid=jnp.ones((1, 1), bool))
  run = jax.jit(engine.recover, static_argnums=0)
  for suffix in (3, None):  # from the prefix cache (the fixed delta lies in the prefix) and recomputed in full
    out = run(spec.__class__(cfg, LSITES, spec.objective, rc, suffix, "live"), params, clamps, pb, rc.hparams(), KEY)
    np.testing.assert_allclose(np.asarray(out.history["objective"]), ref_objs, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.delta_last), ref_delta, atol=2e-4 * rc.budget, rtol=2e-3)
  assert np.linalg.norm(ref_delta) > 0.3
  # the corrections matter at this strength: without them the trajectory is measurably elsewhere
  no_corr = run(spec.__class__(cfg, LSITES, spec.objective, rc.replace(correction_steps=0), 3, "live"), params,
                clamps, pb, rc.hparams(), KEY)
  assert float(np.abs(np.asarray(no_corr.delta_last) - ref_delta).max()) > 50 * 2e-4 * rc.budget
