"""Confidence intervals for rates and means across seeds."""

import dataclasses
import math

import numpy as np

Z95 = 1.959963984540054
_BOOTSTRAP_DRAWS = 1 << 22
_EXACT_PAIRS = 1000  # mcnemar_exact sums integers up to this many discordant pairs.


@dataclasses.dataclass(frozen=True)
class Interval:
  estimate: float
  low: float
  high: float


def wilson(successes: int, trials: int, z: float = Z95) -> Interval:
  """Wilson score interval for a binomial proportion; NaN when there are no trials."""
  if trials == 0:
    return Interval(math.nan, math.nan, math.nan)
  p = successes / trials
  denom = 1 + z**2 / trials
  centre = (p + z**2 / (2 * trials)) / denom
  half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denom
  # At k = 0 or k = n one bound is exactly 0 or 1; rounding would leave it a hair off.
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == trials else min(1.0, centre + half)
  return Interval(p, low, high)


def bootstrap_mean(values, num_resamples: int = 2000, seed: int = 0, level: float = 0.95):
  """Percentile bootstrap interval for the mean of `values` (NaNs dropped)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return Interval(math.nan, math.nan, math.nan)
  rng = np.random.default_rng(seed)
  # Resamples in blocks of ~4M draws: all at once is 16 bytes x resamples x values, 3.2 GB at
  # 100 000 seeds. Up to 2 097 values (at 2000 resamples) it is one block, as before.
  block = max(1, _BOOTSTRAP_DRAWS // values.size)
  means = np.concatenate([
    values[rng.integers(0, values.size, (min(block, num_resamples - start), values.size))].mean(1)
    for start in range(0, num_resamples, block)
  ])  # fmt: skip
  alpha = (1 - level) / 2
  low, high = np.quantile(means, [alpha, 1 - alpha])
  return Interval(float(values.mean()), float(low), float(high))


def mcnemar_exact(a_S, b_S) -> float:
  """Exact two-sided McNemar p-value for paired booleans; 1.0 when no pair is discordant.

  A binomial test with p = 0.5 on the discordant pairs: min(1, 2 P[X <= min(b01, b10)]),
  X ~ Binomial(b01 + b10, 1/2). Up to 1000 discordant pairs it is summed in exact integers,
  which stay accurate where 0.5**n would underflow (n > 1074); beyond, that sum grows as n^2
  digits (52 s at n = 20 000), so the terms are summed in log space from lgamma (~1e-11
  relative).
  """
  a_S, b_S = np.asarray(a_S, bool), np.asarray(b_S, bool)
  if a_S.shape != b_S.shape:
    raise ValueError(f"mcnemar_exact: paired arrays differ in shape, {a_S.shape} vs {b_S.shape}")
  b01, b10 = int(np.sum(a_S & ~b_S)), int(np.sum(~a_S & b_S))
  n = b01 + b10
  if n == 0:
    return 1.0
  k = min(b01, b10)
  if n <= _EXACT_PAIRS:
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)
  log_terms = [
    math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)
  ]
  top = max(log_terms)
  log_tail = top + math.log(np.exp(np.array(log_terms) - top).sum()) - n * math.log(2)
  return min(1.0, 2 * math.exp(log_tail))


def probability_of_improvement(
  a_S, b_S, num_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
  """Share of seeds where a < b (ties count half), with a percentile bootstrap over seeds.

  Pairs with a NaN on either side are dropped; NaN interval when none is left.
  """
  a_S, b_S = np.asarray(a_S, np.float64), np.asarray(b_S, np.float64)
  if a_S.shape != b_S.shape:
    raise ValueError(
      f"probability_of_improvement: paired arrays differ in shape, {a_S.shape} vs {b_S.shape}"
    )
  both_S = ~(np.isnan(a_S) | np.isnan(b_S))
  a_S, b_S = a_S[both_S], b_S[both_S]
  wins_S = (a_S < b_S) + 0.5 * (a_S == b_S)
  return bootstrap_mean(wins_S, num_resamples=num_resamples, seed=seed, level=level)
