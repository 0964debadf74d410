"""Recovery objectives (maximised) and drift penalties, as pure functions.

Objectives read logits at a few *readout* columns: ``logits`` [batch, R, vocab], gathered by the
engine (which only unembeds those columns). Each returns per-row scores [batch]; the engine
averages rows with weights (IOI's shared delta maximises the mean logit difference over prompts).
Targets are a dict of arrays per kind:

  logit_diff     {"pos": [B], "neg": [B]}                       l[pos] - l[neg] at readout 0
  vocab_margin   {"target": [B]}                                 l[t] - mean of the other V-1 logits
  choice_margin  {"choices": [B, C], "gold": [B] (index in C)}   l[gold] - mean(other choices)
  choice_ce      same                                            log_softmax(choice logits)[gold]
  teacher_forced {"next_tokens": [B, R], "answer_len": [B],     refusal v4 score (paper-method 6.4)
                  "decision": [B, Lb], "decision_len": [B],
                  "discouraged": [B, Q, Lq], "discouraged_len": [B, Q]}
  probe_logit    {} (the probe path computes the score itself; see engine.probe_evaluator)

For teacher_forced, readout column j is a - 1 + j (a = answer start), so logits[:, j] predicts
answer token j and ``next_tokens[:, j]`` = tokens[a + j]; ``answer_len`` = T - a.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

OBJECTIVES = ("logit_diff", "vocab_margin", "choice_margin", "choice_ce", "teacher_forced", "probe_logit")
DRIFT_PENALTIES = ("l2", "raw_mse", "relative_mse", "relative_l2")


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static description of an objective (hashable).

  Teacher-forced knobs (reference names in brackets): w_ans [answer_logprob_weight], n_ans
  [answer_token_limit], n_pref / pref_weight [answer_prefix_token_limit / _weight], w_prefix
  [target_prefix_logprob_weight] with prefix_len [target_prefix_token_limit], w_first
  [first_token_logprob_weight], w_anti [anti_refusal_weight] with anti_len
  [anti_refusal_prefix_len], w_margin [first_token_margin_weight]. A term runs only when its
  weight is > 0, as in the reference.
  """

  kind: str = "logit_diff"
  w_ans: float = 0.0
  n_ans: int = 48
  n_pref: int = 0
  pref_weight: float = 1.0
  w_prefix: float = 0.0
  prefix_len: int = 8
  w_first: float = 0.0
  w_anti: float = 0.0
  anti_len: int = 8
  w_margin: float = 0.0

  def __post_init__(self):
    if self.kind not in OBJECTIVES:
      raise ValueError(f"Objective.kind={self.kind!r}: expected one of {OBJECTIVES}")
    if self.kind == "teacher_forced" and self.n_ans <= 0 and self.w_ans > 0:
      raise ValueError("Objective: teacher_forced needs n_ans > 0 (a static readout length)")

  @property
  def n_readout(self) -> int:
    """Number of readout columns R the objective reads."""
    if self.kind != "teacher_forced":
      return 1
    r = 1
    if self.w_ans > 0:
      r = max(r, self.n_ans)
    if self.w_prefix > 0:
      r = max(r, self.prefix_len)
    if self.w_anti > 0:
      r = max(r, self.anti_len)
    return r


# ----------------------------------------------------------------------------------------------
# single-position objectives


