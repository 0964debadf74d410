"""v4 cross-layer two-stage refusal recovery (paper-method 6.4) on the shared engine.

Per valid case: ``tokens = prompt ids + base answer ids`` (the ids concatenated, not the texts
re-tokenized), ``a = prompt_len`` (answer start), ``anchor = a - 1``, answer positions
``P_ans = [a, min(T, a + n_ans))``. Every circuit site carries a delta (live semantics: clamp ->
delta -> capture, the defence active at every site), drift is monitored on ``P_ans``.

  stage 1  delta at the anchor only, boundary objective (w_first F + w_prefix P(b, 8) + w_anti AR +
           w_margin FM), its own steps / lr / budget; the best drift-constrained checkpoint is kept.
  stage 2  stage 1's delta fixed at the anchor; a new delta at ``P_ans``, answer objective
           (w_ans Aans + w_anti AR).

Cases are stacked (left-padded to one length, positions counting real tokens only, as in generation)
and recovered in one vmapped program per stage (``engine.recover_examples``);
case i uses ``fold_in(key, i)`` in both stages.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import intervene
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.tasks import refusal_judge as judge


@dataclasses.dataclass(frozen=True)
class V4Config:
  """The "v4strong" settings (paper-method 6.4 table); ``projection`` is the mode (none/encoder/jacobian)."""

  projection: str = "jacobian"
  steps1: int = 30
  lr1: float = 0.1
  budget1: float = 40.0
  steps2: int = 120
  lr2: float = 0.05
  budget2: float = 40.0
  n_ans: int = 48
  prefix_len: int = 8
  anti_len: int = 8
  w_first: float = 4.0
  w_prefix: float = 2.0
  w_anti1: float = 0.2
  w_margin: float = 0.1
  w_ans: float = 5.0
  w_anti2: float = 0.1
  lambda_act: float = 200.0
  drift_penalty: str = "relative_mse"
  jacobian_probes: int = 8
  correction_steps: int = 5
  correction_lr: float = 0.05
  checkpoint: str = "drift_constrained"
  checkpoint_tau: float = 0.03
  checkpoint_every: int = 10
  checkpoint_penalty_weight: float = 80.0
  discourage_safety_prefixes: bool = True

  def objective(self, stage: int) -> Objective:
    if stage == 1:
      return Objective("teacher_forced", w_first=self.w_first, w_prefix=self.w_prefix, prefix_len=self.prefix_len,
                       w_anti=self.w_anti1, anti_len=self.anti_len, w_margin=self.w_margin)
    return Objective("teacher_forced", w_ans=self.w_ans, n_ans=self.n_ans, w_anti=self.w_anti2,
                     anti_len=self.anti_len)

  def recovery_config(self, stage: int) -> RecoveryConfig:
    jac = self.projection.startswith("jacobian")
    return RecoveryConfig(
        steps=self.steps1 if stage == 1 else self.steps2, lr=self.lr1 if stage == 1 else self.lr2,
        budget=self.budget1 if stage == 1 else self.budget2, projection=self.projection,
        lambda_act=self.lambda_act, drift_penalty=self.drift_penalty, jacobian_probes=self.jacobian_probes,
        correction_steps=self.correction_steps if jac else 0, correction_lr=self.correction_lr,
        checkpoint=self.checkpoint, checkpoint_tau=self.checkpoint_tau, checkpoint_every=self.checkpoint_every,
        checkpoint_penalty_weight=self.checkpoint_penalty_weight)


def discouraged_ids(tok, safety: bool = True) -> list[list[int]]:
  """Token ids of the refusal prefixes (plus the safety-cue prefixes), deduplicated, in list order."""
  out, seen = [], set()
  for p in judge.REFUSAL_PREFIXES + (judge.SAFETY_CUE_PREFIXES if safety else ()):
    ids = tuple(tok.encode(p, add_special_tokens=False).ids)
    if ids and ids not in seen:
      seen.add(ids)
      out.append(list(ids))
  return out


def build_problems(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], discouraged: Sequence[Sequence[int]],
                   cfg: V4Config, pad_id: int = 0, length: int | None = None
                   ) -> tuple[engine.Problem, engine.Problem]:
  """(stage-1 problems, stage-2 problems without their fixed delta), stacked [N, 1, ...].

  prompts / answers: token ids per case (each answer non-empty). The stage-2 problems get
  ``fixed_delta`` from ``with_fixed``. length: the padded sequence length T (default: the longest case).
  """
  n = len(prompts)
  if any(len(a) == 0 for a in answers):
    raise ValueError("build_problems: every case needs a non-empty base answer")
  t = max(len(p) + len(a) for p, a in zip(prompts, answers))
  if length is not None:
    if length < t:
      raise ValueError(f"build_problems: length={length} is shorter than the longest case ({t} tokens)")
    t = length
  r = max(cfg.n_ans, cfg.prefix_len, cfg.anti_len)
  q = len(discouraged)
  lq = max(cfg.anti_len, 1)
  toks = np.full((n, t), pad_id, np.int32)
  mask = np.zeros((n, t), bool)
  a_col = np.zeros((n,), np.int32)
  readout = np.zeros((n, r), np.int32)
  mon = np.zeros((n, cfg.n_ans), np.int32)
  mon_valid = np.zeros((n, cfg.n_ans), bool)
  nxt = np.zeros((n, r), np.int32)
  alen = np.zeros((n,), np.int32)
  dec = np.zeros((n, cfg.prefix_len), np.int32)
  dec_len = np.zeros((n,), np.int32)
  disc = np.zeros((n, max(q, 1), lq), np.int32)
  disc_len = np.zeros((n, max(q, 1)), np.int32)
  for i, (p, ans) in enumerate(zip(prompts, answers)):
    seq = list(p) + list(ans)
    off = t - len(seq)  # left padding (the engine's and generation's convention)
    toks[i, off:] = seq
    mask[i, off:] = True
    a = off + len(p)  # column of the answer start
    a_col[i] = a
    readout[i] = np.minimum(a - 1 + np.arange(r), t - 1)
    m = min(cfg.n_ans, len(ans))
    mon[i, :m] = a + np.arange(m)
    mon[i, m:] = a
    mon_valid[i, :m] = True
    k = min(r, len(ans))
    nxt[i, :k] = ans[:k]
    alen[i] = len(ans)
    k = min(cfg.prefix_len, len(ans))
    dec[i, :k] = ans[:k]
    dec_len[i] = k
    for j, ids in enumerate(discouraged):
      k = min(lq, len(ids))
      disc[i, j, :k] = ids[:k]
      disc_len[i, j] = len(ids)
  positions = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  targets = {"next_tokens": nxt, "answer_len": alen, "decision": dec, "decision_len": dec_len,
             "discouraged": disc, "discouraged_len": disc_len}
  common = dict(tokens=toks, attention_mask=mask, positions=positions, readout_cols=readout, monitor_cols=mon,
                monitor_valid=mon_valid, targets=targets, row_weight=np.ones((n,), np.float32))
  s1 = engine.Problem(delta_cols=(a_col - 1)[:, None], delta_valid=np.ones((n, 1), bool), **common)
  s2 = engine.Problem(delta_cols=mon, delta_valid=mon_valid, **common)
  lift = lambda pb: jax.tree.map(lambda x: jnp.asarray(x)[:, None], pb)  # [N, B=1, ...]
  return lift(s1), lift(s2)


def with_fixed(stage2: engine.Problem, delta1: jax.Array) -> engine.Problem:
  """Stage-2 problems with stage 1's deltas [N, n_sites, 1, d] fixed at the anchor (delta col of stage 1)."""
  anchor = stage2.readout_cols[..., :1]  # readout 0 = a - 1 = the anchor
  return stage2._replace(fixed_delta=jnp.asarray(delta1, jnp.float32), fixed_cols=anchor,
                         fixed_valid=jnp.ones(anchor.shape, bool))


