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
case i uses ``fold_in(key, id_i)`` in both stages (its example id, never its place in a batch).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import batching, intervene
from recovery_jax.recovery import engine
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.tasks import refusal_judge as judge


# The v4strong optimiser settings shared by both stages (paper-method 6.4 table); each stage adds its
# own steps, learning rate and budget (``v4_stage``).
V4_STAGE = dict(lambda_act=200.0, drift_penalty="relative_mse", jacobian_probes=8, correction_steps=5,
                correction_lr=0.05, checkpoint="drift_constrained", checkpoint_tau=0.03, checkpoint_every=10,
                checkpoint_penalty_weight=80.0)


def v4_stage(projection: str, steps: int, lr: float, budget: float, **overrides) -> RecoveryConfig:
  """One stage's ``RecoveryConfig``: the v4strong settings (``V4_STAGE``, then ``overrides``); the drift
  correction steps run only in the jacobian modes."""
  kw = {**V4_STAGE, **overrides}
  if not projection.startswith("jacobian"):
    kw["correction_steps"] = 0
  return RecoveryConfig(steps=steps, lr=lr, budget=budget, projection=projection, **kw)


@dataclasses.dataclass(frozen=True)
class TwoStageConfig:
  """The two-stage recovery: one ``RecoveryConfig`` per stage (the optimiser's knobs, written once,
  in ``RecoveryConfig``) and the two objectives' layout and weights (paper-method 6.4, v4strong)."""

  stage1: RecoveryConfig = v4_stage("jacobian", 30, 0.1, 40.0)
  stage2: RecoveryConfig = v4_stage("jacobian", 120, 0.05, 40.0)
  n_ans: int = 48
  prefix_len: int = 8
  anti_len: int = 8
  w_first: float = 4.0
  w_prefix: float = 2.0
  w_anti1: float = 0.2
  w_margin: float = 0.1
  w_ans: float = 5.0
  w_anti2: float = 0.1

  def __post_init__(self):
    if self.stage1.projection != self.stage2.projection:
      raise ValueError(f"TwoStageConfig: stage projections differ ({self.stage1.projection!r} vs "
                       f"{self.stage2.projection!r})")

  @property
  def projection(self) -> str:
    return self.stage1.projection

  def with_projection(self, mode: str) -> "TwoStageConfig":
    """Both stages under projection ``mode`` (the drift correction steps dropped outside jacobian modes)."""
    one = lambda rc: dataclasses.replace(rc, projection=mode,
                                         correction_steps=rc.correction_steps if mode.startswith("jacobian") else 0)
    return dataclasses.replace(self, stage1=one(self.stage1), stage2=one(self.stage2))

  def objective(self, stage: int) -> Objective:
    if stage == 1:
      return Objective("teacher_forced", w_first=self.w_first, w_prefix=self.w_prefix, prefix_len=self.prefix_len,
                       w_anti=self.w_anti1, anti_len=self.anti_len, w_margin=self.w_margin)
    return Objective("teacher_forced", w_ans=self.w_ans, n_ans=self.n_ans, w_anti=self.w_anti2,
                     anti_len=self.anti_len)

  def recovery_config(self, stage: int) -> RecoveryConfig:
    return self.stage1 if stage == 1 else self.stage2


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
                   cfg: TwoStageConfig, pad_id: int = 0, length: int | None = None
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


class StageShapes(NamedTuple):
  """The static shapes of a run's recovery calls: cases per compiled call, padded length T and the
  two stages' suffix lengths. Calls that share them (and the defence's structure) share one compiled
  program per stage, whatever their cases, feature sets (padded to K_max), values and budgets."""

  batch: int
  length: int
  suffix1: int
  suffix2: int


def stage_shapes(prompts, answers, discouraged, cfg: TwoStageConfig, batch: int, pad_id: int = 0) -> StageShapes:
  """Shapes covering every case of ``prompts`` / ``answers`` and so every subset of them: a case's
  columns span the same suffix at any padded length (left padding), so the longest case and the
  widest span of the whole set bound any subset's."""
  p1, p2 = build_problems(prompts, answers, discouraged, cfg, pad_id)
  return StageShapes(int(batch), int(p1.tokens.shape[-1]), engine.suffix_len_for(p1), engine.suffix_len_for(p2))


def recover_two_stage(params, model_cfg, clamps: Sequence, sites: Sequence[str], prompts, answers, discouraged,
                      cfg: TwoStageConfig, key, pad_id: int = 0, batch_size: int | None = None,
                      shapes: StageShapes | None = None, ids=None, mesh=None, budgets=None) -> TwoStage:
  """The v4 two-stage recovery of every case (module docstring). ``clamps``: the defence (multiply/set
  Clamps, all monitored); ``sites``: the delta sites (the threat model; in forward order), which may
  differ from the clamps' sites: a delta upstream of a clamp passes through it (live semantics).
  budgets: [N] per-case budgets of both stages (rho under a relative budget scale; None: the stages'
  own), traced values of the same program, so a budget curve is the cases tiled over the grid.

  batch_size: cases per compiled call (None: all at once; ``batching.map_batched``). Cases are padded
  to one length and one suffix, and the last batch with copies of its last case, so one program per
  stage serves every batch and every budget (budgets are traced). ``shapes`` (``stage_shapes`` of a
  superset of the cases) fixes the batch size, length and suffixes instead, so calls on different
  case sets share the programs too. Case i uses ``fold_in(key, ids[i])`` in both stages (ids [N]: the
  cases' example ids, default 0..N-1), whatever the batch size or the device count; with a ``mesh``
  every batch is sharded over its ``data`` axis.
  """
  p1, p2 = build_problems(prompts, answers, discouraged, cfg, pad_id, None if shapes is None else shapes.length)
  sites = tuple(sites)
  spec1 = engine.RecoverySpec(model_cfg, sites, cfg.objective(1), cfg.recovery_config(1),
                              suffix_len=engine.suffix_len_for(p1) if shapes is None else shapes.suffix1,
                              semantics="live")
  spec2 = engine.RecoverySpec(model_cfg, sites, cfg.objective(2), cfg.recovery_config(2),
                              suffix_len=engine.suffix_len_for(p2) if shapes is None else shapes.suffix2,
                              semantics="live")

  case_ids = np.arange(len(prompts), dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
  per_case = budgets is not None
  if per_case:
    budgets = np.asarray(budgets, np.float32).reshape(len(prompts))

  def hp_of(stage: int, b):
    hp = cfg.recovery_config(stage).hparams()
    if b is None:
      return hp
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), b.shape), hp)._replace(budget=b)

  def one_batch(pbs, pos):
    q1, q2, b = pbs
    out1 = engine.recover_examples(spec1, params, tuple(clamps), q1, hp_of(1, b), key, ids=case_ids[pos],
                                   per_example_hp=per_case)
    out2 = engine.recover_examples(spec2, params, tuple(clamps), with_fixed(q2, out1.delta), hp_of(2, b), key,
                                   ids=case_ids[pos], per_example_hp=per_case)
    return out1, out2

  args = (p1, p2, budgets)
  if shapes is not None:  # exactly shapes.batch cases per call, even when fewer are given
    return TwoStage(*batching.map_batched(one_batch, args, shapes.batch, mesh=mesh, exact=True))
  return TwoStage(*batching.map_batched(one_batch, args, batch_size, mesh=mesh))


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
