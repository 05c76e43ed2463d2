"""Studies end to end: outputs, grids, chunking, devices, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from conftest import ROOT, subprocess_env, tiny_config

from research import config_lib, study


def grid_config(**study_kw):
  config = tiny_config(**study_kw)
  config.study.scenarios = [
    dict(name="rep", data=dict(corpus="blog_repetitive")),
    dict(name="var", data=dict(corpus="blog_varied")),
  ]
  config.study.grid = ml_collections.ConfigDict(
    {"train": {"learning_rate": (1e-3, 1e-1)}, "model": {"dropout": (0.0, 0.5)}}
  )
  return config


def load_per_seed(workdir):
  with np.load(os.path.join(workdir, "per_seed.npz")) as z:
    return dict(z)


def assert_same_results(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_blog_study_outputs(tmp_path):
  from configs import blog

  config = blog.get_config()
  tiny = tiny_config()
  for group in ("model", "train", "generate"):
    for key in ("embed_dim", "hidden", "epochs", "length"):
      if key in tiny[group]:
        config[group][key] = tiny[group][key]
  config.study.seeds = 3
  rows = study.run_study(config, str(tmp_path))
  assert [r["scenario"] for r in rows] == [s["name"] for s in config.study.scenarios]
  for name in ("config.json", "results.json", "results.csv", "per_seed.npz"):
    assert os.path.exists(tmp_path / name), name
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["config"]["study"]["seeds"] == 3 and saved["versions"]["jax"]
  assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in saved["xla_flags"]
  per_seed = load_per_seed(tmp_path)
  name = rows[1]["scenario"]
  assert per_seed[f"{name}/loss_curve"].shape == (3, 3)
  # The probe prompt plus every distinct training context was continued.
  assert per_seed[f"{name}/tail_period_P"].shape[1] > 50
  row = rows[0]
  assert 0.0 <= row["collapse_low"] <= row["collapse_rate"] <= row["collapse_high"] <= 1.0
  assert row["learning_rate"] == 0.1 and row["dropout"] == 0.0
  assert sum(row["probe_distribution"].values()) == pytest.approx(1.0)
  csv_lines = (tmp_path / "results.csv").read_text().splitlines()
  assert len(csv_lines) == 4 and csv_lines[0].startswith("scenario,")
  table = study.format_table(rows)
  assert all(r["scenario"] in table for r in rows)


def test_grid_shares_programs_and_matches_single_cells(tmp_path):
  config = grid_config()
  cells = config_lib.expand_cells(config)
  assert len(cells) == 8
  assert len({config_lib.program_key(c) for c in cells}) == 2  # One per training text.
  rows = study.run_study(config, str(tmp_path / "grid"))
  assert {r["learning_rate"] for r in rows} == {1e-3, 1e-1}
  assert "dropout" in rows[0] and "learning_rate" in rows[0]
  # A single cell run on its own gives the same per-seed numbers as inside the grid.
  cell = cells[5]
  alone = tiny_config()
  alone.data.corpus = cell.config.data.corpus
  alone.train.learning_rate = cell.config.train.learning_rate
  alone.model.dropout = cell.config.model.dropout
  study.run_study(alone, str(tmp_path / "alone"))
  grid_seed = load_per_seed(tmp_path / "grid")
  alone_seed = load_per_seed(tmp_path / "alone")
  for metric in ("loss_curve", "final_loss", "seed_collapsed", "tail_period_P"):
    np.testing.assert_allclose(
      grid_seed[f"{cell.name}/{metric}"], alone_seed[f"default/{metric}"], rtol=2e-5, atol=1e-6
    )


def test_seed_chunks_give_identical_results(tmp_path):
  whole = grid_config()
  study.run_study(whole, str(tmp_path / "whole"))
  chunked = grid_config(max_parallel_seeds=3, epochs_per_call=1)
  study.run_study(chunked, str(tmp_path / "chunked"))
  assert_same_results(load_per_seed(tmp_path / "whole"), load_per_seed(tmp_path / "chunked"))


def test_resume_skips_finished_cells(tmp_path, caplog):
  config = tiny_config()
  config.study.scenarios = [dict(name="a"), dict(name="b", train=dict(learning_rate=0.01))]
  workdir = str(tmp_path)
  study.run_study(config, workdir)
  first = load_per_seed(workdir)
  stamp = os.path.getmtime(tmp_path / "cells" / "a.npz")
  os.unlink(tmp_path / "cells" / "b.json")  # As if the run died before finishing b.
  with caplog.at_level("INFO"):
    study.run_study(config, workdir)
  assert "skipping a: already finished" in caplog.text
  assert os.path.getmtime(tmp_path / "cells" / "a.npz") == stamp
  assert_same_results(first, load_per_seed(workdir))
  study.run_study(config, workdir, overwrite=True)
  assert os.path.getmtime(tmp_path / "cells" / "a.npz") > stamp


def test_different_config_in_same_workdir_is_refused(tmp_path):
  study.run_study(tiny_config(), str(tmp_path))
  changed = tiny_config()
  changed.train.learning_rate = 0.05
  with pytest.raises(study.StudyError, match="different config.*--overwrite"):
    study.run_study(changed, str(tmp_path))
  # Execution-only fields don't change results, so they don't count as a different config.
  study.run_study(tiny_config(max_parallel_seeds=2), str(tmp_path))
  study.run_study(changed, str(tmp_path), overwrite=True)


def test_diverged_seeds_are_counted_and_excluded(tmp_path):
  config = tiny_config()
  config.train.optimizer = "sgd"
  config.study.scenarios = [
    dict(name="fine", train=dict(learning_rate=0.01)),
    dict(name="boom", train=dict(learning_rate=1e30)),
  ]
  rows = study.run_study(config, str(tmp_path))
  fine, boom = rows
  assert fine["diverged"] == 0
  assert boom["diverged"] == boom["seeds"] == 4
  assert np.isnan(boom["collapse_rate"]) and np.isnan(boom["final_loss_mean"])
  assert "boom" in study.format_table(rows)


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


def run_py(config_path, workdir, *extra, env=None, timeout=300):
  cmd = [sys.executable, "run.py", f"--config={config_path}", f"--workdir={workdir}", *extra]
  return subprocess.run(
    cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
  )


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
