"""Engine equivalences and properties: prefix cache == full recompute, frozen == live where they
must agree, vmap over examples == loop, vmap over feature sets == separate runs, one compilation
per static configuration, exact projections, the norm budget, checkpoint selection, TPP probes."""

import numpy as np
import pytest
import dataclasses

import jax
import jax.numpy as jnp

from recovery_jax.models.random_init import random_tokens
from recovery_jax.sae.testing import random_sae
from recovery_jax import intervene
from recovery_jax.intervene import ClampSpec
from recovery_jax.recovery import api, engine, probe
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae import core as sae_core

SITE = "blocks.1.hook_resid_pre"
B, T = 3, 9
DELTA_COL, READOUT = 6, 8  # suffix of 3 columns
FEATS = [[1, 4, 6, 9, 12], [2, 3, 5, 7, 0]]
MASKS = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]  # the second set is padded to K_max = 5


@pytest.fixture(scope="module")
def setting(tiny_gpt2):
  params, cfg = tiny_gpt2
  sae, scfg = random_sae(cfg.d_model, 40, seed=3, site=SITE)
  toks = random_tokens(11, B, T)
  mask = np.ones((B, T), bool)
  mask[2, :2] = False  # a left-padded row
  targets = {"pos": np.array([3, 8, 21]), "neg": np.array([40, 2, 17])}
  return params, cfg, sae, scfg, toks, mask, targets


def _site_kwargs(setting, **kw):
  params, cfg, sae, scfg, toks, mask, targets = setting
  base = dict(site=SITE, tokens=toks, attention_mask=mask, delta_pos=DELTA_COL, readout_pos=READOUT,
              objective=Objective("logit_diff"), targets=targets, clamp_value=-1.0)
  base.update(kw)
  return (params, cfg, sae, scfg), base


CFG = RecoveryConfig(steps=8, lr=0.1, budget=2.0, projection="encoder")


def _spec(cfg, suffix, semantics="frozen", rc=CFG):
  return engine.RecoverySpec(cfg, (SITE,), Objective("logit_diff"), rc, suffix_len=suffix, semantics=semantics)


def _clamp(sae, scfg, feats, value, **kw):
  return intervene.make_clamp(ClampSpec(SITE, scfg, mode="set", positive_only=True), sae, feats, value, **kw)


@pytest.fixture(scope="module")
def per_example(setting):
  args, kw = _site_kwargs(setting)
  return api.recover_site(*args, **kw, feature_idx=FEATS[0], config=CFG)


