"""run.py --workers: seeds split over local processes, merged to one process's results."""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
  ROOT,
  SIMULATED_HOSTS,
  assert_same_results,
  load_per_seed,
  subprocess_env,
  tiny_config,
)

from research import workdir, workers

THREE_CELLS = """
from configs import tiny

def get_config():
  config = tiny.get_config()
  config.train.epochs = {epochs}
  config.study.seeds = 6
  config.study.seed_offset = 10  # Worker blocks must add to it, not replace it.
  config.study.scenarios = [dict(name="a"), dict(name="b", train=dict(learning_rate=0.01)),
                            dict(name="c", model=dict(dropout=0.0))]
  return config
"""


def write_config(tmp_path, epochs=3) -> str:
  path = tmp_path / "three_cells.py"
  path.write_text(THREE_CELLS.format(epochs=epochs))
  return str(path)


def run_py(config_path, directory, *extra):
  cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={directory}", *extra]
  # On the CPU on every machine: --workers splits CPU studies (refused on an accelerator).
  env = subprocess_env(**SIMULATED_HOSTS)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_blocks_cover_the_seeds_in_order_on_their_own_cpus():
  blocks = workers.plan_blocks(seeds=10, workers=3, cpus=[0, 1, 2, 3, 4, 5])
  assert [(b.first, b.last) for b in blocks] == [(0, 3), (4, 6), (7, 9)]
  assert [b.cpus for b in blocks] == [(0, 1), (2, 3), (4, 5)]
  assert [b.index for b in blocks] == [0, 1, 2]
  # Never more workers than seeds; CPUs shared when too few.
  assert [b.seeds for b in workers.plan_blocks(seeds=2, workers=5, cpus=[0])] == [1, 1]
  assert [b.cpus for b in workers.plan_blocks(seeds=8, workers=3, cpus=[0, 1])] == [
    (0,),
    (1,),
    (0,),
  ]


def test_a_worker_reads_its_block_from_its_environment(monkeypatch):
  assert workers.this_worker() is None
  block = workers.Block(index=1, first=4, last=6, cpus=(2, 3), skip=("a",))
  monkeypatch.setenv(workers.WORKER, json.dumps(vars(block)))
  assert workers.this_worker() == block


@pytest.mark.slow
def test_two_workers_give_one_process_results_models_and_reevaluation(tmp_path):
  config_path = write_config(tmp_path)
  one = run_py(config_path, tmp_path / "one")
  assert one.returncode == 0, one.stderr[-3000:]
  two = run_py(config_path, tmp_path / "two", "--workers=2")
  assert two.returncode == 0, two.stderr[-3000:]
  assert "seeds 0-2 on CPUs" in two.stderr and "seeds 3-5 on CPUs" in two.stderr
  assert_same_results(load_per_seed(tmp_path / "one"), load_per_seed(tmp_path / "two"))
  assert two.stdout.splitlines()[:5] == one.stdout.splitlines()[:5]  # The same table.
  # After its results, one process is told of --workers=0 where that would split the seeds.
  hint = workers.one_process_hint(runpy.run_path(config_path)["get_config"](), "cpu")
  assert ("--workers=0 would split the seeds" in one.stderr) == bool(hint), one.stderr[-3000:]
  assert "--workers=0 would split the seeds" not in two.stderr
  assert not (tmp_path / "two" / "workers").exists()  # Merged, then removed.
  phases = json.loads((tmp_path / "two" / "results.json").read_text())["phases"]
  assert phases["workers"] == 2 and phases["train"] > 0
  assert {"init", "train", "evaluate"} <= {r["program"] for r in phases["compile_programs"]}
  # The merged models: study seeds 13-15 (offset 10) were the second worker's.
  chunks = [(f, last) for f, last, _ in workdir.models_of(str(tmp_path / "two"), "b")]
  assert chunks == [(10, 12), (13, 15)]
  mine, _ = workdir.load_model(str(tmp_path / "two"), "b", 14)
  theirs, _ = workdir.load_model(str(tmp_path / "one"), "b", 14)
  for x, y in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(theirs), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  again = run_py(config_path, tmp_path / "two", "--reevaluate")
  assert again.returncode == 0, again.stderr[-3000:]
  assert_same_results(load_per_seed(tmp_path / "one"), load_per_seed(tmp_path / "two"))
  # Resumed with cell b unfinished, the workers leave a and c to the parent (here all three
  # share each training call's chunk, so only their evaluation and files are saved).
  for suffix in (".json", ".npz"):
    (tmp_path / "two" / "cells" / f"b{suffix}").unlink()
  resumed = run_py(config_path, tmp_path / "two", "--workers=2")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for cell in "ac":  # Worker 0's log, on the terminal.
    assert f"skipping {cell}: its parent process holds it finished" in resumed.stderr
  assert_same_results(load_per_seed(tmp_path / "one"), load_per_seed(tmp_path / "two"))


