"""The soft suffix's shared core: refusal and multiple choice draw the same initial suffix (per-example
noise from ``fold_in(key, example id)``), and the refusal path's rows do not depend on the batch size."""

import types

import jax
import numpy as np

from recovery_jax import intervene
from recovery_jax.recovery import soft_suffix
from recovery_jax.sae import testing as sae_testing
from recovery_jax.tasks import refusal_defence

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


class _Tok:  # every text is the one token 5
  def encode(self, text, add_special_tokens=False):
    return types.SimpleNamespace(ids=[5])


def test_refusal_and_choice_share_the_core(tiny_llama):
  params, cfg = tiny_llama
  rng = np.random.default_rng(0)
  saes = {s: sae_testing.random_sae(cfg.d_model, 16, seed=i, site=s) for i, s in enumerate(SITES)}
  defence = refusal_defence.make_defence(refusal_defence.DefenceSpec("multiply"), saes,
                                         {SITES[0]: [1, 2], SITES[1]: [3]}, 3.0)
  prompts = [list(rng.integers(3, 97, k)) for k in (4, 5, 3)]
  answers = [list(rng.integers(3, 97, k)) for k in (3, 2, 4)]
  kw = dict(max_new_tokens=2, stop_ids=(11,), pad_id=0, seed=7)

  def refusal(lr, batch_size):
    rc = soft_suffix.RefusalSuffixConfig(variant="corrected", suffix_len=2, steps=2, lr=lr, n_ans=3, n_pref=1)
    return soft_suffix.run_refusal(params, cfg, _Tok(), defence, prompts, answers, [[7], [9]], rc,
                                   batch_size=batch_size, **kw)

  one, three = refusal(0.05, 1), refusal(0.05, 3)
  for k in ("suffix_norm", "behaviour_final", "drift_rel"):
    np.testing.assert_allclose(one[k], three[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(one["gen_tokens"], three["gen_tokens"])

  # lr = 0: the suffix stays at init + noise, so ||suffix - init|| is ||noise_i||, drawn from
  # fold_in(PRNGKey(seed), i) by both behaviours (the choice path in batches of 2)
  keys = [jax.random.fold_in(jax.random.PRNGKey(7), i) for i in range(3)]
  want = [0.01 * np.linalg.norm(np.asarray(jax.random.normal(k, (2, cfg.d_model)))) for k in keys]
  sae, scfg = saes[SITES[0]]
  clamp = intervene.make_clamp(intervene.ClampSpec(site=SITES[0], sae_cfg=scfg), sae, np.arange(4), -10.0)
  batch = types.SimpleNamespace(tokens=rng.integers(3, 97, (3, 4)).astype(np.int32),
                                attention_mask=np.ones((3, 4), bool),
                                choices=rng.integers(3, 97, (3, 4)).astype(np.int32), gold=np.zeros(3, np.int32))
  mc = soft_suffix.run(params, cfg, _Tok(), clamp, batch,
                       soft_suffix.SuffixConfig(suffix_len=2, steps=2, lr=0.0, batch_size=2), seed=7)
  np.testing.assert_allclose(mc["suffix_norm"], want, rtol=1e-5)
  np.testing.assert_allclose(refusal(0.0, None)["suffix_norm"], want, rtol=1e-5)
