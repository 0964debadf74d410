"""v4 two-stage refusal recovery: the batched orchestration (padding, columns, fixed stage-1 delta, keys)
against an independent per-example implementation, and the stage-2 objective against a hand-written
forward; generation edits (faithful vs honest) on a tiny random model."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovery_jax.models import generate, random_init, transformer
from recovery_jax.recovery import engine
from recovery_jax.sae import core, testing as sae_testing
from recovery_jax.tasks import refusal_defence as D
from recovery_jax.tasks import refusal_recovery as R

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
FEATS = {SITES[0]: [1, 4, 7], SITES[1]: [0, 3, 5]}
_STAGE = dict(lambda_act=0.1, jacobian_probes=2, correction_steps=1, correction_lr=0.01, checkpoint_every=2,
              checkpoint_tau=0.5)
CFG = R.TwoStageConfig(stage1=R.v4_stage("jacobian", 3, 0.1, 2.0, **_STAGE),
                       stage2=R.v4_stage("jacobian", 4, 0.05, 2.0, **_STAGE),
                       n_ans=4, prefix_len=3, anti_len=3, w_anti2=0.0)
PROMPTS = [[5, 9, 11, 3, 7], [8, 1, 4, 12, 30, 31, 2], [6, 6, 2]]
# every answer is >= n_ans tokens: with a shorter answer (masked answer columns) the jacobian trajectory of this tiny
# setting moves by ~0.2 between the engine's own cached and full-recompute paths (float noise amplified), so exact
# equivalence is checked on full-length answers; the masked layout is checked in test_build_problems_layout
ANSWERS = [[20, 21, 22, 23, 24, 25], [40, 41, 42, 43], [50, 51, 52, 53, 54]]
DISC = [[60, 61], [62], [63, 64, 65, 66]]


@pytest.fixture(scope="module")
def setup():
  params, cfg = random_init.random_model("llama", seed=7, n_layers=3, d_model=32)
  saes = {s: sae_testing.random_sae(32, 40, seed=i + 11, site=s, b_enc=-0.01) for i, s in enumerate(SITES)}
  clamps = D.make_defence(D.DefenceSpec("multiply"), saes, FEATS, 3.0)
  return params, cfg, saes, clamps


def _one_problem(p, ans, delta_cols, fixed=None):
  """A single unpadded problem written out from the paper's layout (not via build_problems)."""
  seq = np.asarray(p + ans, np.int32)[None]
  a, t = len(p), len(p) + len(ans)
  r = max(CFG.n_ans, CFG.prefix_len, CFG.anti_len)
  m = min(CFG.n_ans, len(ans))
  mon = np.asarray([a + j if j < m else a for j in range(CFG.n_ans)])[None]
  nxt = np.zeros((1, r), np.int32)
  nxt[0, :min(r, len(ans))] = ans[:r]
  dec = np.zeros((1, CFG.prefix_len), np.int32)
  dec[0, :min(CFG.prefix_len, len(ans))] = ans[:CFG.prefix_len]
  disc = np.zeros((1, len(DISC), CFG.anti_len), np.int32)
  for j, d in enumerate(DISC):
    disc[0, j, :len(d)] = d[:CFG.anti_len]
  if delta_cols == "anchor":
    dcols, dvalid = np.asarray([[a - 1]]), np.ones((1, 1), bool)
  else:
    dcols, dvalid = mon, (np.arange(CFG.n_ans) < m)[None]
  pb = engine.Problem(
      tokens=jnp.asarray(seq), attention_mask=jnp.ones((1, t), bool), positions=jnp.arange(t)[None],
      delta_cols=jnp.asarray(dcols), delta_valid=jnp.asarray(dvalid),
      readout_cols=jnp.asarray(np.minimum(a - 1 + np.arange(r), t - 1))[None], monitor_cols=jnp.asarray(mon),
      monitor_valid=jnp.asarray((np.arange(CFG.n_ans) < m)[None]),
      targets={"next_tokens": jnp.asarray(nxt), "answer_len": jnp.asarray([len(ans)]), "decision": jnp.asarray(dec),
               "decision_len": jnp.asarray([min(CFG.prefix_len, len(ans))]), "discouraged": jnp.asarray(disc),
               "discouraged_len": jnp.asarray([[len(d) for d in DISC]])},
      row_weight=jnp.ones((1,)))
  if fixed is not None:
    pb = pb._replace(fixed_delta=fixed, fixed_cols=jnp.asarray([[a - 1]]), fixed_valid=jnp.ones((1, 1), bool))
  return pb


