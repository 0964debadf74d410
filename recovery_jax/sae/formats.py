"""SAE files: SAELens, Gemma Scope ``params.npz`` and EleutherAI sparsify (read and written), Llama
Scope and dictionary_learning folders (read).

Every loader returns ``(params, SAEConfig)`` with SAELens names and shapes (``W_enc`` [d_in, d_sae],
``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in], ``threshold`` [d_sae] float32; gated:
``b_gate``, ``r_mag``, ``b_mag``) as numpy arrays; ``jax.numpy`` consumes them directly.

* **SAELens** (folder with ``cfg.json`` + ``sae_weights.safetensors``): 6.x configs and pre-6.0
  ones (``hook_point``, ``activation_fn_str``; default ``apply_b_dec_to_input=True``, as the public
  GPT-2 ``res-jb`` SAEs). ``expected_average_only_in`` is folded into the weights with
  ``norm_scaling_factor`` (argument, or ``cfg.json``): ``W_enc*s``, ``W_dec/s``, ``b_dec/s``. A
  non-trivial ``scaling_factor`` (pre-6.0 finetuning scale) is folded into ``W_dec``. A training
  checkpoint of a BatchTopK SAE (``topk_threshold``) becomes a batchtopk SAE with that threshold.
* **Gemma Scope** (``params.npz``: ``W_enc``/``w_enc``, ``W_dec``, ``b_enc``, ``b_dec``,
  ``threshold``): JumpReLU, ``apply_b_dec_to_input=False``; hook from the path: ``layer_L`` +
  ``res`` -> ``blocks.L.hook_resid_post`` (``mlp`` -> ``hook_mlp_out``, ``att`` -> ``attn.hook_z``).
* **sparsify** (``cfg.json`` + ``sae.safetensors``, one folder per hookpoint ``layers.N``):
  ``encoder.weight`` [d_sae, d_in] -> ``W_enc`` = its transpose; ``W_dec`` is used by its shape
  ([d_sae, d_in] as sparsify writes it today, or the transpose); ReLU-then-top-k == SAELens topk;
  ``layers.N`` -> ``blocks.N.hook_resid_post``; ``x - b_dec`` on input unless ``transcode``.
* **Llama Scope** (``hyperparams.json`` + ``checkpoints/final.safetensors``): see ``load_llamascope``.
* **dictionary_learning** (``ae.pt`` + ``config.json``): see ``load_dictionary_learning``.

Errors (``SAEFileError``) name the file and the problem (missing tensor, wrong shape, unknown
architecture). ``check_compatible`` compares d_in, hook name and model name with the model an SAE is
attached to (``SAECompatibilityError`` names the file and field; ``override=True`` only warns).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from absl import logging

from recovery_jax.sae.config import ARCHITECTURES, NORMALIZATIONS, SAEConfig

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_PARAMS = "params.npz"
SAELENS_FORMAT_VERSION = "6.0.0"  # written into metadata.sae_lens_version: a 6.x-style config

_REQUIRED = {
    "standard": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "batchtopk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "gated": ("W_enc", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec"),
}
_OPTIONAL = {"batchtopk": ("threshold",)}


class SAEFileError(ValueError):
  """An SAE file that cannot be used; the message names the file and the problem."""


class SAECompatibilityError(ValueError):
  """An SAE attached to a model or site it was not made for; names the file and the field."""


def _warn(msg: str) -> None:
  logging.warning(msg)
  warnings.warn(msg, UserWarning, stacklevel=3)


# --- shapes and config -------------------------------------------------------------------------


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
  """SAELens shapes of every tensor the architecture uses."""
  d_in, d_sae = cfg.d_in, cfg.d_sae
  shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "b_enc": (d_sae,),
            "threshold": (d_sae,), "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}
  names = _REQUIRED[cfg.architecture] + _OPTIONAL.get(cfg.architecture, ())
  return {k: shapes[k] for k in names}


def validate_params(params: Mapping[str, Any], cfg: SAEConfig, source: str = "") -> None:
  """Raises SAEFileError naming ``source`` on a missing tensor or a wrong shape."""
  src = source or cfg.source or "<params>"
  for name in _REQUIRED[cfg.architecture]:
    if name not in params:
      raise SAEFileError(
          f"{src}: missing tensor {name!r} (a {cfg.architecture} SAE needs {list(_REQUIRED[cfg.architecture])};"
          f" found {sorted(params)})")
  for name, shape in expected_shapes(cfg).items():
    if name in params and tuple(np.shape(params[name])) != shape:
      raise SAEFileError(
          f"{src}: tensor {name!r} has shape {tuple(np.shape(params[name]))}, expected {shape} "
          f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}, architecture={cfg.architecture!r})")


def _np_dtype(name: str):
  if name in ("bfloat16", "bf16"):
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype({"fp16": "float16", "fp32": "float32", "half": "float16"}.get(name, name))


def _finalize(params: dict, cfg: SAEConfig, source: str, dtype: str | None) -> tuple[dict, SAEConfig]:
  """Casts (threshold always float32), drops unused tensors, validates shapes."""
  keep = set(_REQUIRED[cfg.architecture]) | set(_OPTIONAL.get(cfg.architecture, ()))
  params = {k: np.asarray(v) for k, v in params.items() if k in keep}
  if dtype is not None:
    params = {k: v.astype(_np_dtype(dtype)) for k, v in params.items()}
    cfg = cfg.replace(dtype=str(dtype))
  if "threshold" in params:
    params["threshold"] = params["threshold"].astype(np.float32)
  validate_params(params, cfg, source)
  return params, cfg


# --- SAELens -----------------------------------------------------------------------------------


def _version_tuple(v: str | None) -> tuple[int, ...]:
  if not v:
    return (0,)
  return tuple(int(x) for x in re.findall(r"\d+", v.split("-")[0].split("+")[0])[:3])


def saelens_config_to_dict(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Flat view of a SAELens cfg.json, pre-6.0 keys renamed and defaulted as SAELens does."""
  d = dict(cfg_dict)
  meta = dict(d.pop("metadata", None) or {})
  version = d.get("sae_lens_version") or meta.get("sae_lens_version")
  flat = {**meta, **d}
  if _version_tuple(version) < (6,):
    ren = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
           "activation_fn_str": "activation_fn"}
    flat = {ren.get(k, k): v for k, v in flat.items()}
    flat.setdefault("prepend_bos", True)
    flat.setdefault("apply_b_dec_to_input", True)
    flat.setdefault("architecture", "standard")
    kw = flat.get("activation_fn_kwargs") or {}
    if flat.get("activation_fn") == "topk" and kw.get("k") is not None:
      flat["architecture"] = "topk"
      flat["k"] = kw["k"]
  norm = flat.get("normalize_activations")
  if isinstance(norm, bool):
    norm = "expected_average_only_in" if norm else "none"
  flat["normalize_activations"] = norm or "none"
  return flat


