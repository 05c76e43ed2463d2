"""The research note's text, from a real tiny blog study."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

from research import report


def test_blog_report_has_setup_table_plots_examples_and_claims(blog_workdir):
  directory, _ = blog_workdir
  text = open(os.path.join(directory, "report.md"), encoding="utf-8").read()
  for heading in ("## Setup", "## Results", "## Example continuations", "## Claims checked"):
    assert heading in text
  assert "| scenario | seeds | diverged | collapse [95% CI] |" in text
  for name in ("1_repetitive_lr0.1_do0.0", "2_varied_lr1e-3_do0.2", "3_varied_lr1e-4_do0.5"):
    assert f"| `{name}` | 4 |" in text
  assert "jax " in text and "Seeds per cell: **4**" in text
  assert "matmul_precision='float32'" in text  # What the numbers were computed in.
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert {"loss_curves.png", "tail_periods.png", "top_token_share.png"} <= set(links)
  assert "collapse_vs_lr.png" not in links  # No learning-rate grid here.
  for link in links:
    assert os.path.exists(os.path.join(directory, link))
  assert "'the' + ' " in text  # A decoded probe continuation.
  claims = text.split("## Claims checked")[1]
  verdicts = re.findall(r"\| \*\*(supported|not supported|mixed|untested)\*\* \|", claims)
  assert len(verdicts) == 3
  for heading in ("## Collapse over training", "Attractor census", "Findings, by the rules"):
    assert heading in text
  assert {"collapse_over_training.png", "onset_escape.png", "unigram_kl.png"} <= set(links)
  dynamics = text.split("## Collapse over training")[1].split("## Example")[0]
  assert len(re.findall(r"\| \*\*(?:supported|not supported|mixed|untested)\*\* \|", dynamics)) == 6


def run_report_module(workdir):
  cmd = [sys.executable, "-m", "research.report", f"--workdir={workdir}"]
  return subprocess.run(
    cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
  )


@pytest.mark.slow
def test_standalone_command_rewrites_the_report(blog_workdir):
  directory, _ = blog_workdir
  path = os.path.join(directory, "report.md")
  before = open(path, encoding="utf-8").read()
  os.unlink(path)
  out = run_report_module(directory)
  assert out.returncode == 0, out.stderr
  assert open(path, encoding="utf-8").read() == before


@pytest.mark.slow
def test_standalone_command_without_results_fails_clearly(tmp_path):
  out = run_report_module(tmp_path)
  assert out.returncode != 0
  assert "no results.json" in out.stderr and "Traceback" not in out.stderr


def test_phases_in_one_line_name_the_worker_processes():
  phases = dict(startup=1.04, train=18.7, total=31.9, programs_compiled=22)
  line = report.format_phases(dict(phases, compilation_cache_hits=22, workers=2))
  assert line == (
    "startup 1.0 s; train 18.7 s; total 31.9 s; 22 programs compiled, 22 from the compilation "
    "cache; 2 worker processes"
  )
  assert "worker" not in report.format_phases(dict(phases, workers=1))


def test_compile_seconds_per_program_in_one_line_and_a_table():
  def record(cells, program, trace, lower, backend, hit=False):
    seconds = trace + lower + backend
    return dict(cells=cells, program=program, trace=trace, lower=lower, backend=backend,
                cache_hit=hit, seconds=seconds)  # fmt: skip

  phases = dict(
    compile_programs=[
      record("a", "train", 0.2, 0.1, 2.3),
      record("a", "evaluate", 0.3, 0.2, 2.2),
      record("", "rows", 0.001, 0.002, 0.01, hit=True),
      record("b (+1 more)", "train", 0.1, 0.1, 0.2, hit=True),
      record("", "_collapse_timing", 0.001, 0.002, 0.02),
    ]
  )
  line = report.format_compiles(phases)
  assert line == "compile per program: train 2.6 + 0.4 s, evaluate 2.7 s, 2 more 0.0 s"
  table = report.compile_table(phases).splitlines()
  assert len(table) == 2 + 3 + 1  # Header, rule, the three major programs, the rest.
  assert table[4] == "| `b (+1 more)` | `train` | 0.10 | 0.10 | 0.20 | yes |"
  assert table[5] == "| - | 2 more | 0.00 | 0.00 | 0.03 | 1 of 2 |"
  assert report.format_compiles({}) == ""


def test_the_note_tables_the_last_runs_compilation(blog_workdir):
  directory, _ = blog_workdir
  note = open(os.path.join(directory, "report.md"), encoding="utf-8").read()
  assert "Compilation in the last run, per program" in note
  assert "| `evaluate` |" in note and "| `train` |" in note


def test_a_study_tiled_to_2560_seeds_keeps_its_rates_with_narrower_intervals(
  blog_workdir, tmp_path
):
  """The last stage at many seeds: 2560 seeds bootstrap in blocks (over 2 097 values)."""
  from bench import report_scale
  from research import workdir

  source, _ = blog_workdir
  tiled = str(tmp_path / "tiled")
  report_scale.tile(source, tiled, 2560)  # 640 copies of each of the 4 seeds.
  report_scale.finish(tiled)
  small, big = workdir.load(source).rows, workdir.load(tiled).rows
  assert [r.label for r in big] == [r.label for r in small]
  for a, b in zip(small, big, strict=True):
    assert (a.seeds, b.seeds, b.diverged) == (4, 2560, 640 * a.diverged)
    for field in ("collapse_rate", "distinct_2_mean", "final_loss_mean", "unigram_kl_mean"):
      assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5, nan_ok=True), field
    assert b.collapse_high - b.collapse_low < a.collapse_high - a.collapse_low
    if a.distinct_2_high > a.distinct_2_low:
      assert b.distinct_2_low <= b.distinct_2_mean <= b.distinct_2_high
      assert b.distinct_2_high - b.distinct_2_low < a.distinct_2_high - a.distinct_2_low
  assert "Seeds per cell: **2560**" in open(os.path.join(tiled, "report.md")).read()
