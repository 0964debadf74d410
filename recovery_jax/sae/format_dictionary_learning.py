"""dictionary_learning folders (saprmarks; read).

See ``recovery_jax.sae.formats`` for the common conventions; ``formats.load_sae`` dispatches here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from recovery_jax.sae.config import SAEConfig
from recovery_jax.sae.format_llamascope import _field
from recovery_jax.sae.formats import SAEFileError, _finalize, _read_json


DICTLEARN_WEIGHTS = "ae.pt"
DICTLEARN_CONFIG = "config.json"


def _torch_state_dict(path: Path) -> dict[str, np.ndarray]:
  if not path.exists():
    raise SAEFileError(f"{path}: file not found")
  try:
    import torch
  except ImportError as e:
    raise SAEFileError(f"{path}: reading a torch .pt file needs torch (pip install torch)") from e
  try:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - corrupt or not a state dict
    raise SAEFileError(f"{path}: cannot read the torch state dict ({e})") from e
  if not isinstance(sd, Mapping):
    raise SAEFileError(f"{path}: expected a state dict (name -> tensor), found {type(sd).__name__}")
  return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in sd.items()}


def _dictlearn_hook(trainer: Mapping[str, Any], src: Path) -> str:
  layer = trainer.get("layer")
  if not isinstance(layer, int):
    raise SAEFileError(f"{src}: field 'trainer.layer' is missing or not an integer ({layer!r}); pass hook_name=")
  sub = str(trainer.get("submodule_name") or "").lower()
  if "embed" in sub:
    return "hook_embed"
  if "mlp" in sub:
    return f"blocks.{layer}.hook_mlp_out"
  if "attn" in sub or "attention" in sub:
    return f"blocks.{layer}.hook_attn_out"
  return f"blocks.{layer}.hook_resid_post"


DICTLEARN_CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
                     "BatchTopKSAE", "MatryoshkaBatchTopKSAE")


def load_dictionary_learning(path: str | os.PathLike, *, hook_name: str | None = None, model_name: str | None = None,
                             dtype: str | None = "float32") -> tuple[dict, SAEConfig]:
  """Loads a dictionary_learning folder (``ae.pt`` state dict + ``config.json`` with a ``trainer``
  dict naming ``dict_class``, ``activation_dim``, ``dict_size``, ``layer``, ``lm_name``, ``k``).

  ``AutoEncoder`` (relu(encoder(x - bias)); decoder(f) + bias), ``AutoEncoderNew`` (no input bias),
  ``AutoEncoderTopK`` (per-token top-k after ReLU, ``b_dec`` on input), ``BatchTopKSAE`` /
  ``MatryoshkaBatchTopKSAE`` (inference: the stored global ``threshold``), ``GatedAutoEncoder`` and
  ``JumpReluAutoEncoder`` (no b_dec on input) are read exactly, including their convention of
  reporting features times the decoder norms (folded into the weights: W_enc*n, b_enc*n,
  threshold*n or r_mag+log n, b_mag*n; W_dec/n). Hook: ``blocks.{layer}.hook_resid_post`` (``mlp`` /
  ``attn`` in ``submodule_name``: ``hook_mlp_out`` / ``hook_attn_out``).
  """
  p = Path(path)
  folder = p.parent if p.is_file() else p
  cfg_path, w_path = folder / DICTLEARN_CONFIG, folder / DICTLEARN_WEIGHTS
  conf = _read_json(cfg_path)
  trainer = conf.get("trainer")
  if not isinstance(trainer, Mapping):
    raise SAEFileError(f"{cfg_path}: field 'trainer' is missing (dictionary_learning configs hold the trainer's dict)")
  cls = trainer.get("dict_class")
  if cls not in DICTLEARN_CLASSES:
    raise SAEFileError(f"{cfg_path}: field 'trainer.dict_class' = {cls!r} is not supported; expected one of "
                       f"{DICTLEARN_CLASSES}")
  d_in, d_sae = _field(trainer, "activation_dim", cfg_path), _field(trainer, "dict_size", cfg_path)
  sd = _torch_state_dict(w_path)

  def get(*names, shape=None):
    for n in names:
      if n in sd:
        a = np.asarray(sd[n], np.float32)
        if shape is not None and a.shape != shape:
          raise SAEFileError(f"{w_path}: tensor {n!r} has shape {a.shape}, expected {shape} "
                             f"(dict_size={d_sae}, activation_dim={d_in}, {cls})")
        return a
    raise SAEFileError(f"{w_path}: missing tensor {names[0]!r} for a {cls} (found {sorted(sd)})")

  def linear_or_param(lin, param, out_dim, in_dim):
    """W [in, out] from nn.Linear ``lin.weight`` [out, in] or a parameter ``param`` [in, out]."""
    if f"{lin}.weight" in sd:
      return get(f"{lin}.weight", shape=(out_dim, in_dim)).T
    return get(param, shape=(in_dim, out_dim))

  k, arch, apply_b_dec, extra = None, "standard", True, {}
  w_enc = linear_or_param("encoder", "W_enc", d_sae, d_in)
  w_dec = linear_or_param("decoder", "W_dec", d_in, d_sae)
  if cls == "AutoEncoder":
    b_enc, b_dec = get("encoder.bias", shape=(d_sae,)), get("bias", shape=(d_in,))
  elif cls == "AutoEncoderNew":
    b_enc, b_dec, apply_b_dec = get("encoder.bias", shape=(d_sae,)), get("decoder.bias", shape=(d_in,)), False
  elif cls == "GatedAutoEncoder":
    arch, b_dec, b_enc = "gated", get("decoder_bias", shape=(d_in,)), None
    n = np.linalg.norm(w_dec, axis=-1)
    extra = {"b_gate": get("gate_bias", shape=(d_sae,)), "r_mag": get("r_mag", shape=(d_sae,)) + np.log(n),
             "b_mag": get("mag_bias", shape=(d_sae,)) * n}
    w_dec = w_dec / n[:, None]
  elif cls == "JumpReluAutoEncoder":
    arch, apply_b_dec = "jumprelu", False
    b_enc, b_dec = get("b_enc", shape=(d_sae,)), get("b_dec", shape=(d_in,))
    n = np.linalg.norm(w_dec, axis=-1)
    extra = {"threshold": get("threshold", shape=(d_sae,)) * n}
    w_enc, b_enc, w_dec = w_enc * n, b_enc * n, w_dec / n[:, None]
  else:  # AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE
    b_enc, b_dec = get("encoder.bias", "b_enc", shape=(d_sae,)), get("b_dec", shape=(d_in,))
    k_val = sd.get("k", trainer.get("k"))
    if k_val is None:
      raise SAEFileError(f"{cfg_path}: field 'trainer.k' is missing (and {w_path.name} has no 'k' buffer)")
    k = int(np.asarray(k_val))
    if cls == "AutoEncoderTopK":
      arch = "topk"
    else:
      th = float(np.asarray(get("threshold")).reshape(-1)[0])
      if th < 0:
        raise SAEFileError(f"{w_path}: tensor 'threshold' = {th} < 0: the {cls} threshold was never set in training, "
                           "so its inference encoder is undefined")
      arch, extra = "batchtopk", {"threshold": np.full((d_sae,), th, np.float32)}
  params = {"W_enc": w_enc, "W_dec": w_dec, "b_dec": b_dec, **extra}
  if b_enc is not None:
    params["b_enc"] = b_enc
  hook = hook_name if hook_name is not None else _dictlearn_hook(trainer, cfg_path)
  lm = model_name if model_name is not None else str(trainer.get("lm_name") or "").rsplit("/", 1)[-1]
  buffer = conf.get("buffer") if isinstance(conf.get("buffer"), Mapping) else {}
  cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=apply_b_dec, hook_name=hook,
                  model_name=lm, dtype="float32", context_size=buffer.get("ctx_len"), source=str(folder))
  return _finalize(params, cfg, str(w_path), dtype)
