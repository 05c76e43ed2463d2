"""The blog claims' verdict rules on synthetic rows."""

import dataclasses
import math

import numpy as np
import pytest

from research import claims, stats
from research.results import Row

BASE = Row(
  label="", scenario="", scenario_index=0, cell="", decoding="greedy", axes={},
  corpus="blog_varied", tokenization="char", learning_rate=0.1, dropout=0.0, epochs=100,
  vocab_size=26, trivial_vocab=False, most_frequent_token="t", seeds=256, diverged=0,
  collapse_rate=0.0, collapse_low=0.0, collapse_high=0.0, argmax_constant_rate=0.0,
  argmax_constant_low=0.0, argmax_constant_high=0.0, collapsed_prompt_fraction=0.0,
  final_loss_mean=1.0, final_loss_median=1.0, accuracy_mean=0.5, entropy_mean=1.0,
  distinct_1_mean=0.1, distinct_2_mean=0.1, distinct_2_low=0.09, distinct_2_high=0.11,
  seq_rep_4_mean=0.5, top_token_share_mean=0.5, probe_top="t", probe_top_share=1.0,
  probe_distribution={"t": 1.0}, collapse_tokens={}, collapse_token_is_mode=0.0,
  unigram_kl_mean=1.0, never_collapsed_share=1.0, escaped_share=0.0, collapsed_at_end_share=0.0,
  onset_median=math.nan, onset_q25=math.nan, onset_q75=math.nan, escape_median=math.nan,
  escape_q25=math.nan, escape_q75=math.nan, cycles_mean=1.0, largest_basin_median=1.0,
  fixed_point_share=0.0, unresolved_mean=0.0, seconds=1.0,
)  # fmt: skip


def scenario_row(number, collapsed, seeds=256, probe_top=None, distinct_2=(0.1, 0.09, 0.11), **kw):
  """A synthetic results row of blog scenario `number`: `collapsed` of `seeds` seeds collapsed."""
  ci = stats.wilson(collapsed, seeds)
  probe = probe_top or {"t": 1.0}
  fields = dict(
    label=f"{number}_s",
    scenario=f"{number}_s",
    scenario_index=number - 1,
    cell=f"{number}_s",
    seeds=seeds,
    collapse_rate=ci.estimate,
    collapse_low=ci.low,
    collapse_high=ci.high,
    probe_distribution=probe,
    probe_top=next(iter(probe)),
    probe_top_share=next(iter(probe.values())),
    distinct_2_mean=distinct_2[0],
    distinct_2_low=distinct_2[1],
    distinct_2_high=distinct_2[2],
  )
  fields.update(kw)
  return dataclasses.replace(BASE, **fields)


@pytest.mark.parametrize(
  "collapsed, probe, verdict",
  [
    (250, {"t": 0.95, " ": 0.05}, claims.SUPPORTED),
    (3, {" ": 1.0}, claims.NOT_SUPPORTED),
    (250, {" ": 1.0}, claims.MIXED),  # Collapses, but not onto the most frequent token.
    (3, {"t": 0.9, " ": 0.1}, claims.MIXED),  # Predicts 't' after "the", yet does not collapse.
    (128, {"t": 0.99, " ": 0.01}, claims.MIXED),  # Collapse rate not clear of one half.
  ],
)
def test_claim_1(collapsed, probe, verdict):
  check = claims.claim_1(scenario_row(1, collapsed, probe_top=probe))
  assert check.verdict == verdict, check


@pytest.mark.parametrize(
  "s1, s2, verdict",
  [
    (250, 2, claims.SUPPORTED),
    (250, 180, claims.MIXED),  # Clearly less, but still most seeds.
    (40, 30, claims.MIXED),  # Overlapping intervals.
    (2, 0, claims.MIXED),  # Nothing to fix.
    (2, 100, claims.NOT_SUPPORTED),  # Worse.
    (250, 240, claims.NOT_SUPPORTED),  # Still collapses in most seeds.
  ],
)
def test_claim_2(s1, s2, verdict):
  check = claims.claim_2(scenario_row(1, s1), scenario_row(2, s2))
  assert check.verdict == verdict, check


