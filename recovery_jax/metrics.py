"""Evaluation metrics of the paper's Table 1 and the reference's variants (paper-method 5.5, 7).

Host-side NumPy functions over the engine's outputs. Feature arrays are per example:
``feats`` (recovered, E_S(h_def + delta)), ``refs`` (defended reference E_S(h_def), re-encoded,
Q9) and ``masks`` (valid entries) of shape [N, ...entries] (e.g. [N, K] at one readout
position, or [N, M, K] over positions); every per-example metric reduces all axes but the first.

  act / decode drift (core)           ||c - r||_2, ||(c - r) W_dec[S]||_2 (and linf)
  reactivation (IOI / TPP)            eligible = r <= 0; reactivated = eligible & c > 0
  zero-reactivation recovery          recovered & no reactivated entry (eta = 0)
  defended-feature drift (refusal)    ||c - r|| / ||r||  (NaN where ||r|| = 0: undefined, use absolute)
  clamp-floor violation (refusal)     ||ReLU(r - c)|| / ||r||
  WMDP post-hoc drift / violation     ||c - r||, ||ReLU(c - r)|| (+ relative, direction +1)
  relative delta norm                 exact ||delta||_F / ||h_def||_F and the reference proxy ||delta|| / ||r||
  intervals                           Wilson 95% (binary) and one-sided sign test (TPP) by scipy.stats;
                                      the reference's bootstrap reproduced draw for draw (continuous)
"""

from __future__ import annotations

import math
import random
from statistics import mean
from typing import Iterable, Sequence

import numpy as np

EPS = 1e-8


def _flat(x, n: int | None = None) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape(x.shape[0], -1) if n is None else x.reshape(n, -1)


def _concat(parts) -> np.ndarray:
  """A tuple over monitored clamps of [N, ...] arrays -> [N, E] (entries concatenated)."""
  if isinstance(parts, (tuple, list)):
    return np.concatenate([_flat(p) for p in parts], axis=1)
  return _flat(parts)


def _norm(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=-1))


