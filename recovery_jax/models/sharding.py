"""Tensor-parallel placement of the model over a ``("data", "model")`` mesh (Megatron-style).

Parameters (stacked layout, see ``transformer.py``) are split over the mesh's ``model`` axis:

  attention heads   W_Q [L, D, H, E], b_Q [L, H, E], W_O [L, H, E, D]         over H
                    W_K, W_V [L, D, K, E], b_K, b_V [L, K, E]                  over K (GQA: replicated
                                                                               when ``model`` does not divide K)
  MLP hidden units  W_in, W_gate [L, D, F], b_in [L, F], W_out [L, F, D]       over F
  vocabulary        embed/W_E [V, D], unembed/W_U [D, V], unembed/b_U [V]      over V

Everything else (norm weights, output biases b_O/b_out, gpt2's W_pos, gemma's post-norms and
gemma3's q/k norms) is replicated, and so is any split dimension that ``model`` does not divide
(e.g. GPT-2's vocabulary 50257): ``plan`` says which. Batches go over ``data``.

Inside the forward, ``constrain`` pins activations to the same split (heads, hidden units, logits
over ``model``; the residual stream replicated over ``model``; batch dims left to the compiler, so
data parallelism and vmapped work units propagate from the inputs). It acts only while tracing under
``jax.set_mesh(mesh)`` with a ``model`` axis of size > 1; otherwise it returns its input, so the
unsharded program is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recovery_jax.models.config import ModelConfig

DATA, MODEL = "data", "model"
_U = P.UNCONSTRAINED

# Trailing-dimension activation layouts used by ``constrain`` (leading dims are left unconstrained).
RESID = (None,)  # [..., D]: the residual stream, replicated over model
HEADS = (MODEL, None)  # [..., H, E]: per-head projections
HIDDEN = (MODEL,)  # [..., F]: MLP hidden units
VOCAB = (MODEL,)  # [..., V]: logits

# Param path (last two keys) -> the axis split over ``model`` in the stacked layout.
_SPLIT_AXIS = {
    ("embed", "W_E"): 0,
    ("unembed", "W_U"): 1,
    ("unembed", "b_U"): 0,
    ("attn", "W_Q"): 2, ("attn", "b_Q"): 1, ("attn", "W_O"): 1,
    ("attn", "W_K"): 2, ("attn", "W_V"): 2, ("attn", "b_K"): 1, ("attn", "b_V"): 1,
    ("mlp", "W_in"): 2, ("mlp", "W_gate"): 2, ("mlp", "b_in"): 1, ("mlp", "W_out"): 1,
}


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _model_size(mesh_or_size: Mesh | int) -> int:
  if isinstance(mesh_or_size, int):
    return mesh_or_size
  return int(dict(mesh_or_size.shape).get(MODEL, 1))


def _spec(keys: tuple[str, ...], shape: tuple[int, ...], n_model: int) -> P:
  axis = _SPLIT_AXIS.get(keys[-2:]) if len(keys) >= 2 else None
  # A split dim that model does not divide stays whole; for K/V (GQA, K < H) that replicates the KV
  # heads while the query heads stay split (each device then uses the KV groups its heads need).
  if axis is None or n_model == 1 or axis >= len(shape) or shape[axis] % n_model:
    return P()
  return P(*([None] * axis + [MODEL] + [None] * (len(shape) - axis - 1)))


def param_specs(params, cfg: ModelConfig, mesh_or_size: Mesh | int):
  """PartitionSpec pytree for ``params`` (arrays or ``jax.ShapeDtypeStruct``s; only shapes are read)."""
  n = _model_size(mesh_or_size)
  return jax.tree_util.tree_map_with_path(lambda path, a: _spec(_keys(path), tuple(a.shape), n), params)


def param_shardings(params, cfg: ModelConfig, mesh: Mesh):
  """Pytree of ``NamedSharding``s placing ``params`` tensor-parallel over ``mesh``'s ``model`` axis
  (replicated over ``data``)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, cfg, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
  """``params`` placed by ``param_shardings`` (host arrays or arrays on any devices)."""
  return jax.device_put(params, param_shardings(params, cfg, mesh))


def plan(params, cfg: ModelConfig, mesh_or_size: Mesh | int) -> dict[str, str]:
  """Readable placement: param path -> its PartitionSpec, with ``replicated (not divisible)`` where a
  split dimension was left whole because ``model`` does not divide it."""
  n = _model_size(mesh_or_size)
  out = {}
  for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = _keys(path)
    spec = _spec(keys, tuple(a.shape), n)
    note = " (replicated: not divisible)" if spec == P() and keys[-2:] in _SPLIT_AXIS and n > 1 else ""
    out["/".join(keys)] = f"{spec}{note}"
  return out


def sae_param_shardings(sae_params, mesh: Mesh):
  """SAE params with latents (d_sae) over ``model``: W_enc [d_in, d_sae] -> P(None, model), W_dec
  [d_sae, d_in] -> P(model, None), [d_sae] vectors -> P(model); b_dec and non-divisible ones replicated."""
  n = _model_size(mesh)

  def spec(path, a):
    name, shape = _keys(path)[-1], tuple(a.shape)
    axis = {"W_enc": 1, "W_dec": 0}.get(name, 0 if len(shape) == 1 and name != "b_dec" else None)
    if n == 1 or axis is None or shape[axis] % n:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(*([None] * axis + [MODEL] + [None] * (len(shape) - axis - 1))))

  return jax.tree_util.tree_map_with_path(spec, sae_params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ``data``, the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def _ambient_model_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or MODEL not in mesh.axis_names:
    return 1
  return int(dict(mesh.shape)[MODEL])


def constrain(x: jax.Array, trailing: tuple[Any, ...]) -> jax.Array:
  """``with_sharding_constraint`` on the trailing dims of ``x`` (leading dims unconstrained), under
  an ambient ``jax.set_mesh`` whose ``model`` axis has size > 1; ``x`` itself otherwise. A trailing
  dim that ``model`` does not divide is left unconstrained."""
  n = _ambient_model_size()
  if n == 1 or x.ndim < len(trailing):
    return x
  tail = [_U if (d == MODEL and x.shape[x.ndim - len(trailing) + i] % n) else d for i, d in enumerate(trailing)]
  return jax.lax.with_sharding_constraint(x, P(*([_U] * (x.ndim - len(trailing)) + tail)))