@dataclasses.dataclass(frozen=True)
class TwoStage:
  """Both stages' outputs (leading axis N cases)."""

  stage1: engine.RecoveryOutput
  stage2: engine.RecoveryOutput


def _take(tree, idx: np.ndarray):
  """Rows ``idx`` of the leading axis of every leaf."""
  return jax.tree.map(lambda a: a[jnp.asarray(idx)], tree)


class StageShapes(NamedTuple):
  """The static shapes of a run's recovery calls: cases per compiled call, padded length T and the
  two stages' suffix lengths. Calls that share them (and the defence's structure) share one compiled
  program per stage, whatever their cases, feature sets (padded to K_max), values and budgets."""

  batch: int
  length: int
  suffix1: int
  suffix2: int


def stage_shapes(prompts, answers, discouraged, cfg: V4Config, batch: int, pad_id: int = 0) -> StageShapes:
  """Shapes covering every case of ``prompts`` / ``answers`` and so every subset of them: a case's
  columns span the same suffix at any padded length (left padding), so the longest case and the
  widest span of the whole set bound any subset's."""
  p1, p2 = build_problems(prompts, answers, discouraged, cfg, pad_id)
  return StageShapes(int(batch), int(p1.tokens.shape[-1]), engine.suffix_len_for(p1), engine.suffix_len_for(p2))


