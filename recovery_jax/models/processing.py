"""TransformerLens ``from_pretrained`` weight processing for GPT-2 params (our stacked layout).

``HookedTransformer.from_pretrained`` folds and centres weights by default; SAEs trained on
TransformerLens activations (e.g. ``gpt2-small-res-jb``) expect the *processed* residual stream,
which is the HF residual minus its mean over ``d_model``. This module applies the same steps, in
TransformerLens' order, to params from ``hf.load_hf`` (see ``transformer.py`` for the layout):

1. ``fold_ln``: each LayerNorm's scale ``w`` and bias ``b`` are folded into the weights that read
   its output: ``W_Q, W_K, W_V`` (ln1), ``W_in`` (ln2), ``W_U`` (ln_final); ``b_* += b @ W_*``,
   ``W_* *= w[:, None]``; then the reading weights are centred over their ``d_model`` axis (the
   normalised input has zero mean, so this changes nothing). The norms stay LayerNorms with
   ``w = 1, b = 0`` (TransformerLens' ``LNPre``).
2. ``center_writing_weights``: the mean over ``d_model`` is subtracted from ``W_E``, ``W_pos``,
   ``W_O``, ``b_O``, ``W_out`` and ``b_out``, so every residual site has zero mean over ``d_model``.
3. ``center_unembed``: ``W_U`` (and ``b_U``) minus their mean over the vocabulary; logits shift by a
   constant per position, log-probs are unchanged.
4. ``fold_value_biases``: ``b_O += sum_h b_V[h] @ W_O[h]``, ``b_V = 0``.

GPT-2 ties ``W_U`` to ``W_E``; since both are changed differently, ``unembed/W_U`` [D, V] and
``unembed/b_U`` [V] are materialised (the forward uses them whenever present).

Only layer-norm models (gpt2) are processed: TransformerLens does not centre RMSNorm models, and
folding RMSNorm scales changes no residual value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recovery_jax.models.config import ModelConfig


def _center(w, axis: int):
  return w - w.mean(axis=axis, keepdims=True)


def process_like_transformer_lens(
    params,
    cfg: ModelConfig,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
):
  """Returns new params processed as ``HookedTransformer.from_pretrained`` processes GPT-2.

  Shapes are unchanged, except that ``unembed/W_U`` [d_model, vocab] and ``unembed/b_U`` [vocab] are
  added when absent. Computation is in float32; the result keeps each array's dtype.
  """
  if cfg.norm != "layernorm":
    raise ValueError(f"process_like_transformer_lens: family {cfg.family!r} uses RMSNorm; TransformerLens "
                     "only folds/centres LayerNorm models (gpt2)")
  if "W_gate" in params["blocks"]["mlp"]:
    raise ValueError("process_like_transformer_lens: gated MLPs are not supported (gpt2 has none)")
  dtypes = jax.tree.map(lambda a: jnp.asarray(a).dtype, params)
  new_dtype = dtypes["embed"]["W_E"]  # dtype of entries created here (W_U, b_U)
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in p.items()}
  blocks = {k: dict(v) for k, v in p["blocks"].items()}
  attn, mlp = blocks["attn"], blocks["mlp"]
  if "unembed" in p:
    unembed = dict(p["unembed"])
  else:
    unembed = {"W_U": p["embed"]["W_E"].T}
  unembed.setdefault("b_U", jnp.zeros((cfg.vocab_size,), jnp.float32))

  if fold_ln:
    # ln1 -> W_Q/W_K/W_V [L, D, H, E], biases [L, H, E]
    w1, b1 = blocks["ln1"]["w"], blocks["ln1"]["b"]
    for name in ("Q", "K", "V"):
      W = attn[f"W_{name}"]
      attn[f"b_{name}"] = attn.get(f"b_{name}", 0.0) + jnp.einsum("ldhe,ld->lhe", W, b1)
      attn[f"W_{name}"] = _center(W * w1[:, :, None, None], axis=1)
    # ln2 -> W_in [L, D, F], b_in [L, F]
    w2, b2 = blocks["ln2"]["w"], blocks["ln2"]["b"]
    mlp["b_in"] = mlp.get("b_in", 0.0) + jnp.einsum("ldf,ld->lf", mlp["W_in"], b2)
    mlp["W_in"] = _center(mlp["W_in"] * w2[:, :, None], axis=1)
    # ln_final -> W_U [D, V], b_U [V]
    wf, bf = p["ln_final"]["w"], p["ln_final"]["b"]
    unembed["b_U"] = unembed["b_U"] + bf @ unembed["W_U"]
    unembed["W_U"] = _center(unembed["W_U"] * wf[:, None], axis=0)
    for ln in ("ln1", "ln2"):
      blocks[ln] = {"w": jnp.ones_like(blocks[ln]["w"]), "b": jnp.zeros_like(blocks[ln]["b"])}
    p["ln_final"] = {"w": jnp.ones_like(wf), "b": jnp.zeros_like(bf)}

  if center_writing_weights:
    p["embed"] = {**p["embed"], "W_E": _center(p["embed"]["W_E"], -1)}
    if "pos_embed" in p:
      p["pos_embed"] = {**p["pos_embed"], "W_pos": _center(p["pos_embed"]["W_pos"], -1)}
    attn["W_O"] = _center(attn["W_O"], -1)
    if "b_O" in attn:
      attn["b_O"] = _center(attn["b_O"], -1)
    mlp["W_out"] = _center(mlp["W_out"], -1)
    if "b_out" in mlp:
      mlp["b_out"] = _center(mlp["b_out"], -1)

  if center_unembed:
    unembed["W_U"] = _center(unembed["W_U"], -1)
    unembed["b_U"] = _center(unembed["b_U"], -1)

  if fold_value_biases and "b_V" in attn:
    b_V = attn["b_V"]  # [L, K, E]; gpt2 has K == H
    if b_V.shape[1] != attn["W_O"].shape[1]:
      b_V = jnp.repeat(b_V, attn["W_O"].shape[1] // b_V.shape[1], axis=1)
    attn["b_O"] = attn.get("b_O", 0.0) + jnp.einsum("lhe,lhed->ld", b_V, attn["W_O"])
    attn["b_V"] = jnp.zeros_like(attn["b_V"])

  blocks["attn"], blocks["mlp"] = attn, mlp
  p["blocks"] = blocks
  p["unembed"] = unembed

  def cast(path, a):
    node = dtypes
    for k in path:
      node = node.get(k.key) if isinstance(node, dict) else None
    return a.astype(node if node is not None else new_dtype)

  return jax.tree_util.tree_map_with_path(cast, p)
