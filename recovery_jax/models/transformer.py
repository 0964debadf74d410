"""The decoder-only transformer as a pure function of (params, static config, inputs).

One forward serves llama, gemma2, gemma3 and gpt2; the family is static configuration.
Interventions act at TransformerLens hook sites: ``edits`` maps a site name to a pure function
``fn(x [batch, seq, d_model], positions [batch, seq]) -> x'`` (close over traced arrays freely),
and ``capture`` names sites whose (post-edit) values are returned.

Layers are stored stacked (leading axis ``n_layers``). Runs of layers with no edited or captured
site are executed with ``lax.scan`` (fast to compile); layers that carry a site are unrolled so the
site is a static boundary.

The same forward covers: a plain batch (optionally left-padded), prefill into a KV cache, one-token
decode from a cache, and starting from a cached prefix at a given layer with a residual in hand
(``resid=..., start_layer=L``), which is what the recovery engine differentiates.

Params pytree (TransformerLens-like names; L = n_layers, H = n_heads, K = n_kv_heads, E = d_head,
F = d_mlp; optional entries in brackets):

  embed/W_E [V, D];  [pos_embed/W_pos [n_positions, D]] (gpt2)
  blocks/ln1/w [L, D], [ln1/b];  [ln1_post/w] (gemma: norm of the attention output)
  blocks/attn/W_Q [L, D, H, E], W_K [L, D, K, E], W_V [L, D, K, E], W_O [L, H, E, D],
                 [b_Q [L, H, E], b_K, b_V [L, K, E], b_O [L, D]], [q_norm/w, k_norm/w [L, E]] (gemma3)
  blocks/ln2/w [L, D], [ln2/b];  [ln2_post/w] (gemma)
  blocks/mlp/W_in [L, D, F], [W_gate [L, D, F]] (gated MLPs: out = act(x W_gate) * (x W_in)),
                W_out [L, F, D], [b_in [L, F], b_out [L, D]]
  ln_final/w [D], [ln_final/b];  [unembed/W_U [D, V], unembed/b_U [V]] (absent when tied to W_E)

RMSNorm weights are stored as the effective scale: gemma's (1 + w) is folded in at load time.

Precision: activations run in ``cfg.dtype`` (weights are cast to it where used, so params may be
stored in any dtype); norms, RoPE, attention scores/softmax and logits are float32; the residual
and every edit's output are cast back to ``cfg.dtype``. With ``cfg.dtype == "float32"`` every cast
is a no-op. Tensor parallelism: traced under ``jax.set_mesh(mesh)`` with a ``model`` axis, the
forward adds sharding constraints on heads, MLP hidden units and logits (``models/sharding.py``);
without a mesh it is unchanged.

Size: one forward for four families (llama, gemma2, gemma3, gpt2) with hooks, caches and
precision; the family differences are small branches of the same block.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from recovery_jax.models.config import ModelConfig
from recovery_jax.models import sharding as sharding_lib
from recovery_jax.models import sites as sites_lib

Array = jax.Array
EditFn = Callable[[Array, Array], Array]

_NEG_INF = -1e30


class KVCache(NamedTuple):
  """Keys/values of every layer for ``max_len`` slots.

  k, v: [n_layers, batch, max_len, n_kv_heads, d_head]; pos: [batch, max_len] absolute position of
  each slot; valid: [batch, max_len] whether the slot holds a real token; index: [] next free slot.
  """

  k: Array
  v: Array
  pos: Array
  valid: Array
  index: Array


class ForwardOutput(NamedTuple):
  logits: Array | None  # [batch, seq, vocab]
  resid: Array  # [batch, seq, d_model], residual after the last layer run (before ln_final)
  captures: dict[str, Array]
  cache: KVCache | None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.d_head)
  return KVCache(
      k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
      pos=jnp.zeros((batch, max_len), jnp.int32), valid=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32))


def default_positions(attention_mask: Array | None, batch: int, seq: int, offset: Array | int = 0) -> Array:
  """Positions [batch, seq]: 0.. for unpadded input; cumsum(mask)-1 for left-padded input."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32) + offset, (batch, seq))
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0) + offset


