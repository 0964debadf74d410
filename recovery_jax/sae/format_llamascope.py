"""Llama Scope folders (OpenMOSS Language-Model-SAEs; read).

See ``recovery_jax.sae.formats`` for the common conventions; ``formats.load_sae`` dispatches here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from recovery_jax.sae.config import SAEConfig
from recovery_jax.sae.formats import SAEFileError, _finalize, _read_json, _read_safetensors, fold_norm_scaling_factor


LLAMASCOPE_HPARAMS = "hyperparams.json"
LLAMASCOPE_WEIGHTS = "checkpoints/final.safetensors"


def _field(d: Mapping[str, Any], name: str, src: Path, kind=int):
  v = d.get(name)
  if not isinstance(v, kind) or isinstance(v, bool):
    raise SAEFileError(f"{src}: field {name!r} is missing or not {'an integer' if kind is int else kind}: {v!r}")
  return v


def _llamascope_norm(hp: Mapping[str, Any], t: Mapping[str, np.ndarray], key: str, hook: str, src: Path) -> float:
  """dataset_average_activation_norm of ``key`` ('in'/'out'): hyperparams (keyed 'in'/'out' or by
  hook name), else the weights' ``dataset_average_activation_norm.<hook>`` scalar."""
  d = hp.get("dataset_average_activation_norm") or {}
  for k in (key, hook):
    if isinstance(d, Mapping) and k in d:
      return float(d[k])
  name = f"dataset_average_activation_norm.{hook}"
  if name in t:
    return float(np.asarray(t[name]))
  raise SAEFileError(f"{src}: field 'dataset_average_activation_norm' has no {key!r} entry (norm_activation is "
                     f"'dataset-wise'; found {d!r})")