def relative(num: np.ndarray, ref_norm: np.ndarray) -> np.ndarray:
  """num / ||r|| where the reference norm is non-zero; NaN (undefined) where ||r|| == 0 (the usual
  case after a negative set-clamp zeroes every defended feature; paper-method Q8): report the
  absolute value there instead of dividing by the epsilon."""
  num, ref_norm = np.asarray(num, np.float64), np.asarray(ref_norm, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(ref_norm > 0, num / np.where(ref_norm > 0, ref_norm, 1.0), np.nan)


# ----------------------------------------------------------------------------------------------
# per-example feature metrics


def example_metrics(feats, refs, masks, w_dec_s=None) -> dict[str, np.ndarray]:
  """Per-example metrics [N] from recovered vs defended features (see the module docstring).

  w_dec_s: [K, d] decoder rows of the selected features (for decode drift; feats must then end in
  K). Tuples over several monitored clamps are concatenated (refusal's layers x positions x S_L),
  except for decode drift, which needs a single clamp.
  """
  c, r = _concat(feats).astype(np.float64), _concat(refs).astype(np.float64)
  m = _concat(masks).astype(bool)
  d = np.where(m, c - r, 0.0)
  rm = np.where(m, r, 0.0)
  n_val = m.sum(-1)
  floor = np.where(m, np.maximum(r - c, 0.0), 0.0)
  up = np.where(m, np.maximum(c - r, 0.0), 0.0)
  elig = m & (r <= 0)
  react = elig & (c > 0)
  pos_c = m & (c > 0)
  nv = np.maximum(n_val, 1)
  n_elig = elig.sum(-1)
  out = {
      "act_drift_l2": _norm(d),
      "act_drift_linf": np.max(np.abs(d), axis=-1, initial=0.0),
      "act_drift_rmse": np.sqrt(np.sum(d * d, -1) / nv),
      "ref_norm": _norm(rm),
      "relative_l2": relative(_norm(d), _norm(rm)),
      "floor_violation_l2": _norm(floor),
      "floor_violation_rmse": np.sqrt(np.sum(floor * floor, -1) / nv),
      "floor_violation_mean": floor.sum(-1) / nv,
      "floor_violation_relative_l2": relative(_norm(floor), _norm(rm)),
      "floor_violation_frac": np.sum(m & (np.maximum(r - c, 0.0) > 1e-6), -1) / nv,
      "violation_abs": _norm(up),
      "violation_rel": relative(_norm(up), _norm(rm)),
      "n_entries": n_val,
      "n_eligible": n_elig,
      "n_reactivated": react.sum(-1),
      "reactivated_fraction_within_eligible": react.sum(-1) / np.maximum(n_elig, 1),
      "reactivated_mass_within_eligible": np.where(react, c, 0.0).sum(-1) / np.maximum(n_elig, 1),
      "positive_fraction": pos_c.sum(-1) / nv,
      "defended_positive_fraction": np.sum(m & (r > 0), -1) / nv,
  }
  out["drift_abs"], out["drift_rel"] = out["act_drift_l2"], out["relative_l2"]
  if w_dec_s is not None:
    if isinstance(feats, (tuple, list)):
      if len(feats) != 1:
        raise ValueError("example_metrics: decode drift needs a single monitored clamp")
      feats, refs, masks = feats[0], refs[0], masks[0]
    f, rr, mm = (np.asarray(a) for a in (feats, refs, masks))
    dd = np.where(mm, f - rr, 0.0).astype(np.float64) @ np.asarray(w_dec_s, np.float64)  # [N, ..., d]
    out["decode_drift_l2"] = _norm(dd.reshape(dd.shape[0], -1))
    out["decode_drift_linf"] = np.max(np.abs(dd.reshape(dd.shape[0], -1)), axis=-1, initial=0.0)
  return out


def reactivation_summary(feats, refs, masks) -> dict[str, float]:
  """Global reactivation statistics over all examples and entries (reference
  ``compute_reactivation_metrics``; fractions and masses over valid entries)."""
  c, r = _concat(feats).astype(np.float64), _concat(refs).astype(np.float64)
  m = _concat(masks).astype(bool)
  n = max(int(m.sum()), 1)
  elig = m & (r <= 0)
  react = elig & (c > 0)
  n_elig = int(elig.sum())
  per = example_metrics(feats, refs, masks)
  return {
      "selected_feature_positive_fraction": float(np.sum(m & (c > 0)) / n),
      "selected_feature_positive_mass_mean": float(np.where(m, np.maximum(c, 0.0), 0.0).sum() / n),
      "defended_positive_fraction": float(np.sum(m & (r > 0)) / n),
      "defended_positive_mass_mean": float(np.where(m, np.maximum(r, 0.0), 0.0).sum() / n),
      "eligible_nonpositive_fraction": n_elig / n,
      "eligible_nonpositive_count": n_elig,
      "selected_feature_total_count": int(m.sum()),
      "reactivated_fraction": float(react.sum() / n),
      "reactivated_count": int(react.sum()),
      # the reference's aggregate of this name is the mean over prompts of the per-prompt fraction
      "reactivated_positive_fraction_within_eligible": float(np.mean(per["reactivated_fraction_within_eligible"])),
      "reactivated_positive_fraction_within_eligible_pooled": float(react.sum() / max(1, n_elig)),
      "reactivated_positive_mass_mean": float(np.where(react, np.maximum(c, 0.0), 0.0).sum() / n),
      "reactivated_positive_mass_mean_within_eligible": float(np.where(react, np.maximum(c, 0.0), 0.0).sum()
                                                              / max(1, n_elig)),
  }


def zero_reactivation(recovered, n_reactivated) -> np.ndarray:
  """Zero-reactivation recovery per example: recovered and no reactivated eligible entry."""
  return np.asarray(recovered, bool) & (np.asarray(n_reactivated) == 0)


def recovery_rate(recovered, valid=None) -> float:
  """recovered / valid over examples (nan when nothing is valid)."""
  rec = np.asarray(recovered, bool)
  v = np.ones_like(rec) if valid is None else np.asarray(valid, bool)
  n = int(v.sum())
  return float((rec & v).sum() / n) if n else float("nan")


# ----------------------------------------------------------------------------------------------
# delta norms


def delta_norm(delta) -> np.ndarray:
  """Frobenius norm per example: delta [N, ...] -> [N]."""
  return _norm(_flat(delta).astype(np.float64))


def relative_delta_norm(delta, h_def, eps: float = EPS) -> np.ndarray:
  """Exact relative delta norm ||delta||_F / (||h_def||_F + eps) over the same sites x positions
  (Q22): delta and h_def are [N, ...] of equal shape (engine ``h_def`` at the delta cols)."""
  return delta_norm(delta) / (_norm(_flat(h_def).astype(np.float64)) + eps)


def relative_delta_norm_proxy(delta, refs, masks, eps: float = EPS) -> np.ndarray:
  """The reference's released "relative" norm: ||delta|| / (||r|| + eps), r the defended features
  (feature-norm proxy; ``inferred_relative_delta`` = delta_norm / (l2 / relative_l2))."""
  r = np.where(_concat(masks).astype(bool), _concat(refs).astype(np.float64), 0.0)
  return delta_norm(delta) / (_norm(r) + eps)


# ----------------------------------------------------------------------------------------------
# intervals and tests


def wilson(k: int, n: int, confidence_level: float = 0.95) -> tuple[float | None, float | None, float | None]:
  """(p_hat, lo, hi): the Wilson score interval of k successes in n trials (paper-method 7: z = 1.95996..,
  ``[max(0, center - half), min(1, center + half)]``) by ``scipy.stats.binomtest(k, n).proportion_ci``;
  (None, None, None) when n <= 0; k = 0 gives lo = 0 and k = n gives hi = 1 exactly."""
  if n <= 0:
    return None, None, None
  if not 0 <= k <= n:
    raise ValueError(f"wilson: k={k} successes out of n={n}; expected 0 <= k <= n")
  import scipy.stats  # pylint: disable=import-outside-toplevel  # 0.7 s: only where intervals are computed
  ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence_level, method="wilson")
  return k / n, float(ci.low), float(ci.high)