def test_prefix_cache_equals_full_recompute_and_frozen_equals_live(setting, per_example):
  args, kw = _site_kwargs(setting)
  full = api.recover_site(*args, **kw, feature_idx=FEATS[0], config=CFG, suffix_len=None)
  np.testing.assert_allclose(np.asarray(per_example.history["loss"]), np.asarray(full.history["loss"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(per_example.delta), np.asarray(full.delta), atol=1e-5)
  np.testing.assert_allclose(np.asarray(per_example.rows_defended), np.asarray(full.rows_defended), atol=1e-5)
  assert float(np.abs(per_example.rows - per_example.rows_defended).max()) > 0.1  # recovery moved the logits
  # one delta site: the clamp's input does not depend on delta, so frozen and live are the same
  # program (compared as jaxprs: identical computations, hence identical numbers)
  params, cfg, sae, scfg, toks, mask, targets = setting
  pb = jax.tree.map(lambda a: a[0], api.site_problems(toks, mask, DELTA_COL, READOUT, targets, shared=False))
  clamp = _clamp(sae, scfg, FEATS[0], -1.0)
  for suffix in (3, None):
    progs = []
    for sem in ("frozen", "live"):
      spec = _spec(cfg, suffix, sem)
      progs.append(str(jax.make_jaxpr(
          lambda d: engine.recover(spec, params, (clamp,), pb, CFG.hparams(), jax.random.PRNGKey(0), d))(
              jnp.zeros((1, 1, cfg.d_model)))))
    assert progs[0] == progs[1]


def test_vmap_over_examples_equals_loop_and_compiles_once(setting, per_example):
  params, cfg, sae, scfg, toks, mask, targets = setting
  spec = _spec(cfg, 3)
  pbs = api.site_problems(toks, mask, DELTA_COL, READOUT, targets, shared=False)
  clamp = _clamp(sae, scfg, FEATS[0], -1.0)
  one = jax.jit(engine.recover, static_argnums=0)
  for i in range(B):
    pb = jax.tree.map(lambda a: a[i], pbs)
    out = one(spec.canonical(), params, (clamp,), pb, CFG.hparams(), jax.random.fold_in(jax.random.PRNGKey(0), i))
    np.testing.assert_allclose(np.asarray(out.delta), np.asarray(per_example.delta[i]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.history["objective"]), np.asarray(per_example.history["objective"][i]),
                               atol=1e-5)
    np.testing.assert_allclose(float(out.rows[0]), float(per_example.rows[i]), atol=1e-5)
  # a second feature set of the same K_max (and another clamp value and budget) reuses the program
  n_compiled = engine._examples_jit._cache_size()
  args, kw = _site_kwargs(setting, clamp_value=-3.0)
  api.recover_site(*args, **kw, feature_idx=FEATS[1], feature_mask=MASKS[1], config=CFG.replace(budget=0.7, lr=0.05))
  assert engine._examples_jit._cache_size() == n_compiled


def test_vmap_over_feature_sets_equals_separate_runs(setting):
  args, kw = _site_kwargs(setting)
  del kw["clamp_value"]
  cfg = CFG
  kw["shared"] = True
  grid = api.recover_site_grid(*args, **kw, feature_idx=FEATS, feature_mask=MASKS, clamp_value=[-1.0, -2.0],
                               budget=[2.0, 0.5], config=cfg)
  assert grid.delta.shape == (2, 1, 1, setting[1].d_model) and grid.rows.shape == (2, B)
  for g in range(2):
    one = api.recover_site(*args, **kw, feature_idx=FEATS[g], feature_mask=MASKS[g], clamp_value=[-1.0, -2.0][g],
                           config=cfg.replace(budget=[2.0, 0.5][g]), key=jax.random.fold_in(jax.random.PRNGKey(0), g))
    np.testing.assert_allclose(np.asarray(grid.delta[g]), np.asarray(one.delta), atol=5e-6)  # f32 reassociation
    np.testing.assert_allclose(np.asarray(grid.history["loss"][g]), np.asarray(one.history["loss"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grid.rows[g]), np.asarray(one.rows), atol=1e-5)
    assert float(np.max(grid.history["delta_norm"][g])) <= [2.0, 0.5][g] * (1 + 1e-6)


def test_relative_budget_equals_absolute_at_rho_times_state_norm(setting):
  """budget_scale="relative": problem i's delta is bounded by rho * ||h_def_i||_F. Each example
  recovered alone with the absolute budget rho * ||h_def_i|| (its own norm, computed here) gives the
  same delta; the bound binds (||delta|| reaches it), and it differs across examples."""
  params, cfg, sae, scfg, toks, mask, targets = setting
  pbs = api.site_problems(toks, mask, DELTA_COL, READOUT, targets, shared=False)
  clamp, rho, key = _clamp(sae, scfg, FEATS[0], -1.0), 0.05, jax.random.PRNGKey(4)
  rel = CFG.replace(budget=rho, budget_scale="relative")
  out = engine.recover_examples(_spec(cfg, 3, rc=rel), params, (clamp,), pbs, rel.hparams(), key)
  norms = np.sqrt((np.asarray(out.h_def, np.float64) ** 2).sum(axis=(1, 2, 3, 4)))  # [N] ||h_def_i||_F
  np.testing.assert_allclose(np.asarray(out.budget), rho * norms, rtol=1e-5)
  assert norms.max() - norms.min() > 1e-3 * norms.max()  # per-example bounds, not one shared number
  rec, spec = jax.jit(engine.recover, static_argnums=0), _spec(cfg, 3, rc=CFG.canonical())
  for i in range(B):
    pb = jax.tree.map(lambda a: a[i], pbs)
    one = rec(spec, params, (clamp,), pb, CFG.hparams(budget=float(rho * norms[i])), jax.random.fold_in(key, i))
    np.testing.assert_allclose(np.asarray(one.delta), np.asarray(out.delta[i]), atol=1e-6)
    assert float(jnp.linalg.norm(one.delta)) == pytest.approx(rho * norms[i], rel=1e-4)  # the bound binds


def test_encoder_exact_keeps_preactivations(setting):
  params, cfg, sae, scfg, toks, mask, targets = setting
  args, kw = _site_kwargs(setting)
  rc = RecoveryConfig(steps=30, lr=0.2, budget=3.0, projection="encoder_exact")
  out = api.recover_site(*args, **kw, feature_idx=FEATS[0], config=rc)
  idx = jnp.asarray(FEATS[0])
  h_def = out.h_def[:, 0, 0]  # [B, d]
  delta = out.delta[:, 0, 0]
  before = sae_core.encode_pre_subset(sae, scfg, h_def, idx)
  after = sae_core.encode_pre_subset(sae, scfg, h_def + delta, idx)
  assert float(jnp.linalg.norm(delta, axis=-1).min()) > 0.5
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.feats[0]), np.asarray(out.refs[0]), atol=1e-5)
  assert np.all(np.asarray(out.history["delta_norm"]) <= 3.0 * (1 + 1e-6))


# ----------------------------------------------------------------------------------------------
# two sites: live (refusal v4 style, with a fixed delta from an earlier stage) and frozen


MSITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def _multi_problem(setting, semantics, projection, suffix_len, monitor_last=True, **rc_kw):
  params, cfg, sae, scfg, toks, mask, targets = setting
  sae2, scfg2 = random_sae(cfg.d_model, 40, seed=9, site=MSITES[1])
  clamps = (intervene.make_clamp(ClampSpec(MSITES[0], scfg, mode="multiply", positive_only=False), sae, [1, 4, 6], 3.0),
            intervene.make_clamp(ClampSpec(MSITES[1], scfg2, mode="multiply", positive_only=False,
                                           monitor=monitor_last), sae2, [2, 3, 5], 3.0))
  rc = RecoveryConfig(projection=projection, **rc_kw)
  spec = engine.RecoverySpec(cfg, MSITES, Objective("logit_diff"), rc, suffix_len=suffix_len, semantics=semantics)
  d = cfg.d_model
  pb = engine.Problem(
      tokens=jnp.asarray(toks[:1]), attention_mask=jnp.ones((1, T), bool), positions=jnp.arange(T)[None],
      delta_cols=jnp.asarray([[5, 6]]), delta_valid=jnp.asarray([[True, True]]), readout_cols=jnp.asarray([[7]]),
      monitor_cols=jnp.asarray([[5, 6, 7, 2]]), monitor_valid=jnp.asarray([[True, True, True, False]]),
      targets={"pos": jnp.asarray([3]), "neg": jnp.asarray([40])}, row_weight=jnp.ones((1,)),
      fixed_delta=0.3 * jax.random.normal(jax.random.PRNGKey(5), (2, 1, d)), fixed_cols=jnp.asarray([[4]]),
      fixed_valid=jnp.asarray([[True]]))
  return spec, clamps, pb


def _multi(setting, semantics, projection, suffix_len, **rc_kw):
  spec, clamps, pb = _multi_problem(setting, semantics, projection, suffix_len, **rc_kw)
  out = jax.jit(engine.recover, static_argnums=0)(spec, setting[0], clamps, pb, spec.config.hparams(),
                                                  jax.random.PRNGKey(1))
  return out, spec, clamps, pb


@pytest.mark.parametrize("projection", ["jacobian", "jacobian_exact"])
@pytest.mark.parametrize("suffix_len", [4, None])
def test_split_evaluator_step_equals_one_piece(setting, projection, suffix_len):
  """The Jacobian step cuts the evaluator after the last monitored site (probe and penalty
  cotangents through the head only, the objective's once through the tail): the trajectory equals
  the uncut evaluator's. Layer 1 (clamp not monitored, a delta site) lies in the tail. No drift probe:
  its on/off threshold (||c - r|| > 1e-8) turns float noise into different bases."""
  params = setting[0]
  spec, clamps, pb = _multi_problem(setting, "live", projection, suffix_len, monitor_last=False, steps=5, lr=0.1,
                                    budget=1.5, lambda_act=50.0, drift_penalty="relative_mse", jacobian_probes=2,
                                    jacobian_drift_probe=False,
                                    correction_steps=1)
  pb = pb._replace(readout_cols=jnp.asarray([[6]]))  # a delta column: layer 1's delta reaches the readout
  rc = spec.config

  @jax.jit
  def run(key):
    prep = engine.prepare(spec, params, clamps, pb)
    f = engine.make_evaluator(spec, params, clamps, pb, prep)
    assert isinstance(f, opt_lib.SplitEval)
    mon = engine.monitor_of(clamps, prep.refs, prep.masks)
    d0 = jnp.zeros((2, 2, spec.model_cfg.d_model))
    return [opt_lib.optimize(g, d0, mon, rc, rc.hparams(), key) for g in (f, lambda d: f(d))]

  split, whole = run(jax.random.PRNGKey(3))
  np.testing.assert_allclose(np.asarray(split.history["loss"]), np.asarray(whole.history["loss"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(split.delta_last), np.asarray(whole.delta_last), atol=1e-5)
  assert float(jnp.abs(split.delta_last[1]).max()) > 1e-3  # the tail's delta site moved


def test_two_sites_live_cached_equals_full_and_checkpoint_rule(setting):
  kw = dict(steps=12, lr=0.1, budget=1.5, lambda_act=50.0, drift_penalty="relative_mse", checkpoint="drift_constrained",
            checkpoint_every=3, checkpoint_tau=0.02, checkpoint_penalty_weight=5.0)
  cached, *_ = _multi(setting, "live", "jacobian", 4, jacobian_probes=2, jacobian_drift_probe=False,
                      correction_steps=1, **kw)
  full, *_ = _multi(setting, "live", "jacobian", None, jacobian_probes=2, jacobian_drift_probe=False,
                    correction_steps=1, **kw)
  np.testing.assert_allclose(np.asarray(cached.history["loss"]), np.asarray(full.history["loss"]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(cached.delta_last), np.asarray(full.delta_last), atol=1e-5)
  np.testing.assert_allclose(np.asarray(cached.rows_defended), np.asarray(full.rows_defended), atol=1e-5)
  assert np.all(np.asarray(cached.history["delta_norm"]) <= 1.5 * (1 + 1e-6))
  # the best checkpoint follows the v4 rule over the snapshots {0, 2, 5, 8, 11}, each scored after
  # its update (snapshot s is the delta the forward of step s + 1 sees; the last one the final iterate)
  h = {k: np.asarray(v) for k, v in cached.history.items()}
  cands = [(s, h["objective"][s + 1], h["drift_rel"][s + 1]) for s in (0, 2, 5, 8)]
  cands.append((11, float(cached.objective_last), float(cached.drift_rel_last)))
  best = None
  for s, obj, rel in cands:
    score, fb = (obj if rel <= 0.02 else -np.inf), obj - 5.0 * rel
    if best is None:
      best = (s, score, fb, obj)
    elif score == -np.inf and best[1] == -np.inf:
      best = (s, score, fb, obj) if fb > best[2] else best
    elif score > best[1]:
      best = (s, score, fb, obj)
  assert int(cached.best_step) == best[0]
  np.testing.assert_allclose(float(cached.objective), best[3], atol=1e-5)


def test_two_sites_frozen_offsets_cached_equals_full(setting):
  kw = dict(steps=6, lr=0.1, budget=1.5)
  cached, spec, clamps, pb = _multi(setting, "frozen", "none", 4, **kw)
  full, *_ = _multi(setting, "frozen", "none", None, **kw)
  np.testing.assert_allclose(np.asarray(cached.history["loss"]), np.asarray(full.history["loss"]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(cached.delta), np.asarray(full.delta), atol=1e-5)
  # with two delta sites, frozen (layer 1's clamp change fixed, no re-clamp of the perturbed
  # residual) and live agree at delta = 0 and differ once delta moves the layer-1 input
  live_spec = engine.RecoverySpec(spec.model_cfg, spec.delta_sites, spec.objective, spec.config, spec.suffix_len,
                                  semantics="live")

  @jax.jit
  def both(d):
    out = []
    for sp in (spec, live_spec):
      prep = engine.prepare(sp, setting[0], clamps, pb)
      out.append(engine.make_evaluator(sp, setting[0], clamps, pb, prep)(d).objective)
    return out

  zero = both(jnp.zeros_like(cached.delta))
  np.testing.assert_allclose(float(zero[0]), float(zero[1]), atol=1e-5)
  moved = both(cached.delta)
  assert abs(float(moved[0]) - float(moved[1])) > 1e-4


def test_jacobian_exact_first_order_change_is_zero(setting):
  out, spec, clamps, pb = _multi(setting, "live", "jacobian_exact", 4, steps=6, lr=0.05, budget=100.0,
                                 record_delta=True)
  params = setting[0]
  prep = engine.prepare(spec, params, clamps, pb)
  f = engine.make_evaluator(spec, params, clamps, pb, prep)
  flat = lambda d: jnp.concatenate([x.reshape(-1) for x in f(d).feats])
  jvp = jax.jit(lambda d, u: (jax.jvp(flat, (d,), (u,))[1], jax.jvp(lambda e: f(e).objective, (d,), (u,))[1]))
  deltas = [jnp.zeros_like(out.delta)] + list(out.history["delta"])
  moved = 0.0
  for t in range(6):
    u = deltas[t + 1] - deltas[t]
    dc, dobj = jvp(deltas[t], u)
    moved = max(moved, float(jnp.linalg.norm(u)))
    # masked entries (monitor slot 4) are constant; real ones must not move to first order
    assert float(jnp.abs(dc).max()) < 1e-4 * float(jnp.linalg.norm(u)) + 1e-6
  assert moved > 1e-2
  assert float(out.objective) > float(out.history["objective"][0])  # it still recovers


# ----------------------------------------------------------------------------------------------
# TPP probe path


def test_probe_recovery(setting):
  _, cfg, sae, scfg, *_ = setting
  n, t, d = 4, 6, cfg.d_model
  h = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (n, 1, t, d))
  pool = jnp.ones((n, 1, t), bool).at[:, :, 0].set(False)  # BOS excluded from pooling
  w = jax.random.normal(jax.random.PRNGKey(1), (d,)) / np.sqrt(d)
  last = jnp.full((n, 1, 1), t - 1)
  pbs = probe.ProbeProblem(h=h, pool_mask=pool, positions=jnp.broadcast_to(jnp.arange(t), (n, 1, t)),
                            probe_w=jnp.broadcast_to(w, (n, d)), probe_b=jnp.zeros((n,)), delta_cols=last,
                            delta_valid=jnp.ones((n, 1, 1), bool),
                            monitor_cols=jnp.broadcast_to(jnp.arange(t), (n, 1, t)),
                            monitor_valid=jnp.ones((n, 1, t), bool), row_weight=jnp.ones((n, 1)))
  spec = probe.ProbeSpec(RecoveryConfig(steps=20, lr=0.1, budget=2.0))
  clamp = intervene.make_clamp(ClampSpec(SITE, scfg, mode="zero"), sae, FEATS[0], 0.0)
  out = probe.recover_probe_examples(spec, clamp, pbs, spec.config.hparams(), jax.random.PRNGKey(0))
  # the zero-ablated probe logit matches a direct computation, and recovery raises it
  h_def = clamp(h[:, 0])
  direct = jnp.mean(h_def[:, 1:], axis=1) @ w
  np.testing.assert_allclose(np.asarray(out.rows_defended[:, 0]), np.asarray(direct), atol=1e-5)
  assert np.all(np.asarray(out.rows[:, 0]) > np.asarray(out.rows_defended[:, 0]) + 0.1)
  # the delta only touches the last position: features elsewhere are unchanged
  np.testing.assert_array_equal(np.asarray(out.feats[0][:, 0, :-1]), np.asarray(out.refs[0][:, 0, :-1]))


def test_too_short_suffix_is_an_error_not_a_wrong_column(setting):
  """A hand-set suffix that does not reach the readout column used to read another column silently
  (objective -6.17 instead of 5.28 in a reproduction); now it is a clear error, and "auto" works."""
  args, kw = _site_kwargs(setting)
  with pytest.raises(ValueError, match="suffix_len=1 is too short.*suffix_len=3"):
    api.recover_site(*args, **kw, feature_idx=FEATS[0], config=CFG.replace(steps=2), suffix_len=1)
  params, cfg, sae, scfg, toks, mask, targets = setting
  pbs = api.site_problems(toks, mask, DELTA_COL, READOUT, targets, shared=False)
  assert engine.suffix_len_for(pbs) == 3  # delta col 6 .. readout col 8
  early = pbs._replace(readout_cols=pbs.readout_cols - 3)  # readout at 5: from 5 to the delta at 6
  assert engine.suffix_len_for(early) == 2
  late_monitor = early._replace(monitor_cols=jnp.full_like(pbs.monitor_cols, 8))  # monitored at 8
  assert engine.suffix_len_for(late_monitor) == 4


def test_diverging_recovery_is_flagged(setting):
  args, kw = _site_kwargs(setting)
  out = api.recover_site(*args, **kw, feature_idx=FEATS[0], config=CFG.replace(lr=1e38, steps=3))
  assert np.asarray(out.diverged).all()
  ok = api.recover_site(*args, **kw, feature_idx=FEATS[0], config=CFG.replace(steps=3))
  assert not np.asarray(ok.diverged).any()


@pytest.mark.slow
@pytest.mark.parametrize("kind,n_layers,remat", [("ioi", 4, True), ("ioi", 4, "dots"), ("refusal", 8, True),
                                                  ("refusal", 8, "dots")])
def test_remat_gives_the_same_recovery(kind, n_layers, remat):
  """``RecoverySpec.remat`` ("dots", the default, or True; against False: every scanned layer rematerialised in the step's backward, its weights
  re-sliced inside the checkpoint) changes the schedule, not the trajectory. Models deep enough that
  layers without a site run in the scan: IOI-shaped (frozen, site at layer 1, layers 2-3 scanned) and
  refusal-shaped (live, sites at layers 3, 4, 6, Jacobian sketch; layer 5 scanned in the head, 7 in
  the tail)."""
  from bench import problems  # pylint: disable=import-outside-toplevel
  from recovery_jax.models import random_init  # pylint: disable=import-outside-toplevel
  cfg = random_init.tiny_config("llama", vocab_size=256, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                d_mlp=128)
  params = random_init.init_params(cfg, jax.random.PRNGKey(0))
  wl = problems.make_workload(kind, params, cfg, None, n=2, k_max=8, steps=4, d_sae=128)
  run = lambda spec: engine.recover_examples(spec, params, wl.clamps, wl.problems, spec.config.hparams(), wl.key)
  plain, remade = run(dataclasses.replace(wl.spec, remat=False)), run(dataclasses.replace(wl.spec, remat=remat))
  # remat re-fuses the recomputed layers: float-level differences, which Adam carries into the delta
  np.testing.assert_allclose(np.asarray(remade.objective), np.asarray(plain.objective), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(remade.delta), np.asarray(plain.delta), atol=1e-4)
  assert float(jnp.abs(plain.delta).max()) > 1e-2
