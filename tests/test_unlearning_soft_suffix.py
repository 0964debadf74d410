"""Soft-suffix forward: with the suffix set to real token embeddings, ``corrected`` equals the clamped
model on the concatenated tokens, and ``faithful`` equals a clamp restricted to the prompt columns."""

import jax.numpy as jnp
import numpy as np

from recovery_jax import intervene
from recovery_jax.models import random_init, transformer
from recovery_jax.recovery import soft_suffix
from recovery_jax.sae import testing as sae_testing

SITE = "blocks.0.hook_resid_post"  # attention of layer 1 reads every column


def test_suffix_forward_equals_token_forward():
  cfg = random_init.tiny_config("llama", vocab_size=64, n_layers=2)
  params = random_init.init_params(cfg, 0)
  sae, scfg = sae_testing.random_sae(cfg.d_model, 32, seed=3, site=SITE, enc_noise=0.0, b_enc=0.0)  # ReLU: half fire
  spec = intervene.ClampSpec(site=SITE, sae_cfg=scfg)
  clamp = intervene.make_clamp(spec, sae, np.arange(12), -10.0)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(3, 64, (2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), bool).at[1, :2].set(False)  # row 1 left-padded
  suffix_ids = jnp.asarray(rng.integers(3, 64, (2, 3)), jnp.int32)
  choices = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]], jnp.int32)
  emb = transformer.embed(params, cfg, prompt)
  suf = transformer.embed(params, cfg, suffix_ids)
  full = jnp.concatenate([prompt, suffix_ids], 1)
  fmask = jnp.concatenate([mask, jnp.ones((2, 3), bool)], 1)

  cl, _, _ = soft_suffix.forward(params, cfg, clamp, "corrected", emb, mask, suf, choices)
  ref = intervene.clamp(transformer.forward, clamp)(params, cfg, full, attention_mask=fmask).logits[:, -1]
  np.testing.assert_allclose(cl, np.take_along_axis(np.asarray(ref), np.asarray(choices), -1), atol=1e-4)

  cl_f, _, _ = soft_suffix.forward(params, cfg, clamp, "faithful", emb, mask, suf, choices)
  pos = transformer.default_positions(fmask, 2, 9)
  pm = jnp.arange(9)[None] < jnp.asarray([[6], [4]])  # absolute positions of the prompt tokens per row
  mspec = intervene.ClampSpec(site=SITE, sae_cfg=scfg, masked_positions=True)
  mclamp = intervene.make_clamp(mspec, sae, np.arange(12), -10.0, position_mask=pm)
  ref_f = intervene.clamp(transformer.forward, mclamp)(params, cfg, full, attention_mask=fmask, positions=pos)
  np.testing.assert_allclose(cl_f, np.take_along_axis(np.asarray(ref_f.logits[:, -1]), np.asarray(choices), -1),
                             atol=1e-4)
  assert not np.allclose(cl, cl_f, atol=1e-3)  # the clamp on the suffix columns matters
  _, _, pre = soft_suffix.forward(params, cfg, clamp, "faithful", emb, mask, suf, choices)
  assert (np.asarray(pre)[:, 6:] > 0).any(-1).all()  # clamped features fire on every suffix column