def wilson_interval(k: int, n: int, confidence_level: float = 0.95) -> tuple[float, float]:
  """(lo, hi) Wilson interval for k successes out of n (n > 0)."""
  if n <= 0:
    raise ValueError(f"wilson_interval: n={n}: need at least one trial")
  _, lo, hi = wilson(int(k), int(n), confidence_level)
  return lo, hi


def finite_values(values: Iterable) -> list[float]:
  out = []
  for v in values:
    try:
      f = float(v)
    except (TypeError, ValueError):
      continue
    if math.isfinite(f):
      out.append(f)
  return out


def bootstrap_ci(values: Sequence, n_boot: int = 2000, seed: int = 0) -> tuple[float | None, float | None, float | None]:
  """(mean, lo, hi): the reference's percentile bootstrap, reproduced draw for draw.

  ``random.Random(seed)``; each of ``n_boot`` resamples is ``n`` draws of ``rng.choice`` over the
  finite values; lo/hi = sorted means at int(0.025 (n_boot - 1)) and int(0.975 (n_boot - 1)).
  Kept beside ``bootstrap_ci_scipy`` because the paper's tables come from exactly these draws; the two
  agree within Monte-Carlo error (tests/test_metrics.py).
  """
  xs = finite_values(values)
  if not xs:
    return None, None, None
  n = len(xs)
  idx = _choice_indices(random.Random(seed), n, n * n_boot).reshape(n_boot, n)
  # statistics.mean is the correctly rounded exact mean; so is (the draws' sum as integers over one power-of-two
  # denominator) / (denominator * n) in Python's correctly rounded int division: the same numbers, fast.
  ratios = [x.as_integer_ratio() for x in xs]  # (m, 2**e): floats are dyadic
  den = max(d for _, d in ratios)
  ints = [m * (den // d) for m, d in ratios]
  counts = np.bincount((np.arange(n_boot)[:, None] * n + idx).ravel(), minlength=n_boot * n).reshape(n_boot, n)
  if max(abs(v) for v in ints) * n < 2 ** 62:  # exact in int64
    sums = (counts @ np.asarray(ints, np.int64)).tolist()
  else:
    sums = [sum(int(c) * v for c, v in zip(row, ints) if c) for row in counts]
  boots = sorted(t / (den * n) for t in sums)
  return mean(xs), boots[int(0.025 * (n_boot - 1))], boots[int(0.975 * (n_boot - 1))]


def _choice_indices(rng: random.Random, n: int, size: int) -> np.ndarray:
  """The indices of ``size`` successive ``rng.choice`` calls on a sequence of length ``n`` (< 2**32),
  drawn in bulk: CPython's choice is ``getrandbits(k)`` (one 32-bit Mersenne word >> (32 - k),
  k = n.bit_length()) until the value is < n, and ``getrandbits(32 * m)`` is m successive words, least
  significant first."""
  k = n.bit_length()
  out = np.empty(0, np.int64)
  while out.size < size:
    m = 2 * (size - out.size) + 64  # the acceptance rate is above 1/2
    words = np.frombuffer(rng.getrandbits(32 * m).to_bytes(4 * m, "little"), "<u4")
    r = (words >> np.uint32(32 - k)).astype(np.int64)
    out = np.concatenate([out, r[r < n]])
  return out[:size]


def bootstrap_ci_scipy(values: Sequence, n_boot: int = 2000, seed: int = 0, statistic=np.mean,
                       confidence_level: float = 0.95) -> tuple[float | None, float | None, float | None]:
  """(statistic, lo, hi): ``scipy.stats.bootstrap`` percentile interval over the finite values (NumPy
  generator ``seed``: the same estimator as ``bootstrap_ci``, other draws); one value x gives (x, x, x)."""
  xs = np.asarray(finite_values(values), np.float64)
  if xs.size == 0:
    return None, None, None
  if xs.size == 1:
    return float(xs[0]), float(xs[0]), float(xs[0])
  import scipy.stats  # pylint: disable=import-outside-toplevel
  res = scipy.stats.bootstrap((xs,), statistic, n_resamples=n_boot, confidence_level=confidence_level,
                              method="percentile", rng=np.random.default_rng(seed))
  return float(statistic(xs)), float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_test_p(k: int, n: int) -> float:
  """One-sided sign test: P(X >= k) for X ~ Binomial(n, 1/2) (TPP paired comparison), by
  ``scipy.stats.binomtest``; n must be >= 1."""
  if n <= 0:
    raise ValueError(f"sign_test_p: n={n}: need at least one paired comparison")
  import scipy.stats  # pylint: disable=import-outside-toplevel
  return float(scipy.stats.binomtest(int(k), int(n), 0.5, alternative="greater").pvalue)
