"""TransformerLens-style weight processing of GPT-2 params matches HookedTransformer, offline.

The reference is ``HookedTransformer(HookedTransformerConfig(...))`` + ``convert_gpt2_weights`` +
``load_and_process_state_dict`` on a tiny random GPT2LMHeadModel (``from_pretrained("gpt2", ...)``
would need the hub for the config).
"""

import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tests.hf_fixtures import make_hf_model, VOCAB
from recovery_jax.models import hf, processing, transformer

torch = pytest.importorskip("torch")
tl = pytest.importorskip("transformer_lens")

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
SETTINGS = [
    dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    dict(fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
    dict(fold_ln=False, center_writing_weights=True, center_unembed=False, fold_value_biases=True),
    dict(fold_ln=False, center_writing_weights=False, center_unembed=True, fold_value_biases=False),
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("gpt2"))
  ref = make_hf_model("gpt2", folder, seed=1)
  params, cfg = hf.load_hf(folder)
  return ref, jax.tree.map(jnp.asarray, params), cfg


def _hooked(ref, cfg, settings):
  from transformer_lens import HookedTransformer, HookedTransformerConfig
  from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
  tl_cfg = HookedTransformerConfig(
      n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_positions, d_head=cfg.d_head,
      n_heads=cfg.n_heads, d_mlp=cfg.d_mlp, d_vocab=cfg.vocab_size, act_fn="gelu_new",
      normalization_type="LN", eps=cfg.norm_eps, positional_embedding_type="standard",
      original_architecture="GPT2LMHeadModel", default_prepend_bos=False, device="cpu", dtype=torch.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    model = HookedTransformer(tl_cfg)
  model.load_and_process_state_dict(convert_gpt2_weights(ref, tl_cfg), **settings)
  return model.eval()


def _tokens(seed=0, b=2, t=12):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(b, t))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "+".join(k for k in FLAGS if s[k]) or "none")
def test_resid_and_logprobs_match_transformer_lens(gpt2, settings):
  ref, params, cfg = gpt2
  toks = _tokens()
  model = _hooked(ref, cfg, settings)
  with torch.no_grad():
    tl_logits, cache = model.run_with_cache(torch.tensor(toks))
  processed = processing.process_like_transformer_lens(params, cfg, **settings)
  sites = [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)] + [f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
  out = transformer.forward(processed, cfg, jnp.asarray(toks), capture=sites)
  for site in sites:
    np.testing.assert_allclose(np.asarray(out.captures[site]), cache[site].numpy(), atol=1e-4, rtol=1e-4,
                               err_msg=site)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(out.logits, -1)),
                             torch.log_softmax(tl_logits, -1).numpy(), atol=1e-4, rtol=1e-4)
  # the logits themselves too (center_unembed shifts them identically on both sides)
  np.testing.assert_allclose(np.asarray(out.logits), tl_logits.numpy(), atol=1e-4, rtol=1e-4)
  # and the processed weights, including the reading weights centred by fold_ln
  a, m = processed["blocks"]["attn"], processed["blocks"]["mlp"]
  pairs = {
      "W_E": (processed["embed"]["W_E"], model.W_E), "W_pos": (processed["pos_embed"]["W_pos"], model.W_pos),
      "W_Q": (jnp.transpose(a["W_Q"], (0, 2, 1, 3)), model.W_Q), "b_Q": (a["b_Q"], model.b_Q),
      "W_K": (jnp.transpose(a["W_K"], (0, 2, 1, 3)), model.W_K), "b_K": (a["b_K"], model.b_K),
      "W_V": (jnp.transpose(a["W_V"], (0, 2, 1, 3)), model.W_V), "b_V": (a["b_V"], model.b_V),
      "W_O": (a["W_O"], model.W_O), "b_O": (a["b_O"], model.b_O),
      "W_in": (m["W_in"], model.W_in), "b_in": (m["b_in"], model.b_in),
      "W_out": (m["W_out"], model.W_out), "b_out": (m["b_out"], model.b_out),
      "W_U": (processed["unembed"]["W_U"], model.W_U), "b_U": (processed["unembed"]["b_U"], model.b_U),
  }
  for name, (ours, theirs) in pairs.items():
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_processing_keeps_our_logprobs_and_centres_the_residual(gpt2):
  _, params, cfg = gpt2
  toks = jnp.asarray(_tokens(1))
  sites = [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)]
  raw = transformer.forward(params, cfg, toks, capture=sites)
  processed = processing.process_like_transformer_lens(params, cfg)
  new = transformer.forward(processed, cfg, toks, capture=sites)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(new.logits, -1)),
                             np.asarray(jax.nn.log_softmax(raw.logits, -1)), atol=1e-4, rtol=1e-4)
  for site in sites:
    r, n = np.asarray(raw.captures[site]), np.asarray(new.captures[site])
    np.testing.assert_allclose(n, r - r.mean(-1, keepdims=True), atol=1e-4, rtol=1e-4, err_msg=site)
    np.testing.assert_allclose(n.mean(-1), 0.0, atol=1e-5)
  # layer norms are unit, W_U is materialised, inputs are not modified
  np.testing.assert_array_equal(np.asarray(processed["blocks"]["ln1"]["w"]), 1.0)
  np.testing.assert_array_equal(np.asarray(processed["ln_final"]["b"]), 0.0)
  assert processed["unembed"]["W_U"].shape == (cfg.d_model, cfg.vocab_size)
  assert "unembed" not in params
  np.testing.assert_array_equal(np.asarray(processed["blocks"]["attn"]["b_V"]), 0.0)


def test_rejects_rms_models():
  from recovery_jax.models.config import ModelConfig
  cfg = ModelConfig(family="llama", vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, d_head=4, d_mlp=8)
  with pytest.raises(ValueError, match="RMSNorm"):
    processing.process_like_transformer_lens({}, cfg)
