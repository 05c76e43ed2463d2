"""The code base stays ruff-clean (lint and format) and its stages import only downward."""

import os
import re
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


# The stages from the bottom up (README, Architecture): a module imports only modules before it.
LAYERS = (
  "platform", "hosts", "schema", "files", "stats", "metrics", "lstm", "pallas_lstm", "data",
  "config_lib", "model", "generate", "train", "evaluate", "programs", "results", "workdir",
  "study", "claims", "plots", "report", "workers",
)  # fmt: skip


def research_imports(module: str) -> set[str]:
  source = open(os.path.join(ROOT, "research", f"{module}.py"), encoding="utf-8").read()
  names = set()
  for group in re.findall(r"^from research import ([\w, ]+)", source, re.M):
    names |= {n.strip().split(" as ")[0] for n in group.split(",")}
  names |= set(re.findall(r"^from research import (\w+) as", source, re.M))
  names |= set(re.findall(r"^from research\.(\w+) import", source, re.M))
  return names


def test_every_module_is_a_layer_and_imports_only_below_itself():
  modules = {f[:-3] for f in os.listdir(os.path.join(ROOT, "research")) if f.endswith(".py")}
  assert modules - {"__init__"} == set(LAYERS)
  for i, module in enumerate(LAYERS):
    upward = research_imports(module) - set(LAYERS[:i])
    assert not upward, f"research/{module}.py imports {sorted(upward)} from above it"
