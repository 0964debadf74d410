"""EleutherAI sparsify folders (read and written).

See ``recovery_jax.sae.formats`` for the common conventions; ``formats.load_sae`` dispatches here.
"""

from __future__ import annotations

import json
import re
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from recovery_jax.sae.config import SAEConfig
from recovery_jax.sae.formats import SAEFileError, SAELENS_CFG, SPARSIFY_WEIGHTS, _finalize, _read_json, _read_safetensors, _to_numpy, validate_params


def _sparsify_hook(folder: Path) -> tuple[str, int | None]:
  name = folder.name
  if name in ("embed_tokens", "embed_in", "wte"):
    return "hook_embed", None
  m = re.search(r"(?:layers|h|blocks)[._](\d+)$", name)
  if m is None:
    raise SAEFileError(f"{folder}: cannot tell the hook from the folder name {name!r} "
                       "(sparsify names residual SAEs 'layers.N'); pass hook_name=")
  return f"blocks.{int(m.group(1))}.hook_resid_post", int(m.group(1))


def load_sparsify(path: str | os.PathLike, *, hook_name: str | None = None, model_name: str | None = None,
                  dtype: str | None = "float32") -> tuple[dict, SAEConfig]:
  """Loads a sparsify folder (``cfg.json`` + ``sae.safetensors``) as a SAELens-style topk SAE."""
  folder = Path(path)
  if folder.is_file():
    folder = folder.parent
  cfg_path, w_path = folder / SAELENS_CFG, folder / SPARSIFY_WEIGHTS
  c = _read_json(cfg_path)
  act = c.get("activation", "topk")
  if act != "topk":
    raise SAEFileError(f"{cfg_path}: field 'activation' = {act!r} is not supported (only sparsify 'topk')")
  if c.get("skip_connection") or c.get("transcode"):
    raise SAEFileError(f"{cfg_path}: transcoders / skip connections are not SAEs of this loader "
                       f"(transcode={c.get('transcode')}, skip_connection={c.get('skip_connection')})")
  for field in ("d_in", "k"):
    if not isinstance(c.get(field), int):
      raise SAEFileError(f"{cfg_path}: field {field!r} is missing or not an integer ({c.get(field)!r})")
  t = _read_safetensors(w_path)
  if "encoder.weight" in t:
    w_enc = t["encoder.weight"].T
  elif "W_enc" in t:
    w_enc = t["W_enc"]
  else:
    raise SAEFileError(f"{w_path}: missing tensor 'encoder.weight' (found {sorted(t)})")
  d_in = c["d_in"]
  d_sae = c.get("num_latents") or d_in * c.get("expansion_factor", 32)
  if w_enc.shape != (d_in, d_sae):
    raise SAEFileError(f"{w_path}: tensor 'encoder.weight' has shape {tuple(w_enc.shape[::-1])}, "
                       f"expected {(d_sae, d_in)} (num_latents, d_in)")
  if "W_dec" not in t:
    raise SAEFileError(f"{w_path}: missing tensor 'W_dec' (found {sorted(t)})")
  w_dec = t["W_dec"]
  if w_dec.shape == (d_sae, d_in):
    pass  # sparsify's layout today
  elif w_dec.shape == (d_in, d_sae):
    w_dec = w_dec.T
  else:
    raise SAEFileError(f"{w_path}: tensor 'W_dec' has shape {tuple(w_dec.shape)}, expected {(d_sae, d_in)}")
  b_enc = t.get("encoder.bias", t.get("b_enc", np.zeros((d_sae,), w_enc.dtype)))
  b_dec = t.get("b_dec", np.zeros((d_in,), w_enc.dtype))
  hook, _ = _sparsify_hook(folder) if hook_name is None else (hook_name, None)
  if model_name is None:
    run_cfg = folder.parent / "config.json"
    model_name = _read_json(run_cfg).get("model", "") if run_cfg.exists() else ""
  cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=int(d_sae), k=c["k"],
                  apply_b_dec_to_input=not c.get("transcode", False), hook_name=hook,
                  model_name=model_name or "", dtype=str(w_enc.dtype), source=str(folder))
  return _finalize({"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}, cfg, str(w_path), dtype)


def save_sparsify(params: Mapping[str, Any], cfg: SAEConfig, path: str | os.PathLike) -> Path:
  """Writes a sparsify folder (``cfg.json`` + ``sae.safetensors``) of a topk SAE; returns it.

  The folder should be named after the hookpoint (``layers.N``) for sparsify's loaders.
  """
  from safetensors.numpy import save_file
  if cfg.architecture != "topk" or not cfg.apply_b_dec_to_input or cfg.normalize_activations != "none":
    raise SAEFileError(f"save_sparsify: sparsify files hold topk SAEs that subtract b_dec on input "
                       f"(got {cfg.architecture}, apply_b_dec_to_input={cfg.apply_b_dec_to_input})")
  validate_params(params, cfg)
  p = _to_numpy(params)
  w_enc, b_enc, w_dec = p["W_enc"], p["b_enc"], p["W_dec"]
  if cfg.rescale_acts_by_decoder_norm:
    n = np.linalg.norm(w_dec.astype(np.float32), axis=-1)
    w_enc, b_enc, w_dec = w_enc * n, b_enc * n, w_dec / n[:, None]
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  save_file({"encoder.weight": np.ascontiguousarray(w_enc.T), "encoder.bias": b_enc, "W_dec": w_dec,
             "b_dec": p["b_dec"]}, str(folder / SPARSIFY_WEIGHTS))
  with open(folder / SAELENS_CFG, "w") as f:
    json.dump({"activation": "topk", "expansion_factor": max(cfg.d_sae // cfg.d_in, 1),
               "normalize_decoder": True, "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False,
               "skip_connection": False, "transcode": False, "d_in": cfg.d_in}, f, indent=1)
  return folder
