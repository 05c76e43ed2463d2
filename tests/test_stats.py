"""Confidence intervals against known values."""

import math

import numpy as np
import pytest

from research import stats


@pytest.mark.parametrize(
  "k, n, low, high",
  [
    # Reference values: Wilson score interval, z = 1.96 (e.g. statsmodels proportion_confint).
    (0, 10, 0.0, 0.27753),
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
  ],
)
def test_wilson_known_values(k, n, low, high):
  ci = stats.wilson(k, n)
  assert ci.estimate == pytest.approx(k / n)
  assert ci.low == pytest.approx(low, abs=2e-5)
  assert ci.high == pytest.approx(high, abs=2e-5)


@pytest.mark.parametrize("k, n", [(81, 263), (1, 3), (999, 1000)])
def test_wilson_bounds_solve_the_score_equation(k, n):
  # The bounds are the p with (k/n - p)^2 = z^2 p (1 - p) / n.
  ci = stats.wilson(k, n)
  for p in (ci.low, ci.high):
    assert (k / n - p) ** 2 == pytest.approx(stats.Z95**2 * p * (1 - p) / n, rel=1e-9, abs=1e-15)
  assert ci.low < k / n < ci.high


def test_wilson_no_trials_is_nan():
  assert math.isnan(stats.wilson(0, 0).estimate)


def test_bootstrap_mean_covers_the_mean():
  values = np.random.default_rng(0).normal(3.0, 1.0, 400)
  ci = stats.bootstrap_mean(values)
  assert ci.low < values.mean() < ci.high
  assert ci.high - ci.low == pytest.approx(2 * 1.96 / 20, rel=0.25)
  assert math.isnan(stats.bootstrap_mean([np.nan]).estimate)


def test_mcnemar_exact_textbook():
  # 1 pair discordant one way, 9 the other: 2 * (1 + 10) / 2^10.
  a = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 4
  b = [False] * 1 + [True] * 9 + [True] * 5 + [False] * 4
  assert stats.mcnemar_exact(a, b) == pytest.approx(0.021484375, abs=1e-15)
  assert stats.mcnemar_exact(b, a) == pytest.approx(0.021484375, abs=1e-15)
  # Symmetric discordance, and none at all.
  assert stats.mcnemar_exact([True, False, True, False], [False, True, False, True]) == 1.0
  assert stats.mcnemar_exact([True, False], [True, False]) == 1.0
  # 0 vs 20: 2 / 2^20.
  assert stats.mcnemar_exact([True] * 20, [False] * 20) == pytest.approx(2 / 2**20, rel=1e-12)


@pytest.mark.parametrize("n", [1001, 2500, 4000])
def test_mcnemar_beyond_the_exact_sum_matches_it(n):
  # Above 1000 discordant pairs the tail is summed in log space; against the integer sum.
  for k in (1, n // 4, n // 2 - 30, n // 2 - 3, n // 2):
    exact = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    a_S, b_S = np.arange(n) < k, np.arange(n) >= k
    assert stats.mcnemar_exact(a_S, b_S) == pytest.approx(exact, rel=1e-9, abs=0.0)


def test_bootstrap_in_blocks_covers_the_mean(monkeypatch):
  values = np.random.default_rng(1).normal(3.0, 1.0, 400)
  # Up to 2 097 values the resamples are one draw, as before blocks (results kept bit for bit).
  rng = np.random.default_rng(0)
  means = values[rng.integers(0, 400, (2000, 400))].mean(axis=1)
  one_draw = np.quantile(means, [0.025, 0.975])
  ci = stats.bootstrap_mean(values)
  assert (ci.low, ci.high) == tuple(one_draw)
  # In blocks (here 6 of 300 resamples, then 1 of 200) the interval is as valid.
  monkeypatch.setattr(stats, "_BOOTSTRAP_DRAWS", 300 * 400)
  ci = stats.bootstrap_mean(values)
  assert ci.low < values.mean() < ci.high
  assert ci.high - ci.low == pytest.approx(2 * 1.96 / 20, rel=0.25)


def test_probability_of_improvement():
  below = stats.probability_of_improvement([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
  assert (below.estimate, below.low, below.high) == (1.0, 1.0, 1.0)
  equal = stats.probability_of_improvement([0.4, 0.4], [0.4, 0.4])
  assert (equal.estimate, equal.low, equal.high) == (0.5, 0.5, 0.5)
  # A win, a tie, two losses: 1.5 / 4; the pair with a NaN is dropped.
  mixed = stats.probability_of_improvement([0.0, 1.0, 2.0, 3.0, np.nan], [1.0, 1.0, 1.0, 1.0, 0.0])
  assert mixed.estimate == pytest.approx(0.375)
  assert 0.0 <= mixed.low < 0.375 < mixed.high <= 1.0
  assert math.isnan(stats.probability_of_improvement([np.nan], [1.0]).estimate)
