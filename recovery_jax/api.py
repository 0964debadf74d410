"""The researcher's API: load a model and an SAE, build a defence, recover, read one ``Verdict`` per example.

    import recovery_jax as rj

    model = rj.load_model("path/to/hf_folder")                  # or a .gguf file, or a named default
    sae = rj.load_sae("path/to/saelens_folder", model, site="blocks.4.hook_resid_pre")
    behaviour = rj.LogitDiff(correct=[" Mary", " Tom"], wrong=[" John", " Anna"])
    features = rj.top_features(model, sae, prompts, behaviour, k=16)   # or your own ids
    defence = rj.defence(sae, features, value=-5.0, mode="set")
    verdicts = rj.recover(model, defence, prompts, behaviour, config=rj.RecoveryConfig(steps=100))
    [(v.recovered, v.behaviour_defended, v.behaviour_recovered, v.rel_delta_norm, v.drift) for v in verdicts]

Everything here is a thin layer over the engine the apps run: ``recover`` builds engine problems (left-padded
prompts, the delta at the last prompt token, ``recovery.api.site_problems`` or, for a continuation,
``tasks.refusal_recovery.build_problems``), runs ``engine.recover_grid`` once (one grid point) and turns its
output into rows with the grid settings' own row builder (``experiments.grid.point_rows``), so a ``Verdict``
carries the same numbers as the IOI / unlearning app's ``results.jsonl`` row of the same run. The minimum
budget comes from ``recovery.min_budget.search``. The functional primitives underneath (``models.forward``,
``sae.core`` encode/decode, ``intervene.clamp``, ``recovery.projections``, ``recovery.optimizer``,
``recovery.engine``) stay importable; see docs/api.md and docs/engine.md.

Shapes: E examples (prompts), T padded tokens, d = d_model, K features of a clamp.

Size: the front door keeps loaders, defence, the three behaviours, ``recover`` and ``Verdict`` in one
module, so ``import recovery_jax as rj`` shows the whole surface in one place; each part is a few lines
over the modules named above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import intervene
from recovery_jax.errors import UserError
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig
from recovery_jax.sae.config import SAEConfig


# ----------------------------------------------------------------------------------------------
# model and SAE


class Model(NamedTuple):
  """A loaded model: ``params`` (pytree of jax arrays), static ``cfg`` and a ``tokenizers.Tokenizer``
  (None when the files carry none: pass token ids then)."""

  params: Any
  cfg: ModelConfig
  tokenizer: Any


class SAE(NamedTuple):
  """A loaded SAE: ``params`` in SAELens names (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``,
  ``b_dec``, ``threshold``) as jax arrays and its ``SAEConfig`` (``cfg.hook_name``: the site it is used at)."""

  params: dict
  cfg: SAEConfig

  @property
  def site(self) -> str:
    return self.cfg.hook_name


def load_model(name_or_path: str, *, processing: str = "", dtype=jnp.float32, seed: int = 0) -> Model:
  """A HF folder (``config.json`` + safetensors, ``tokenizer.json``), a ``.gguf`` file, a named default
  (``smollm2-135m-instruct``, ``gemma3-270m``) or a tiny random model (``tiny-random-llama``; weights from
  ``seed``) -> ``Model`` (``models.loading.load_model``). ``processing="transformer_lens"`` folds GPT-2's
  weights as TransformerLens does (for SAEs trained on TL activations, e.g. gpt2-small-res-jb)."""
  from recovery_jax.models import loading  # pylint: disable=import-outside-toplevel
  try:
    params, cfg, tok = loading.load_model(name_or_path, dtype=dtype, seed=seed)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"load_model({name_or_path!r}): {e}") from e
  if processing == "transformer_lens":
    from recovery_jax.models import processing as proc  # pylint: disable=import-outside-toplevel
    params = proc.process_like_transformer_lens(params, cfg)
  elif processing:
    raise UserError(f"load_model: processing={processing!r}: expected '' or 'transformer_lens'")
  return Model(params, cfg, tok)


def load_sae(path: str, model: Model, site: str | None = None, *, override: bool = False, **kw) -> SAE:
  """An SAE folder (SAELens, Gemma Scope, sparsify, Llama Scope, dictionary_learning; ``sae.formats.load_sae``),
  or a model name whose shipped SAE at ``site`` is wanted, checked against ``model`` and ``site`` (default: the
  file's ``hook_name``): d_in, hook name, model name (``override=True`` turns name mismatches into warnings)
  -> ``SAE``."""
  from recovery_jax.sae import formats  # pylint: disable=import-outside-toplevel
  try:
    params, cfg = formats.load_sae(path, model_cfg=model.cfg, site=site, override=override, **kw)
  except (formats.SAEFileError, formats.SAECompatibilityError, FileNotFoundError, ValueError) as e:
    raise UserError(f"load_sae({str(path)!r}, site={site!r}): {e}") from e
  return SAE(jax.tree.map(jnp.asarray, params), cfg)


# ----------------------------------------------------------------------------------------------
# defence


@dataclasses.dataclass(frozen=True)
class Defence:
  """One or more SAE clamps (``intervene.Clamp``: static ``ClampSpec`` + SAE params + feature ids padded to
  K with a mask + value), applied together; ``forward()`` is the defended forward function."""

  clamps: tuple

  @property
  def sites(self) -> tuple[str, ...]:
    """The clamp sites, each once, in the order given."""
    return tuple(dict.fromkeys(c.site for c in self.clamps))

  def forward(self, forward_fn=None):
    """``intervene.clamp(forward_fn)``: the same signature as ``models.transformer.forward`` (default)."""
    if forward_fn is None:
      from recovery_jax.models import transformer  # pylint: disable=import-outside-toplevel
      forward_fn = transformer.forward
    return intervene.clamp(forward_fn, self.clamps)

  def __add__(self, other: "Defence") -> "Defence":
    """Both defences at once (clamps sharing a site run in order)."""
    return Defence(self.clamps + other.clamps)


def defence(sae: SAE, features, *, value: float = 0.0, mode: str = "set", site: str | None = None,
            positive_only: bool = True, error_term: str = "keep", error_grad: str = "pass",
            k_max: int | None = None) -> Defence:
  """A clamp of ``features`` (ids [K] in [0, d_sae)) of ``sae`` at ``site`` (default: the SAE's site).

  mode (``intervene.CLAMP_MODES``): ``set`` (z'_i = value; the paper's IOI defence: -5), ``multiply``
  (z'_i = value * z_i; > 1 amplifies, as the refusal defence does) or ``zero``. ``positive_only``: only active
  features (z_i > 0) are changed. ``error_term``: ``keep`` (x' = x + D(z') - D(z), the paper) or ``drop`` (the
  SAE as a bottleneck, x' = D(z')). ``k_max`` pads the ids (several defences of one compiled shape).
  Combine defences with ``+``.
  """
  site = site or sae.site
  if not site:
    raise UserError("defence: the SAE records no hook_name; pass site='blocks.L.hook_resid_pre' (or similar)")
  try:
    spec = intervene.ClampSpec(site=site, sae_cfg=sae.cfg, mode=mode, positive_only=positive_only,
                               error_term=error_term, error_grad=error_grad)
  except ValueError as e:
    raise UserError(f"defence: {e}") from e
  ids = np.asarray(features).reshape(-1)
  if ids.size == 0:
    raise UserError("defence: no features given; expected at least one SAE feature id")
  return Defence((intervene.make_clamp(spec, sae.params, ids, value, k_max=k_max),))


# ----------------------------------------------------------------------------------------------
# behaviours


def _token_id(tok, v, what: str) -> int:
  """A token id, or the single token of a string (encoded without special tokens)."""
  if isinstance(v, (int, np.integer)):
    return int(v)
  if tok is None:
    raise UserError(f"{what}: {v!r} is text but the model has no tokenizer; pass token ids")
  ids = tok.encode(v, add_special_tokens=False).ids
  if len(ids) != 1:
    raise UserError(f"{what}: {v!r} is {len(ids)} tokens {ids}; expected exactly one (a leading space often "
                    "makes a word one token)")
  return int(ids[0])


def _per_example(values, n: int, what: str) -> list:
  values = list(values)
  if len(values) != n:
    raise UserError(f"{what}: {len(values)} entries for {n} prompts; expected one per prompt")
  return values


@dataclasses.dataclass(frozen=True)
class LogitDiff:
  """logit[correct] - logit[wrong] at the last prompt token (IOI: correct = IO name, wrong = S name).
  correct / wrong: one token (id or single-token string) per prompt. Present when > 0; the defence works
  on an example when it takes it to <= 0 (``valid``); recovered when > 0 again."""

  correct: Sequence
  wrong: Sequence

  def objective(self) -> Objective:
    return Objective("logit_diff")

  def targets(self, tok, n: int) -> dict:
    pos = [_token_id(tok, v, "LogitDiff.correct") for v in _per_example(self.correct, n, "LogitDiff.correct")]
    neg = [_token_id(tok, v, "LogitDiff.wrong") for v in _per_example(self.wrong, n, "LogitDiff.wrong")]
    return {"pos": np.asarray(pos, np.int32), "neg": np.asarray(neg, np.int32)}

  def threshold(self, before: np.ndarray) -> np.ndarray:
    return np.zeros_like(before)


@dataclasses.dataclass(frozen=True)
class AnswerChoice:
  """The answer among options at the last prompt token: ``choices`` [E, C] (ids or single-token strings;
  C >= 2), ``gold`` [E] (index into a row's choices). ``loss``: ``margin`` (l[gold] - mean of the other
  choices' logits, the engine's ``choice_margin``) or ``ce`` (log-softmax over the choices at gold,
  ``choice_ce``). Present when the score exceeds ``threshold`` (margin: 0; ce: log(1/2), i.e. gold holds
  more than half the choices' probability); valid / recovered as for ``LogitDiff``."""

  choices: Sequence
  gold: Sequence
  loss: str = "margin"

  def __post_init__(self):
    if self.loss not in ("margin", "ce"):
      raise UserError(f"AnswerChoice.loss={self.loss!r}: expected 'margin' or 'ce'")

  def objective(self) -> Objective:
    return Objective("choice_margin" if self.loss == "margin" else "choice_ce")

  def targets(self, tok, n: int) -> dict:
    rows = _per_example(self.choices, n, "AnswerChoice.choices")
    ids = [[_token_id(tok, v, f"AnswerChoice.choices[{i}]") for v in r] for i, r in enumerate(rows)]
    if len({len(r) for r in ids}) != 1 or len(ids[0]) < 2:
      raise UserError(f"AnswerChoice.choices: every prompt needs the same number (>= 2) of options; got "
                      f"{sorted({len(r) for r in ids})}")
    gold = np.asarray(_per_example(self.gold, n, "AnswerChoice.gold"), np.int64)
    if ((gold < 0) | (gold >= len(ids[0]))).any():
      raise UserError(f"AnswerChoice.gold: {gold.tolist()} must index the {len(ids[0])} choices")
    return {"choices": np.asarray(ids, np.int32), "gold": gold.astype(np.int32)}

  def threshold(self, before: np.ndarray) -> np.ndarray:
    return np.full_like(before, 0.0 if self.loss == "margin" else math.log(0.5))


@dataclasses.dataclass(frozen=True)
class Continuation:
  """A target continuation after each prompt, teacher-forced: the mean log-probability of its tokens
  (``targets``: text or ids per prompt; at most ``max_tokens`` are scored). The defence works on an example
  when it lowers that score by more than ``margin`` nats (``valid``: defended <= before - margin); recovered
  when the score is back above before - margin. The delta sits at the last prompt token (the position that
  predicts the first target token); drift is monitored over the target's positions."""

  targets: Sequence
  margin: float = 1.0
  max_tokens: int = 32

  def __post_init__(self):
    if not self.margin > 0:
      raise UserError(f"Continuation.margin={self.margin}: expected > 0 (nats)")
    if self.max_tokens < 1:
      raise UserError(f"Continuation.max_tokens={self.max_tokens}: expected >= 1")

  def target_ids(self, tok, n: int) -> list[list[int]]:
    out = []
    for i, t in enumerate(_per_example(self.targets, n, "Continuation.targets")):
      if isinstance(t, str):
        if tok is None:
          raise UserError("Continuation.targets: text given but the model has no tokenizer; pass token ids")
        ids = tok.encode(t, add_special_tokens=False).ids
      else:
        ids = [int(v) for v in t]
      if not ids:
        raise UserError(f"Continuation.targets[{i}]: {t!r} has no tokens; expected a non-empty continuation")
      out.append(ids[:self.max_tokens])
    return out

  def objective(self, n_tokens: int) -> Objective:
    return Objective("teacher_forced", w_ans=1.0, n_ans=n_tokens)

  def threshold(self, before: np.ndarray) -> np.ndarray:
    return before - self.margin


# ----------------------------------------------------------------------------------------------
# verdicts


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What recovery did to one example (docs/api.md has the table). Behaviour values are the behaviour's
  score (logit difference; choice margin or log-probability; the continuation's mean log-probability)."""

  example: int  # index of the prompt
  valid: bool  # present before the defence and suppressed by it (the examples a recovery rate counts)
  recovered: bool  # the behaviour is back under the defence + delta (never when diverged)
  diverged: bool  # a non-finite objective, gradient or delta occurred (results void)
  behaviour_before: float  # undefended score
  behaviour_defended: float  # under the defence
  behaviour_recovered: float  # under the defence + the recovered delta
  threshold: float  # the score above which the behaviour counts as present
  delta_norm: float  # ||delta||_F of this example's delta (the shared delta when shared=True)
  rel_delta_norm: float  # ||delta||_F / ||h_def||_F, the defended residual at the delta sites x positions
  budget_bound: float  # the bound on ||delta||_F (rho * ||h_def||_F under a relative budget)
  steps_at_budget: int  # optimisation steps that ended on the budget's boundary
  drift: float  # ||c - r||_2 over the clamped features: c recovered, r defended (monitored positions)
  drift_rel: float  # drift / ||r||_2 (NaN where ||r|| = 0, e.g. every clamped feature set to <= 0)
  defended_feature_norm: float  # ||r||_2
  pre_drift: float | None  # ||pre_S(h_def + delta) - pre_S(h_def)||_2, the clamped pre-activations (one site)
  decode_drift: float | None  # ||(c - r) W_dec[S]||_2 (one monitored clamp)
  n_reactivated: int  # clamped entries inactive under the defence (r <= 0) that the delta turned on (c > 0)
  reactivated_fraction: float  # n_reactivated / entries with r <= 0
  min_budget: float | None  # smallest relative budget rho found to recover it (inf: none); None: not searched

  @classmethod
  def from_row(cls, row: dict, threshold: float, min_budget: float | None = None) -> "Verdict":
    """A verdict from a grid row (``experiments.grid.point_rows``; the app's results.jsonl fields)."""
    opt = lambda k: None if row.get(k) is None else float(row[k])
    return cls(example=int(row["example"]), valid=bool(row["valid"]), recovered=bool(row["recovered"]),
               diverged=bool(row["diverged"]), behaviour_before=float(row["base"]),
               behaviour_defended=float(row["defended"]), behaviour_recovered=float(row["recovered_score"]),
               threshold=float(threshold), delta_norm=float(row["delta_norm"]),
               rel_delta_norm=float(row["rel_delta_norm"]), budget_bound=float(row["budget_bound"]),
               steps_at_budget=int(row["steps_at_budget"]), drift=float(row["act_drift_l2"]),
               drift_rel=float(row["act_drift_rel"]), defended_feature_norm=float(row["ref_norm"]),
               pre_drift=opt("pre_act_drift_l2"), decode_drift=opt("decode_drift_l2"),
               n_reactivated=int(row["n_reactivated"]),
               reactivated_fraction=float(row["reactivated_fraction_within_eligible"]), min_budget=min_budget)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def table(verdicts: Sequence[Verdict]) -> str:
  """A short markdown table of verdicts (one line each) and the recovery rate over valid examples."""
  head = "| example | valid | recovered | before | defended | recovered score | rel delta | drift | min rho |"
  lines = [head, "|" + "---|" * 9]
  for v in verdicts:
    mb = "" if v.min_budget is None else f"{v.min_budget:.3g}"
    lines.append(f"| {v.example} | {v.valid} | {v.recovered}{' (diverged)' if v.diverged else ''} | "
                 f"{v.behaviour_before:.3f} | {v.behaviour_defended:.3f} | {v.behaviour_recovered:.3f} | "
                 f"{v.rel_delta_norm:.3f} | {v.drift:.3f} | {mb} |")
  valid = [v for v in verdicts if v.valid]
  lines.append(f"\nrecovered {sum(v.recovered for v in valid)}/{len(valid)} valid examples "
               f"({len(verdicts)} prompts)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# prompts -> engine problems


def encode_prompts(model: Model, prompts, *, bos: bool | None = None) -> list[list[int]]:
  """Token ids per prompt: texts are encoded without special tokens (BOS prepended when ``bos``, default:
  Gemma models, as the IOI setting does); ``(tokens [E, T], attention_mask [E, T])`` arrays give each row's
  real tokens; a list of id lists is taken as it is."""
  if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
    toks, mask = np.asarray(prompts[0]), np.asarray(prompts[1], bool)
    if toks.shape != mask.shape:
      raise UserError(f"prompts: tokens {toks.shape} and attention_mask {mask.shape} differ in shape")
    rows = [toks[i][mask[i]].tolist() for i in range(len(toks))]
  else:
    rows = []
    for i, p in enumerate(prompts):
      if isinstance(p, str):
        if model.tokenizer is None:
          raise UserError("prompts: text given but the model has no tokenizer (no tokenizer.json); pass token ids")
        ids = model.tokenizer.encode(p, add_special_tokens=False).ids
        if bos if bos is not None else model.cfg.is_gemma:
          ids = [model.cfg.bos_token_id] + ids
      else:
        ids = [int(t) for t in p]
      rows.append(ids)
  if not rows:
    raise UserError("prompts: no prompts given")
  for i, r in enumerate(rows):
    if not r:
      raise UserError(f"prompts[{i}] has no tokens")
  return rows


def _left_pad(rows, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  t = max(len(r) for r in rows)
  toks = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    toks[i, t - len(r):] = r
    mask[i, t - len(r):] = True
  return toks, mask


def build_problems(model: Model, rows, behaviour, *, shared: bool = False):
  """(stacked engine problems, Objective): ``shared`` -> 1 problem of E rows (one delta for every prompt, as
  the reference IOI); else E problems of 1 row. Left-padded with the model's pad id; positions count real
  tokens only."""
  from recovery_jax.recovery import api as site_api  # pylint: disable=import-outside-toplevel
  pad = model.cfg.pad_token_id or 0
  n = len(rows)
  if isinstance(behaviour, Continuation):
    from recovery_jax.tasks import refusal_recovery  # pylint: disable=import-outside-toplevel
    answers = behaviour.target_ids(model.tokenizer, n)
    n_tok = max(len(a) for a in answers)
    layout = refusal_recovery.TwoStageConfig(n_ans=n_tok, prefix_len=1, anti_len=1)
    problems, _ = refusal_recovery.build_problems(rows, answers, [], layout, pad_id=pad)  # [E, 1, ...]
    site_api.check_prompts(problems.tokens[:, 0], problems.attention_mask[:, 0], model_cfg=model.cfg)
    if shared:
      problems = jax.tree.map(lambda a: a[:, 0][None], problems)
    return problems, behaviour.objective(n_tok)
  if not isinstance(behaviour, (LogitDiff, AnswerChoice)):
    raise UserError(f"behaviour: {type(behaviour).__name__} is not LogitDiff, AnswerChoice or Continuation")
  toks, mask = _left_pad(rows, pad)
  end = toks.shape[1] - 1
  site_api.check_prompts(toks, mask, model_cfg=model.cfg)
  return site_api.site_problems(toks, mask, end, end, behaviour.targets(model.tokenizer, n), shared=shared), \
      behaviour.objective()


def _delta_sites(model: Model, defence: Defence, delta_sites) -> tuple[str, ...]:
  from recovery_jax.models import sites as sites_lib  # pylint: disable=import-outside-toplevel
  sites = defence.sites if delta_sites is None else ((delta_sites,) if isinstance(delta_sites, str)
                                                     else tuple(delta_sites))
  n = model.cfg.n_layers
  try:
    return tuple(sorted(dict.fromkeys(sites), key=lambda s: sites_lib.visit_key(s, n)))
  except ValueError as e:
    raise UserError(f"delta_sites: {e}") from e


# ----------------------------------------------------------------------------------------------
# recovery


def top_features(model: Model, sae: SAE, prompts, behaviour, k: int, *, site: str | None = None,
                 bos: bool | None = None) -> np.ndarray:
  """The top-``k`` features of ``sae`` by attribution to ``behaviour`` at the last prompt token (the IOI
  setting's selection, ``features.attribution_scores`` + ``top_positive``): ids [<= k] int32. For
  ``LogitDiff`` and ``AnswerChoice``."""
  from recovery_jax import features  # pylint: disable=import-outside-toplevel
  from recovery_jax.recovery import objectives as obj_lib  # pylint: disable=import-outside-toplevel
  if isinstance(behaviour, Continuation):
    raise UserError("top_features: attribution reads one position; use LogitDiff or AnswerChoice (or pass the "
                    "defence's feature ids yourself)")
  rows = encode_prompts(model, prompts, bos=bos)
  toks, mask = _left_pad(rows, model.cfg.pad_token_id or 0)
  targets = jax.tree.map(jnp.asarray, behaviour.targets(model.tokenizer, len(rows)))
  obj = behaviour.objective()
  score = lambda logits: obj_lib.row_scores(obj, logits[:, None], targets)  # logits [E, V] -> [E]
  attr = features.attribution_scores(model.params, model.cfg, sae.params, sae.cfg, site or sae.site,
                                     jnp.asarray(toks), jnp.asarray(mask), toks.shape[1] - 1, score)
  return np.asarray(features.top_positive(attr, k))


def recover(model: Model, defence: Defence, prompts, behaviour, *, config: RecoveryConfig = RecoveryConfig(),
            shared: bool = False, delta_sites: str | Sequence[str] | None = None, semantics: str = "frozen",
            min_budget: Sequence[float] | None = None, bisect_steps: int = 4, key=None,
            bos: bool | None = None) -> list[Verdict]:
  """Recovers ``behaviour`` on every prompt under ``defence``; one ``Verdict`` per prompt, in order.

  prompts: texts, id lists, or ``(tokens [E, T], attention_mask [E, T])``. behaviour: ``LogitDiff``,
  ``AnswerChoice`` or ``Continuation``. config: the optimiser (steps, lr, budget and ``budget_scale``,
  ``projection``: none | encoder | encoder_exact | jacobian | jacobian_exact, drift penalties, checkpoint).
  shared: one delta [n_sites, 1, d] for all prompts (the reference IOI) instead of one per prompt.
  delta_sites: where delta is added (default: the defence's sites; the residual entering a clamp, e.g.
  ``blocks.3.hook_resid_post`` for a clamp at ``blocks.4.hook_resid_pre``, makes delta pass the SAE).
  semantics: ``frozen`` | ``live`` (several delta sites; docs/engine.md). min_budget: a grid of relative
  budgets rho: each example's smallest recovering rho (``recovery.min_budget.search``, then
  ``bisect_steps`` bisections; per-prompt deltas only). key: PRNG key (default ``key(0)``); example i uses
  ``fold_in(key, i)`` (only the Jacobian projections draw from it).
  """
  from recovery_jax.experiments import grid  # pylint: disable=import-outside-toplevel
  from recovery_jax.recovery import engine  # pylint: disable=import-outside-toplevel
  from recovery_jax.recovery import min_budget as min_budget_lib  # pylint: disable=import-outside-toplevel
  if not defence.clamps:
    raise UserError("recover: the defence has no clamps")
  if min_budget is not None and shared:
    raise UserError("recover: min_budget needs one delta per prompt (shared=False)")
  rows = encode_prompts(model, prompts, bos=bos)
  problems, objective = build_problems(model, rows, behaviour, shared=shared)
  try:
    spec = engine.RecoverySpec(model_cfg=model.cfg, delta_sites=_delta_sites(model, defence, delta_sites),
                               objective=objective, config=config, suffix_len=engine.suffix_len_for(problems),
                               semantics=semantics)
  except ValueError as e:
    raise UserError(f"recover: {e}") from e
  key = jax.random.key(0) if key is None else (key if isinstance(key, jax.Array) else jnp.asarray(key))
  clamps = tuple(intervene.stack_clamps([c]) for c in defence.clamps)  # one grid point
  hp = jax.tree.map(lambda a: a[None], config.hparams())
  out = engine.recover_grid(spec, model.params, clamps, problems, hp, key[None])
  res = jax.tree.map(np.asarray, grid.unit_result(spec, clamps, out))

  thr = np.asarray(behaviour.threshold(np.asarray(res["rows_base"][0], np.float64).reshape(-1)))  # [E]
  ctx = grid.Grid(title="", header="", params=None, problems=None, spec=None, clamps=None,
                  valid=lambda rb, rd: (rb > thr) & (rd <= thr), recovered=lambda rr: rr > thr,
                  examples=[{} for _ in rows])
  point = {"point_id": 0, "grid_id": 0, "mode": config.projection, "variant": "shared" if shared else "per_prompt"}
  row_list, _ = grid.point_rows(ctx, point, res, 0, budget_scale=config.budget_scale)

  mins = [None] * len(rows)
  if min_budget is not None:
    rel = dataclasses.replace(spec, config=config.replace(budget_scale="relative"))
    found = min_budget_lib.search(rel, model.params, defence.clamps, problems, key, min_budget,
                                  lambda r: np.asarray(r).reshape(-1) > thr, bisect_steps=bisect_steps)
    mins = [float(v) for v in found.min_rho]
  return [Verdict.from_row(r, thr[i], mins[i]) for i, r in enumerate(row_list)]
