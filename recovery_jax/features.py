"""Feature selection by attribution through a pass-through SAE (the reference's IOI selection).

At ``site`` the residual is replaced by ``decode(z) + stop_gradient(x - decode(z))``: the forward
value is unchanged and the gradient of the objective reaches the features z through the decoder.
``attr_i = mean_b z_b,i * d objective / d z_b,i`` at the readout position.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from recovery_jax.models import transformer
from recovery_jax.models.config import ModelConfig
from recovery_jax.sae import core as sae_core
from recovery_jax.sae.config import SAEConfig


def attribution_scores(params, cfg: ModelConfig, sae_params, sae_cfg: SAEConfig, site: str, tokens, attention_mask,
                       readout_pos: int, objective: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Per-feature attribution [d_sae] of ``objective(logits at readout [batch, vocab]) -> [batch]``
  (its batch mean is differentiated) through the SAE at ``site`` at the readout position."""

  all_features = jnp.arange(sae_cfg.d_sae)

  @jax.jit  # one program (eagerly, the forward and its VJP dispatch op by op)
  def run(params, sae_params, tokens, attention_mask):
    def obj_of_eps(eps):  # eps [batch, d_sae] is a zero perturbation of z at the readout
      zs = {}

      def edit(x, positions):
        del positions
        x_r = x[:, readout_pos]
        zs["z"] = sae_core.encode(sae_params, sae_cfg, x_r)
        return x.at[:, readout_pos].add(sae_core.decode_delta(sae_params, sae_cfg, eps, all_features, x_r))

      out = transformer.forward(params, cfg, tokens, attention_mask=attention_mask, edits={site: edit})
      return objective(out.logits[:, readout_pos]).mean(), zs["z"]

    eps = jnp.zeros((tokens.shape[0], sae_cfg.d_sae), jnp.float32)
    grad, z = jax.grad(obj_of_eps, has_aux=True)(eps)
    return (jax.lax.stop_gradient(z) * grad).mean(0)

  return run(params, sae_params, tokens, attention_mask)


def top_positive(attr: jax.Array, k: int) -> jax.Array:
  """Indices of the top-k features by attribution among those with attr > 0; if none is positive,
  the top-k by |attr| (the reference's fallback). Returns [min(k, available)] int32."""
  attr = jnp.asarray(attr)
  n_pos = int((attr > 0).sum())
  if n_pos == 0:
    return jnp.argsort(-jnp.abs(attr))[:k].astype(jnp.int32)
  order = jnp.argsort(-attr)
  return order[:min(k, n_pos)].astype(jnp.int32)
