"""The shared soft-suffix machinery: layout, initialisation, the clipped Adam loop, batching.

Layout per row: [prompt (left-padded, T columns)] + [L soft suffix embeddings] + [optional tail, e.g. a
teacher-forced answer (A columns, right-padded)], all at ``hook_embed`` (the model's scaled token-embedding
space; GPT-2's positions are added to the whole stack). The suffix starts as the embedding of the
one-token ``cfg.init_text`` repeated plus N(0, noise^2), row i's noise drawn from
``fold_in(PRNGKey(seed), i)`` (``batching.example_keys``: batch size changes no number). Adam on the
suffixes, and after each step ``||suffix - init||_F`` is clipped to ``budget`` per row.

A behaviour is a hashable *objective* (a jit static argument) with fields ``mcfg`` and ``cfg`` (variant,
suffix_len, steps, lr, budget, noise, init_text, behavior_weight) and two pure functions of
``(params, edit, data, suffix [B, L, d])``:
  loss     -> (behaviour loss [B] (minimised), monitor [B], report [B] (recorded per step));
  readout  -> a pytree with leaves [B, ...] (evaluated at the initial and the optimised suffix).
Variants (paper-method Q16): ``faithful`` minimises the behaviour loss alone (the reference detaches its
monitor term: no gradient, and Adam ignores the constant weight); ``corrected`` minimises
``w_b * behaviour + (1 - w_b) * monitor / monitor_0`` (monitor_0 at the initial suffix).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from recovery_jax import batching, intervene
from recovery_jax.models import transformer

VARIANTS = ("faithful", "corrected")


def check_variant(cfg) -> None:
  if cfg.variant not in VARIANTS:
    raise ValueError(f"{type(cfg).__name__}.variant={cfg.variant!r}: expected one of {VARIANTS}")


def stack(params, mcfg, prompt_emb, prompt_mask, suffix, tail_emb=None, tail_mask=None):
  """prompt_emb [B, T, d], prompt_mask [B, T], suffix [B, L, d], tail_emb [B, A, d], tail_mask [B, A] ->
  (x [B, S, d] (GPT-2: plus positions), mask [B, S] bool, positions [B, S]); S = T + L (+ A)."""
  xs = [prompt_emb, suffix.astype(prompt_emb.dtype)]
  ms = [prompt_mask.astype(bool), jnp.ones(suffix.shape[:2], bool)]
  if tail_emb is not None:
    xs.append(tail_emb.astype(prompt_emb.dtype))
    ms.append(tail_mask.astype(bool))
  x, mask = jnp.concatenate(xs, axis=1), jnp.concatenate(ms, axis=1)
  positions = transformer.default_positions(mask, x.shape[0], x.shape[1])
  if mcfg.family == "gpt2":
    x = x + params["pos_embed"]["W_pos"][positions].astype(x.dtype)
  return x, mask, positions


def forward(params, mcfg, clamps, x, mask, positions, *, edit_until=None):
  """The defended forward of a stacked layout. clamps: ``Clamp``s, run in order at their sites;
  edit_until: the edits act on columns < edit_until only (None: every column).
  -> (final residual [B, S, d], post-edit features, pre-edit features: tuples over clamps of [B, S, K])."""
  def restrict(c):
    if edit_until is None:
      return c
    return lambda h, pos: jnp.where((jnp.arange(h.shape[1]) < edit_until)[None, :, None], c(h, pos), h)

  sites = tuple(c.site for c in clamps)
  out = transformer.forward(params, mcfg, resid=x, positions=positions, attention_mask=mask,
                            edits=intervene.chain_edits(*({c.site: restrict(c)} for c in clamps)),
                            capture=sites, capture_inputs=sites, compute_logits=False)
  post = tuple(c.features(out.captures[c.site]) * c.mask for c in clamps)
  pre = tuple(c.features(out.captures[f"{c.site}:input"]) * c.mask for c in clamps)
  return out.resid, post, pre


def init_embedding(params, mcfg, tokenizer, cfg):
  """[d] float32: the embedding of ``cfg.init_text`` (one token)."""
  ids = tokenizer.encode(cfg.init_text, add_special_tokens=False).ids
  if len(ids) != 1:
    raise ValueError(f"{type(cfg).__name__}.init_text={cfg.init_text!r} is {len(ids)} tokens; expected one")
  return transformer.embed(params, mcfg, jnp.asarray([[ids[0]]], jnp.int32))[0, 0].astype(jnp.float32)


def example_noise(seed: int, ids, shape, scale: float):
  """[B, *shape] float32: ``scale * N(0, 1)`` per example from ``fold_in(PRNGKey(seed), ids[i])``."""
  normal = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))
  return scale * normal(batching.example_keys(jax.random.PRNGKey(seed), ids))


def optimise(objective, init, noise, cfg):
  """Adam from s0 = init + noise [B, L, d] on ``objective(s) -> (loss [B], monitor [B], report [B])``
  (rows summed: Adam and the clip are per element / per row). -> (s0, s, report history [steps, B])."""
  s0 = init + noise
  _, mon0, _ = objective(s0)
  mon0 = jax.lax.stop_gradient(jnp.maximum(jnp.abs(mon0), 1e-6))
  w = cfg.behavior_weight

  def loss_fn(s):
    loss, mon, report = objective(s)
    if cfg.variant == "corrected":
      loss = w * loss + (1 - w) * mon / mon0
    return jnp.sum(loss), report

  tx = optax.adam(cfg.lr)

  def step(carry, _):
    s, opt = carry
    (_, report), g = jax.value_and_grad(loss_fn, has_aux=True)(s)
    up, opt = tx.update(g, opt, s)
    s = optax.apply_updates(s, up)
    dev = s - init
    norm = jnp.sqrt(jnp.sum(jnp.square(dev), axis=(1, 2), keepdims=True))
    s = jnp.where(norm > cfg.budget, init + dev * cfg.budget / (norm + 1e-8), s)
    return (s, opt), report

  (s, _), hist = jax.lax.scan(step, (s0, tx.init(s0)), None, length=cfg.steps)
  return s0, s, hist


@functools.partial(jax.jit, static_argnums=0)
def _program(objective, params, edit, data, init_emb, noise):
  """One compiled program per objective and shapes: -> (suffix [B, L, d], ||suffix - init|| [B],
  history [steps, B], readout at s0, readout at the optimised suffix)."""
  init = jnp.broadcast_to(init_emb, noise.shape)
  s0, s, hist = optimise(functools.partial(objective.loss, params, edit, data), init, noise, objective.cfg)
  norm = jnp.sqrt(jnp.sum(jnp.square(s - init), axis=(1, 2)))
  return s, norm, hist, objective.readout(params, edit, data, s0), objective.readout(params, edit, data, s)


def run_batched(objective, params, tokenizer, edit, examples, prepare, *, seed: int, batch_size, exact: bool,
                finish=None) -> dict:
  """Optimises one suffix per example of ``examples`` (pytree, leaves [N, ...]) through
  ``batching.map_batched``; ``edit`` (the clamp / defence pytree) is passed to the objective.

  prepare(rows) -> data (the objective's arrays for a batch); finish(data, suffix) -> dict of per-row
  arrays computed with the optimised suffix (e.g. generation), or None.
  -> numpy dict: suffix_norm [N], history [N, steps], init / final (readouts at s0 / s), + finish's."""
  cfg = objective.cfg
  init_emb = init_embedding(params, objective.mcfg, tokenizer, cfg)

  def one_batch(rows, ids):
    data = prepare(rows)
    noise = example_noise(seed, ids, (cfg.suffix_len, objective.mcfg.d_model), cfg.noise)
    s, norm, hist, r0, r1 = _program(objective, params, edit, data, init_emb, noise)
    out = {"suffix_norm": norm, "history": hist.T, "init": r0, "final": r1}
    if finish is not None:
      out.update(finish(data, s))
    return out

  return batching.map_batched(one_batch, examples, batch_size, exact=exact)
