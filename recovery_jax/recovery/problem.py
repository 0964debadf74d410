"""The statement of a recovery: static ``RecoverySpec``, the ``Problem`` arrays, the output type,
and host-side checks of problems against a spec (see ``engine`` for the semantics)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovery_jax import intervene
from recovery_jax.intervene import Clamp
from recovery_jax.models import sites as sites_lib
from recovery_jax.models.config import ModelConfig
from recovery_jax.recovery import objectives as obj_lib
from recovery_jax.recovery import optimizer as opt_lib
from recovery_jax.recovery.objectives import Objective
from recovery_jax.recovery.optimizer import RecoveryConfig

Array = jax.Array
SEMANTICS = ("frozen", "live")


@dataclasses.dataclass(frozen=True)
class RecoverySpec:
  """Static structure of a recovery (the jit cache key together with the clamps' specs and array
  shapes).

  delta_sites: residual sites carrying the recovery variable, in forward order.
  semantics: ``frozen`` or ``live`` (module docstring).
  suffix_len: static number of columns recomputed from the cached prefix (None: full recompute).
  config: RecoveryConfig; its traced numbers are ignored here (see ``RecoveryConfig.canonical``).
  remat: rematerialise each scanned layer in the step's backward pass (``transformer.forward(remat=...)``:
    False, True / "full", or "dots"): the same gradients, without saving a copy of every layer's
    weights per step. Default "dots" (matmul outputs kept, the rest recomputed): the measured best on
    CPU, where the saved weight copies are a fixed cost per step that no batch amortises (IOI-shaped
    SmolLM2 step at batch 4: 147 ms off, 112 ms dots; docs/benchmarks.md).
  """

  model_cfg: ModelConfig
  delta_sites: tuple[str, ...]
  objective: Objective
  config: RecoveryConfig
  suffix_len: int | None = 1
  semantics: str = "frozen"
  remat: bool | str = "dots"

  def __post_init__(self):
    n = self.model_cfg.n_layers
    if not self.delta_sites:
      raise ValueError("RecoverySpec.delta_sites is empty")
    keys = [sites_lib.visit_key(s, n) for s in self.delta_sites]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
      raise ValueError(f"RecoverySpec.delta_sites {self.delta_sites} must be distinct and in forward order")
    if self.semantics not in SEMANTICS:
      raise ValueError(f"RecoverySpec.semantics={self.semantics!r}: expected one of {SEMANTICS}")
    if self.suffix_len is not None:
      s0 = sites_lib.parse_site(self.delta_sites[0], n)
      if s0.hook not in ("hook_resid_pre", "hook_resid_post"):
        raise ValueError(f"prefix caching starts at a resid_pre/resid_post site, got {self.delta_sites[0]!r};"
                         " use suffix_len=None")
      if self.suffix_len < 1:
        raise ValueError(f"RecoverySpec.suffix_len={self.suffix_len}: expected >= 1 or None")
    if self.objective.kind == "probe_logit":
      raise ValueError("probe_logit objectives use recovery.probe, not the transformer engine")

  @property
  def start_layer(self) -> int:
    s0 = sites_lib.parse_site(self.delta_sites[0], self.model_cfg.n_layers)
    return s0.layer if s0.hook == "hook_resid_pre" else s0.layer + 1

  def key_of(self, site: str) -> tuple[int, int]:
    return sites_lib.visit_key(site, self.model_cfg.n_layers)

  def canonical(self) -> "RecoverySpec":
    return dataclasses.replace(self, config=self.config.canonical())


def monitored(clamps: Sequence[Clamp]) -> tuple[int, ...]:
  """Indices of the clamps whose features the engine tracks."""
  return tuple(i for i, c in enumerate(clamps) if c.spec.monitor)


class Problem(NamedTuple):
  """Arrays of one problem (B rows sharing a delta [n_sites, P, d]).

  tokens [B, T] int; attention_mask [B, T] bool; positions [B, T] int (absolute);
  delta_cols / delta_valid [B, P]; readout_cols [B, R]; monitor_cols / monitor_valid [B, M];
  targets: objective targets (dict of [B, ...]); row_weight [B] float (objective row weights);
  fixed_delta [n_sites, Pf, d] with fixed_cols / fixed_valid [B, Pf], or None (no earlier stage).
  """

  tokens: Array
  attention_mask: Array
  positions: Array
  delta_cols: Array
  delta_valid: Array
  readout_cols: Array
  monitor_cols: Array
  monitor_valid: Array
  targets: dict
  row_weight: Array
  fixed_delta: Array | None = None
  fixed_cols: Array | None = None
  fixed_valid: Array | None = None


class RecoveryOutput(NamedTuple):
  """Result of one problem. Row arrays are [B]; features are tuples over monitored clamps of
  [B, M, K]; history holds per-step arrays [steps] (``rows``: [steps, B])."""

  delta: Array  # [n_sites, P, d] selected delta
  delta_last: Array  # final iterate
  history: dict
  objective_base: Array
  rows_base: Array
  objective_defended: Array
  rows_defended: Array
  objective: Array  # recovered (at the selected delta)
  rows: Array
  feats: tuple
  refs: tuple
  masks: tuple
  drift_rel: Array
  best_step: Array
  h_def: Array  # [n_sites, B, P, d]
  objective_last: Array  # at the final iterate (differs from ``objective`` with checkpoint selection)
  drift_rel_last: Array
  diverged: Array  # [] bool: a non-finite objective or delta occurred (results are then void)
  budget: Array  # [] the bound on ||delta||_F in the residual's units (``optimizer.absolute_budget``)



def gather_cols(x: Array, cols: Array) -> Array:
  """x [B, T, ...] at cols [B, C] -> [B, C, ...] (cols clipped into range)."""
  cols = jnp.clip(cols, 0, x.shape[1] - 1)
  idx = cols.reshape(cols.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def suffix_len_for(problems: Problem) -> int:
  """Smallest static suffix covering every problem's delta, readout and monitor columns
  (host side; ``problems`` may carry leading stack axes)."""
  dc, dv = np.asarray(problems.delta_cols), np.asarray(problems.delta_valid, bool)
  rc = np.asarray(problems.readout_cols)
  mc, mv = np.asarray(problems.monitor_cols), np.asarray(problems.monitor_valid, bool)
  lead = dc.shape[:-2]  # problem axes; the row axis B is shared by the suffix of one problem
  flat = lambda a: a.reshape(int(np.prod(lead, dtype=int)), -1)
  big = np.iinfo(np.int32).max
  start = np.minimum(np.where(flat(dv), flat(dc), big).min(-1), flat(rc).min(-1))
  end = np.maximum(np.maximum(np.where(flat(dv), flat(dc), -1).max(-1), flat(rc).max(-1)),
                   np.where(flat(mv), flat(mc), -1).max(-1))
  return int((end - start).max() + 1)


def check_problems(spec: RecoverySpec, clamps: Sequence[Clamp], problems: Problem) -> None:
  """Host-side checks of concrete problem arrays against the spec (clear errors instead of a
  silently wrong column): clamp sites, SAE widths, and a suffix that covers every column."""
  n = spec.model_cfg.n_layers
  for c in clamps:
    sites_lib.parse_site(c.site, n)
  intervene.check_clamps(clamps, spec.model_cfg.d_model)
  if spec.suffix_len is None or isinstance(problems.delta_cols, jax.core.Tracer):
    return
  need = suffix_len_for(problems)
  if need > spec.suffix_len:
    raise ValueError(f"RecoverySpec.suffix_len={spec.suffix_len} is too short: the problems' delta, readout and "
                     f"monitor columns span {need} columns from the first delta/readout column; use "
                     f"suffix_len={need} (engine.suffix_len_for) or None")


def output_of(res: opt_lib.OptResult, rows_base, rows_defended, masks, h_def, row_weight, budget) -> RecoveryOutput:
  """RecoveryOutput from an optimiser result and the delta-free quantities (engine and probe path)."""
  return RecoveryOutput(
      delta=res.delta, delta_last=res.delta_last, history=res.history,
      objective_base=obj_lib.weighted_mean(rows_base, row_weight), rows_base=rows_base,
      objective_defended=obj_lib.weighted_mean(rows_defended, row_weight), rows_defended=rows_defended,
      objective=res.objective, rows=res.rows, feats=res.feats, refs=res.refs, masks=masks,
      drift_rel=res.drift_rel, best_step=res.best_step, h_def=h_def, objective_last=res.objective_last,
      drift_rel_last=res.drift_rel_last, diverged=res.diverged, budget=budget)