@pytest.fixture(scope="module")
def two_stage(setup):
  params, cfg, _, clamps = setup
  return R.recover_two_stage(params, cfg, clamps, SITES, PROMPTS, ANSWERS, DISC, CFG, jax.random.key(3))


@pytest.mark.slow
def test_two_stage_equals_per_example(setup, two_stage):
  params, cfg, _, clamps = setup
  key = jax.random.key(3)
  out = two_stage
  run = jax.jit(engine.recover, static_argnums=0)
  for i in (2,):  # a left-padded case (one per-example compile per stage: CI time)
    p, ans = PROMPTS[i], ANSWERS[i]
    k = jax.random.fold_in(key, i)
    spec1 = engine.RecoverySpec(cfg, SITES, CFG.objective(1), CFG.recovery_config(1), suffix_len=None, semantics="live")
    o1 = run(spec1, params, clamps, _one_problem(p, ans, "anchor"), CFG.recovery_config(1).hparams(), k)
    spec2 = engine.RecoverySpec(cfg, SITES, CFG.objective(2), CFG.recovery_config(2), suffix_len=None, semantics="live")
    o2 = run(spec2, params, clamps, _one_problem(p, ans, "answer", fixed=o1.delta), CFG.recovery_config(2).hparams(), k)
    np.testing.assert_allclose(out.stage1.delta[i], o1.delta, atol=1e-4)
    np.testing.assert_allclose(out.stage1.history["objective"][i], o1.history["objective"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.stage2.delta[i], o2.delta, atol=1e-4)
    np.testing.assert_allclose(out.stage2.history["objective"][i], o2.history["objective"], atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(o2.delta).max()) > 0 and float(jnp.abs(o1.delta).max()) > 0


@pytest.mark.slow
def test_stage2_objective_by_hand(setup, two_stage):
  """The recovered stage-2 objective equals w_ans * mean log p(answer_j | prefix) over the first n_ans answer
  tokens, from a plain forward with the defence, stage 1's delta at the anchor and stage 2's at the answer."""
  params, cfg, saes, _ = setup
  out = two_stage
  for i, (p, ans) in enumerate(zip(PROMPTS, ANSWERS)):
    a, seq = len(p), jnp.asarray([p + ans])
    m = min(CFG.n_ans, len(ans))

    def edit(j):
      sae, scfg = saes[SITES[j]]
      f = jnp.asarray(FEATS[SITES[j]])
      def fn(x, positions):
        z = core.encode(sae, scfg, x)[..., f]
        x = x + (2.0 * z) @ sae["W_dec"][f]  # x3 on the selected features, the error kept
        x = x.at[0, a - 1].add(out.stage1.delta[i][j, 0])
        return x.at[0, a:a + m].add(out.stage2.delta[i][j, :m])
      return fn

    logits = transformer.forward(params, cfg, seq, edits={s: edit(j) for j, s in enumerate(SITES)}).logits[0]
    logp = jax.nn.log_softmax(logits, -1)
    want = CFG.w_ans * np.mean([float(logp[a - 1 + j, ans[j]]) for j in range(m)])
    assert float(out.stage2.objective[i]) == pytest.approx(want, abs=2e-4)


def test_generation_edits_faithful_and_honest(setup):
  params, cfg, _, clamps = setup
  rng = np.random.default_rng(0)
  d1 = jnp.asarray(rng.standard_normal((1, 2, 1, 32)), jnp.float32)
  d2 = jnp.asarray(rng.standard_normal((1, 2, 3, 32)), jnp.float32)
  prompt = jnp.asarray([[5, 9, 11, 3, 7]])
  a = 5
  ans_pos, ans_valid = jnp.asarray([[a, a + 1, a + 2]]), jnp.ones((1, 3), bool)
  gen = {}
  for v in ("faithful", "honest"):
    ed = R.generation_edits(D.edits(clamps), SITES, d1, d2, jnp.asarray([a - 1]), ans_pos, ans_valid, v)
    g = generate.generate(params, cfg, prompt, max_new_tokens=5, edits=ed)
    gen[v] = np.asarray(g.tokens)
    # equal to a full recompute of the whole sequence with the same edits (delta at absolute positions)
    seq = jnp.concatenate([prompt, jnp.asarray(gen[v][:, :-1])], 1)
    full = np.asarray(jnp.argmax(transformer.forward(params, cfg, seq, edits=ed).logits[:, a - 1:], -1))
    assert (full == gen[v]).all()
  assert (gen["faithful"][:, 0] == gen["honest"][:, 0]).all()  # the first token sees only the anchor delta
  with pytest.raises(ValueError, match="faithful or honest"):
    R.generation_edits({}, SITES, d1, d2, jnp.asarray([a - 1]), ans_pos, ans_valid, "both")


def test_build_problems_layout():
  p1, p2 = R.build_problems(PROMPTS, ANSWERS, DISC, CFG)
  assert p1.tokens.shape == (3, 1, 11)  # left-padded to the longest case (5 + 6 tokens)
  assert p1.delta_cols[:, 0, 0].tolist() == [4, 6, 5]
  assert p2.delta_cols[2, 0].tolist() == [6, 7, 8, 9] and bool(p2.delta_valid.all())
  assert p1.positions[2, 0, 3:].tolist() == list(range(8)) and not bool(p1.attention_mask[2, 0, 2])
  # an answer shorter than n_ans: masked answer columns, readouts clipped to the last column
  q1, q2 = R.build_problems([[1, 2, 3]], [[9, 8]], DISC, CFG)
  assert q2.delta_cols[0, 0].tolist() == [3, 4, 3, 3] and q2.delta_valid[0, 0].tolist() == [True, True, False, False]
  assert q1.readout_cols[0, 0].tolist() == [2, 3, 4, 4] and q1.targets["answer_len"][0, 0] == 2
  with pytest.raises(ValueError, match="non-empty base answer"):
    R.build_problems([[1, 2]], [[]], DISC, CFG)
  assert R.with_fixed(p2, jnp.zeros((3, 2, 1, 32))).fixed_cols[:, 0, 0].tolist() == [4, 6, 5]


@pytest.mark.slow
def test_run_shapes_share_one_program_and_change_nothing(setup):
  """The K sweep's contract: calls on different case subsets with different feature sets (padded to one
  K_max) share one compiled program per stage when given the run's ``stage_shapes``, and padding a
  subset to those shapes (longer rows, wider suffix, a padded chunk) gives the same recovery as its
  own per-call shapes."""
  params, cfg, saes, _ = setup
  c = CFG.with_projection("none")
  shapes = R.stage_shapes(PROMPTS, ANSWERS, DISC, c, batch=3)
  small = D.make_defence(D.DefenceSpec("multiply"), saes, {SITES[0]: [4], SITES[1]: [3]}, 3.0, k_max=3)
  full = D.make_defence(D.DefenceSpec("multiply"), saes, FEATS, 3.0, k_max=3)
  key = jax.random.key(5)

  def run(defence, idx, sh):
    return R.recover_two_stage(params, cfg, defence, SITES, [PROMPTS[i] for i in idx], [ANSWERS[i] for i in idx],
                               DISC, c, key, shapes=sh)

  run(full, [0, 1, 2], shapes)
  n_programs = engine._examples_jit._cache_size()  # pylint: disable=protected-access
  padded = run(small, [2], shapes)  # case 2 is the shortest: padded to a longer row than its own
  assert engine._examples_jit._cache_size() == n_programs  # pylint: disable=protected-access
  own = run(small, [2], None)
  assert engine._examples_jit._cache_size() > n_programs  # pylint: disable=protected-access
  for stage in ("stage1", "stage2"):
    a, b = getattr(padded, stage), getattr(own, stage)
    np.testing.assert_allclose(np.asarray(a.objective), np.asarray(b.objective), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.delta), np.asarray(b.delta), atol=1e-5)