@pytest.mark.slow
def test_a_killed_run_stops_its_workers_and_resumes_to_the_same_results(tmp_path):
  config_path = write_config(tmp_path, epochs=400)
  reference = run_py(config_path, tmp_path / "ref")
  assert reference.returncode == 0, reference.stderr[-3000:]
  directory = tmp_path / "killed"
  cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={directory}"]
  with open(tmp_path / "run.log", "w") as log:
    proc = subprocess.Popen(
      [*cmd, "--workers=2"], cwd=ROOT, env=subprocess_env(**SIMULATED_HOSTS), stdout=log, stderr=log
    )
  deadline = time.time() + 240
  cells_a = [
    directory / "workers" / block / "cells" / "a.json" for block in ("seeds_0-2", "seeds_3-5")
  ]
  # Worker pids from their locks, read while waiting: on a loaded machine one worker can finish
  # both cells, and drop its lock, before the other finishes cell a.
  locks = {}
  while not all(cell.exists() for cell in cells_a):
    assert proc.poll() is None and time.time() < deadline, "run ended before the workers' cell a"
    for lock in (directory / "workers").glob("*/.collapse-study.lock"):
      try:
        locks[lock.parent.name] = json.loads(lock.read_text())["pid"]
      except (OSError, ValueError):
        pass  # Being written, or just removed.
    time.sleep(0.02)
  assert sorted(locks) == ["seeds_0-2", "seeds_3-5"], locks
  worker_pids = list(locks.values())
  proc.kill()
  proc.wait(timeout=60)
  deadline = time.time() + 30
  while any(workdir._pid_alive(pid) for pid in worker_pids) and time.time() < deadline:
    time.sleep(0.05)
  assert not any(workdir._pid_alive(pid) for pid in worker_pids), "a worker outlived its parent"
  assert not (directory / "results.json").exists()
  resumed = run_py(config_path, directory, "--workers=2")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "skipping a: already finished" in resumed.stderr  # Worker 0's log, on the terminal.
  assert_same_results(load_per_seed(tmp_path / "ref"), load_per_seed(directory))


@pytest.mark.slow
def test_a_failing_worker_stops_the_others_with_one_line(tmp_path):
  config_path = write_config(tmp_path)
  directory = tmp_path / "w"
  assert run_py(config_path, directory, "--workers=2").returncode == 0
  for cell in (directory / "cells").glob("*.json"):
    cell.unlink()  # Unfinished again, so the next run starts its workers.
  # Worker 1's workdir replaced by a file: that worker alone refuses it.
  blocked = directory / "workers" / "seeds_3-5"
  blocked.parent.mkdir()
  blocked.write_text("not a directory")
  out = run_py(config_path, directory, "--workers=2")
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert "worker 1 (seeds 3-5) failed with exit code 1" in errors[0]
  assert "is not writable: it is a file" in errors[0]
  assert "Traceback" not in out.stderr
  lock = directory / "workers" / "seeds_0-2" / ".collapse-study.lock"
  if lock.exists():  # Worker 0 was stopped mid-run (not if it had already finished).
    assert not workdir._pid_alive(json.loads(lock.read_text())["pid"])


