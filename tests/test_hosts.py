"""Processes: one process is the identity; 2 and 4 real local processes equal one; a death."""

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SIMULATED_HOSTS, assert_same_results, load_per_seed, subprocess_env

from research import hosts, workdir


def test_one_process_writes_and_shares_unchanged():
  assert hosts.is_writer()
  assert hosts.share({"a": [1, 2]}) == {"a": [1, 2]}
  assert hosts.on_writer(lambda: 7, (ValueError,)) == 7
  hosts.sync("nothing to wait for")
  assert hosts.smallest(5) == 5
  with pytest.raises(ValueError, match="2\\*\\*31"):
    hosts.smallest(2**31)  # Bytes would overflow the collective's int32: budgets go in MiB.

  def refuse():
    raise workdir.WorkdirError("locked")

  with pytest.raises(workdir.WorkdirError, match="^locked$"):
    hosts.on_writer(refuse, (workdir.WorkdirError,))


# A SIGINT whose KeyboardInterrupt is swallowed, as JAX's gc callback (a finalizer: Python
# prints "Exception ignored") and its bare `except:` clauses can do; then work that would
# finish unless interrupted again.
SWALLOWED = r"""
import os, signal, sys, time
from research import hosts
# Python's own handler: a shell that started the tests in the background ignores SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
hosts.reliable_interrupts()

SIGNAL = getattr(signal, sys.argv[2])  # SIGINT (Ctrl-C) or SIGTERM (a scheduler's).

class Finalizer:
  def __del__(self):
    os.kill(os.getpid(), SIGNAL)
    time.sleep(5)

if sys.argv[1] == "finalizer":
  Finalizer()
else:
  try:
    os.kill(os.getpid(), SIGNAL)
    time.sleep(5)
  except:  # noqa: E722
    pass
print("swallowed", flush=True)
start = time.time()
try:
  while time.time() < start + 20:
    sum(range(1000))
except KeyboardInterrupt:
  print(f"raised again after {time.time() - start:.1f} s", flush=True)
  sys.exit(0)
print("lost", flush=True)
"""


@pytest.mark.parametrize(
  "where, sig", [("bare_except", "SIGINT"), ("finalizer", "SIGINT"), ("bare_except", "SIGTERM")]
)
def test_a_swallowed_interrupt_is_raised_again(where, sig):
  out = subprocess.run(
    [sys.executable, "-c", SWALLOWED, where, sig], cwd=ROOT, env=subprocess_env(),
    capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.split("\n")
  assert lines[0] == "swallowed" and lines[1].startswith("raised again after"), out.stdout
  assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_interrupts_are_left_alone_where_sigint_is_ignored():
  before = (
    signal.signal(signal.SIGINT, signal.SIG_IGN),
    signal.signal(signal.SIGTERM, signal.SIG_DFL),
  )
  hook = sys.unraisablehook
  try:
    hosts.reliable_interrupts()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM: handled.
  finally:
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])
    sys.unraisablehook = hook


# What JAX's coordination client prints when it aborts a process whose peer died.
ABORT = r"""
import os, sys
print("progress line", file=sys.stderr, flush=True)
print("E1127 07:05:53.618672 27972 coordination_service_agent.cc:289] Polled an error",
      file=sys.stderr)
print("F1127 07:05:53.618819 27972 client.h:80] Terminating process because the JAX "
      "distributed service detected fatal errors.", file=sys.stderr)
print("*** Check failure stack trace: ***", file=sys.stderr, flush=True)
assert os.environ["COLLAPSE_STUDY_SUPERVISED"] == str(os.getppid())
os.abort()
"""


def test_the_supervisor_turns_jax_abort_into_one_line_and_passes_the_rest(capfd):
  before = signal.getsignal(signal.SIGINT)
  assert hosts.supervise([sys.executable, "-c", ABORT], "1") == 1
  err = capfd.readouterr().err
  assert "progress line" in err and "Check failure" not in err and "F1127" not in err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: process 1: lost contact"), err
  assert signal.getsignal(signal.SIGINT) is before  # Restored after the child ended.
  failing = "import sys; print('E1127 x client.h:1] other', file=sys.stderr); sys.exit(3)"
  assert hosts.supervise([sys.executable, "-c", failing], "0") == 3  # Not an abort: as is.
  assert "client.h:1] other" in capfd.readouterr().err