def logit_diff(logits: Array, pos: Array, neg: Array) -> Array:
  """[B, R, V] -> [B]: l[pos] - l[neg] at readout 0."""
  l0 = logits[:, 0].astype(jnp.float32)
  take = lambda ids: jnp.take_along_axis(l0, ids[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return take(pos) - take(neg)


def vocab_margin(logits: Array, target: Array) -> Array:
  """[B, R, V] -> [B]: target logit minus the mean of the other V-1 logits (reference target_margin)."""
  l0 = logits[:, 0].astype(jnp.float32)
  t = jnp.take_along_axis(l0, target[:, None].astype(jnp.int32), axis=-1)[:, 0]
  v = l0.shape[-1]
  return t - (l0.sum(-1) - t) / (v - 1)


def _choice_logits(logits: Array, choices: Array) -> Array:
  return jnp.take_along_axis(logits[:, 0].astype(jnp.float32), choices.astype(jnp.int32), axis=-1)


def choice_margin(logits: Array, choices: Array, gold: Array) -> Array:
  """[B, R, V] -> [B]: l[gold] - mean of the other choices' logits."""
  cl = _choice_logits(logits, choices)
  g = jnp.take_along_axis(cl, gold[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return g - (cl.sum(-1) - g) / (cl.shape[-1] - 1)


def choice_ce(logits: Array, choices: Array, gold: Array) -> Array:
  """[B, R, V] -> [B]: -CE over the choice logits (log-probability of gold among the choices)."""
  lp = jax.nn.log_softmax(_choice_logits(logits, choices), axis=-1)
  return jnp.take_along_axis(lp, gold[:, None].astype(jnp.int32), axis=-1)[:, 0]


# ----------------------------------------------------------------------------------------------
# teacher-forced refusal objective (paper-method 6.4)


def prefix_logprob(logp: Array, ids: Array, ids_len: Array, limit: int, answer_len: Array) -> Array:
  """Reference ``continuation_avg_logprob``: mean over j < min(len, limit, answer_len) of
  logp[:, j, ids_j] (teacher-forced on the actual sequence). logp [B, R, V], ids [B, L]; 0 if empty."""
  n = min(limit, ids.shape[-1], logp.shape[1])
  lp = jnp.take_along_axis(logp[:, :n], ids[:, :n, None].astype(jnp.int32), axis=-1)[..., 0]
  cnt = jnp.minimum(jnp.minimum(ids_len, limit), answer_len)
  w = (jnp.arange(n)[None] < cnt[:, None]).astype(jnp.float32)
  return jnp.where(cnt > 0, (lp * w).sum(-1) / jnp.maximum(cnt, 1), 0.0)


def teacher_forced(obj: Objective, logits: Array, targets) -> Array:
  """Refusal score ``w_ans*Aans + w_prefix*P(b) + w_first*F + w_anti*AR + w_margin*FM``: [B]."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  b = logits.shape[0]
  alen = targets["answer_len"].astype(jnp.int32)
  score = jnp.zeros((b,), jnp.float32)
  dec, dec_len = targets.get("decision"), targets.get("decision_len")
  if dec is None:
    dec, dec_len = targets["next_tokens"], alen
  has_dec = dec_len > 0
  if obj.w_ans > 0:
    n = min(obj.n_ans, logits.shape[1])
    lp = jnp.take_along_axis(logp[:, :n], targets["next_tokens"][:, :n, None].astype(jnp.int32), axis=-1)[..., 0]
    j = jnp.arange(n)[None]
    w = (j < alen[:, None]).astype(jnp.float32)
    if obj.n_pref > 0 and obj.pref_weight != 1.0:
      w = w * jnp.where(j < obj.n_pref, obj.pref_weight, 1.0)
    score += obj.w_ans * (lp * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)
  if obj.w_prefix > 0:
    score += obj.w_prefix * jnp.where(has_dec, prefix_logprob(logp, dec, dec_len, obj.prefix_len, alen), 0.0)
  first = dec[:, 0].astype(jnp.int32)
  if obj.w_first > 0:
    f = jnp.take_along_axis(logp[:, 0], first[:, None], axis=-1)[:, 0]
    score += obj.w_first * jnp.where(has_dec, f, 0.0)
  q, q_len = targets.get("discouraged"), targets.get("discouraged_len")
  if q is not None and (obj.w_anti > 0 or obj.w_margin > 0):
    q_valid = q_len > 0  # [B, Q]
    any_q = q_valid.any(-1) & has_dec
    if obj.w_anti > 0:
      tgt = prefix_logprob(logp, dec, dec_len, obj.anti_len, alen)
      per_q = jax.vmap(lambda ids, ln: prefix_logprob(logp, ids, ln, obj.anti_len, alen),
                       in_axes=(1, 1), out_axes=1)(q, q_len)  # [B, Q]
      best = jnp.max(jnp.where(q_valid, per_q, -jnp.inf), axis=-1)
      score += obj.w_anti * jnp.where(any_q, tgt - best, 0.0)
    if obj.w_margin > 0:
      l0 = logits[:, 0]
      q0 = jnp.take_along_axis(l0, q[:, :, 0].astype(jnp.int32), axis=-1)
      best0 = jnp.max(jnp.where(q_valid, q0, -jnp.inf), axis=-1)
      fm = jnp.take_along_axis(l0, first[:, None], axis=-1)[:, 0] - best0
      score += obj.w_margin * jnp.where(any_q, fm, 0.0)
  return score


# ----------------------------------------------------------------------------------------------


def row_scores(obj: Objective, logits: Array, targets) -> Array:
  """Per-row objective values [B] from readout logits [B, R, V]."""
  if obj.kind == "logit_diff":
    return logit_diff(logits, targets["pos"], targets["neg"])
  if obj.kind == "vocab_margin":
    return vocab_margin(logits, targets["target"])
  if obj.kind == "choice_margin":
    return choice_margin(logits, targets["choices"], targets["gold"])
  if obj.kind == "choice_ce":
    return choice_ce(logits, targets["choices"], targets["gold"])
  if obj.kind == "teacher_forced":
    return teacher_forced(obj, logits, targets)
  raise ValueError(f"row_scores: objective {obj.kind!r} does not read logits")


def readout_ids(obj: Objective, targets) -> Array | None:
  """Vocabulary ids [B, n] that ``obj`` reads, when it reads only a few (else None): the engine then
  unembeds just those columns instead of the whole vocabulary."""
  if obj.kind == "logit_diff":
    return jnp.stack([targets["pos"], targets["neg"]], axis=-1)
  if obj.kind in ("choice_margin", "choice_ce"):
    return targets["choices"]
  return None


def row_scores_at(obj: Objective, sub_logits: Array, targets) -> Array:
  """Per-row objective values [B] from the logits of ``readout_ids`` only: [B, R, n]."""
  local = jnp.broadcast_to(jnp.arange(sub_logits.shape[-1]), sub_logits.shape[:1] + sub_logits.shape[-1:])
  if obj.kind == "logit_diff":
    return logit_diff(sub_logits, local[:, 0], local[:, 1])
  if obj.kind == "choice_margin":
    return choice_margin(sub_logits, local, targets["gold"])
  if obj.kind == "choice_ce":
    return choice_ce(sub_logits, local, targets["gold"])
  raise ValueError(f"row_scores_at: objective {obj.kind!r} reads the whole vocabulary")


def weighted_mean(scores: Array, weights: Array | None) -> Array:
  if weights is None:
    return scores.mean()
  w = weights.astype(jnp.float32)
  return (scores * w).sum() / jnp.maximum(w.sum(), 1e-12)


# ----------------------------------------------------------------------------------------------
# drift (features c vs defended reference r; tuples over monitored clamps of [B, M, K] with masks)


def safe_norm(x: Array) -> Array:
  """L2 norm with a zero (not NaN) gradient at 0, like torch's norm backward."""
  s = jnp.sum(jnp.square(x))
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def drift_penalty(kind: str, cs, rs, masks, eps: float = 1e-6) -> Array:
  """Drift penalty over monitored clamps (r detached in denominators).

  l2: ||c - r||_F over all entries and clamps (core ``feat_act_drift_l2_seq``; not squared).
  raw_mse / relative_mse / relative_l2: the v4 ``activation_drift_loss``, averaged over clamps with
  at least one valid entry: mean((c-r)^2); mean((c-r)^2)/(mean(r^2)+eps); sum((c-r)^2)/(sum(r^2)+eps).
  """
  if kind not in DRIFT_PENALTIES:
    raise ValueError(f"drift_penalty: kind={kind!r}, expected one of {DRIFT_PENALTIES}")
  if not cs:
    return jnp.zeros((), jnp.float32)
  if kind == "l2":
    flat = jnp.concatenate([jnp.where(m, c - r, 0.0).reshape(-1) for c, r, m in zip(cs, rs, masks)])
    return safe_norm(flat)
  total, n_used = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  for c, r, m in zip(cs, rs, masks):
    mf = m.astype(jnp.float32)
    n = mf.sum()
    d2 = (jnp.square(c - r) * mf).sum()
    r2 = jax.lax.stop_gradient((jnp.square(r) * mf).sum())
    if kind == "raw_mse":
      loss = d2 / jnp.maximum(n, 1.0)
    elif kind == "relative_mse":
      loss = (d2 / jnp.maximum(n, 1.0)) / (r2 / jnp.maximum(n, 1.0) + eps)
    else:
      loss = d2 / (r2 + eps)
    used = n > 0
    total += jnp.where(used, loss, 0.0)
    n_used += used.astype(jnp.float32)
  return total / jnp.maximum(n_used, 1.0)


def relative_l2(cs, rs, masks, eps: float = 1e-8) -> Array:
  """||c - r|| / (||r|| + eps) over the concatenation of monitored clamps (checkpoint criterion)."""
  if not cs:
    return jnp.zeros((), jnp.float32)
  d = jnp.concatenate([jnp.where(m, c - r, 0.0).reshape(-1) for c, r, m in zip(cs, rs, masks)])
  r = jnp.concatenate([jnp.where(m, r, 0.0).reshape(-1) for r, m in zip(rs, masks)])
  return jnp.sqrt(jnp.sum(d * d)) / (jnp.sqrt(jnp.sum(r * r)) + eps)
