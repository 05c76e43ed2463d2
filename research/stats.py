"""Confidence intervals for rates and means across seeds."""

import dataclasses
import math

import numpy as np

Z95 = 1.959963984540054


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
  means = values[rng.integers(0, values.size, (num_resamples, values.size))].mean(axis=1)
  alpha = (1 - level) / 2
  low, high = np.quantile(means, [alpha, 1 - alpha])
  return Interval(float(values.mean()), float(low), float(high))
