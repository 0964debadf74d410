"""SAE maths as pure functions of (params, static config, activations).

Shapes: ``x`` [..., d_in], ``z`` [..., d_sae]; ``idx`` [K] int feature indices for the sparse forms.
Run-time input normalisation (``constant_norm_rescale``, ``layer_norm``) follows SAELens:
``process_in`` normalises and subtracts ``b_dec`` (when ``apply_b_dec_to_input``); ``decode`` undoes
the normalisation with the statistics of the input it is paired with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recovery_jax.sae.config import SAEConfig

Array = jax.Array


def _norm_stats(cfg: SAEConfig, x: Array):
  """Per-token normalisation statistics of x (or None when normalisation is static/absent)."""
  if cfg.normalize_activations == "constant_norm_rescale":
    scale = jnp.sqrt(cfg.d_in) / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return ("scale", scale)
  if cfg.normalize_activations == "layer_norm":
    # SAELens: (x - mu) / (std + 1e-5) with the unbiased std; the output is y * std + mu (no eps)
    mu = x.mean(-1, keepdims=True)
    std = jnp.std(x - mu, axis=-1, keepdims=True, ddof=1)
    return ("ln", (mu, std))
  return None


def _normalize(stats, x: Array) -> Array:
  if stats is None:
    return x
  kind, s = stats
  if kind == "scale":
    return x * s
  mu, std = s
  return (x - mu) / (std + 1e-5)


def _denormalize(stats, y: Array, *, with_shift: bool = True) -> Array:
  """Inverse of _normalize; ``with_shift=False`` maps a *difference* of outputs (no mean added)."""
  if stats is None:
    return y
  kind, s = stats
  if kind == "scale":
    return y / s
  mu, std = s
  return y * std + mu if with_shift else y * std


def process_in(params, cfg: SAEConfig, x: Array) -> Array:
  """SAE input after normalisation and the optional b_dec subtraction: [..., d_in]."""
  x = _normalize(_norm_stats(cfg, x), x.astype(jnp.float32))
  if cfg.apply_b_dec_to_input:
    x = x - params["b_dec"]
  return x


def _rescales(cfg: SAEConfig) -> bool:
  return cfg.rescale_acts_by_decoder_norm and cfg.architecture in ("topk", "batchtopk")


def decoder_norms(params) -> Array:
  """Row norms of W_dec: [d_sae]."""
  return jnp.linalg.norm(params["W_dec"].astype(jnp.float32), axis=-1)


def encode_pre(params, cfg: SAEConfig, x: Array) -> Array:
  """Pre-activations [..., d_sae] (gated: the magnitude path; topk with
  ``rescale_acts_by_decoder_norm``: scaled by the decoder row norms, as SAELens)."""
  xin = process_in(params, cfg, x)
  if cfg.architecture == "gated":
    return xin @ (params["W_enc"] * jnp.exp(params["r_mag"])) + params["b_mag"]
  pre = xin @ params["W_enc"] + params["b_enc"]
  if _rescales(cfg):
    pre = pre * decoder_norms(params)
  return pre


def _activate(params, cfg: SAEConfig, pre: Array, xin: Array | None = None, idx: Array | None = None) -> Array:
  if cfg.architecture == "standard":
    return jax.nn.relu(pre)
  if cfg.architecture in ("jumprelu", "batchtopk"):  # strict >, threshold compared in float32
    th = (params["threshold"] if idx is None else params["threshold"][idx]).astype(jnp.float32)
    return jnp.where(pre > th, jax.nn.relu(pre), 0.0)
  if cfg.architecture == "gated":
    w_gate = params["W_enc"] if idx is None else params["W_enc"][:, idx]
    b_gate = params["b_gate"] if idx is None else params["b_gate"][idx]
    return jnp.where(xin @ w_gate + b_gate > 0, jax.nn.relu(pre), 0.0)
  raise ValueError(f"_activate does not handle {cfg.architecture!r}")


def _topk_mask(cfg: SAEConfig, pre: Array) -> Array:
  """Boolean mask of the k largest pre-activations per token (ties broken by index, as lax.top_k)."""
  _, ids = jax.lax.top_k(pre, cfg.k)
  return jnp.put_along_axis(jnp.zeros(pre.shape, bool), ids, True, axis=-1, inplace=False)


def encode(params, cfg: SAEConfig, x: Array) -> Array:
  """Feature activations z [..., d_sae].

  topk keeps the k largest pre-activations then applies ReLU (SAELens order); batchtopk at
  inference is JumpReLU with its stored ``threshold`` when present, else per-token top-k.
  """
  pre = encode_pre(params, cfg, x)
  if _uses_topk(params, cfg):
    return jnp.where(_topk_mask(cfg, pre), jax.nn.relu(pre), 0.0)
  xin = process_in(params, cfg, x) if cfg.architecture == "gated" else None
  return _activate(params, cfg, pre, xin)


def _uses_topk(params, cfg: SAEConfig) -> bool:
  return cfg.architecture == "topk" or (cfg.architecture == "batchtopk" and "threshold" not in params)


def effective_decoder(params, cfg: SAEConfig) -> Array:
  """Rows that multiply z in ``decode``: W_dec, or W_dec / ||W_dec|| rowwise for a topk SAE with
  ``rescale_acts_by_decoder_norm``. [d_sae, d_in]."""
  w = params["W_dec"]
  if _rescales(cfg):
    w = w / decoder_norms(params)[:, None]
  return w


def decode(params, cfg: SAEConfig, z: Array, x: Array | None = None) -> Array:
  """Reconstruction [..., d_in]; ``x`` supplies run-time normalisation statistics when used."""
  y = z @ effective_decoder(params, cfg) + params["b_dec"]
  if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
    if x is None:
      raise ValueError(f"decode of a {cfg.normalize_activations} SAE needs the input x for its statistics")
    y = _denormalize(_norm_stats(cfg, x.astype(jnp.float32)), y)
  return y


def forward(params, cfg: SAEConfig, x: Array) -> Array:
  """Reconstruction of x: decode(encode(x))."""
  return decode(params, cfg, encode(params, cfg, x), x)


def error(params, cfg: SAEConfig, x: Array) -> Array:
  """SAE error term x - decode(encode(x)) [..., d_in]."""
  return x.astype(jnp.float32) - forward(params, cfg, x)


# --- sparse forms used by the clamp -------------------------------------------------------------


def encode_pre_subset(params, cfg: SAEConfig, x: Array, idx: Array) -> Array:
  """Pre-activations of features ``idx`` only: [..., K]; needs K encoder columns, not d_sae."""
  xin = process_in(params, cfg, x)
  w = params["W_enc"][:, idx]
  if cfg.architecture == "gated":
    return xin @ (w * jnp.exp(params["r_mag"][idx])) + params["b_mag"][idx]
  pre = xin @ w + params["b_enc"][idx]
  if _rescales(cfg):
    pre = pre * jnp.linalg.norm(params["W_dec"][idx].astype(jnp.float32), axis=-1)
  return pre


def encode_subset(params, cfg: SAEConfig, x: Array, idx: Array) -> Array:
  """Activations of features ``idx``: [..., K]. Exact and sparse for standard/jumprelu/gated;
  topk (and batchtopk without threshold) needs the full encode to know the k-th value."""
  if _uses_topk(params, cfg):
    return jnp.take(encode(params, cfg, x), idx, axis=-1)
  pre = encode_pre_subset(params, cfg, x, idx)
  xin = process_in(params, cfg, x) if cfg.architecture == "gated" else None
  return _activate(params, cfg, pre, xin, idx)


def decode_delta(params, cfg: SAEConfig, dz: Array, idx: Array, x: Array | None = None) -> Array:
  """Residual-space change for a change ``dz`` [..., K] of features ``idx``: sum_i dz_i W_dec[i],
  mapped back through the run-time normalisation of ``x`` when the SAE uses one. [..., d_in]."""
  w = params["W_dec"][idx]
  if _rescales(cfg):
    w = w / jnp.linalg.norm(w.astype(jnp.float32), axis=-1, keepdims=True)
  y = dz @ w
  if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
    if x is None:
      raise ValueError(f"decode_delta of a {cfg.normalize_activations} SAE needs the input x")
    y = _denormalize(_norm_stats(cfg, x.astype(jnp.float32)), y, with_shift=False)
  return y


def encoder_columns(params, cfg: SAEConfig, idx: Array) -> Array:
  """Effective encoder directions of features ``idx`` in input space: [d_in, K], i.e. the gradient of
  the pre-activations w.r.t. the SAE input before normalisation (gated: magnitude path; topk with
  ``rescale_acts_by_decoder_norm``: times the decoder norms)."""
  w = params["W_enc"][:, idx]
  if cfg.architecture == "gated":
    w = w * jnp.exp(params["r_mag"][idx])
  if _rescales(cfg):
    w = w * jnp.linalg.norm(params["W_dec"][idx].astype(jnp.float32), axis=-1)
  return w
