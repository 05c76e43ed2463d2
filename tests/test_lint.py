"""The code base stays ruff-clean (lint and format), so CI's one test command checks style too."""

import subprocess
import sys

from conftest import ROOT


def ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_ruff_lint():
  out = ruff("check")
  assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
  out = ruff("format", "--check")
  assert out.returncode == 0, out.stdout + out.stderr
