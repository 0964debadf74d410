"""Metrics of the paper's Table 1 and the reference's variants, on hand-made arrays."""

import math
import random
from statistics import mean

import numpy as np
import pytest

from recovery_jax import metrics


def test_example_metrics_by_hand():
  # 2 examples x 3 features; example 1 has a padded (masked) feature
  r = np.array([[0.0, 0.5, -1.0], [0.0, 0.0, 9.0]])
  c = np.array([[0.2, 0.1, -1.0], [0.0, 0.3, -5.0]])
  m = np.array([[1, 1, 1], [1, 1, 0]], bool)
  w = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  ex = metrics.example_metrics(c, r, m, w)
  d0 = np.array([0.2, -0.4, 0.0])
  np.testing.assert_allclose(ex["act_drift_l2"], [np.linalg.norm(d0), 0.3])
  np.testing.assert_allclose(ex["act_drift_linf"], [0.4, 0.3])
  np.testing.assert_allclose(ex["decode_drift_l2"], [np.linalg.norm(d0 @ w), np.linalg.norm(np.array([0, 0.3, 0]) @ w)])
  # eligible: r <= 0 among valid entries; reactivated: eligible and c > 0
  np.testing.assert_array_equal(ex["n_eligible"], [2, 2])
  np.testing.assert_array_equal(ex["n_reactivated"], [1, 1])
  np.testing.assert_allclose(ex["reactivated_fraction_within_eligible"], [0.5, 0.5])
  # example 1's valid defended features are all zero: relative drift is undefined (NaN), not 0.3 / 1e-8
  np.testing.assert_allclose(ex["relative_l2"], [np.linalg.norm(d0) / np.linalg.norm(r[0]), np.nan])
  np.testing.assert_allclose(ex["violation_rel"][1], np.nan)
  assert ex["ref_norm"][1] == 0.0 and ex["act_drift_l2"][1] == pytest.approx(0.3)  # the absolute value stands
  np.testing.assert_allclose(ex["floor_violation_l2"], [0.4, 0.0])
  np.testing.assert_allclose(ex["floor_violation_relative_l2"], [0.4 / np.linalg.norm(r[0]), np.nan])
  np.testing.assert_allclose(ex["floor_violation_frac"], [1 / 3, 0.0])
  np.testing.assert_allclose(ex["violation_abs"], [0.2, 0.3])
  np.testing.assert_allclose(ex["defended_positive_fraction"], [1 / 3, 0.0])
  z = metrics.zero_reactivation([True, True], ex["n_reactivated"])
  np.testing.assert_array_equal(z, [False, False])
  np.testing.assert_array_equal(metrics.zero_reactivation([True, False], [0, 0]), [True, False])


def test_multi_layer_concatenation_matches_v4_drift():
  rng = np.random.default_rng(0)
  c = (rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 5)))
  r = (rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 5)))
  m = (np.ones((2, 4, 3), bool), np.ones((2, 4, 5), bool))
  ex = metrics.example_metrics(c, r, m)
  cc = np.concatenate([c[0].reshape(2, -1), c[1].reshape(2, -1)], 1)
  rr = np.concatenate([r[0].reshape(2, -1), r[1].reshape(2, -1)], 1)
  rel = np.linalg.norm(cc - rr, axis=1) / (np.linalg.norm(rr, axis=1) + 1e-8)
  floor = np.linalg.norm(np.maximum(rr - cc, 0), axis=1) / (np.linalg.norm(rr, axis=1) + 1e-8)
  np.testing.assert_allclose(ex["relative_l2"], rel)
  np.testing.assert_allclose(ex["floor_violation_relative_l2"], floor)
  np.testing.assert_allclose(ex["act_drift_rmse"], np.sqrt(np.mean((cc - rr) ** 2, 1)))


def test_reactivation_summary_ioi_style():
  r = np.array([[0.0, 1.0], [0.0, 0.0]])
  c = np.array([[0.5, 1.0], [0.0, 2.0]])
  s = metrics.reactivation_summary(c, r, np.ones_like(r, bool))
  assert s["eligible_nonpositive_count"] == 3 and s["reactivated_count"] == 2
  # the reference's aggregate of this name is the mean over prompts of the per-prompt fraction
  # (prompt 0: 1/1, prompt 1: 1/2); the pooled ratio 2/3 has its own name
  assert s["reactivated_positive_fraction_within_eligible"] == pytest.approx((1.0 + 0.5) / 2)
  assert s["reactivated_positive_fraction_within_eligible_pooled"] == pytest.approx(2 / 3)
  assert s["defended_positive_fraction"] == pytest.approx(0.25)
  assert s["reactivated_positive_mass_mean_within_eligible"] == pytest.approx(2.5 / 3)


def test_delta_norms():
  delta = np.ones((2, 1, 2, 4))
  h = 2 * np.ones((2, 1, 2, 4))
  np.testing.assert_allclose(metrics.relative_delta_norm(delta, h), 0.5, rtol=1e-7)
  refs, masks = np.full((2, 3), 2.0), np.ones((2, 3), bool)
  np.testing.assert_allclose(metrics.relative_delta_norm_proxy(delta, refs, masks), np.sqrt(8) / np.sqrt(12), rtol=1e-7)
  assert metrics.recovery_rate([1, 0, 1], [1, 1, 0]) == 0.5
  assert math.isnan(metrics.recovery_rate([1], [0]))


def test_wilson_interval_values():
  p, lo, hi = metrics.wilson(37, 64)
  z = 1.959963984540054
  n, ph = 64, 37 / 64
  center = (ph + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt((ph * (1 - ph) + z * z / (4 * n)) / n) / (1 + z * z / n)
  assert (p, lo, hi) == (ph, center - half, center + half)
  assert metrics.wilson_interval(0, 10)[0] == 0.0 and metrics.wilson_interval(10, 10)[1] == pytest.approx(1.0)
  assert metrics.wilson(3, 0) == (None, None, None)
  lo, hi = metrics.wilson_interval(24, 24)
  assert lo == pytest.approx(24 / (24 + z * z)) and hi == pytest.approx(1.0)  # closed form at p = 1


def test_bootstrap_reproduces_reference_draws():
  vals = [0.1, float("nan"), 0.7, 0.3, None, 1.2, 0.05]
  xs = [0.1, 0.7, 0.3, 1.2, 0.05]
  rng = random.Random(0)
  boots = sorted(mean(rng.choice(xs) for _ in range(len(xs))) for _ in range(2000))
  assert metrics.bootstrap_ci(vals) == (mean(xs), boots[49], boots[1949])
  m, lo, hi = metrics.bootstrap_ci_fast(vals)
  assert lo <= m <= hi and m == pytest.approx(mean(xs))
  assert metrics.bootstrap_ci([]) == (None, None, None)


def test_sign_test():
  assert metrics.sign_test_p(20, 20) == pytest.approx(2 ** -20)
  assert metrics.sign_test_p(0, 20) == pytest.approx(1.0)
  assert metrics.sign_test_p(15, 20) == pytest.approx(sum(math.comb(20, k) for k in range(15, 21)) / 2 ** 20)
