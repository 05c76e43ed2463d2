"""run.py end to end, in subprocesses: one-line errors, flags, devices, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, SIMULATED_HOSTS, assert_same_results, load_per_seed, subprocess_env

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
  # One line: besides absl's log lines, stderr holds the error and nothing else.
  lines = [line for line in out.stderr.splitlines() if not re.match(r"[IWEF]\d{4} ", line)]
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_pallas_kernels_under_float64_are_refused_in_one_line(tmp_path):
  out = run_tiny(tmp_path / "w", "--jax_enable_x64", "--config.model.impl=pallas")
  assert_clean_error(out, "config.model.impl must be 'fused' or 'flax' with --jax_enable_x64")
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
  one = run_py(config_path, tmp_path / "one", env=subprocess_env(**SIMULATED_HOSTS))
  assert one.returncode == 0, one.stderr[-3000:]
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", **SIMULATED_HOSTS)
  four = run_py(config_path, tmp_path / "four", env=env)
  assert four.returncode == 0, four.stderr[-3000:]
  devices = json.loads((tmp_path / "four" / "config.json").read_text())["devices"]
  assert devices["device_count"] == 4
  assert_same_results(load_per_seed(tmp_path / "one"), load_per_seed(tmp_path / "four"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """An uninterrupted run of the three-cell config (about a second per cell), for kill tests."""
  tmp_path = tmp_path_factory.mktemp("uninterrupted")
  config_path = write_config(tmp_path, epochs=400, seeds=8)
  reference = run_py(config_path, tmp_path / "ref")
  assert reference.returncode == 0, reference.stderr[-3000:]
  return config_path, load_per_seed(tmp_path / "ref")


# run.py with Python's own SIGINT handler: a shell that started the tests in the background
# ignores SIGINT, and children inherit that (a preexec_fn would fork a threaded process).
WITH_SIGINT = (
  "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
  "sys.argv = sys.argv[1:]; runpy.run_path('run.py', run_name='__main__')"
)


def start(cmd, tmp_path):
  """Starts run.py (cmd) with its output in a file: an undrained pipe would block it."""
  log = tmp_path / "run.log"
  assert cmd[:2] == [sys.executable, "run.py"]
  with open(log, "w") as out:
    proc = subprocess.Popen(
      [sys.executable, "-c", WITH_SIGINT, *cmd[1:]],
      cwd=ROOT, env=subprocess_env(), stdout=out, stderr=out,
    )  # fmt: skip
  return proc, log


# When to kill: once a file appears, plus a delay. From compiling to the last cell's training.
MOMENTS = {
  "compiling": ("config.json", 0.0),
  "first_chunk": ("config.json", 1.5),
  "cell_a_written": ("cells/a.json", 0.0),
  "training_b": ("cells/a.json", 0.5),
  "training_c": ("cells/b.json", 0.3),
}


KILLS = [(sig, moment) for sig in (signal.SIGKILL, signal.SIGINT) for moment in sorted(MOMENTS)]
KILLS += [(signal.SIGTERM, moment) for moment in ("first_chunk", "training_b")]  # A scheduler.


@pytest.mark.parametrize(
  "sig, moment", KILLS, ids=[f"{signal.Signals(s).name}-{m}" for s, m in KILLS]
)
def test_killed_run_resumes_to_identical_results(tmp_path, sig, moment, uninterrupted):
  config_path, reference = uninterrupted
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={workdir}"]
  proc, log = start(cmd, tmp_path)
  marker, delay = MOMENTS[moment]
  deadline = time.time() + 240
  while not (workdir / marker).exists():
    assert proc.poll() is None and time.time() < deadline, f"run ended before {marker}"
    time.sleep(0.02)
  time.sleep(delay)
  proc.send_signal(sig)
  proc.wait(timeout=120)
  stderr = log.read_text()
  assert not (workdir / "results.json").exists(), "the run finished before it was killed"
  if sig in (signal.SIGINT, signal.SIGTERM):
    assert proc.returncode == 130, stderr[-3000:]
    assert "run the same command to resume" in stderr and "Fatal Python error" not in stderr
    assert not (workdir / ".collapse-study.lock").exists()  # Let go: no stale lock.
  else:
    assert proc.returncode == -signal.SIGKILL
  leftovers = [f for f in os.listdir(workdir / "cells") if f.startswith(".tmp")]
  assert not leftovers
  finished = {c for c in "abc" if (workdir / "cells" / f"{c}.json").exists()}
  resumed = run_py(config_path, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for cell in finished:
    assert f"skipping {cell}: already finished" in resumed.stderr
  assert_same_results(reference, load_per_seed(workdir))


def test_syntax_error_in_a_config_file_is_one_line_with_file_and_line(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n  return None\n")
  out = run(f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 2
  assert_clean_error(out, f"{path}:1: invalid syntax")
  assert len(out.stderr.strip().splitlines()) == 1


def test_exit_codes_and_errors_printed_once(tmp_path):
  out = run_tiny("")  # --workdir= would write into the current directory.
  assert out.returncode == 1
  assert_clean_error(out, "--workdir is empty")
  (tmp_path / "photo.jpg").write_bytes(b"x")
  out = run_tiny(tmp_path, "--overwrite")
  assert out.returncode == 1 and (tmp_path / "photo.jpg").exists()
  assert out.stderr.count("holds no collapse-study run") == 1, out.stderr
  out = run_tiny(tmp_path / "w", "--config.train.learning_rate=nan")
  assert out.returncode == 2
  assert out.stderr.count("config.train.learning_rate must be > 0, got nan") == 1, out.stderr


def test_the_report_command_reports_a_write_failure_in_one_line(tmp_path):
  assert run_tiny(tmp_path).returncode == 0
  os.unlink(tmp_path / "report.md")
  os.mkdir(tmp_path / "report.md")  # Unwritable even for root, unlike a read-only folder.
  out = subprocess.run(
    [sys.executable, "-m", "research.report", f"--workdir={tmp_path}"],
    cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert out.returncode == 1
  assert_clean_error(out, f"cannot write {tmp_path}/report.md")


def checkpoint_epoch(workdir) -> int:
  """Epoch of the latest mid-cell checkpoint in workdir (0 if none yet)."""
  for path in workdir.glob("checkpoints/*/latest.json"):
    try:
      return json.loads(path.read_text())["epoch"]
    except (OSError, ValueError):
      pass  # Being replaced right now.
  return 0


def test_a_kill_during_a_1000_epoch_cell_resumes_from_its_last_checkpoint(tmp_path):
  overrides = (
    "--config.train.epochs=1000",
    "--config.study.epochs_per_call=50",
    "--config.study.checkpoint_seconds=0",
  )
  reference = run_tiny(tmp_path / "ref", *overrides)
  assert reference.returncode == 0, reference.stderr[-3000:]
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "run.py", "--config=configs/tiny.py", f"--workdir={workdir}", *overrides]
  proc, _ = start(cmd, tmp_path)
  deadline = time.time() + 240
  while checkpoint_epoch(workdir) < 300:
    assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
    time.sleep(0.02)
  proc.kill()
  proc.wait(timeout=60)
  assert not (workdir / "cells" / "default.json").exists()
  resumed = run_tiny(workdir, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming rows 0-3 from their checkpoint at epoch" in resumed.stderr
  assert_same_results(load_per_seed(tmp_path / "ref"), load_per_seed(workdir))
