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
  """scipy's Wilson interval equals paper-method 7's formula (z = 1.959963984540054, clipped to [0, 1])."""
  z = 1.959963984540054
  for k, n in ((37, 64), (23, 24), (12, 24), (1, 3)):
    ph = k / n
    center = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt((ph * (1 - ph) + z * z / (4 * n)) / n) / (1 + z * z / n)
    assert metrics.wilson(k, n) == pytest.approx((ph, max(0.0, center - half), min(1.0, center + half)), abs=1e-12)
  assert metrics.wilson(23, 24)[1:] == pytest.approx((0.797582, 0.992607), abs=1e-6)  # paper: [79.8, 99.3]
  # edges: k = 0 gives lo = 0 and k = n gives hi = 1 exactly; n = 0 gives no interval
  assert metrics.wilson_interval(0, 10)[0] == 0.0 and metrics.wilson_interval(10, 10)[1] == 1.0
  assert metrics.wilson(3, 0) == (None, None, None)
  lo, hi = metrics.wilson_interval(24, 24)
  assert lo == pytest.approx(24 / (24 + z * z)) and hi == 1.0  # closed form at p = 1
  with pytest.raises(ValueError, match="n=0"):
    metrics.wilson_interval(0, 0)
  with pytest.raises(ValueError, match="k=5 successes out of n=4"):
    metrics.wilson(5, 4)
  assert metrics.wilson(1, 2, confidence_level=0.5)[1] > metrics.wilson(1, 2)[1]  # a narrower interval


def test_bootstrap_reproduces_reference_draws():
  vals = [0.1, float("nan"), 0.7, 0.3, None, 1.2, 0.05]
  xs = [0.1, 0.7, 0.3, 1.2, 0.05]
  rng = random.Random(0)
  boots = sorted(mean(rng.choice(xs) for _ in range(len(xs))) for _ in range(2000))
  assert metrics.bootstrap_ci(vals) == (mean(xs), boots[49], boots[1949])
  m, lo, hi = metrics.bootstrap_ci_scipy(vals)
  assert lo <= m <= hi and m == pytest.approx(mean(xs))
  assert metrics.bootstrap_ci([]) == (None, None, None) == metrics.bootstrap_ci_scipy([None, float("inf")])
  assert metrics.bootstrap_ci([0.4]) == (0.4, 0.4, 0.4) == metrics.bootstrap_ci_scipy([0.4])
  assert metrics.bootstrap_ci([1.0] * 24) == (1.0, 1.0, 1.0) == metrics.bootstrap_ci_scipy([1.0] * 24)


@pytest.mark.parametrize("dist", ["lognormal", "drift_like"])
def test_reference_bootstrap_agrees_with_scipy(dist):
  """The paper's draws (random.Random(0), 2000 resamples) and scipy.stats.bootstrap (percentile, 20000
  resamples) estimate the same 2.5% / 97.5% quantiles of the bootstrap mean. Monte-Carlo error: a
  quantile estimated from B resamples has standard error sqrt(q (1 - q) / B) / f(x_q), f the density of
  the bootstrap mean (near normal, sd s): 0.0598 s at B = 2000 and 0.0189 s at B = 20000, so the
  difference has standard error 0.0627 s; we allow 4 of them (0.25 s). Quantiles at 5% / 95% instead
  (0.33 s away) fail."""
  g = np.random.default_rng(7)
  xs = (g.lognormal(0.0, 1.0, 24) if dist == "lognormal"
        else np.concatenate([g.gamma(2.0, 0.04, 22), [0.566, 0.988]])).tolist()  # paper: AdvBench drifts
  m, lo, hi = metrics.bootstrap_ci(xs)
  import scipy.stats  # pylint: disable=import-outside-toplevel
  res = scipy.stats.bootstrap((np.asarray(xs),), np.mean, n_resamples=20000, method="percentile",
                              rng=np.random.default_rng(1))
  s = float(np.std(res.bootstrap_distribution))
  tol = 4 * math.hypot(0.0598, 0.0189) * s
  assert m == pytest.approx(np.mean(xs))
  assert abs(lo - res.confidence_interval.low) < tol and abs(hi - res.confidence_interval.high) < tol
  _, slo, shi = metrics.bootstrap_ci_scipy(xs, n_boot=20000, seed=1)
  assert (slo, shi) == pytest.approx((res.confidence_interval.low, res.confidence_interval.high))


def test_sign_test():
  assert metrics.sign_test_p(20, 20) == pytest.approx(2 ** -20, rel=1e-12)
  assert metrics.sign_test_p(0, 20) == pytest.approx(1.0)
  for k in (1, 10, 15, 19):  # paper-method 7: sum_{j >= k} C(n, j) / 2^n
    assert metrics.sign_test_p(k, 20) == pytest.approx(sum(math.comb(20, j) for j in range(k, 21)) / 2 ** 20, rel=1e-12)
  with pytest.raises(ValueError, match="n=0"):
    metrics.sign_test_p(0, 0)


def test_format_table_keeps_cells():
  """outputs.format_table (tabulate, GitHub markdown): header names and cells as formatted before (floats
  .3f, numeric-looking strings as written, not re-parsed), one row per line, a separator row."""
  from recovery_jax import outputs  # pylint: disable=import-outside-toplevel
  from recovery_jax.tasks import refusal_stats  # pylint: disable=import-outside-toplevel
  rate = refusal_stats.fmt_rate(refusal_stats.rate([True] * 23 + [False]))
  text = outputs.format_table(["run", "n", "rate", "recovered"],
                              [["main", 24, 0.95833, rate], ["K", "007", "1e5", "-"]])
  lines = text.splitlines()
  cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
  assert cells[0] == ["run", "n", "rate", "recovered"] and set("".join(lines[1])) <= set("|-:")
  assert cells[2][:3] == ["main", "24", "0.958"] and cells[3] == ["K", "007", "1e5", "-"]
  assert rate.startswith("23/24 = 0.96 [W 0.80, 0.99; B") and "|".join(cells[2]).endswith(rate.replace("|", ""))
  assert len(lines) == 4 and len({len(ln) for ln in lines}) == 1  # aligned columns
  assert outputs.format_table(["a", "b"], []).splitlines()[0].split() == ["|", "a", "|", "b", "|"]
  with pytest.raises(ValueError, match="row 1 has 1 cells; expected 2"):
    outputs.format_table(["a", "b"], [[1, 2], [3]])
