"""Parity of the JAX forward with transformers on tiny random-weight models of each family."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tests.hf_fixtures import make_hf_model, VOCAB
from recovery_jax.models import hf, transformer

torch = pytest.importorskip("torch")

FAMILIES = ["llama", "gemma2", "gemma3", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  ref = make_hf_model(request.param, folder)
  params, cfg = hf.load_hf(folder)
  return ref, jax.tree.map(jnp.asarray, params), cfg


def _tokens(seed, b, t):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(b, t))


def test_logits_and_resid_post_match_transformers(pair):
  ref, params, cfg = pair
  toks = _tokens(0, 2, 12)  # longer than the sliding window (6)
  with torch.no_grad():
    out = ref(torch.tensor(toks), output_hidden_states=True)
  sites = [f"blocks.{l}.hook_resid_post" for l in range(cfg.n_layers)]
  ours = transformer.forward(params, cfg, jnp.asarray(toks), capture=sites)
  np.testing.assert_allclose(np.asarray(ours.logits), out.logits.numpy(), atol=1e-4, rtol=1e-4)
  # HF hidden_states[l + 1] is the output of layer l; the last one has the final norm applied
  for l in range(cfg.n_layers - 1):
    np.testing.assert_allclose(np.asarray(ours.captures[sites[l]]), out.hidden_states[l + 1].numpy(),
                               atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ours.captures["blocks.0.hook_resid_post"]),
                             np.asarray(transformer.forward(params, cfg, jnp.asarray(toks),
                                                            capture=("blocks.1.hook_resid_pre",)
                                                            ).captures["blocks.1.hook_resid_pre"]),
                             atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_single_prompts(pair):
  _, params, cfg = pair
  lens = [5, 11, 8]
  t = max(lens)
  rows = [_tokens(i + 1, 1, n)[0] for i, n in enumerate(lens)]
  toks = np.zeros((len(lens), t), np.int64)
  mask = np.zeros((len(lens), t), np.int32)
  for i, r in enumerate(rows):
    toks[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  batch = transformer.forward(params, cfg, jnp.asarray(toks), attention_mask=jnp.asarray(mask))
  for i, r in enumerate(rows):
    single = transformer.forward(params, cfg, jnp.asarray(r[None]))
    np.testing.assert_allclose(np.asarray(batch.logits[i, t - len(r):]), np.asarray(single.logits[0]),
                               atol=2e-5, rtol=1e-5)


def test_prefill_then_decode_equals_full_forward(pair):
  _, params, cfg = pair
  toks = jnp.asarray(_tokens(7, 2, 10))
  full = transformer.forward(params, cfg, toks).logits
  cache = transformer.init_cache(cfg, 2, 16)
  out = transformer.forward(params, cfg, toks[:, :6], cache=cache)
  steps = [out.logits]
  cache = out.cache
  for i in range(6, 10):
    out = transformer.forward(params, cfg, toks[:, i:i + 1], cache=cache)
    cache = out.cache
    steps.append(out.logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_start_from_cached_prefix_at_a_layer_equals_full(pair):
  _, params, cfg = pair
  toks = jnp.asarray(_tokens(9, 2, 10))
  layer = 1
  site = f"blocks.{layer}.hook_resid_pre"
  full = transformer.forward(params, cfg, toks, capture=(site,))
  cache = transformer.forward(params, cfg, toks[:, :7], cache=transformer.init_cache(cfg, 2, 10)).cache
  suffix = transformer.forward(params, cfg, resid=full.captures[site][:, 7:], start_layer=layer, cache=cache,
                               positions=jnp.broadcast_to(jnp.arange(7, 10), (2, 3)))
  np.testing.assert_allclose(np.asarray(suffix.logits), np.asarray(full.logits[:, 7:]), atol=2e-5, rtol=1e-5)
