"""The soft suffix for refusal (paper-method 9.2): teacher-forced answer objective and greedy generation.

Layout per case (``core``): [chat prompt (left-padded, T columns)] + [L soft suffix embeddings] + [the base
answer, teacher-forced (first ``n_ans`` tokens, right-padded)]: the suffix sits inside the model turn,
after the generation prompt. The live defence acts on every circuit site and every column, in both variants.

Behaviour loss (minimised) = CE_w (first ``n_ans`` answer tokens, the first ``n_pref`` weighted ``w_pref``;
weighted mean) + ``w_anti * softplus(max_q lp(q_0) - lp(b_0))`` at the first answer position (q_0: the
first tokens of the refusal prefixes). Monitor = mean over sites of the max over the attack scope (suffix +
answer columns) and the defended features of the pre-defence activations.

Generation: greedy, no KV cache (a full recompute per token, as the reference), the defence on every
column, up to ``max_new_tokens``, the suffix after the prompt. Drift: relative L2 of the post-defence
features over sites x answer columns x S, optimised vs initial suffix (paper-method 7, OABD drift).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax.models import transformer
from recovery_jax.recovery.soft_suffix import core


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
    core.check_variant(self)


@dataclasses.dataclass(frozen=True)
class RefusalObjective:
  """``core`` objective; data: prompt_emb [B, T, d], prompt_mask [B, T], ans_emb [B, A, d], ans_ids [B, A],
  ans_mask [B, A] float, disc0 [Q] (first tokens of the refusal prefixes)."""

  mcfg: Any
  cfg: RefusalSuffixConfig

  def _forward(self, params, defence, data, suffix):
    x, mask, pos = core.stack(params, self.mcfg, data["prompt_emb"], data["prompt_mask"], suffix, data["ans_emb"],
                              data["ans_mask"])
    return core.forward(params, self.mcfg, defence, x, mask, pos)

  def loss(self, params, defence, data, suffix):
    cfg, ans_ids, ans_mask = self.cfg, data["ans_ids"], data["ans_mask"]
    t, l, a = data["prompt_emb"].shape[1], suffix.shape[1], ans_ids.shape[1]
    resid, _, pre = self._forward(params, defence, data, suffix)
    h = resid[:, t + l - 1:t + l - 1 + a]  # columns predicting answer token j
    logp = jax.nn.log_softmax(transformer.final_logits(params, self.mcfg, h).astype(jnp.float32), -1)  # [B, A, V]
    lp = jnp.take_along_axis(logp, ans_ids[..., None], -1)[..., 0]
    w = jnp.where(jnp.arange(a) < cfg.n_pref, cfg.w_pref, 1.0)[None] * ans_mask
    ce = -jnp.sum(w * lp, -1) / jnp.maximum(jnp.sum(w, -1), 1e-6)
    lq = jnp.max(logp[:, 0][:, data["disc0"]], -1)
    beh = ce + cfg.w_anti * jax.nn.softplus(lq - lp[:, 0])
    scope = jnp.concatenate([jnp.ones((h.shape[0], l), bool), ans_mask.astype(bool)], 1)[:, :, None]
    mon = jnp.mean(jnp.stack([jnp.max(jnp.where(scope, p[:, t:], -jnp.inf), axis=(1, 2)) for p in pre]), 0)
    return beh, mon, beh

  def readout(self, params, defence, data, suffix):
    """-> post-defence features at the answer columns: tuple over sites of [B, A, K]."""
    _, post, _ = self._forward(params, defence, data, suffix)
    return tuple(f[:, -data["ans_ids"].shape[1]:] for f in post)


@functools.partial(jax.jit, static_argnames=("mcfg", "max_new_tokens"))
def generate(params, defence, prompt_emb, prompt_mask, suffix, stops, pad, *, mcfg, max_new_tokens: int):
  """Greedy, no KV cache: -> tokens [B, max_new_tokens] (``pad`` after a stop) and lengths [B]."""
  b, d = prompt_emb.shape[0], prompt_emb.shape[2]
  n, t, l = max_new_tokens, prompt_emb.shape[1], suffix.shape[1]

  def body(i, carry):
    tail, tail_mask, toks, done, lens = carry
    x, mask, pos = core.stack(params, mcfg, prompt_emb, prompt_mask, suffix, tail, tail_mask)
    resid, _, _ = core.forward(params, mcfg, defence, x, mask, pos)
    h = jax.lax.dynamic_slice_in_dim(resid, t + l - 1 + i, 1, axis=1)
    tok = jnp.argmax(transformer.final_logits(params, mcfg, h)[:, 0], -1).astype(jnp.int32)
    tok = jnp.where(done, pad, tok)
    toks = toks.at[:, i].set(tok)
    lens = lens + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stops)
    e = transformer.embed(params, mcfg, tok[:, None]).astype(tail.dtype)
    tail = jax.lax.dynamic_update_slice_in_dim(tail, e, i, axis=1)
    return tail, tail_mask.at[:, i].set(True), toks, done, lens

  carry = (jnp.zeros((b, n, d), prompt_emb.dtype), jnp.zeros((b, n), bool), jnp.full((b, n), pad, jnp.int32),
           jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
  _, _, toks, _, lens = jax.lax.fori_loop(0, n, body, carry)
  return toks, lens


def _relative(r, c):
  """Per-row relative L2 drift and floor of features c vs r (tuples of [N, ...]) -> ([N], [N]) float64."""
  n = r[0].shape[0]
  r, c = (np.concatenate([np.asarray(f, np.float64).reshape(n, -1) for f in fs], 1) for fs in (r, c))
  rn = np.linalg.norm(r, axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return (np.where(rn > 0, np.linalg.norm(c - r, axis=1) / rn, np.nan),
            np.where(rn > 0, np.linalg.norm(np.maximum(r - c, 0), axis=1) / rn, np.nan))


def run_refusal(params, mcfg, tok, defence, prompt_rows: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                discouraged: Sequence[Sequence[int]], cfg: RefusalSuffixConfig, *, max_new_tokens: int, stop_ids,
                pad_id: int, seed: int = 0, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Optimises a soft suffix per case (in batches of ``batch_size``; None: all cases in one batch) and
  generates with it under the defence.

  Returns per-case arrays: gen_tokens [N, max_new_tokens], gen_lengths, suffix_norm (||suffix - init||),
  behaviour_final, drift_rel and floor_rel (post-defence answer features, optimised vs initial suffix).
  """
  n, t, a = len(prompt_rows), max(len(p) for p in prompt_rows), cfg.n_ans
  pt, pm = np.full((n, t), pad_id, np.int32), np.zeros((n, t), bool)
  at, am = np.full((n, a), pad_id, np.int32), np.zeros((n, a), np.float32)
  for i, (p, ans) in enumerate(zip(prompt_rows, answers)):
    pt[i, t - len(p):], pm[i, t - len(p):] = p, True
    k = min(a, len(ans))
    at[i, :k], am[i, :k] = ans[:k], 1.0
  disc0 = jnp.asarray(sorted({q[0] for q in discouraged if q}), jnp.int32)
  stops = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
  emb = lambda x: transformer.embed(params, mcfg, jnp.asarray(x)).astype(jnp.float32)

  def prepare(rows):
    p, m, ans, ans_m = rows
    return {"prompt_emb": emb(p), "prompt_mask": jnp.asarray(m), "ans_emb": emb(ans), "ans_ids": jnp.asarray(ans),
            "ans_mask": jnp.asarray(ans_m), "disc0": disc0}

  def finish(data, suffix):
    toks, lens = generate(params, defence, data["prompt_emb"], data["prompt_mask"], suffix, stops,
                          jnp.asarray(pad_id, jnp.int32), mcfg=mcfg, max_new_tokens=max_new_tokens)
    return {"gen_tokens": toks, "gen_lengths": lens}

  res = core.run_batched(RefusalObjective(mcfg, cfg), params, tok, defence, (pt, pm, at, am), prepare, seed=seed,
                         batch_size=batch_size, exact=False, finish=finish)
  drift, floor = _relative(res["init"], res["final"])
  return {"gen_tokens": res["gen_tokens"], "gen_lengths": res["gen_lengths"], "suffix_norm": res["suffix_norm"],
          "behaviour_final": res["history"][:, -1], "drift_rel": drift, "floor_rel": floor}
