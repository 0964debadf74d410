"""Reconstruction quality of an SAE on activations: explained variance, MSE, L0, dead fraction."""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax.sae import core
from recovery_jax.sae.config import SAEConfig


def explained_variance(x, x_hat) -> jax.Array:
  """1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over all rows of x [N, d] (a scalar)."""
  x = x.astype(jnp.float32)
  err = jnp.sum(jnp.square(x - x_hat))
  var = jnp.sum(jnp.square(x - x.mean(0)))
  return 1.0 - err / var


@functools.partial(jax.jit, static_argnums=1)
def _batch_stats(params, cfg: SAEConfig, x):
  x = x.astype(jnp.float32)
  z = core.encode(params, cfg, x)
  x_hat = core.decode(params, cfg, z, x)
  return {"sq_err": jnp.sum(jnp.square(x - x_hat)), "sum_x": x.sum(0), "sum_sq_x": jnp.sum(jnp.square(x)),
          "l0": jnp.sum(z > 0), "fired": jnp.any(z > 0, axis=0), "n": x.shape[0]}


def evaluate(params, cfg: SAEConfig, batches: Iterable[np.ndarray]) -> dict[str, float]:
  """Streams batches [n, d_in]: explained variance (pooled over all rows), MSE (per token, summed
  over d_in), mean L0, fraction of latents that never fired, token count."""
  acc: dict = {}
  for x in batches:
    s = _batch_stats(params, cfg, jnp.asarray(x))
    s = jax.device_get(s)
    if not acc:
      acc = {k: np.asarray(v, np.float64) if k != "fired" else np.asarray(v) for k, v in s.items()}
    else:
      for k, v in s.items():
        acc[k] = acc[k] | v if k == "fired" else acc[k] + np.asarray(v, np.float64)
  if not acc:
    raise ValueError("evaluate: no activations")
  n = float(acc["n"])
  total_var = acc["sum_sq_x"] - np.sum(np.square(acc["sum_x"])) / n
  return {"explained_variance": float(1.0 - acc["sq_err"] / total_var), "mse": float(acc["sq_err"] / n),
          "l0": float(acc["l0"] / n), "dead_fraction": float(1.0 - acc["fired"].mean()), "tokens": int(n)}


def batched(x: np.ndarray, batch: int = 4096) -> Iterable[np.ndarray]:
  for i in range(0, len(x), batch):
    yield np.asarray(x[i:i + batch], np.float32)


def format_metrics(m: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
