"""The floor under a decoder: one decode step's weight matmuls and nothing else.

``batch`` rows go through every layer's Q, K, V, O, gate, up and down projections and the unembedding,
in JAX (jitted, the model's stacked weights in a ``lax.scan``, one dot each) and in torch (``F.linear``
on every ``nn.Linear`` of the HF model built from the same file). ``batch / seconds`` is a decode
throughput that no decoder built on that library's matmuls can pass: attention, norms, the KV cache and
a clamp all come on top. ``bench.generation`` times both beside the decoders (``--no_floor`` skips it).
Llama-family parameters with a gated MLP and a tied unembedding (SmolLM2, the tiny Llama).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def jax_floor_weights(params):
  """(stacked projections {"attn": W_Q, W_K, W_V, W_O; "mlp": W_gate, W_in, W_out}, unembedding [V, D])."""
  blocks = params["blocks"]
  return ({"attn": {k: blocks["attn"][k] for k in ("W_Q", "W_K", "W_V", "W_O")},
           "mlp": {k: blocks["mlp"][k] for k in ("W_gate", "W_in", "W_out")}}, params["embed"]["W_E"])


def torch_floor_weights(hf) -> list:
  """The weight of every ``nn.Linear`` of the HF model, in module order (a tied LM head once)."""
  import torch  # pylint: disable=import-outside-toplevel
  return [m.weight for m in hf.modules() if isinstance(m, torch.nn.Linear)]


def jax_floor(params, batch: int, dtype=jnp.float32):
  """fn() for the weight matmuls of one decode step in JAX: ``batch`` rows through every projection of
  every layer (the stacked weights in a ``lax.scan``, one dot each) and the unembedding, in ``dtype``."""
  blocks = params["blocks"]
  d = blocks["attn"]["W_Q"].shape[1]

  @jax.jit
  def step(blocks, w_e, x):
    def layer(h, p):
      a, m = p["attn"], p["mlp"]
      q = jnp.einsum("bd,dhk->bhk", h, a["W_Q"])
      k = jnp.einsum("bd,dhk->bhk", h, a["W_K"])
      v = jnp.einsum("bd,dhk->bhk", h, a["W_V"])
      o = jnp.einsum("bhk,hkd->bd", q, a["W_O"])
      u = jax.nn.silu(h @ m["W_gate"]) * (h @ m["W_in"])
      h = h + 1e-3 * (o + u @ m["W_out"]) + 0.0 * (k.sum() + v.sum())
      return h, None
    h, _ = jax.lax.scan(layer, x, blocks)
    return h @ w_e.T

  weights = jax.tree.map(lambda w: jnp.asarray(w, dtype), jax_floor_weights(params))
  x = jnp.full((batch, d), 1e-2, dtype)
  step(*weights, x).block_until_ready()
  return lambda: jax.block_until_ready(step(*weights, x))


def torch_floor(hf, batch: int, device: str):
  """fn() for the weight matmuls of one decode step in torch: ``batch`` rows through every
  ``nn.Linear`` of the HF model, in module order (the projections and the LM head)."""
  import torch  # pylint: disable=import-outside-toplevel
  linears = torch_floor_weights(hf)
  xs = {w.shape[1]: torch.full((batch, w.shape[1]), 1e-2, device=device) for w in linears}

  def call():
    with torch.no_grad():
      for w in linears:
        torch.nn.functional.linear(xs[w.shape[1]], w)
    if device == "cuda":
      torch.cuda.synchronize()

  return call