@pytest.mark.parametrize(
  "s2, s3, d2_3, verdict",
  [
    (100, 2, (0.1, 0.09, 0.11), claims.SUPPORTED),  # Less collapse, same distinct-2.
    (0, 0, (0.3, 0.29, 0.31), claims.SUPPORTED),  # More distinct-2.
    (0, 250, (0.01, 0.0, 0.02), claims.NOT_SUPPORTED),  # The measured outcome: worse.
    (100, 2, (0.01, 0.0, 0.02), claims.MIXED),  # Less collapse, but less distinct-2.
    (0, 0, (0.1, 0.09, 0.11), claims.MIXED),  # No clear difference.
  ],
)
def test_claim_3(s2, s3, d2_3, verdict):
  check = claims.claim_3(scenario_row(2, s2), scenario_row(3, s3, distinct_2=d2_3))
  assert check.verdict == verdict, check


def test_claims_untested_without_rows_or_with_all_seeds_diverged():
  s1 = scenario_row(1, 0, diverged=256, collapse_rate=math.nan)
  assert claims.claim_1(s1).verdict == claims.UNTESTED
  assert claims.claim_2(None, scenario_row(2, 0)).verdict == claims.UNTESTED
  assert claims.claim_3(scenario_row(2, 0), None).verdict == claims.UNTESTED


def test_check_blog_groups_grid_points_and_decodings():
  rows = []
  for epochs in (100, 300):
    for decoding in ("greedy", "T1.0"):
      for number in (1, 2, 3):
        rows.append(scenario_row(number, 0, axes={"train.epochs": epochs}, decoding=decoding))
  rows.append(scenario_row(4, 0))  # A fourth scenario: not one of the blog's.
  checked = claims.check_blog(rows)
  labels = [label for label, _ in checked]
  assert labels == [
    "[epochs=100]@greedy",
    "[epochs=100]@T1.0",
    "[epochs=300]@greedy",
    "[epochs=300]@T1.0",
  ]
  assert all(len(checks) == 3 for _, checks in checked)


@pytest.mark.parametrize(
  "escaped, at_end, verdict",
  [(0.9, 0.05, claims.SUPPORTED), (0.05, 0.9, claims.NOT_SUPPORTED), (0.3, 0.3, claims.MIXED)],
)
def test_escape_rule(escaped, at_end, verdict):
  row = scenario_row(3, 0, escaped_share=escaped, collapsed_at_end_share=at_end)
  assert claims.escape(row).verdict == verdict
  assert claims.escape(scenario_row(3, 0)).verdict == claims.UNTESTED  # Never collapsed.


def curves(collapsed_SxQ, kl_SxQ, token=1):
  n = len(collapsed_SxQ)
  return dict(
    diverged=np.zeros(n, bool),
    curve_collapsed=np.asarray(collapsed_SxQ, bool),
    curve_unigram_kl=np.asarray(kl_SxQ, float),
    curve_collapse_token=np.full(np.shape(collapsed_SxQ), token),
  )


def test_unigram_stage_rule():
  rng = np.random.default_rng(0)
  collapsed = np.tile([1, 1, 0, 0], (40, 1))  # Collapsed early, then not.
  low_when_collapsed = np.where(collapsed, 0.01, 1.0) + rng.uniform(0, 0.01, collapsed.shape)
  onto_mode = curves(collapsed, low_when_collapsed, token=1)
  assert claims.unigram_stage(onto_mode, mode_token=1).verdict == claims.SUPPORTED
  high_when_collapsed = np.where(collapsed, 1.0, 0.01)
  elsewhere = curves(collapsed, high_when_collapsed, token=2)
  assert claims.unigram_stage(elsewhere, mode_token=1).verdict == claims.NOT_SUPPORTED
  mixed = curves(collapsed, low_when_collapsed, token=2)
  assert claims.unigram_stage(mixed, mode_token=1).verdict == claims.MIXED
  never = curves(np.zeros((40, 4)), high_when_collapsed)
  assert claims.unigram_stage(never, mode_token=1).verdict == claims.UNTESTED