# ----------------------------------------------------------------------------------------------
# building blocks


def _norm(cfg: ModelConfig, p: Mapping[str, Array], x: Array) -> Array:
  """LayerNorm / RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  f32 = lambda a: a.astype(jnp.float32)
  xf = f32(x)
  if cfg.norm == "layernorm":
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + cfg.norm_eps)
    y = y * f32(p["w"])
    y = y + f32(p["b"]) if "b" in p else y
  else:
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + cfg.norm_eps)
    y = y * f32(p["w"])  # gemma's (1 + w) is stored as the effective scale
  return y.astype(x.dtype)


def _act(cfg: ModelConfig, x: Array) -> Array:
  if cfg.act == "silu":
    return jax.nn.silu(x)
  if cfg.act == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.gelu(x, approximate=False)


def _rope_tables(positions: Array, d_head: int, theta: float, scale: float = 1.0) -> tuple[Array, Array]:
  """HF rotate_half RoPE: cos, sin of shape [batch, seq, d_head]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d_head, 2, dtype=jnp.float32) / d_head))
  freqs = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [batch, seq, heads, d_head]; float32 tables, result in x's dtype."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


class _Ctx(NamedTuple):
  """Per-call, per-layer-invariant tensors."""

  positions: Array  # [B, T]
  allowed_full: Array  # [B, T, S]
  allowed_sliding: Array  # [B, T, S]
  rope_full: tuple[Array, Array] | None
  rope_local: tuple[Array, Array] | None
  cache_index: Array | None


def _attention(cfg: ModelConfig, p, x: Array, ctx: _Ctx, is_sliding, kv: tuple[Array, Array] | None):
  """x: [B, T, D] (normed). kv: this layer's cache (k, v) [B, S, Hkv, Dh] or None."""
  b, t, _ = x.shape
  dt = x.dtype
  heads = lambda a: sharding_lib.constrain(a, sharding_lib.HEADS)
  q = heads(jnp.einsum("btd,dhk->bthk", x, p["W_Q"].astype(dt)))
  k = jnp.einsum("btd,dhk->bthk", x, p["W_K"].astype(dt))
  v = jnp.einsum("btd,dhk->bthk", x, p["W_V"].astype(dt))
  if "b_Q" in p:
    q, k, v = q + p["b_Q"].astype(dt), k + p["b_K"].astype(dt), v + p["b_V"].astype(dt)
  if "q_norm" in p:
    q = _norm(cfg, p["q_norm"], q)
    k = _norm(cfg, p["k_norm"], k)
  if cfg.uses_rope:
    cos, sin = ctx.rope_full
    if ctx.rope_local is not None:
      cos = jnp.where(is_sliding, ctx.rope_local[0], cos)
      sin = jnp.where(is_sliding, ctx.rope_local[1], sin)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
  new_kv = None
  if kv is not None:  # the chunk's keys/values join this layer's (read-only) cache slice
    new_kv = (k.astype(kv[0].dtype), v.astype(kv[1].dtype))
    k = jax.lax.dynamic_update_slice(kv[0], new_kv[0], (0, ctx.cache_index, 0, 0)).astype(q.dtype)
    v = jax.lax.dynamic_update_slice(kv[1], new_kv[1], (0, ctx.cache_index, 0, 0)).astype(q.dtype)
  hkv = cfg.n_kv_heads
  q = q.reshape(b, t, hkv, cfg.n_heads // hkv, cfg.d_head) * cfg.query_scale
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  if cfg.attn_softcap is not None:
    scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
  allowed = ctx.allowed_full
  if cfg.sliding_window is not None:
    allowed = jnp.where(is_sliding, ctx.allowed_sliding, allowed)
  scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  z = heads(jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.n_heads, cfg.d_head))
  out = jnp.einsum("bthk,hkd->btd", z, p["W_O"].astype(dt))
  if "b_O" in p:
    out = out + p["b_O"].astype(dt)
  return sharding_lib.constrain(out, sharding_lib.RESID), new_kv


