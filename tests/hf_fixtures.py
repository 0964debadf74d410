"""Tiny random-weight transformers models saved with save_pretrained (reference side of parity tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

VOCAB = 128


def make_hf_model(family: str, folder: str, seed: int = 0):
  """Builds a tiny random model of ``family``, saves it to ``folder`` and returns the torch model."""
  import torch
  import transformers as tf

  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=96)
  if family == "llama":
    cfg = tf.LlamaConfig(**common, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                         rms_norm_eps=1e-5)
    model = tf.LlamaForCausalLM(cfg)
  elif family == "gemma2":
    cfg = tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=6,
                          query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    model = tf.Gemma2ForCausalLM(cfg)
  elif family == "gemma3":
    cfg = tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16, sliding_window=6,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    model = tf.Gemma3ForCausalLM(cfg)
  elif family == "gpt2":
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    model = tf.GPT2LMHeadModel(cfg)
  else:
    raise ValueError(family)
  # random (non-trivial) norm weights and biases so that processing bugs show
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model = model.eval().float()
  model.save_pretrained(folder)
  return model
