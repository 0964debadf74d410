"""Objectives and drift penalties against direct NumPy transcriptions of the reference formulas."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from recovery_jax.recovery import objectives as O
from recovery_jax.recovery.objectives import Objective


def _logsoftmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_refusal_score(logits, tokens, a, dec, disc, w):
  """paper-method 6.4 / reference build_recovery_objective on full-sequence logits [T, V]."""
  t = len(tokens)
  lp = _logsoftmax(logits)

  def p_of(ids, n):
    limit = min(len(ids), n, t - a)
    if limit <= 0:
      return 0.0
    return float(np.mean([lp[a - 1 + j, ids[j]] for j in range(limit)]))

  score = 0.0
  if w["w_ans"] > 0:
    start, end = a - 1, min(t - 1, a - 1 + w["n_ans"])
    ks = list(range(start, end))
    wt = np.ones(len(ks))
    if w["n_pref"] > 0 and w["pref_weight"] != 1.0:
      wt[:w["n_pref"]] = w["pref_weight"]
    tl = np.array([lp[k, tokens[k + 1]] for k in ks])
    score += w["w_ans"] * float((tl * wt).sum() / max(1.0, wt.sum()))
  if w["w_prefix"] > 0:
    score += w["w_prefix"] * p_of(dec, w["prefix_len"])
  if w["w_first"] > 0:
    score += w["w_first"] * lp[a - 1, dec[0]]
  if w["w_anti"] > 0 and disc:
    score += w["w_anti"] * (p_of(dec, w["anti_len"]) - max(p_of(q, w["anti_len"]) for q in disc))
  if w["w_margin"] > 0 and disc:
    score += w["w_margin"] * (logits[a - 1, dec[0]] - max(logits[a - 1, q[0]] for q in disc))
  return score


@pytest.mark.parametrize("a,t,weights", [
    (6, 30, dict(w_ans=0.0, w_prefix=2.0, w_first=4.0, w_anti=0.2, w_margin=0.1)),  # stage 1 (v4)
    (6, 30, dict(w_ans=5.0, n_pref=16, pref_weight=2.0, w_anti=0.1)),  # stage 2 (reproduce_refusal.sh)
    (6, 10, dict(w_ans=5.0, w_anti=0.1, w_prefix=1.0)),  # answer shorter than every limit
])
def test_teacher_forced_matches_reference(a, t, weights):
  rng = np.random.default_rng(a + t)
  v = 50
  logits = rng.normal(size=(t, v)) * 3
  tokens = rng.integers(0, v, size=t)
  disc = [[3, 4, 5], [7], [9, 1, 2, 8, 6, 5, 4, 3, 2]]
  full = dict(w_ans=0.0, n_ans=12, n_pref=0, pref_weight=1.0, w_prefix=0.0, prefix_len=8, w_first=0.0, w_anti=0.0,
              anti_len=8, w_margin=0.0)
  full.update(weights)
  obj = Objective("teacher_forced", **full)
  dec = list(tokens[a:a + 8])
  want = _reference_refusal_score(logits, tokens, a, dec, disc, full)
  # engine view: readout columns a - 1 + j; next tokens tokens[a + j]; padded beyond T
  r = obj.n_readout
  cols = np.minimum(a - 1 + np.arange(r), t - 1)
  nxt = np.zeros(r, np.int32)
  n = min(r, t - a)
  nxt[:n] = tokens[a:a + n]
  q = np.zeros((3, 9), np.int32)
  q_len = np.array([len(x) for x in disc])
  for i, x in enumerate(disc):
    q[i, :len(x)] = x
  dec_arr = np.zeros(8, np.int32)
  dec_arr[:len(dec)] = dec
  targets = {"next_tokens": nxt[None], "answer_len": np.array([t - a]), "decision": dec_arr[None],
             "decision_len": np.array([len(dec)]), "discouraged": q[None], "discouraged_len": q_len[None]}
  got = O.row_scores(obj, jnp.asarray(logits[cols][None], jnp.float32), jax.tree.map(jnp.asarray, targets))
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-5, atol=1e-4)


def test_single_position_objectives():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 1, 11))
  lj = jnp.asarray(logits, jnp.float32)
  ld = O.row_scores(Objective("logit_diff"), lj, {"pos": jnp.array([1, 2]), "neg": jnp.array([3, 4])})
  np.testing.assert_allclose(np.asarray(ld), logits[[0, 1], 0, [1, 2]] - logits[[0, 1], 0, [3, 4]], rtol=1e-6)
  vm = O.row_scores(Objective("vocab_margin"), lj, {"target": jnp.array([5, 0])})
  for b, tt in enumerate([5, 0]):
    others = np.delete(logits[b, 0], tt)
    np.testing.assert_allclose(float(vm[b]), logits[b, 0, tt] - others.mean(), rtol=1e-5)
  ch = {"choices": jnp.array([[1, 2, 3, 4], [4, 3, 2, 1]]), "gold": jnp.array([2, 0])}
  cm = O.row_scores(Objective("choice_margin"), lj, ch)
  ce = O.row_scores(Objective("choice_ce"), lj, ch)
  for b in range(2):
    cl = logits[b, 0, np.asarray(ch["choices"][b])]
    g = int(ch["gold"][b])
    np.testing.assert_allclose(float(cm[b]), cl[g] - np.delete(cl, g).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(ce[b]), _logsoftmax(cl)[g], rtol=1e-5)
  assert float(O.weighted_mean(jnp.array([1.0, 3.0]), jnp.array([1.0, 0.0]))) == 1.0


def test_drift_penalties():
  rng = np.random.default_rng(1)
  c = (jnp.asarray(rng.normal(size=(1, 2, 3))), jnp.asarray(rng.normal(size=(1, 2, 4))))
  r = (jnp.asarray(rng.normal(size=(1, 2, 3))), jnp.asarray(rng.normal(size=(1, 2, 4))))
  m = (jnp.ones((1, 2, 3), bool), jnp.ones((1, 2, 4), bool).at[0, 1, 3].set(False))
  d = [np.where(mm, np.asarray(cc) - np.asarray(rr), 0) for cc, rr, mm in zip(c, r, m)]
  rr = [np.where(mm, np.asarray(x), 0) for x, mm in zip(r, m)]
  n = [6, 7]
  l2 = np.sqrt(sum((x ** 2).sum() for x in d))
  np.testing.assert_allclose(float(O.drift_penalty("l2", c, r, m)), l2, rtol=1e-5)
  np.testing.assert_allclose(float(O.drift_penalty("raw_mse", c, r, m)),
                             np.mean([(d[i] ** 2).sum() / n[i] for i in range(2)]), rtol=1e-5)
  np.testing.assert_allclose(float(O.drift_penalty("relative_mse", c, r, m, 1e-6)),
                             np.mean([((d[i] ** 2).sum() / n[i]) / ((rr[i] ** 2).sum() / n[i] + 1e-6)
                                      for i in range(2)]), rtol=1e-5)
  np.testing.assert_allclose(float(O.drift_penalty("relative_l2", c, r, m, 1e-6)),
                             np.mean([(d[i] ** 2).sum() / ((rr[i] ** 2).sum() + 1e-6) for i in range(2)]), rtol=1e-5)
  # the l2 penalty has a zero (not NaN) gradient at zero drift, like torch's norm
  g = jax.grad(lambda x: O.drift_penalty("l2", (x,), (x,), (jnp.ones_like(x, bool),)))(c[0])
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) == 0.0


def test_readout_subset_equals_full_vocabulary_scores():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recovery_jax.models import random_init, transformer
  from recovery_jax.recovery import objectives as O
  for family in ("llama", "gemma2", "gpt2"):
    cfg = random_init.tiny_config(family, vocab_size=64)
    if family == "llama":
      cfg = cfg.replace(tie_embeddings=False)
    params = random_init.init_params(cfg, jax.random.key(1))
    h = jax.random.normal(jax.random.key(2), (3, 2, cfg.d_model))
    full = transformer.final_logits(params, cfg, h)
    targets = {"pos": jnp.array([1, 5, 9]), "neg": jnp.array([2, 0, 63]),
               "choices": jnp.array([[3, 4, 5, 6], [7, 8, 9, 10], [0, 1, 2, 60]]), "gold": jnp.array([0, 3, 2])}
    for kind in ("logit_diff", "choice_margin", "choice_ce"):
      obj = O.Objective(kind)
      sub = transformer.final_logits_at(params, cfg, h, O.readout_ids(obj, targets))
      np.testing.assert_allclose(np.asarray(O.row_scores_at(obj, sub, targets)),
                                 np.asarray(O.row_scores(obj, full, targets)), rtol=1e-5, atol=1e-5)