def _mlp(cfg: ModelConfig, p, x: Array) -> Array:
  dt = x.dtype
  hidden = lambda a: sharding_lib.constrain(a, sharding_lib.HIDDEN)
  h = hidden(x @ p["W_in"].astype(dt))
  if "b_in" in p:
    h = h + p["b_in"].astype(dt)
  if "W_gate" in p:
    h = _act(cfg, hidden(x @ p["W_gate"].astype(dt))) * h
  else:
    h = _act(cfg, h)
  out = h @ p["W_out"].astype(dt)
  out = out + p["b_out"].astype(dt) if "b_out" in p else out
  return sharding_lib.constrain(out, sharding_lib.RESID)


def _block(cfg: ModelConfig, p, h: Array, ctx: _Ctx, is_sliding, kv, hook: Callable[[str, Array], Array]):
  """One transformer block; ``hook(short_name, x)`` applies edits/captures at its sites."""
  h = hook("hook_resid_pre", h)
  attn_out, new_kv = _attention(cfg, p["attn"], _norm(cfg, p["ln1"], h), ctx, is_sliding, kv)
  if "ln1_post" in p:
    attn_out = _norm(cfg, p["ln1_post"], attn_out)
  attn_out = hook("hook_attn_out", attn_out)
  h = hook("hook_resid_mid", h + attn_out)
  mlp_out = _mlp(cfg, p["mlp"], _norm(cfg, p["ln2"], h))
  if "ln2_post" in p:
    mlp_out = _norm(cfg, p["ln2_post"], mlp_out)
  mlp_out = hook("hook_mlp_out", mlp_out)
  h = hook("hook_resid_post", h + mlp_out)
  return h, new_kv


def _segments(start: int, stop: int, hooked: set[int]) -> list[tuple[int, int, bool]]:
  """Splits [start, stop) into runs: (lo, hi, is_hooked); hooked layers are single-layer runs."""
  segs, lo = [], start
  for layer in range(start, stop):
    if layer in hooked:
      if lo < layer:
        segs.append((lo, layer, False))
      segs.append((layer, layer + 1, True))
      lo = layer + 1
  if lo < stop:
    segs.append((lo, stop, False))
  return segs


def embed(params, cfg: ModelConfig, tokens: Array) -> Array:
  """Token embedding [batch, seq, d_model] in ``cfg.dtype`` (gemma: scaled by sqrt(d_model), the
  scale rounded to that dtype as in HF), before hook_embed."""
  x = params["embed"]["W_E"][tokens].astype(cfg.compute_dtype)
  if cfg.is_gemma:
    x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
  return sharding_lib.constrain(x, sharding_lib.RESID)


def unembed(params, cfg: ModelConfig, x: Array) -> Array:
  """Logits from the normalised final residual: [batch, seq, d_model] -> float32 [batch, seq, vocab]
  (products in x's dtype, accumulated in float32)."""
  f32 = jnp.float32
  if "unembed" in params:
    logits = jnp.einsum("...d,dv->...v", x, params["unembed"]["W_U"].astype(x.dtype), preferred_element_type=f32)
    if "b_U" in params["unembed"]:
      logits = logits + params["unembed"]["b_U"].astype(f32)
  else:
    logits = jnp.einsum("...d,vd->...v", x, params["embed"]["W_E"].astype(x.dtype), preferred_element_type=f32)
  logits = sharding_lib.constrain(logits, sharding_lib.VOCAB)
  if cfg.final_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  return logits


def final_logits(params, cfg: ModelConfig, resid: Array) -> Array:
  """Logits from the residual after the last layer (ln_final + unembed): [..., d_model] -> [..., vocab]."""
  return unembed(params, cfg, _norm(cfg, params["ln_final"], resid))


