"""The blog post's claims as pure verdict rules on results rows.

Rules read results.Row values. The blog's scenarios 1, 2 and 3 are the study's first three
scenarios (config.study.scenarios[0:3], Row.scenario_index 0-2), as configs/blog.py lists them.

"Clearly" below means: the two 95% intervals do not overlap. That is a conservative test (a
difference can be real while intervals touch), so verdicts err towards "mixed".
"""

import dataclasses
import math

import numpy as np

from research import config_lib, schema, stats
from research.results import Row

CLAIM_SETS = schema.CLAIM_SETS
SUPPORTED, NOT_SUPPORTED, MIXED, UNTESTED = "supported", "not supported", "mixed", "untested"
HALF = 0.5  # "Consistently" / "most seeds": more than half, with the interval clear of it.

# Verdict rules, printed in the note so a reader can check them against the numbers.
RULES = (
  "Intervals are 95% Wilson intervals over seeds (rates) or 95% bootstrap intervals of the "
  "mean (distinct-2); diverged seeds are excluded. *A below B* means A's interval lies "
  "entirely below B's.",
  "**Claim 1** is *supported* when the intervals of both the collapse rate and the share of "
  "seeds whose probe is the most frequent token lie above 0.5, *not supported* when both lie "
  "below 0.5, and *mixed* otherwise.",
  "**Claim 2** is *supported* when scenario 2's collapse rate is below scenario 1's and its "
  "interval lies below 0.5; *not supported* when it is above scenario 1's, or lies above 0.5 "
  "without being below scenario 1's; *mixed* otherwise (e.g. neither scenario collapses, so "
  "there is nothing to fix).",
  "**Claim 3** compares scenario 3 with scenario 2: an improvement is a collapse rate below, or "
  "a distinct-2 above, scenario 2's; a regression is the reverse. *Supported*: at least one "
  "improvement and no regression; *not supported*: at least one regression and no improvement; "
  "*mixed*: both, or neither. Distinct-2 counts noise as diversity (a barely trained model "
  "sampled at temperature 1 scores high), so read it with the loss, which the verdict ignores.",
  "The blog decodes greedily; verdicts under other decodings (`@name` groups) are extras.",
)


@dataclasses.dataclass(frozen=True)
class Check:
  """One claim, the numbers that test it and the verdict they give."""

  claim: str
  measured: str
  verdict: str
  reason: str


def _num(x) -> float:
  return math.nan if x is None else float(x)


def _valid_seeds(row: Row) -> int:
  return row.seeds - row.diverged


def below(a_high, b_low) -> bool:
  """A's interval lies entirely below B's (False when either bound is NaN)."""
  return _num(a_high) < _num(b_low)


def _ci(rate, low, high) -> str:
  return f"{_num(rate):.3f} [{_num(low):.3f}, {_num(high):.3f}]"


def _collapse(row) -> str:
  return _ci(row.collapse_rate, row.collapse_low, row.collapse_high)


def _distinct_2(row) -> str:
  return _ci(row.distinct_2_mean, row.distinct_2_low, row.distinct_2_high)


def probe_interval(row) -> stats.Interval:
  """Share of non-diverged seeds whose probe is the most frequent training token."""
  n = _valid_seeds(row)
  share = row.probe_distribution.get(row.most_frequent_token, 0.0)
  return stats.wilson(round(share * n), n)


def _untested(claim: str, why: str) -> Check:
  return Check(claim, "-", UNTESTED, why)


def _missing(claim: str, **rows) -> Check | None:
  for name, row in rows.items():
    if row is None:
      return _untested(claim, f"no {name} row in the results")
    if _valid_seeds(row) == 0:
      return _untested(claim, f"every seed of {row.label} diverged")
  return None


CLAIM_1 = (
  "Repetitive text, Adam lr 0.1 and no dropout make the model consistently predict the most "
  "frequent training token ('t' in the blog's text), the same token whatever the input."
)
CLAIM_2 = "Varied text with lr 1e-3 and dropout 0.2 fixes the collapse of scenario 1."
CLAIM_3 = (
  "Lr 1e-4 with dropout 0.5 improves output diversity even more than scenario 2 (less "
  "fixated on a single token)."
)


def _majority(above: bool, under: bool, what: str) -> str:
  """How a share compares with half the seeds, in words."""
  if above:
    return f"most seeds {what}"
  return f"few seeds {what}" if under else f"the share that {what} is not clear of 0.5"