def recover_two_stage(params, model_cfg, clamps: Sequence, sites: Sequence[str], prompts, answers, discouraged,
                      cfg: V4Config, key, pad_id: int = 0, batch_size: int | None = None,
                      shapes: StageShapes | None = None) -> TwoStage:
  """The v4 two-stage recovery of every case (module docstring). ``clamps``: the defence (multiply/set
  Clamps at ``sites``, all monitored).

  batch_size: cases per compiled call (None: all at once). Cases are padded to one length and one
  suffix, and the last chunk with copies of its first case, so one program per stage serves every
  chunk and every budget (budgets are traced). ``shapes`` (``stage_shapes`` of a superset of the cases)
  fixes the chunk size, length and suffixes instead, so calls on different case sets share the
  programs too. One chunk uses ``key``; with several, chunk c uses ``fold_in(key, c)`` (case i of a
  chunk then ``fold_in(that, i)``).
  """
  p1, p2 = build_problems(prompts, answers, discouraged, cfg, pad_id, None if shapes is None else shapes.length)
  sites = tuple(sites)
  spec1 = engine.RecoverySpec(model_cfg, sites, cfg.objective(1), cfg.recovery_config(1),
                              suffix_len=engine.suffix_len_for(p1) if shapes is None else shapes.suffix1,
                              semantics="live")
  spec2 = engine.RecoverySpec(model_cfg, sites, cfg.objective(2), cfg.recovery_config(2),
                              suffix_len=engine.suffix_len_for(p2) if shapes is None else shapes.suffix2,
                              semantics="live")
  n = len(prompts)
  bs = shapes.batch if shapes is not None else (n if not batch_size else min(batch_size, n))
  outs = []
  for c, i in enumerate(range(0, n, bs)):
    idx = np.arange(i, min(n, i + bs))
    idx = np.concatenate([idx, np.full(bs - len(idx), idx[0])])
    k = key if n <= bs else jax.random.fold_in(key, c)
    out1 = engine.recover_examples(spec1, params, tuple(clamps), _take(p1, idx), cfg.recovery_config(1).hparams(), k)
    q2 = with_fixed(_take(p2, idx), out1.delta)
    out2 = engine.recover_examples(spec2, params, tuple(clamps), q2, cfg.recovery_config(2).hparams(), k)
    real = min(n, i + bs) - i
    outs.append(jax.tree.map(lambda a: np.asarray(a)[:real], (out1, out2)))
  out1, out2 = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
  return TwoStage(out1, out2)


def generation_edits(defence_edits: dict, sites: Sequence[str], delta1, delta2, anchor_pos, ans_pos, ans_valid,
                     variant: str) -> dict:
  """Edits for generation with a recovered delta of ONE batch of cases, at absolute positions.

  ``faithful`` (the reference, Q12): only stage 1's delta at the anchor; ``honest``: stage 2's delta at
  the answer positions as well. delta1 [B, n_sites, 1, d], delta2 [B, n_sites, P, d]; anchor_pos [B];
  ans_pos / ans_valid [B, P] (absolute positions). The defence edits run first at each site.
  """
  adds = {}
  for j, s in enumerate(sites):
    fns = [intervene.add_at_positions_edit(delta1[:, j], jnp.asarray(anchor_pos)[:, None])]
    if variant == "honest":
      fns.append(intervene.add_at_positions_edit(delta2[:, j], jnp.asarray(ans_pos), jnp.asarray(ans_valid)))
    elif variant != "faithful":
      raise ValueError(f"generation variant {variant!r}: expected faithful or honest")
    adds[s] = fns
  return intervene.chain_edits(defence_edits, *({s: f} for s, fns in adds.items() for f in fns))
