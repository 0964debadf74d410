"""OABD-style soft-suffix baseline for refusal (paper-method 9.2), on the transformer forward.

Layout per case: [chat prompt (left-padded, T columns)] + [L soft suffix embeddings] + [the base answer,
teacher-forced (first ``n_ans`` tokens, right-padded)]: the suffix sits inside the model turn, after the
generation prompt. The suffix starts as the embedding of ``init_text`` ("!") repeated plus N(0, noise^2),
is optimised with Adam under the live defence (every circuit site, every position), and after each step
``||suffix - init||_F`` is clipped to ``budget`` per case.

Loss (minimised): ``w_b * behaviour + (1 - w_b) * monitor / monitor_0``;
  behaviour = CE_w (first ``n_ans`` answer tokens, the first ``n_pref`` weighted ``w_pref``; weighted
              mean) + ``w_anti * softplus(max_q lp(q_0) - lp(b_0))`` at the first answer position
              (q_0: the first tokens of the refusal prefixes);
  monitor   = mean over sites of the max over the attack scope (suffix + answer columns) and the
              defended features of the pre-defence activations; monitor_0 its initial value.
Variants (Q16): ``faithful`` detaches the monitor (the reference: no gradient, so with Adam it is the
behaviour term alone); ``corrected`` keeps it differentiable.

Generation: greedy, no KV cache (a full recompute per token, as the reference), the defence on every
column, up to ``max_new_tokens``, the suffix after the prompt. Drift: relative L2 of the post-defence
features over sites x answer columns x S, optimised vs initial suffix (paper-method 7, OABD drift).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovery_jax.models import transformer
from recovery_jax.tasks import refusal_defence as defence_lib

VARIANTS = ("faithful", "corrected")


@dataclasses.dataclass(frozen=True)
class RefusalSuffixConfig:
  """Knobs of the refusal soft-suffix baseline (paper-method 8, OABD refusal row; paper run values)."""

  variant: str = "faithful"
  suffix_len: int = 16
  steps: int = 120
  lr: float = 0.01
  budget: float = 40.0
  noise: float = 0.01
  init_text: str = "!"
  n_ans: int = 48
  n_pref: int = 16
  w_pref: float = 3.0
  w_anti: float = 0.3
  behavior_weight: float = 0.9

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"RefusalSuffixConfig.variant={self.variant!r}: expected one of {VARIANTS}")


def _stack(prompt_emb, prompt_mask, suffix, tail_emb, tail_mask):
  x = jnp.concatenate([prompt_emb, suffix.astype(prompt_emb.dtype), tail_emb.astype(prompt_emb.dtype)], axis=1)
  mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(suffix.shape[:2], bool), tail_mask.astype(bool)], 1)
  return x, mask, transformer.default_positions(mask, x.shape[0], x.shape[1])


def forward(params, mcfg, defence, x, mask, positions):
  """(final residual [B, S, d], post-defence features, pre-defence features: tuples over the defence's
  clamps of [B, S, K])."""
  sites = tuple(c.site for c in defence)
  out = transformer.forward(params, mcfg, resid=x, positions=positions, attention_mask=mask,
                            edits=defence_lib.edits(defence), capture=sites, capture_inputs=sites,
                            compute_logits=False)
  post = tuple(c.features(out.captures[c.site]) * c.mask for c in defence)
  pre = tuple(c.features(out.captures[f"{c.site}:input"]) * c.mask for c in defence)
  return out.resid, post, pre


def _losses(params, mcfg, defence, cfg: RefusalSuffixConfig, prompt_emb, prompt_mask, ans_emb, ans_ids, ans_mask,
            disc0, suffix):
  """-> (behaviour [B], monitor [B], post-defence features at the answer columns)."""
  t, l = prompt_emb.shape[1], suffix.shape[1]
  x, mask, pos = _stack(prompt_emb, prompt_mask, suffix, ans_emb, ans_mask)
  resid, post, pre = forward(params, mcfg, defence, x, mask, pos)
  a = ans_ids.shape[1]
  h = resid[:, t + l - 1:t + l - 1 + a]  # columns predicting answer token j
  logp = jax.nn.log_softmax(transformer.final_logits(params, mcfg, h).astype(jnp.float32), -1)  # [B, A, V]
  lp = jnp.take_along_axis(logp, ans_ids[..., None], -1)[..., 0]
  j = jnp.arange(a)
  w = jnp.where(j < cfg.n_pref, cfg.w_pref, 1.0)[None] * ans_mask
  ce = -jnp.sum(w * lp, -1) / jnp.maximum(jnp.sum(w, -1), 1e-6)
  lq = jnp.max(logp[:, 0][:, disc0], -1)
  beh = ce + cfg.w_anti * jax.nn.softplus(lq - lp[:, 0])
  scope = jnp.concatenate([jnp.ones((x.shape[0], l), bool), ans_mask.astype(bool)], 1)[:, :, None]
  mon = jnp.mean(jnp.stack([jnp.max(jnp.where(scope, p[:, t:], -jnp.inf), axis=(1, 2)) for p in pre]), 0)
  ans_feats = tuple(f[:, t + l:] for f in post)
  return beh, mon, ans_feats


_PROGRAMS: dict = {}


def _program(mcfg, cfg: RefusalSuffixConfig, defence_struct):
  key = (mcfg, cfg, defence_struct)
  if key in _PROGRAMS:
    return _PROGRAMS[key]

  def fn(params, defence, prompt_emb, prompt_mask, ans_emb, ans_ids, ans_mask, disc0, init, noise):
    args = (params, mcfg, defence, cfg, prompt_emb, prompt_mask, ans_emb, ans_ids, ans_mask, disc0)
    s0 = init + noise
    _, mon0, f0 = _losses(*args, s0)
    mon0 = jax.lax.stop_gradient(jnp.maximum(jnp.abs(mon0), 1e-6))

    def loss_fn(s):
      beh, mon, _ = _losses(*args, s)
      if cfg.variant == "faithful":
        mon = jax.lax.stop_gradient(mon)
      return jnp.sum(cfg.behavior_weight * beh + (1 - cfg.behavior_weight) * mon / mon0), beh

    tx = optax.adam(cfg.lr)

    def step(carry, _):
      s, opt = carry
      (_, beh), g = jax.value_and_grad(loss_fn, has_aux=True)(s)
      up, opt = tx.update(g, opt, s)
      s = optax.apply_updates(s, up)
      dev = s - init
      norm = jnp.sqrt(jnp.sum(jnp.square(dev), axis=(1, 2), keepdims=True))
      s = jnp.where(norm > cfg.budget, init + dev * cfg.budget / (norm + 1e-8), s)
      return (s, opt), beh

    (s, _), hist = jax.lax.scan(step, (s0, tx.init(s0)), None, length=cfg.steps)
    _, _, f1 = _losses(*args, s)
    return s, jnp.sqrt(jnp.sum(jnp.square(s - init), axis=(1, 2))), hist, f0, f1

  _PROGRAMS[key] = jax.jit(fn)
  return _PROGRAMS[key]


_GREEDY: dict = {}


def _greedy(mcfg):
  """jit per model config: (params, defence, prompt_emb, prompt_mask, suffix, stops, pad, max_new_arr) ->
  greedy tokens [B, N] (N = max_new_arr.shape[0]) and lengths [B], no KV cache."""
  if mcfg not in _GREEDY:
    _GREEDY[mcfg] = jax.jit(lambda *a: _greedy_fn(mcfg, *a))
  return _GREEDY[mcfg]


def _greedy_fn(mcfg, params, defence, prompt_emb, prompt_mask, suffix, stops, pad, max_new_arr):
  b, d = prompt_emb.shape[0], prompt_emb.shape[2]
  n = max_new_arr.shape[0]
  t, l = prompt_emb.shape[1], suffix.shape[1]
  tail = jnp.zeros((b, n, d), prompt_emb.dtype)
  tail_mask = jnp.zeros((b, n), bool)
  toks = jnp.full((b, n), pad, jnp.int32)

  def body(i, carry):
    tail, tail_mask, toks, done, lens = carry
    x, mask, pos = _stack(prompt_emb, prompt_mask, suffix, tail, tail_mask)
    resid, _, _ = forward(params, mcfg, defence, x, mask, pos)
    h = jax.lax.dynamic_slice_in_dim(resid, t + l - 1 + i, 1, axis=1)
    tok = jnp.argmax(transformer.final_logits(params, mcfg, h)[:, 0], -1).astype(jnp.int32)
    tok = jnp.where(done, pad, tok)
    toks = toks.at[:, i].set(tok)
    lens = lens + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stops)
    e = transformer.embed(params, mcfg, tok[:, None]).astype(tail.dtype)
    tail = jax.lax.dynamic_update_slice_in_dim(tail, e, i, axis=1)
    tail_mask = tail_mask.at[:, i].set(True)
    return tail, tail_mask, toks, done, lens

  carry = (tail, tail_mask, toks, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
  _, _, toks, _, lens = jax.lax.fori_loop(0, n, body, carry)
  return toks, lens


def run(params, mcfg, tok, defence, prompt_rows: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
        discouraged: Sequence[Sequence[int]], cfg: RefusalSuffixConfig, *, max_new_tokens: int, stop_ids, pad_id: int,
        seed: int = 0) -> dict[str, np.ndarray]:
  """Optimises a soft suffix per case (all cases in one batch) and generates with it under the defence.

  Returns per-case arrays: gen_tokens [N, max_new_tokens], gen_lengths, suffix_norm (||suffix - init||),
  behaviour_final, drift_rel and floor_rel (post-defence answer features, optimised vs initial suffix).
  """
  ids = tok.encode(cfg.init_text, add_special_tokens=False).ids
  if len(ids) != 1:
    raise ValueError(f"RefusalSuffixConfig.init_text={cfg.init_text!r} is {len(ids)} tokens; expected one")
  n, d = len(prompt_rows), mcfg.d_model
  t = max(len(p) for p in prompt_rows)
  pt = np.full((n, t), pad_id, np.int32)
  pm = np.zeros((n, t), bool)
  for i, p in enumerate(prompt_rows):
    pt[i, t - len(p):], pm[i, t - len(p):] = p, True
  a = cfg.n_ans
  at = np.full((n, a), pad_id, np.int32)
  am = np.zeros((n, a), np.float32)
  for i, ans in enumerate(answers):
    k = min(a, len(ans))
    at[i, :k], am[i, :k] = ans[:k], 1.0
  disc0 = jnp.asarray(sorted({q[0] for q in discouraged if q}), jnp.int32)
  emb = lambda x: transformer.embed(params, mcfg, jnp.asarray(x)).astype(jnp.float32)
  init = jnp.broadcast_to(emb([[ids[0]]])[0, 0], (n, cfg.suffix_len, d))
  noise = cfg.noise * jax.random.normal(jax.random.key(seed), init.shape, jnp.float32)
  struct = jax.tree.structure(defence)
  s, norm, hist, f0, f1 = _program(mcfg, cfg, struct)(params, defence, emb(pt), jnp.asarray(pm), emb(at),
                                                      jnp.asarray(at), jnp.asarray(am), disc0, init, noise)
  c = np.concatenate([np.asarray(f, np.float64).reshape(n, -1) for f in f1], 1)
  r = np.concatenate([np.asarray(f, np.float64).reshape(n, -1) for f in f0], 1)
  rn = np.linalg.norm(r, axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    drift = np.where(rn > 0, np.linalg.norm(c - r, axis=1) / rn, np.nan)
    floor = np.where(rn > 0, np.linalg.norm(np.maximum(r - c, 0), axis=1) / rn, np.nan)
  toks, lens = _greedy(mcfg)(params, defence, emb(pt), jnp.asarray(pm), s, jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32),
                       jnp.asarray(pad_id, jnp.int32), jnp.zeros((max_new_tokens,), jnp.int8))
  return {"gen_tokens": np.asarray(toks), "gen_lengths": np.asarray(lens), "suffix_norm": np.asarray(norm),
          "behaviour_final": np.asarray(hist[-1]), "drift_rel": drift, "floor_rel": floor}