def claim_1(s1) -> Check:
  """Scenario 1 collapses, and its probe is the corpus' most frequent token, for most seeds."""
  if (missing := _missing(CLAIM_1, scenario_1=s1)) is not None:
    return missing
  probe = probe_interval(s1)
  token = s1.most_frequent_token
  measured = (
    f"collapse {_collapse(s1)}; probe = {token!r} (most frequent) in "
    f"{_ci(probe.estimate, probe.low, probe.high)} of seeds; most common probe "
    f"{s1.probe_top!r} ({_num(s1.probe_top_share):.2f})"
  )
  collapses, predicts = s1.collapse_low > HALF, probe.low > HALF
  never_collapses, never_predicts = s1.collapse_high < HALF, probe.high < HALF
  reason = "; ".join(
    [
      _majority(collapses, never_collapses, "collapse"),
      _majority(predicts, never_predicts, f"predict {token!r}"),
    ]
  )
  if collapses and predicts:
    return Check(CLAIM_1, measured, SUPPORTED, reason)
  if never_collapses and never_predicts:
    return Check(CLAIM_1, measured, NOT_SUPPORTED, reason)
  return Check(CLAIM_1, measured, MIXED, reason)


def claim_2(s1, s2) -> Check:
  """Scenario 2 collapses less than scenario 1, and in fewer than half of its seeds."""
  if (missing := _missing(CLAIM_2, scenario_1=s1, scenario_2=s2)) is not None:
    return missing
  measured = f"collapse {_collapse(s2)} vs scenario 1 {_collapse(s1)}"
  lower = below(s2.collapse_high, s1.collapse_low)
  higher = below(s1.collapse_high, s2.collapse_low)
  if lower and s2.collapse_high < HALF:
    return Check(CLAIM_2, measured, SUPPORTED, "scenario 2 collapses clearly less, and rarely")
  if higher:
    return Check(CLAIM_2, measured, NOT_SUPPORTED, "scenario 2 collapses more than scenario 1")
  if s2.collapse_low > HALF and not lower:
    return Check(CLAIM_2, measured, NOT_SUPPORTED, "scenario 2 still collapses in most seeds")
  if lower:
    return Check(CLAIM_2, measured, MIXED, "less collapse, but not clearly below half the seeds")
  reason = "the collapse rates' intervals overlap"
  if s1.collapse_high < HALF:
    reason += "; scenario 1 collapses in few seeds, so there is little to fix"
  return Check(CLAIM_2, measured, MIXED, reason)


def claim_3(s2, s3) -> Check:
  """Scenario 3 improves on scenario 2: less collapse or more distinct bigrams, neither worse."""
  if (missing := _missing(CLAIM_3, scenario_2=s2, scenario_3=s3)) is not None:
    return missing
  measured = (
    f"collapse {_collapse(s3)} vs {_collapse(s2)}; distinct-2 {_distinct_2(s3)} vs "
    f"{_distinct_2(s2)}; median loss {_num(s3.final_loss_median):.3f} vs "
    f"{_num(s2.final_loss_median):.3f}"
  )
  evidence = {
    "less collapse": below(s3.collapse_high, s2.collapse_low),
    "more distinct-2": below(s2.distinct_2_high, s3.distinct_2_low),
  }
  against = {
    "more collapse": below(s2.collapse_high, s3.collapse_low),
    "less distinct-2": below(s3.distinct_2_high, s2.distinct_2_low),
  }
  found = [k for k, v in evidence.items() if v]
  contra = [k for k, v in against.items() if v]
  if found and not contra:
    return Check(CLAIM_3, measured, SUPPORTED, ", ".join(found))
  if contra and not found:
    return Check(CLAIM_3, measured, NOT_SUPPORTED, ", ".join(contra))
  if found:
    return Check(CLAIM_3, measured, MIXED, ", ".join(found + contra))
  return Check(CLAIM_3, measured, MIXED, "no difference clear of the intervals")


def group_label(row: Row, show_decoding: bool) -> str:
  """What, besides the scenario, tells rows apart: the grid point and the decoding."""
  label = ""
  if row.axes:
    axes = (f"{k.split('.')[-1]}={config_lib.format_value(v)}" for k, v in row.axes.items())
    label = "[" + ",".join(axes) + "]"
  return label + (f"@{row.decoding}" if show_decoding else "")


def check_blog(rows: list[Row]) -> list[tuple[str, list[Check]]]:
  """Every blog claim per (grid point, decoding) group of rows, in the rows' order.

  Scenarios 1-3 are the rows with scenario_index 0-2; the decoding is named in the group label
  when the rows hold more than one.
  """
  show_decoding = len({r.decoding for r in rows}) > 1
  groups: dict[str, dict[int, Row]] = {}
  for row in rows:
    if row.scenario_index < 3:
      groups.setdefault(group_label(row, show_decoding), {})[row.scenario_index + 1] = row
  return [
    (label, [claim_1(s.get(1)), claim_2(s.get(1), s.get(2)), claim_3(s.get(2), s.get(3))])
    for label, s in groups.items()
  ]