@pytest.mark.slow
def test_two_workers_reevaluate_one_saved_chunk_as_one_process_does(tmp_path):
  config_path = write_config(tmp_path)
  trained = run_py(config_path, tmp_path / "one")
  assert trained.returncode == 0, trained.stderr[-3000:]
  shutil.copytree(tmp_path / "one", tmp_path / "two")
  # Sampled: every seed's own keys must reach it through the split too.
  sampled = "--config.generate.strategy=top_k"
  one = run_py(config_path, tmp_path / "one", "--reevaluate", sampled)
  assert one.returncode == 0, one.stderr[-3000:]
  two = run_py(config_path, tmp_path / "two", "--reevaluate", sampled, "--workers=2")
  assert two.returncode == 0, two.stderr[-3000:]
  assert "re-evaluate: seeds 0-2 on CPUs" in two.stderr
  # Each worker took its rows of the one saved chunk.
  assert [(f, last) for f, last, _ in workdir.models_of(str(tmp_path / "two"), "b")] == [(10, 15)]
  assert_same_results(load_per_seed(tmp_path / "one"), load_per_seed(tmp_path / "two"))
  assert two.stdout.splitlines()[:5] == one.stdout.splitlines()[:5]  # The same table.
  assert not (tmp_path / "two" / "workers").exists()
  phases = json.loads((tmp_path / "two" / "results.json").read_text())["phases"]
  assert phases["workers"] == 2 and phases["evaluate"] > 0
  config = json.loads((tmp_path / "two" / "config.json").read_text())["config"]
  assert config["generate"]["strategy"] == "top_k"


@pytest.mark.slow
def test_workers_refuse_distributed_in_one_line(tmp_path):
  out = run_py(os.path.join("configs", "tiny.py"), tmp_path / "w", "--workers=2", "--distributed")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    "error: --workers=2 cannot be combined with --distributed"
  ]


def test_zero_workers_is_one_per_core_within_the_memory_budget(monkeypatch):
  monkeypatch.setattr(workers, "cpus", lambda: list(range(8)))
  config = tiny_config()
  config.study.seeds = 256
  config.study.memory_budget_mb = 100_000
  assert workers.auto_count(config, "cpu") == 8  # One per core...
  assert workers.auto_count(config, "gpu") == 1  # ...on a CPU only...
  config.study.memory_budget_mb = 3 * workers.WORKER_MB
  assert workers.auto_count(config, "cpu") == 3  # ...with a GiB of the budget each...
  config.study.seeds = 2
  assert workers.auto_count(config, "cpu") == 2  # ...and a seed each.
  config.study.memory_budget_mb = 100
  assert workers.auto_count(config, "cpu") == 1


def test_one_process_on_several_cores_is_told_of_workers(monkeypatch):
  monkeypatch.setattr(workers, "cpus", lambda: list(range(4)))
  config = tiny_config()
  config.study.seeds = 256
  config.study.memory_budget_mb = 100_000
  hint = workers.one_process_hint(config, "cpu")
  assert "4 CPU cores" in hint and "--workers=0" in hint and "over 4 worker processes" in hint
  assert workers.one_process_hint(config, "gpu") == ""  # One process is --workers=0 there.
  monkeypatch.setattr(workers, "cpus", lambda: [0])
  assert workers.one_process_hint(config, "cpu") == ""


@pytest.mark.slow
def test_a_budget_share_too_small_for_one_seed_is_refused_once_before_any_worker(tmp_path):
  out = run_py(
    os.path.join("configs", "tiny.py"), tmp_path / "w", "--workers=2",
    "--config.study.memory_budget_mb=1",
  )  # fmt: skip
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr
  assert errors[0].startswith("error: 2 workers, each with 1 MiB of the 1 MiB budget: "), errors
  assert "is too small for default: one seed needs" in errors[0]
  assert not (tmp_path / "w" / "workers").exists()


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_named_in_one_line(tmp_path):
  config_path = write_config(tmp_path, epochs=400)
  directory = tmp_path / "w"
  cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={directory}"]
  with open(tmp_path / "run.log", "w") as log:
    proc = subprocess.Popen(
      [*cmd, "--workers=2"], cwd=ROOT, env=subprocess_env(**SIMULATED_HOSTS), stdout=log, stderr=log
    )
  locks = [directory / "workers" / b / ".collapse-study.lock" for b in ("seeds_0-2", "seeds_3-5")]
  deadline = time.time() + 240
  while not all(lock.exists() for lock in locks):
    assert proc.poll() is None and time.time() < deadline, "run ended before its workers began"
    time.sleep(0.02)
  pids = [json.loads(lock.read_text())["pid"] for lock in locks]
  os.kill(pids[0], signal.SIGKILL)  # As the OOM killer would.
  assert proc.wait(timeout=60) == 1
  errors = [line for line in (tmp_path / "run.log").read_text().splitlines() if "error: " in line]
  assert errors == [
    "error: worker 0 (seeds 0-2) was killed by signal 9; its log is above. Finished cells are "
    "kept: run the same command to resume"
  ]
  assert not workdir._pid_alive(pids[1])
