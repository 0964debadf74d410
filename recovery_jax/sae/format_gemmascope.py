"""Gemma Scope ``params.npz`` files (read and written).

See ``recovery_jax.sae.formats`` for the common conventions; ``formats.load_sae`` dispatches here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from recovery_jax.sae.config import SAEConfig
from recovery_jax.sae.formats import GEMMASCOPE_PARAMS, SAEFileError, _finalize, _to_numpy, validate_params


_GEMMA_MODELS = {"2b-it": ("gemma-2-2b-it", 2304), "9b-it": ("gemma-2-9b-it", 3584), "27b-it": ("gemma-2-27b-it", 4608),
                 "2b": ("gemma-2-2b", 2304), "9b": ("gemma-2-9b", 3584), "27b": ("gemma-2-27b", 4608)}


def _gemmascope_hook(path: str, site: str | None, layer: int | None) -> tuple[str, str, int | None]:
  """(site, hook name, layer) from the path (``.../gemma-scope-2b-pt-res/layer_20/width_16k/...``)."""
  low = path.lower()
  if layer is None:
    m = re.search(r"layer[_.](\d+)", low)
    layer = int(m.group(1)) if m else None
  if site is None:
    m = re.search(r"-(res|mlp|att)(?:-|/|$)", low)
    site = m.group(1) if m else "res"
  if "embedding" in low:
    return site, "hook_embed", 0
  if layer is None:
    raise SAEFileError(f"{path}: cannot tell the layer from the path (no 'layer_L'); pass layer= or hook_name=")
  hook = {"res": f"blocks.{layer}.hook_resid_post", "mlp": f"blocks.{layer}.hook_mlp_out",
          "att": f"blocks.{layer}.attn.hook_z"}.get(site)
  if hook is None:
    raise SAEFileError(f"{path}: unknown Gemma Scope site {site!r}: expected 'res', 'mlp' or 'att'")
  return site, hook, layer


def load_gemmascope(path: str | os.PathLike, *, hook_name: str | None = None, layer: int | None = None,
                    site: str | None = None, model_name: str | None = None,
                    dtype: str | None = "float32") -> tuple[dict, SAEConfig]:
  """Loads a Gemma Scope ``params.npz`` (file or its folder) as a JumpReLU SAE.

  The hook comes from ``hook_name`` or the path (``layer_L``; ``res`` unless the path says
  ``-mlp``/``-att``): ``res`` -> ``blocks.L.hook_resid_post``. Embedding SAEs are rescaled by
  sqrt(d_in) as SAELens does.
  """
  f = Path(path)
  if f.is_dir():
    f = f / GEMMASCOPE_PARAMS
  if not f.exists():
    raise SAEFileError(f"{f}: file not found")
  try:
    with np.load(f) as data:
      tensors = {("W_" + k[2:] if k.startswith("w_") else k): np.asarray(data[k]) for k in data.files}
  except Exception as e:  # noqa: BLE001
    raise SAEFileError(f"{f}: cannot read npz ({e})") from e
  for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
    if name not in tensors:
      raise SAEFileError(f"{f}: missing tensor {name!r} (Gemma Scope params.npz holds W_enc, W_dec, b_enc, "
                         f"b_dec, threshold; found {sorted(tensors)})")
  if tensors["W_enc"].ndim != 2:
    raise SAEFileError(f"{f}: tensor 'W_enc' has shape {tensors['W_enc'].shape}, expected [d_in, d_sae]")
  d_in, d_sae = tensors["W_enc"].shape
  hook = hook_name if hook_name is not None else _gemmascope_hook(str(f), site, layer)[1]
  if model_name is None:
    m = re.search(r"gemma-scope-(\d+b(?:-it)?)-(?:pt|it)", str(f).lower())
    model_name = _GEMMA_MODELS[m.group(1)][0] if m and m.group(1) in _GEMMA_MODELS else ""
  if "scaling_factor" in tensors:
    s = np.asarray(tensors.pop("scaling_factor"), np.float32)
    if not np.allclose(s, 1.0):
      tensors["W_dec"] = tensors["W_dec"] * s[:, None]
  if hook == "hook_embed":
    tensors["W_enc"] = tensors["W_enc"] / np.sqrt(d_in)
    tensors["W_dec"] = tensors["W_dec"] * np.sqrt(d_in)
  cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False,
                  hook_name=hook, model_name=model_name, dtype="float32", prepend_bos=True,
                  context_size=1024, source=str(f))
  return _finalize(tensors, cfg, str(f), dtype)


def save_gemmascope(params: Mapping[str, Any], cfg: SAEConfig, path: str | os.PathLike) -> Path:
  """Writes ``params.npz`` in the Gemma Scope layout (jumprelu, no b_dec on input); returns the file."""
  if cfg.architecture not in ("jumprelu", "batchtopk") or cfg.apply_b_dec_to_input or \
      cfg.normalize_activations != "none" or cfg.rescale_acts_by_decoder_norm:
    raise SAEFileError(f"save_gemmascope: Gemma Scope files hold JumpReLU SAEs without b_dec on input or "
                       f"normalisation (got {cfg.architecture}, apply_b_dec_to_input={cfg.apply_b_dec_to_input}, "
                       f"normalize_activations={cfg.normalize_activations!r})")
  validate_params(params, cfg)
  p = _to_numpy(params)
  f = Path(path)
  if f.suffix != ".npz":
    f = f / GEMMASCOPE_PARAMS
  f.parent.mkdir(parents=True, exist_ok=True)
  np.savez(f, **{k: p[k].astype(np.float32) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
  return f