# ----------------------------------------------------------------------------- dynamics

DYNAMICS_RULES = (
  "**Escape**: among a cell's seeds that were collapsed at some evaluation point, the share "
  "that is not collapsed at the last one (95% Wilson interval). *Supported* (they escape) when "
  "the interval lies above 0.5, *not supported* when below, *mixed* otherwise; *untested* when "
  "no seed ever collapsed.",
  "**Unigram stage**: per seed, the mean unigram KL over its collapsed evaluation points and "
  "over its other points, with 95% bootstrap intervals over seeds; and, over every collapsed "
  "evaluation point, the share collapsed onto the corpus' most frequent next token. "
  "*Supported* when the collapsed points' KL lies below the others' and that share's Wilson "
  "interval lies above 0.5; *not supported* when neither holds; *mixed* otherwise; "
  "*untested* without both kinds of points.",
)
ESCAPE = "Seeds that collapse during training escape collapse by the end of training."
UNIGRAM_STAGE = (
  "Collapse coincides with the unigram stage: while collapsed, the model predicts the corpus "
  "unigram prior (low KL) and collapses onto its most frequent token."
)


def _epochs(median, low, high) -> str:
  if math.isnan(_num(median)):
    return "–"
  return f"{median:g} [{low:g}, {high:g}]"


def escape(row: Row) -> Check:
  """Do the cell's collapsed seeds escape by the last evaluation point?"""
  ok = row.seeds - row.diverged
  ever = round((row.escaped_share + row.collapsed_at_end_share) * ok) if ok else 0
  if ever == 0:
    return _untested(ESCAPE, "no seed was collapsed at any evaluation point")
  escaped = round(row.escaped_share * ok)
  ci = stats.wilson(escaped, ever)
  measured = (
    f"{escaped} of {ever} ever-collapsed seeds escaped ({_ci(ci.estimate, ci.low, ci.high)}); "
    f"escape epoch median {_epochs(row.escape_median, row.escape_q25, row.escape_q75)}; "
    f"onset epoch median {_epochs(row.onset_median, row.onset_q25, row.onset_q75)}"
  )
  if ci.low > HALF:
    return Check(ESCAPE, measured, SUPPORTED, "most collapsed seeds escape")
  if ci.high < HALF:
    return Check(ESCAPE, measured, NOT_SUPPORTED, "most collapsed seeds stay collapsed")
  return Check(ESCAPE, measured, MIXED, "the share that escapes is not clear of 0.5")


def unigram_stage(arrays: dict, mode_token: int) -> Check:
  """Is the model near the unigram prior when collapsed, and collapsed onto its mode?"""
  ok = ~arrays["diverged"].astype(bool)
  collapsed_SxQ = arrays["curve_collapsed"][ok].astype(bool)
  kl_SxQ = arrays["curve_unigram_kl"][ok].astype(np.float64)
  if not collapsed_SxQ.any() or collapsed_SxQ.all():
    return _untested(UNIGRAM_STAGE, "needs both collapsed and not-collapsed evaluation points")

  def mean_where(mask_SxQ):  # Per seed; NaN for a seed without such points.
    count_S = mask_SxQ.sum(axis=1)
    return np.where(count_S > 0, (kl_SxQ * mask_SxQ).sum(axis=1) / np.maximum(count_S, 1), np.nan)

  kl_collapsed, kl_other = mean_where(collapsed_SxQ), mean_where(~collapsed_SxQ)
  c, o = stats.bootstrap_mean(kl_collapsed), stats.bootstrap_mean(kl_other)
  tokens_SxQ = arrays["curve_collapse_token"][ok]
  points = int(collapsed_SxQ.sum())
  mode = stats.wilson(int((tokens_SxQ[collapsed_SxQ] == mode_token).sum()), points)
  measured = (
    f"unigram KL {_ci(c.estimate, c.low, c.high)} nats when collapsed vs "
    f"{_ci(o.estimate, o.low, o.high)} otherwise; collapsed onto the corpus mode at "
    f"{_ci(mode.estimate, mode.low, mode.high)} of {points} collapsed evaluation points"
  )
  closer, onto_mode = below(c.high, o.low), mode.low > HALF
  if closer and onto_mode:
    return Check(UNIGRAM_STAGE, measured, SUPPORTED, "closer to the prior, onto its mode")
  if not closer and mode.high < HALF:
    return Check(UNIGRAM_STAGE, measured, NOT_SUPPORTED, "not closer to the prior, nor its mode")
  return Check(UNIGRAM_STAGE, measured, MIXED, "one sign of the unigram stage, not both")
