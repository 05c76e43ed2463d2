"""run.py end to end, in subprocesses: one-line errors, flags, devices, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, assert_same_results, load_per_seed, subprocess_env

pytestmark = pytest.mark.slow


def run(*args, env=None, timeout=300):
  cmd = [sys.executable, "run.py", *args]
  return subprocess.run(
    cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
  )


def run_tiny(workdir, *overrides):
  return run("--config=configs/tiny.py", f"--workdir={workdir}", *overrides)


def assert_clean_error(out, message):
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.train.lr=0.1", "unknown config field 'train.lr'"),
    ("--config.train.learning_rate=-0.1", "config.train.learning_rate must be > 0, got -0.1"),
    ("--config.generate.strategy=beam", "config.generate.strategy must be one of ['greedy',"),
    ("--config.train.epochs=ten", "--config.train.epochs=ten"),
  ],
)
def test_run_py_reports_config_errors_in_one_line(tmp_path, override, message):
  out = run_tiny(tmp_path / "w", override)
  assert_clean_error(out, message)
  assert not (tmp_path / "w").exists()


def test_missing_config_file(tmp_path):
  out = run("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert_clean_error(out, "cannot load --config=configs/nope.py")


def test_non_utf8_corpus_file(tmp_path):
  path = tmp_path / "c.txt"
  path.write_bytes(b"the cat \xff\xfe sat")
  assert_clean_error(
    run_tiny(tmp_path / "w", f"--config.data.corpus_file={path}"), "not valid UTF-8"
  )


def test_prompt_with_unknown_tokens_names_them(tmp_path):
  out = run_tiny(
    tmp_path / "w", "--config.data.corpus=blog_repetitive", "--config.generate.prompts=('thx!',)"
  )
  assert_clean_error(out, "tokens not in the training vocabulary: ['!', 'x']")


def test_single_token_corpus_runs_and_is_trivially_collapsed(tmp_path):
  corpus = tmp_path / "a.txt"
  corpus.write_bytes(b"aaaaaaaaaaaa")
  out = run_tiny(
    tmp_path / "w", f"--config.data.corpus_file={corpus}", "--config.generate.prompts=('a',)"
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "collapse is trivial" in out.stdout
  row = json.loads((tmp_path / "w" / "results.json").read_text())["rows"][0]
  assert row["trivial_vocab"] and row["collapse_rate"] == 1.0


def test_float64_opt_in(tmp_path):
  out = run_tiny(tmp_path, "--jax_enable_x64")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((tmp_path / "config.json").read_text())["x64"] is True
  with np.load(tmp_path / "per_seed.npz") as z:
    assert z["default/final_loss"].dtype == np.float64
    assert z["default/loss_curve"].dtype == np.float64


TWO_CELLS = """
from configs import tiny

def get_config():
  config = tiny.get_config()
  config.train.epochs = {epochs}
  config.study.seeds = {seeds}
  config.study.max_parallel_seeds = {seeds}  # One cell per call, so cells finish one by one.
  config.study.scenarios = [dict(name="a"), dict(name="b", train=dict(learning_rate=0.01)),
                            dict(name="c", model=dict(dropout=0.0))]
  return config
"""


def write_config(tmp_path, epochs=3, seeds=6):
  path = tmp_path / "two_cells.py"
  path.write_text(TWO_CELLS.format(epochs=epochs, seeds=seeds))
  return str(path)


def run_py(config_path, workdir, *extra, env=None):
  return run(f"--config={config_path}", f"--workdir={workdir}", *extra, env=env)


def test_four_host_devices_match_one_device(tmp_path):
  config_path = write_config(tmp_path, seeds=6)  # 6 seeds x 3 cells: padded to 4 devices.
  one = run_py(config_path, tmp_path / "one")
  assert one.returncode == 0, one.stderr[-3000:]
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
  four = run_py(config_path, tmp_path / "four", env=env)
  assert four.returncode == 0, four.stderr[-3000:]
  devices = json.loads((tmp_path / "four" / "config.json").read_text())["devices"]
  assert devices["device_count"] == 4
  assert_same_results(load_per_seed(tmp_path / "one"), load_per_seed(tmp_path / "four"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """An uninterrupted run of the three-cell config, shared by the kill tests."""
  tmp_path = tmp_path_factory.mktemp("uninterrupted")
  config_path = write_config(tmp_path, epochs=60, seeds=8)
  reference = run_py(config_path, tmp_path / "ref")
  assert reference.returncode == 0, reference.stderr[-3000:]
  return config_path, load_per_seed(tmp_path / "ref")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_identical_results(tmp_path, sig, uninterrupted):
  config_path, reference = uninterrupted
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={workdir}"]
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  while not (workdir / "cells" / "a.json").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before the first cell"
    time.sleep(0.05)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert not (workdir / "results.json").exists(), "the run finished before it was killed"
  if sig == signal.SIGINT:
    assert proc.returncode == 130 and "run the same command to resume" in stderr
  leftovers = [f for f in os.listdir(workdir / "cells") if f.startswith(".tmp")]
  assert not leftovers
  resumed = run_py(config_path, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "skipping a: already finished" in resumed.stderr
  assert_same_results(reference, load_per_seed(workdir))
