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

Errors (``SAEFileError``, a ``UserError``) name the file and the problem (missing tensor, wrong shape,
a non-floating dtype, NaN or inf values with the features that hold them, unknown architecture). ``check_compatible`` compares d_in, hook name and model name with the model an SAE is
attached to (``SAECompatibilityError`` names the file and field; ``override=True`` only warns).

Size: the SAELens reader/writer, the format dispatch and the compatibility check share the
validation helpers here; the other families live in ``format_*.py``.
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

from recovery_jax.errors import UserError
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


class SAEFileError(UserError):
  """An SAE file that cannot be used; the message names the file and the problem."""


class SAECompatibilityError(UserError):
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


# the axis of each tensor that runs over the d_sae features (b_dec has none)
_FEATURE_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "threshold": 0, "b_gate": 0, "r_mag": 0, "b_mag": 0}


def _is_float(a: np.ndarray) -> bool:
  return a.dtype.kind == "f" or "float" in a.dtype.name  # bfloat16 (ml_dtypes) has kind 'V'


def nonfinite_report(name: str, a) -> str | None:
  """None when every value of tensor ``name`` is finite; else what is wrong and where, e.g.
  "tensor 'W_dec' [48, 16] holds 16 NaN values in feature 3"."""
  a = np.asarray(a)
  a = a if a.dtype.kind == "f" else a.astype(np.float32)
  bad = ~np.isfinite(a)
  if not bad.any():
    return None
  n_nan = int(np.isnan(a).sum())
  kinds = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "inf")) if n)
  msg = f"tensor {name!r} {list(a.shape)} holds {kinds} value{'s' if int(bad.sum()) > 1 else ''}"
  axis = _FEATURE_AXIS.get(name)
  if a.ndim and axis is not None and axis < a.ndim:
    hit = np.nonzero(bad.any(axis=tuple(i for i in range(a.ndim) if i != axis)))[0]
    more = ", ..." if len(hit) > 8 else ""
    msg += (f" in feature {int(hit[0])}" if len(hit) == 1 else
            f" in {len(hit)} features ({', '.join(str(int(i)) for i in hit[:8])}{more})")
  elif a.ndim:
    hit = np.argwhere(bad)[:4]
    msg += f" (first at index {tuple(int(i) for i in hit[0])})"
  return msg


def check_finite(params: Mapping[str, Any], cfg: SAEConfig, source: str = "") -> None:
  """Raises SAEFileError naming ``source`` and the tensor when a weight holds NaN or inf (a corrupt
  file, or one saved from a diverged run: every score computed with it would be NaN)."""
  src = source or cfg.source or "<in-memory SAE>"
  for name in sorted(params):
    report = nonfinite_report(name, params[name])
    if report:
      raise SAEFileError(f"{src}: {report}; the SAE weights must be finite (a corrupt file, or one saved from a "
                         "diverged training run); a NaN weight would make every score of a run NaN")


def _np_dtype(name: str):
  if name in ("bfloat16", "bf16"):
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype({"fp16": "float16", "fp32": "float32", "half": "float16"}.get(name, name))


def _finalize(params: dict, cfg: SAEConfig, source: str, dtype: str | None) -> tuple[dict, SAEConfig]:
  """Casts (threshold always float32), drops unused tensors, validates shapes."""
  keep = set(_REQUIRED[cfg.architecture]) | set(_OPTIONAL.get(cfg.architecture, ()))
  params = {k: np.asarray(v) for k, v in params.items() if k in keep}
  for k in sorted(params):
    if not _is_float(params[k]):
      raise SAEFileError(f"{source}: tensor {k!r} has dtype {params[k].dtype}, expected a floating dtype "
                         f"(float32, float16 or bfloat16; config dtype {cfg.dtype!r})")
  if dtype is not None:
    params = {k: v.astype(_np_dtype(dtype)) for k, v in params.items()}
    cfg = cfg.replace(dtype=str(dtype))
  if "threshold" in params:
    params["threshold"] = params["threshold"].astype(np.float32)
  validate_params(params, cfg, source)
  check_finite(params, cfg, source)  # after the cast: a value past float16's range is inf too
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
  from recovery_jax.sae import pipeline  # pylint: disable=import-outside-toplevel  (pipeline imports formats)
  pipeline.verify_export_checksum(os.path.dirname(w_path))  # an export of ours: its files as written
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
    if s is not None and not (np.isfinite(float(s)) and float(s) > 0):
      raise SAEFileError(f"{cfg_path}: field 'norm_scaling_factor' = {s!r}: expected a finite number > 0")
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
  turns mismatches into warnings; ``kw`` goes to the format's loader. ``path`` may also be a name
  ``release:id`` (``registry.find``: a shipped SAE, or one under ``$RECOVERY_JAX_SAE_ROOT``).
  """
  from recovery_jax.sae import registry  # pylint: disable=import-outside-toplevel  (registry imports formats lazily)
  if registry.is_name(path):
    found = registry.find(str(path))
    path, kw = found.path, {**found.load_kwargs(), **kw}
  if site is not None and not Path(path).exists():
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


def site_width(model_cfg, hook: str) -> int:
  """Width of the model's activation at ``hook``: n_heads * d_head for attn.hook_z, else d_model."""
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
    width = site_width(model_cfg, site)
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


# the per-family loaders live in their own modules (they import the helpers above)
from recovery_jax.sae.format_gemmascope import load_gemmascope, save_gemmascope  # noqa: E402,F401
from recovery_jax.sae.format_sparsify import load_sparsify, save_sparsify  # noqa: E402,F401
from recovery_jax.sae.format_llamascope import LLAMASCOPE_HPARAMS, LLAMASCOPE_WEIGHTS, load_llamascope  # noqa: E402,F401
from recovery_jax.sae.format_dictionary_learning import DICTLEARN_CLASSES, DICTLEARN_CONFIG, DICTLEARN_WEIGHTS, load_dictionary_learning  # noqa: E402,F401
