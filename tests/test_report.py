"""The research note: report.md and its plots from real tiny studies; claim verdict rules."""

import os
import re
import subprocess
import sys

import matplotlib.image
import ml_collections
import pytest
from conftest import ROOT, subprocess_env, tiny_config

from research import claims, report, stats, study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def blog_tiny_config():
  """The blog's three scenarios at the tiny size."""
  from configs import blog

  config = blog.get_config()
  tiny = tiny_config()
  for group in ("model", "train", "generate"):
    config[group] = tiny[group]
  config.study.seeds = 4
  return config


@pytest.fixture(scope="module")
def blog_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("blog"))
  study.run_study(blog_tiny_config(), workdir)
  report.write_report(workdir)
  return workdir


def image_links(text: str) -> list[str]:
  return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def assert_valid_png(path: str) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, path


def test_blog_report_has_setup_table_plots_examples_and_claims(blog_workdir):
  text = open(os.path.join(blog_workdir, "report.md"), encoding="utf-8").read()
  for heading in ("## Setup", "## Results", "## Example continuations", "## Claims checked"):
    assert heading in text
  assert "| scenario | seeds | diverged | collapse [95% CI] |" in text
  for name in ("1_repetitive_lr0.1_do0.0", "2_varied_lr1e-3_do0.2", "3_varied_lr1e-4_do0.5"):
    assert f"| `{name}` | 4 |" in text
  assert "jax " in text and "Seeds per cell: **4**" in text
  links = image_links(text)
  assert {"loss_curves.png", "tail_periods.png", "top_token_share.png"} <= set(links)
  assert "collapse_vs_lr.png" not in links  # No learning-rate grid here.
  for link in links:
    assert_valid_png(os.path.join(blog_workdir, link))
  assert "'the' + ' " in text  # A decoded probe continuation.
  verdicts = re.findall(r"\| \*\*(supported|not supported|mixed|untested)\*\* \|", text)
  assert len(verdicts) == 3


def run_report_module(workdir):
  cmd = [sys.executable, "-m", "research.report", f"--workdir={workdir}"]
  return subprocess.run(
    cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
  )


def test_standalone_command_rewrites_report(blog_workdir):
  path = os.path.join(blog_workdir, "report.md")
  os.unlink(path)
  out = run_report_module(blog_workdir)
  assert out.returncode == 0, out.stderr
  assert os.path.exists(path)


def test_standalone_command_without_results_fails_clearly(tmp_path):
  out = run_report_module(tmp_path)
  assert out.returncode != 0
  assert "no results.json" in out.stderr


def test_grid_report_plots_collapse_against_learning_rate(tmp_path):
  config = tiny_config(seeds=2)
  config.study.grid = ml_collections.ConfigDict(
    {"train": {"learning_rate": (1e-3, 1e-1)}, "model": {"dropout": (0.0, 0.5)}}
  )
  study.run_study(config, str(tmp_path))
  report.write_report(str(tmp_path))
  links = image_links((tmp_path / "report.md").read_text())
  assert "collapse_vs_lr.png" in links and "collapse_heatmap.png" in links
  for link in links:
    assert_valid_png(str(tmp_path / link))
  assert "## Claims checked" not in (tmp_path / "report.md").read_text()  # claims = "".


def test_lr_panels_split_by_scenario_other_axes_and_decoding():
  def row(cell, decoding=""):
    scenario = cell + (f"@{decoding}" if decoding else "")
    return dict(cell=cell, scenario=scenario, learning_rate=0.1, dropout=0.0)

  axes = {
    "a[dropout=0,learning_rate=0.1]": {"model.dropout": 0.0, "train.learning_rate": 0.1},
    "a[learning_rate=0.1,epochs=3]": {"train.learning_rate": 0.1, "train.epochs": 3},
    "b": {},
  }
  rows = [row(c, d) for c in axes for d in ("", "T1")]
  panels = report.lr_panels(rows, axes)
  assert sorted(panels) == ["a", "a@T1", "a[epochs=3]", "a[epochs=3]@T1"]


# ----------------------------------------------------------------------------- verdicts


def scenario_row(number, collapsed, seeds=256, probe_top=None, distinct_2=(0.1, 0.09, 0.11), **kw):
  """A synthetic results row: `collapsed` of `seeds` seeds collapsed (none diverged)."""
  ci = stats.wilson(collapsed, seeds)
  probe = probe_top or {"t": 1.0}
  row = dict(
    scenario=f"{number}_s",
    cell=f"{number}_s",
    seeds=seeds,
    diverged=0,
    collapse_rate=ci.estimate,
    collapse_low=ci.low,
    collapse_high=ci.high,
    probe_distribution=probe,
    probe_top=next(iter(probe)),
    probe_top_share=next(iter(probe.values())),
    most_frequent_token="t",
    distinct_2_mean=distinct_2[0],
    distinct_2_low=distinct_2[1],
    distinct_2_high=distinct_2[2],
    final_loss_median=1.0,
  )
  row.update(kw)
  return row


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
  s1 = scenario_row(1, 0, diverged=256)
  assert claims.claim_1(s1).verdict == claims.UNTESTED
  assert claims.claim_2(None, scenario_row(2, 0)).verdict == claims.UNTESTED
  assert claims.claim_3(scenario_row(2, 0), None).verdict == claims.UNTESTED


def test_check_blog_groups_grid_points_and_decodings():
  rows = []
  for suffix in ("[epochs=100]", "[epochs=300]"):
    for decoding in ("greedy", "T1.0"):
      for number in (1, 2, 3):
        row = scenario_row(number, 0)
        row["cell"] = f"{number}_s{suffix}"
        row["scenario"] = f"{row['cell']}@{decoding}"
        rows.append(row)
  rows.append(dict(scenario_row(1, 0), cell="other", scenario="other"))  # Not a blog scenario.
  checked = claims.check_blog(rows)
  labels = [label for label, _ in checked]
  assert labels == [
    "[epochs=100]@greedy",
    "[epochs=100]@T1.0",
    "[epochs=300]@greedy",
    "[epochs=300]@T1.0",
  ]
  assert all(len(checks) == 3 for _, checks in checked)