def load_llamascope(path: str | os.PathLike, *, hook_name: str | None = None, model_name: str | None = None,
                    dtype: str | None = "float32") -> tuple[dict, SAEConfig]:
  """Loads a Llama Scope folder (``hyperparams.json`` + ``checkpoints/final.safetensors``, as written
  by OpenMOSS Language-Model-SAEs) into an SAE that takes raw activations.

  Their encode: x_n = x * sqrt(d_model) / norm_in (``norm_activation: dataset-wise``; ``token-wise``
  uses ||x||; ``inference``: 1); optionally x_n - b_D (``apply_decoder_bias_to_pre_encoder``);
  pre = x_n @ encoder.weight^T + encoder.bias; the activation tests ``pre * ||decoder column||``
  when ``sparsity_include_decoder_norm`` (default) else ``pre`` (jumprelu: > ``jump_relu_threshold``
  or exp(``log_jumprelu_threshold``); relu: > 0; topk); features = pre where active; decode
  (f @ decoder.weight^T + decoder.bias) / (sqrt(d_model) / norm_out). Here: W_enc = encoder.weight^T
  * s, W_dec = decoder.weight^T / s, b_dec = decoder.bias / s, b_enc as is, jumprelu threshold_i =
  threshold / ||decoder column i|| (exact); a topk SAE with decoder norms in its sparsity gets unit
  decoder columns (W_enc*n, b_enc*n, W_dec/n: the same reconstruction, activations times the norms).
  Transcoders (``hook_point_out`` != ``hook_point_in``) are refused.
  """
  p = Path(path)
  folder = p.parent.parent if p.is_file() else p
  hp_path, w_path = folder / LLAMASCOPE_HPARAMS, folder / LLAMASCOPE_WEIGHTS
  hp = _read_json(hp_path)
  d_in, d_sae = _field(hp, "d_model", hp_path), _field(hp, "d_sae", hp_path)
  act = str(hp.get("act_fn", "relu")).lower()
  if act not in ("jumprelu", "relu", "topk"):
    raise SAEFileError(f"{hp_path}: field 'act_fn' = {act!r} is not supported (jumprelu, relu, topk)")
  hook_in, hook_out = hp.get("hook_point_in") or hp.get("hook_point"), hp.get("hook_point_out")
  if hook_out and hook_in and hook_out != hook_in:
    raise SAEFileError(f"{hp_path}: field 'hook_point_out' = {hook_out!r} differs from 'hook_point_in' = {hook_in!r}: "
                       "a transcoder, not an SAE of this loader")
  norm_mode = hp.get("norm_activation", "dataset-wise")
  if norm_mode not in ("dataset-wise", "token-wise", "inference"):
    raise SAEFileError(f"{hp_path}: field 'norm_activation' = {norm_mode!r} is not supported "
                       "(dataset-wise, token-wise, inference)")
  t = _read_safetensors(w_path)
  shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae)}
  use_dec_bias = bool(hp.get("use_decoder_bias", True))
  if use_dec_bias:
    shapes["decoder.bias"] = (d_in,)
  for name, shape in shapes.items():
    if name not in t:
      raise SAEFileError(f"{w_path}: missing tensor {name!r} (found {sorted(t)})")
    if tuple(t[name].shape) != shape:
      raise SAEFileError(f"{w_path}: tensor {name!r} has shape {tuple(t[name].shape)}, expected {shape} "
                         f"(d_sae={d_sae}, d_model={d_in} from {LLAMASCOPE_HPARAMS})")
  f32 = lambda a: np.asarray(a, np.float32)
  w_enc, b_enc, w_dec = f32(t["encoder.weight"]).T, f32(t["encoder.bias"]), f32(t["decoder.weight"]).T
  b_dec = f32(t["decoder.bias"]) if use_dec_bias else np.zeros((d_in,), np.float32)
  include_norm = bool(hp.get("sparsity_include_decoder_norm", True))
  dec_norm = np.linalg.norm(w_dec, axis=-1)
  hook = hook_name or hook_in or ""
  params = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
  k = None
  if act == "jumprelu":
    if "log_jumprelu_threshold" in t:
      th = np.exp(f32(t["log_jumprelu_threshold"]))
      if th.shape not in ((), (d_sae,)):
        raise SAEFileError(f"{w_path}: tensor 'log_jumprelu_threshold' has shape {th.shape}, expected {(d_sae,)}")
    elif isinstance(hp.get("jump_relu_threshold"), (int, float)):
      th = np.float32(hp["jump_relu_threshold"])
    else:
      raise SAEFileError(f"{hp_path}: field 'jump_relu_threshold' is missing (and {w_path.name} has no "
                         "'log_jumprelu_threshold')")
    th = np.broadcast_to(th, (d_sae,)).astype(np.float32)
    params["threshold"] = th / np.maximum(dec_norm, 1e-12) if include_norm else th
    arch = "jumprelu"
  elif act == "topk":  # unit decoder columns (their transform_to_unit_decoder_norm): top-k of pre * norm
    arch, k = "topk", _field(hp, "top_k", hp_path)
    if include_norm:
      n = np.maximum(dec_norm, 1e-12)
      params.update(W_enc=w_enc * n, b_enc=b_enc * n, W_dec=w_dec / n[:, None])
  else:
    arch = "standard"
  norm = "none"
  if norm_mode == "dataset-wise":
    s_in = np.sqrt(d_in) / _llamascope_norm(hp, t, "in", hook_in or hook, hp_path)
    params = fold_norm_scaling_factor(params, float(s_in))
  elif norm_mode == "token-wise":
    norm = "constant_norm_rescale"
  cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k,
                  apply_b_dec_to_input=bool(hp.get("apply_decoder_bias_to_pre_encoder", False)) and use_dec_bias,
                  normalize_activations=norm, hook_name=hook,
                  model_name=model_name if model_name is not None else str(hp.get("model_name") or ""),
                  dtype="float32", prepend_bos=True, source=str(folder))
  return _finalize(params, cfg, str(w_path), dtype)