def _read_json(path: Path) -> dict:
  if not path.exists():
    raise SAEFileError(f"{path}: file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise SAEFileError(f"{path}: not valid JSON ({e})") from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  if not path.exists():
    raise SAEFileError(f"{path}: file not found")
  from safetensors import safe_open
  try:
    out = {}
    with safe_open(str(path), framework="numpy") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
    return out
  except TypeError:  # bfloat16 has no numpy dtype in safetensors: go through torch-free flax reader
    from safetensors.flax import load_file
    return {k: np.asarray(v) for k, v in load_file(str(path)).items()}
  except Exception as e:  # noqa: BLE001 - corrupt header etc.
    raise SAEFileError(f"{path}: cannot read safetensors ({e})") from e


def _arch_error(path: Path, arch: Any, field: str = "architecture") -> SAEFileError:
  return SAEFileError(f"{path}: field {field!r} = {arch!r} is not a supported SAE architecture; "
                      f"expected one of {ARCHITECTURES}")


def load_saelens(path: str | os.PathLike, *, dtype: str | None = "float32",
                 norm_scaling_factor: float | None = None) -> tuple[dict, SAEConfig]:
  """Loads a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

  ``dtype`` casts the weights (None keeps the stored dtype); the threshold stays float32.
  """
  folder = Path(path)
  if folder.is_file():
    folder = folder.parent
  cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
  flat = saelens_config_to_dict(_read_json(cfg_path))
  arch = flat.get("architecture")
  if arch not in ARCHITECTURES:
    raise _arch_error(cfg_path, arch)
  for field in ("d_in", "d_sae"):
    if not isinstance(flat.get(field), int):
      raise SAEFileError(f"{cfg_path}: field {field!r} is missing or not an integer ({flat.get(field)!r})")
  norm = flat["normalize_activations"]
  if norm not in NORMALIZATIONS:
    raise SAEFileError(f"{cfg_path}: field 'normalize_activations' = {norm!r} is not supported; "
                       f"expected one of {NORMALIZATIONS}")
  if flat.get("reshape_activations", "none") not in ("none", None):
    raise SAEFileError(f"{cfg_path}: field 'reshape_activations' = {flat['reshape_activations']!r} "
                       "is not supported (only 'none'; hook_z SAEs take [.., n_heads*d_head] inputs)")
  tensors = _read_safetensors(w_path)
  if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU training checkpoints
    tensors["threshold"] = np.exp(np.asarray(tensors.pop("log_threshold"), np.float32))
  if "topk_threshold" in tensors and arch == "batchtopk":  # SAELens BatchTopK training checkpoint
    tensors["threshold"] = np.full((flat["d_sae"],), float(np.asarray(tensors.pop("topk_threshold"))), np.float32)
  k = flat.get("k")
  if arch in ("topk", "batchtopk"):
    if k is None:
      raise SAEFileError(f"{cfg_path}: field 'k' is missing for a {arch} SAE")
    k = int(round(float(k)))
  cfg = SAEConfig(
      architecture=arch, d_in=flat["d_in"], d_sae=flat["d_sae"],
      apply_b_dec_to_input=bool(flat.get("apply_b_dec_to_input", True)),
      normalize_activations=norm, k=k if arch in ("topk", "batchtopk") else None,
      hook_name=flat.get("hook_name") or "", model_name=flat.get("model_name") or "",
      dtype=str(flat.get("dtype", "float32")),
      rescale_acts_by_decoder_norm=bool(flat.get("rescale_acts_by_decoder_norm", False)),
      prepend_bos=flat.get("prepend_bos"), context_size=flat.get("context_size"),
      source=str(folder))
  # pre-6.0 finetuning scale: decode used (z * s) @ W_dec
  if "scaling_factor" in tensors:
    s = np.asarray(tensors.pop("scaling_factor"), np.float32)
    if not np.allclose(s, 1.0):
      if "W_dec" in tensors and tensors["W_dec"].shape[0] == s.shape[0]:
        tensors["W_dec"] = tensors["W_dec"] * s[:, None].astype(tensors["W_dec"].dtype)
  params, cfg = _finalize(tensors, cfg, str(w_path), dtype)
  if norm == "expected_average_only_in":
    s = norm_scaling_factor if norm_scaling_factor is not None else flat.get("norm_scaling_factor")
    if s is None:
      _warn(f"{cfg_path}: normalize_activations='expected_average_only_in' but no norm_scaling_factor "
            "was given or stored; the SAE runs unscaled (as SAELens does when it cannot fold it)")
    params = fold_norm_scaling_factor(params, float(s)) if s is not None else params
    cfg = cfg.replace(normalize_activations="none")
  return params, cfg


def fold_norm_scaling_factor(params: Mapping[str, np.ndarray], s: float) -> dict:
  """Folds an ``expected_average_only_in`` input scale s (x -> s*x) into the weights:
  W_enc*s, W_dec/s, b_dec/s (SAELens ``fold_activation_norm_scaling_factor``)."""
  p = dict(params)
  p["W_enc"] = (np.asarray(p["W_enc"], np.float32) * s).astype(np.asarray(p["W_enc"]).dtype)
  p["W_dec"] = (np.asarray(p["W_dec"], np.float32) / s).astype(np.asarray(p["W_dec"]).dtype)
  p["b_dec"] = (np.asarray(p["b_dec"], np.float32) / s).astype(np.asarray(p["b_dec"]).dtype)
  return p


def saelens_config_dict(cfg: SAEConfig, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The 6.x SAELens cfg.json of ``cfg`` (batchtopk is written as jumprelu, as SAELens does)."""
  arch = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
  meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
          "model_name": cfg.model_name or None, "hook_name": cfg.hook_name or None,
          "hook_head_index": None, "prepend_bos": cfg.prepend_bos, "context_size": cfg.context_size,
          "written_by": "recovery_jax"}
  meta.update(dict(metadata or {}))
  d = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
       "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": cfg.normalize_activations,
       "reshape_activations": "none", "metadata": meta}
  if arch == "topk":
    d["k"] = cfg.k
    d["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
  return d


def _to_numpy(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in params.items()}


def save_saelens(params: Mapping[str, Any], cfg: SAEConfig, path: str | os.PathLike, *,
                 dtype: str | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
  """Writes a SAELens folder that ``sae_lens.SAE.load_from_disk`` reads; returns the folder.

  batchtopk SAEs need a ``threshold`` and are written as jumprelu (SAELens' inference form).
  ``dtype`` casts the weights on disk (the threshold stays float32).
  """
  from safetensors.numpy import save_file
  validate_params(params, cfg)
  p = _to_numpy(params)
  if cfg.architecture == "batchtopk":
    if "threshold" not in p:
      raise SAEFileError(f"save_saelens: a batchtopk SAE needs a 'threshold' to be saved (as jumprelu)")
    if cfg.rescale_acts_by_decoder_norm:  # fold: pre*n > th  <=>  (W_enc*n, b_enc*n) with unit W_dec
      n = np.linalg.norm(p["W_dec"].astype(np.float32), axis=-1)
      p["W_enc"], p["b_enc"], p["W_dec"] = p["W_enc"] * n, p["b_enc"] * n, p["W_dec"] / n[:, None]
      cfg = cfg.replace(rescale_acts_by_decoder_norm=False)
  if dtype is not None:
    p = {k: v.astype(_np_dtype(dtype)) for k, v in p.items()}
    cfg = cfg.replace(dtype=dtype)
  if "threshold" in p:
    p["threshold"] = p["threshold"].astype(np.float32)
  names = _REQUIRED["jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture]
  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(p[k]) for k in names}, str(folder / SAELENS_WEIGHTS))
  with open(folder / SAELENS_CFG, "w") as f:
    json.dump(saelens_config_dict(cfg, metadata), f, indent=1)
  return folder


# --- Gemma Scope -------------------------------------------------------------------------------

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


# --- sparsify ----------------------------------------------------------------------------------


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


# --- Llama Scope (OpenMOSS Language-Model-SAEs) --------------------------------------------------

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


# --- dictionary_learning (saprmarks) -------------------------------------------------------------

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


# --- any format ----------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
  """'saelens', 'gemmascope', 'sparsify', 'llamascope' or 'dictionary_learning' from the files present."""
  p = Path(path)
  if p.is_file():
    if p.suffix == ".npz":
      return "gemmascope"
    if p.name == "final.safetensors" and (p.parent.parent / LLAMASCOPE_HPARAMS).exists():
      return "llamascope"
    p = p.parent
  if (p / GEMMASCOPE_PARAMS).exists():
    return "gemmascope"
  if (p / SAELENS_WEIGHTS).exists():
    return "saelens"
  if (p / SPARSIFY_WEIGHTS).exists():
    return "sparsify"
  if (p / LLAMASCOPE_HPARAMS).exists():
    return "llamascope"
  if (p / DICTLEARN_WEIGHTS).exists():
    return "dictionary_learning"
  if not p.exists():
    raise SAEFileError(f"{p}: no such file or folder")
  raise SAEFileError(f"{p}: no SAE file found (expected {SAELENS_WEIGHTS}, {SPARSIFY_WEIGHTS}, {GEMMASCOPE_PARAMS}, "
                     f"{LLAMASCOPE_HPARAMS} + {LLAMASCOPE_WEIGHTS} or {DICTLEARN_WEIGHTS}; "
                     f"found {sorted(x.name for x in p.iterdir())})")


def load_sae(path: str | os.PathLike, *, format: str = "auto", model_cfg=None, hook_name: str | None = None,
             override: bool = False, dtype: str | None = "float32", site: str | None = None,
             architecture: str | None = None, **kw) -> tuple[dict, SAEConfig]:
  """Loads an SAE in any supported format; with ``model_cfg`` also ``check_compatible``.

  ``path`` is a file or folder, or, with ``site``, a model name whose shipped SAE at that site is
  loaded (``load_sae("smollm2-135m-instruct", site="blocks.9.hook_resid_post")``, see
  ``registry``; ``architecture`` picks one when several are shipped there). ``hook_name`` is the
  site the SAE will be attached to (compared with the file's; defaults to ``site``), ``override``
  turns mismatches into warnings; ``kw`` goes to the format's loader.
  """
  if site is not None and not Path(path).exists():
    from recovery_jax.sae import registry
    path = registry.resolve(str(path), site, architecture=architecture)
  hook_name = hook_name if hook_name is not None else site
  fmt = detect_format(path) if format == "auto" else format
  loaders = {"saelens": load_saelens, "gemmascope": load_gemmascope, "sparsify": load_sparsify,
             "llamascope": load_llamascope, "dictionary_learning": load_dictionary_learning}
  if fmt not in loaders:
    raise ValueError(f"format={fmt!r}: expected 'auto' or one of {sorted(loaders)}")
  try:
    params, cfg = loaders[fmt](path, dtype=dtype, **kw)
  except SAEFileError as e:  # Gemma Scope / sparsify files name their hook only through the path
    if hook_name is None or "cannot tell" not in str(e) or "hook_name" in kw:
      raise
    params, cfg = loaders[fmt](path, dtype=dtype, hook_name=hook_name, **kw)
  logging.info("loaded %s SAE %s: %s d_in=%d d_sae=%d hook=%s model=%s", fmt, cfg.source, cfg.architecture,
               cfg.d_in, cfg.d_sae, cfg.hook_name, cfg.model_name)
  if model_cfg is not None:
    cfg = check_compatible(cfg, model_cfg, hook_name, override=override)
  return params, cfg


# --- compatibility -----------------------------------------------------------------------------

_MODEL_ALIASES = {"gpt2-small": "gpt2", "openai-community/gpt2": "gpt2"}


def _norm_model_name(name: str) -> str:
  n = name.strip().lower()
  n = _MODEL_ALIASES.get(n, n)
  n = n.rsplit("/", 1)[-1]
  return _MODEL_ALIASES.get(n, n).replace("_", "-")


def _base_name(name: str) -> str:
  return re.sub(r"-(it|instruct|chat|pt|base)$", "", _norm_model_name(name))


def _site_width(model_cfg, hook: str) -> int:
  if hook.endswith("attn.hook_z"):
    return model_cfg.n_heads * model_cfg.d_head
  return model_cfg.d_model


def check_compatible(sae_cfg: SAEConfig, model_cfg, hook_name: str | None = None, override: bool = False) -> SAEConfig:
  """Checks d_in, hook name and model name of an SAE against the model (and site) it is attached to.

  Raises SAECompatibilityError naming the SAE file and the field; with ``override=True`` logs a
  loud warning instead (deliberate use, e.g. a base-model SAE on a different checkpoint). A base
  vs instruct pair of the same model (``gemma-2-2b`` / ``gemma-2-2b-it``) only warns, since that is
  standard practice. Returns the config with ``hook_name`` set to the site actually used.
  """
  from recovery_jax.models import sites as sites_lib
  src = sae_cfg.source or "<in-memory SAE>"
  hard: list[str] = []  # d_in: cannot run at all, not even with override
  problems: list[str] = []
  soft: list[str] = []
  site = hook_name or sae_cfg.hook_name
  if not site:
    problems.append(f"{src}: field 'hook_name' is empty and no hook_name was given to attach the SAE")
  else:
    if hook_name and sae_cfg.hook_name and hook_name != sae_cfg.hook_name:
      problems.append(f"{src}: field 'hook_name' = {sae_cfg.hook_name!r} but the SAE is attached at {hook_name!r}")
    if not site.endswith("attn.hook_z"):
      try:
        sites_lib.parse_site(site, model_cfg.n_layers)
      except ValueError as e:
        problems.append(f"{src}: field 'hook_name': {e}")
    width = _site_width(model_cfg, site)
    if sae_cfg.d_in != width:
      hard.append(f"{src}: field 'd_in' = {sae_cfg.d_in} does not match the model's width {width} at "
                      f"{site!r} (model {model_cfg.name or model_cfg.family!r}, d_model={model_cfg.d_model})")
  mname, sname = getattr(model_cfg, "name", "") or "", sae_cfg.model_name or ""
  if mname and sname and _norm_model_name(mname) != _norm_model_name(sname):
    msg = f"{src}: field 'model_name' = {sname!r} but the model is {mname!r}"
    (soft if _base_name(mname) == _base_name(sname) else problems).append(msg)
  for m in soft:
    _warn(m + " (base/instruct variants of one model: allowed)")
  if hard or (problems and not override):
    raise SAECompatibilityError("; ".join(hard + problems))
  if problems:
    for m in problems:
      _warn("override=True: " + m)
  return sae_cfg.replace(hook_name=site) if site else sae_cfg