def final_logits_at(params, cfg: ModelConfig, resid: Array, ids: Array) -> Array:
  """Logits of a few vocabulary entries only: resid [B, R, d_model], ids [B, n] -> float32 [B, R, n].

  Equal to ``final_logits(...)[..., ids]`` (softcapping is elementwise) at a fraction of the cost
  when an objective reads only a few logits (logit difference, choice margins).
  """
  x = _norm(cfg, params["ln_final"], resid)
  ids = ids.astype(jnp.int32)
  if "unembed" in params:
    w = jnp.moveaxis(params["unembed"]["W_U"][:, ids], 0, -1)  # [B, n, D]
  else:
    w = params["embed"]["W_E"][ids]  # [B, n, D]
  logits = jnp.einsum("brd,bnd->brn", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  if "unembed" in params and "b_U" in params["unembed"]:
    logits = logits + params["unembed"]["b_U"][ids][:, None, :].astype(jnp.float32)
  if cfg.final_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  return logits


REMAT_POLICIES = {True: None, "full": None, "dots": jax.checkpoint_policies.dots_saveable}


def forward(
    params,
    cfg: ModelConfig,
    tokens: Array | None = None,
    *,
    resid: Array | None = None,
    start_layer: int = 0,
    stop_layer: int | None = None,
    positions: Array | None = None,
    attention_mask: Array | None = None,
    edits: Mapping[str, EditFn] | None = None,
    capture: Sequence[str] = (),
    capture_inputs: Sequence[str] = (),
    cache: KVCache | None = None,
    remat: bool | str = False,
    compute_logits: bool = True,
) -> ForwardOutput:
  """Runs layers [start_layer, stop_layer) and, if the last layer ran, the unembedding.

  Args:
    tokens: [batch, seq] int ids (needed when starting at layer 0 without ``resid``).
    resid: [batch, seq, d_model] value entering ``blocks.{start_layer}.hook_resid_pre``.
    positions: [batch, seq] absolute positions; default from ``attention_mask`` / cache index.
    attention_mask: [batch, seq] 1 for real tokens of this chunk, 0 for (left) padding.
    edits: site name -> ``fn(x, positions) -> x``.
    capture: site names whose post-edit values are returned in ``captures``.
    capture_inputs: site names whose pre-edit values are returned in ``captures[f"{name}:input"]``.
    cache: KV cache; this chunk is written at ``cache.index`` and attends to all valid slots.
    remat: False, True (= "full") or "dots": wrap each scanned block (the layers without a site),
      its weight slicing included, in ``jax.checkpoint``, so a backward pass re-slices the weights
      instead of saving a copy of every layer's slice; "full" also recomputes the block's
      activations, "dots" keeps its matmul outputs and recomputes only the elementwise rest. Less
      memory, and less time where weight traffic bounds the step (see docs/benchmarks.md). Layers
      carrying a site run as they are.
  """
  edits = dict(edits or {})
  stop_layer = cfg.n_layers if stop_layer is None else stop_layer
  names = set(edits) | set(capture) | set(capture_inputs)
  parsed = {n: sites_lib.parse_site(n, cfg.n_layers) for n in names}
  for n, s in parsed.items():
    if s.layer is not None and not start_layer <= s.layer < stop_layer:
      raise ValueError(f"site {n!r} lies outside the layers run here [{start_layer}, {stop_layer})")
    if s.layer is None and s.hook in ("hook_embed", "hook_pos_embed") and (start_layer > 0 or resid is not None):
      raise ValueError(f"site {n!r} is before the starting point (start_layer={start_layer})")
    if s.hook == "ln_final.hook_normalized" and (stop_layer != cfg.n_layers or not compute_logits):
      raise ValueError(f"site {n!r} needs the full stack and logits")

  captures: dict[str, Array] = {}

  if resid is None:
    if tokens is None:
      raise ValueError("forward needs tokens or resid")
    if start_layer != 0:
      raise ValueError("forward with start_layer > 0 needs resid")
  b, t = (tokens.shape if resid is None else resid.shape[:2])
  offset = cache.index if cache is not None else 0
  if positions is None:
    positions = default_positions(attention_mask, b, t, offset)
  positions = positions.astype(jnp.int32)

  def apply(name: str, x: Array) -> Array:
    if name in capture_inputs:
      captures[f"{name}:input"] = x
    if name in edits:  # an edit may compute in float32 (e.g. add delta); the stream keeps its dtype
      x = edits[name](x, positions).astype(x.dtype)
    if name in capture:
      captures[name] = x
    return x

  if resid is None:
    h = apply("hook_embed", embed(params, cfg, tokens))
    if cfg.family == "gpt2":
      h = h + apply("hook_pos_embed", params["pos_embed"]["W_pos"][positions].astype(h.dtype))
  else:
    h = sharding_lib.constrain(resid.astype(cfg.compute_dtype), sharding_lib.RESID)

  # masks: keys are this chunk (no cache) or every cache slot after writing this chunk
  chunk_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  new_cache = None
  if cache is not None:
    kpos = jax.lax.dynamic_update_slice(cache.pos, positions, (0, cache.index))
    kvalid = jax.lax.dynamic_update_slice(cache.valid, chunk_valid, (0, cache.index))
  else:
    kpos, kvalid = positions, chunk_valid
  allowed_full = kvalid[:, None, :] & (kpos[:, None, :] <= positions[:, :, None])
  if cfg.sliding_window is not None:
    allowed_sliding = allowed_full & (positions[:, :, None] - kpos[:, None, :] < cfg.sliding_window)
  else:
    allowed_sliding = allowed_full
  rope_full = rope_local = None
  if cfg.uses_rope:
    rope_full = _rope_tables(positions, cfg.d_head, cfg.rope_theta, cfg.rope_scaling_factor)
    if cfg.rope_local_theta is not None:
      rope_local = _rope_tables(positions, cfg.d_head, cfg.rope_local_theta)
  ctx = _Ctx(positions, allowed_full, allowed_sliding, rope_full, rope_local,
             cache.index if cache is not None else None)

  if remat and remat not in REMAT_POLICIES:
    raise ValueError(f"forward(remat={remat!r}): expected False, True, 'full' or 'dots'")
  sliding = jnp.asarray(cfg.sliding_layers, bool)
  blocks = params["blocks"]
  hooked = {s.layer for s in parsed.values() if s.layer is not None}

  # Layers are indexed in place (dynamic_index_in_dim) rather than sliced per segment, so XLA does
  # not copy the stacked weights or the KV cache on every call.
  take = lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)

  def run_block(blocks, i, h, kv, hook):
    return _block(cfg, jax.tree.map(lambda a: take(a, i), blocks), h, ctx, sliding[i], kv, hook)

  # The cache is read, never carried: a layer scan carrying the stacked cache makes the backward
  # pass save (and XLA copy) it per layer. Each layer returns only its chunk's keys/values [B, T,
  # Hkv, Dh]; they are written into the cache once per segment, after the layers have run.
  def layer_step(i, h, hook, ckpt=False):
    kv = None if cache is None else (take(cache.k, i), take(cache.v, i))
    # ckpt: the layer's weights are sliced inside the checkpoint, so a backward pass re-slices them
    # from the (loop-invariant) stacked params instead of saving every layer's slice as a residual
    block = lambda b, i, h, kv: run_block(b, i, h, kv, hook)
    if ckpt:
      block = jax.checkpoint(block, policy=REMAT_POLICIES[ckpt])
    return block(blocks, i, h, kv)

  chunk_kv = []  # (first layer, k [n, B, T, Hkv, Dh], v [...]) per segment
  for lo, hi, is_hooked in _segments(start_layer, stop_layer, hooked):
    if is_hooked:
      hook = lambda n, x, lo=lo: apply(sites_lib.site_name(lo, n), x)
      h, nkv = layer_step(lo, h, hook)
      nkv = None if nkv is None else tuple(a[None] for a in nkv)
    else:
      def body(h, i):
        return layer_step(i, h, lambda n, x: x, ckpt=remat)
      h, nkv = jax.lax.scan(body, h, jnp.arange(lo, hi))
    if cache is not None:
      chunk_kv.append((lo, *nkv))

  if cache is not None:
    k_all, v_all = cache.k, cache.v
    for lo, k, v in chunk_kv:
      k_all = jax.lax.dynamic_update_slice(k_all, k, (lo, 0, cache.index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(v_all, v, (lo, 0, cache.index, 0, 0))
    new_cache = KVCache(k_all, v_all, kpos, kvalid, cache.index + t)

  logits = None
  if stop_layer == cfg.n_layers and compute_logits:
    x = apply("ln_final.hook_normalized", _norm(cfg, params["ln_final"], h))
    logits = unembed(params, cfg, x)
  return ForwardOutput(logits, h, captures, new_cache)
