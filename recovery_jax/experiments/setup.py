"""Shared experiment setup: resolve the model and SAE named in a config, with clear errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from recovery_jax import errors, manifest
from recovery_jax.models import loading, sites as sites_lib
from recovery_jax.sae import formats as sae_formats
from recovery_jax.sae import registry, testing as sae_testing


def load_model(name: str, processing: str = "", seed: int = 0):
  """(params, cfg, tokenizer) for a config's ``model`` field (``loading.load_model``; tiny random
  models take their weights from ``seed``)."""
  if name.startswith("REQUIRED"):
    raise errors.UserError(f"config field 'model': {name}")
  known = loading.NAMED_MODELS + tuple(loading.TINY_MODELS)
  if name not in known and not os.path.exists(name):
    raise errors.UserError(f"config field 'model': {name!r} is not a named model ({', '.join(known)}) "
                           "nor an existing .gguf file or HF folder")
  try:
    params, cfg, tok = loading.load_model(name, seed=seed)
  except (FileNotFoundError, ValueError) as e:
    raise errors.UserError(f"config field 'model': {e}") from e
  if processing == "transformer_lens":
    from recovery_jax.models import processing as proc  # pylint: disable=import-outside-toplevel
    params = proc.process_like_transformer_lens(params, cfg)
  elif processing:
    raise errors.UserError(f"config field 'model_processing'={processing!r}: expected '' or 'transformer_lens'")
  if tok is None:
    raise errors.UserError(f"config field 'model': {name!r} has no tokenizer.json")
  tiny = name in loading.TINY_MODELS  # the run's manifest names the file it read (none: random weights)
  manifest.record("model", name, None if tiny else loading.resolve_named(name) if name in loading.NAMED_MODELS
                  else name, **({"random_weights_seed": seed} if tiny else {}))
  return params, cfg, tok


def random_sae(model_cfg, site: str, d_sae: int, seed: int = 0):
  """A random standard ReLU SAE (tied init, ``sae.testing.random_sae``) for smoke runs, scaled to the
  residual stream of the tiny GPT-2-initialised models: (params, SAEConfig)."""
  return sae_testing.random_sae(model_cfg.d_model, d_sae, seed=seed + 1, site=site, model_name=model_cfg.name,
                                enc_noise=0.0, b_enc=-0.01)


def load_sae(path: str, model_cfg, site: str, override: bool = False, model_name: str = ""):
  """(params, SAEConfig) for a config's ``sae`` field, checked against the model and site.

  ``path``: a SAE folder; ``"shipped"`` (the SAE this project ships for ``model_name`` at ``site``,
  found by ``sae.registry`` from any working directory); or ``"random"`` (smoke runs).
  """
  try:
    sites_lib.parse_site(site, model_cfg.n_layers)
  except ValueError as e:
    raise errors.UserError(f"config field 'site': {e}") from e
  if path == "random":
    manifest.record("sae", "random", None, site=site, random_weights_seed=1)
    return random_sae(model_cfg, site, d_sae=256)
  value = path
  if path == "shipped":
    try:
      path = str(registry.resolve(model_name, site))
    except ValueError as e:
      raise errors.UserError(f"config field 'sae'='shipped': {e}") from e
  if path.startswith("REQUIRED"):
    raise errors.UserError(f"config field 'sae': {path}")
  load_kw = {}
  if registry.is_name(path):  # release:id (docs/cli.md): a shipped SAE, or one under $RECOVERY_JAX_SAE_ROOT
    try:
      found = registry.find(path)
    except errors.UserError as e:
      raise errors.UserError(f"config field 'sae': {e}") from e
    path, load_kw = str(found.path), found.load_kwargs()
  if not os.path.exists(path):
    raise errors.UserError(f"config field 'sae': {path!r} does not exist (a SAELens, Gemma Scope or sparsify folder)")
  try:
    params, cfg = sae_formats.load_sae(path, model_cfg=model_cfg, hook_name=site, override=override, **load_kw)
  except (sae_formats.SAEFileError, sae_formats.SAECompatibilityError, ValueError) as e:
    raise errors.UserError(f"config field 'sae': {e}") from e
  manifest.record("sae", value, path, site=site)
  return jax.tree.map(jnp.asarray, params), cfg