# Three cells of 4 seeds in one program; a budget of 4 MiB per process trains 3 rows per device
# per call and evaluates 1, so chunks cross cells, the last one is padded, and evaluation runs
# in parts, each differently for 1, 2 and 4 processes; checkpoints are saved mid-cell.
THREE_CELLS = """
from configs import tiny

def get_config():
  config = tiny.get_config()
  config.train.epochs = {epochs}
  config.generate.length = 64
  config.study.seeds = 4
  config.study.max_parallel_seeds = 8
  config.study.memory_budget_mb = 4
  config.study.epochs_per_call = 50
  config.study.checkpoint_seconds = 0  # A mid-cell checkpoint after every call: collective saves.
  config.study.scenarios = [dict(name="a"), dict(name="b", train=dict(learning_rate=0.01)),
                            dict(name="c", model=dict(dropout=0.0))]
  return config
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(config_path, workdir_path, processes: int, logs_dir):
  """Starts `processes` run.py processes of one --distributed study; output in files."""
  port, procs = free_port(), []
  for i in range(processes):
    cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={workdir_path}"]
    if processes > 1:
      cmd += ["--distributed", f"--coordinator_address=127.0.0.1:{port}"]
      cmd += [f"--num_processes={processes}", f"--process_id={i}", "--distributed_timeout=60"]
    with open(os.path.join(logs_dir, f"process_{i}.log"), "w") as log:
      env = subprocess_env(**SIMULATED_HOSTS)
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
  return procs


def logs(logs_dir) -> str:
  return "\n".join(
    f"--- {name}\n{open(os.path.join(logs_dir, name)).read()[-3000:]}"
    for name in sorted(os.listdir(logs_dir))
  )


def run_study(config_path, workdir_path, processes: int, tmp_path):
  logs_dir = tmp_path / f"logs_{processes}_{time.monotonic_ns()}"
  logs_dir.mkdir()
  procs = start(config_path, workdir_path, processes, logs_dir)
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [0] * processes, logs(logs_dir)
  return logs_dir


@pytest.fixture(scope="module")
def three_cells(tmp_path_factory):
  """The config file, and its results in one process (the reference)."""
  tmp_path = tmp_path_factory.mktemp("three_cells")
  path = tmp_path / "three_cells.py"
  path.write_text(THREE_CELLS.format(epochs=300))
  run_study(path, tmp_path / "one", 1, tmp_path)
  return path, load_per_seed(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_give_the_results_of_one(tmp_path, three_cells, processes):
  config_path, reference = three_cells
  logs_dir = run_study(config_path, tmp_path / "w", processes, tmp_path)
  assert_same_results(reference, load_per_seed(tmp_path / "w"))
  record = workdir.load(str(tmp_path / "w"))
  assert record.devices["process_count"] == processes
  assert "seeds per training call" in (logs_dir / "process_0.log").read_text()
  for i in range(1, processes):  # Only process 0 writes (and logs the study's progress).
    assert "process 0 writes the results" in (logs_dir / f"process_{i}.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("dies, resume_with", [(1, 1), (0, 2)], ids=["worker_dies", "writer_dies"])
def test_a_dead_process_stops_the_others_with_one_line_and_the_study_resumes(
  tmp_path, three_cells, dies, resume_with
):
  config_path, reference = three_cells
  w, logs_dir = tmp_path / "w", tmp_path / "logs"
  logs_dir.mkdir()
  procs = start(config_path, w, 2, logs_dir)
  try:
    deadline = time.time() + 300
    while not (w / "cells" / "a.json").exists():
      assert time.time() < deadline and all(p.poll() is None for p in procs), logs(logs_dir)
      time.sleep(0.05)
    procs[dies].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = procs[1 - dies]
    code = survivor.wait(timeout=90)
    waited = time.time() - killed
  finally:
    for p in procs:
      p.kill()
  out = (logs_dir / f"process_{1 - dies}.log").read_text()
  assert code == 1, logs(logs_dir)
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "lost contact with another process" in errors[0], out[-3000:]
  assert "Traceback" not in out and "Check failure" not in out, out[-3000:]
  assert waited < 90
  assert not (w / "results.json").exists()
  assert (w / "cells" / "a.json").exists()  # Finished cells stay; the rest is recomputed.
  run_study(config_path, w, resume_with, tmp_path)  # With as many processes, or with one.
  assert_same_results(reference, load_per_seed(w))


@pytest.mark.slow
def test_a_refusal_on_process_0_stops_every_process_with_its_line(tmp_path, three_cells):
  config_path, _ = three_cells
  w, logs_dir = tmp_path / "w", tmp_path / "logs"
  w.mkdir()
  logs_dir.mkdir()
  holder = dict(pid=os.getpid(), host=platform.node(), started="now")  # A live lock holder.
  (w / ".collapse-study.lock").write_text(json.dumps(holder))
  procs = start(config_path, w, 2, logs_dir)
  try:
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [1, 1], logs(logs_dir)
  for i in range(2):
    out = (logs_dir / f"process_{i}.log").read_text()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is in use by pid {os.getpid()}" in errors[0], out[-3000:]
    assert ("reported by process 0" in errors[0]) == (i == 1)
  assert sorted(os.listdir(w)) == [".collapse-study.lock"]  # Nothing written.


def run_py(*args):
  """run.py outside any cluster JAX could detect (SLURM, Open MPI, a coordinator address)."""
  env = {
    k: v
    for k, v in subprocess_env(**SIMULATED_HOSTS).items()
    if not k.startswith(("JAX_COORD", "SLURM", "OMPI"))
  }
  cmd = [sys.executable, "run.py", "--config=configs/tiny.py", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(
  "args, message",
  [
    (["--process_id=1"], "--process_id need --distributed"),
    (["--distributed", "--num_processes=2", "--process_id=2"], "must be below --num_processes=2"),
    (["--distributed"], "--distributed: cannot join the other processes"),
  ],
)
def test_distributed_flag_errors_are_one_line(tmp_path, args, message):
  out = run_py(f"--workdir={tmp_path / 'w'}", *args)
  assert out.returncode != 0
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()
