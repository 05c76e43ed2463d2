"""The workdir: its layout, what --overwrite may delete, verified resume, the lock, the note."""

import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_config

from research import config_lib, files, results, workdir


def one_cell(**train):
  config = tiny_config()
  config.train.update(train)
  (cell,) = config_lib.expand_cells(config)
  return cell


def fake_arrays(seeds=4):
  return results.SeedArrays(
    train=dict(final_loss=np.arange(seeds, dtype=np.float32), diverged=np.zeros(seeds, bool)),
    decodings=dict(greedy=dict(seed_collapsed=np.ones(seeds, bool))),
  )


def fake_meta(cell):
  return results.CellMeta(
    name=cell.name,
    scenario=cell.scenario,
    scenario_index=0,
    axes={},
    config={},
    decodings=["greedy"],
    labels={"greedy": cell.name},
    vocab=["<pad>", "a"],
    num_windows=4,
    prompts=3,
    contexts=2,
    contexts_used=2,
    mode_token=1,
    eval_epochs=[0, 3],
    seconds=0.5,
    train_seconds=0.3,
    eval_seconds=0.1,
    fingerprint=config_lib.cell_fingerprint(cell),
  )


def opened(tmp_path, config=None, overwrite=False):
  return workdir.open_for_study(str(tmp_path), config or tiny_config(), overwrite)


def test_cell_round_trip(tmp_path):
  cell = one_cell()
  with opened(tmp_path):
    assert not workdir.cell_done(str(tmp_path), cell)
    workdir.write_cell(str(tmp_path), cell, fake_meta(cell), fake_arrays())
    assert workdir.cell_done(str(tmp_path), cell)
  meta, arrays = workdir.read_cell(str(tmp_path), cell.name)
  assert meta == fake_meta(cell)
  np.testing.assert_array_equal(arrays.of("greedy")["final_loss"], [0, 1, 2, 3])
  assert arrays.of("greedy")["seed_collapsed"].all()
  with np.load(tmp_path / "cells" / "default.npz") as z:
    assert sorted(z) == ["diverged", "final_loss", "greedy/seed_collapsed"]


def test_models_that_cannot_be_written_or_deleted_are_one_line_write_errors(tmp_path, monkeypatch):
  """Orbax, refused a folder, reported only a timeout from its thread; rmtree a traceback."""
  relpath = os.path.join(workdir.MODELS_DIR, "default", "seeds_0-1")
  tree = dict(seeds=np.arange(2, dtype=np.uint32), state=dict(w=np.ones((2, 3), np.float32)))
  with opened(tmp_path):
    (tmp_path / workdir.MODELS_DIR).write_text("a file where the models' folder goes")
    with pytest.raises(files.WriteError, match="cannot write .*models/default/seeds_0-1"):
      workdir._save_state(str(tmp_path), relpath, tree)
    (tmp_path / workdir.MODELS_DIR).unlink()
    workdir._save_state(str(tmp_path), relpath, tree)
    assert [(first, last) for first, last, _ in workdir.models_of(str(tmp_path), "default")] == [
      (0, 1)
    ]
    refused = PermissionError(13, "Permission denied")
    monkeypatch.setattr(workdir.shutil, "rmtree", lambda path: (_ for _ in ()).throw(refused))
    with pytest.raises(files.WriteError, match="cannot delete .*seeds_0-1: Permission denied"):
      workdir.remove_models(str(tmp_path), "default")


def test_a_workdir_of_another_config_is_refused(tmp_path):
  with opened(tmp_path):
    pass
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["fingerprint"] == config_lib.fingerprint(tiny_config())
  assert saved["versions"]["jax"] and saved["devices"]["backend"] == jax.default_backend()
  assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in saved["xla_flags"]
  # Execution-only fields don't change results, so they don't count as another config.
  with opened(tmp_path, tiny_config(max_parallel_seeds=2)):
    pass
  changed = tiny_config()
  changed.train.learning_rate = 0.05
  with pytest.raises(workdir.WorkdirError, match="different config.*--overwrite"):
    opened(tmp_path, changed)
  with opened(tmp_path, changed, overwrite=True):
    pass
  assert json.loads((tmp_path / "config.json").read_text())["config"]["train"]["learning_rate"]


def test_overwrite_deletes_only_what_the_tool_wrote(tmp_path):
  cell = one_cell()
  with opened(tmp_path):
    workdir.write_cell(str(tmp_path), cell, fake_meta(cell), fake_arrays())
    workdir.write_note(str(tmp_path), "# note", {"loss_curves": b"png"}, ("loss_curves",))
  (tmp_path / "photo.jpg").write_bytes(b"the user's")
  (tmp_path / "cells" / "notes.txt").write_text("the user's too")
  with opened(tmp_path, overwrite=True):
    pass
  left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
  assert left == [".collapse-study.json", "cells/notes.txt", "config.json", "photo.jpg"]


@pytest.mark.parametrize("where", ["", "/", "~"])
def test_empty_root_and_home_workdirs_are_refused(where):
  with pytest.raises(workdir.WorkdirError, match="--workdir"):
    workdir.open_for_study(os.path.expanduser(where), tiny_config(), overwrite=True)


def test_a_directory_of_other_files_is_refused(tmp_path):
  (tmp_path / "report.md").write_text("my own report")
  with pytest.raises(workdir.WorkdirError, match="has files but holds no collapse-study run"):
    opened(tmp_path, overwrite=True)
  assert os.listdir(tmp_path) == ["report.md"]
  assert (tmp_path / "report.md").read_text() == "my own report"


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(workdir.WorkdirError, match="is not writable"):
    opened(blocker / "sub")


def test_a_cell_made_by_another_config_is_recomputed(tmp_path, caplog):
  cell, other = one_cell(), one_cell(learning_rate=0.05)
  with opened(tmp_path):
    workdir.write_cell(str(tmp_path), cell, fake_meta(cell), fake_arrays())
    with caplog.at_level(logging.WARNING):
      assert not workdir.cell_done(str(tmp_path), other)
    assert "cells/default.json was made by another config" in caplog.text
    assert workdir.cell_done(str(tmp_path), cell)


@pytest.mark.parametrize("damage", ["truncate_npz", "bad_json", "missing_field", "seed_count"])
def test_damaged_cell_files_are_set_aside_and_recomputed(tmp_path, caplog, damage):
  cell = one_cell()
  npz, meta_json = tmp_path / "cells" / "default.npz", tmp_path / "cells" / "default.json"
  with opened(tmp_path):
    arrays = fake_arrays(seeds=3 if damage == "seed_count" else 4)
    workdir.write_cell(str(tmp_path), cell, fake_meta(cell), arrays)
    if damage == "truncate_npz":
      npz.write_bytes(npz.read_bytes()[:40])
    elif damage == "bad_json":
      meta_json.write_text('{"name": "def')
    elif damage == "missing_field":
      record = json.loads(meta_json.read_text())
      del record["vocab"]
      meta_json.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
      assert not workdir.cell_done(str(tmp_path), cell)
  assert "cells/default.json is damaged" in caplog.text and "set aside" in caplog.text
  assert not npz.exists() and not meta_json.exists()
  assert len(os.listdir(tmp_path / "cells" / "set-aside")) == 2


def test_the_lock_refuses_a_second_run_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
  with opened(tmp_path):
    lock = json.loads((tmp_path / workdir.LOCK).read_text())
    assert lock["pid"] == os.getpid() and lock["host"]
    with pytest.raises(workdir.WorkdirError, match=f"in use by pid {os.getpid()}"):
      opened(tmp_path)
  assert not (tmp_path / workdir.LOCK).exists()
  dead = subprocess.Popen(["true"])
  dead.wait()
  (tmp_path / workdir.LOCK).write_text(json.dumps(dict(pid=dead.pid, host=lock["host"])))
  with caplog.at_level(logging.WARNING), opened(tmp_path):
    assert json.loads((tmp_path / workdir.LOCK).read_text())["pid"] == os.getpid()
  assert f"stale lock of dead pid {dead.pid}" in caplog.text


def _take_lock(directory, start, outcome, hold):
  start.wait()
  try:
    workdir._acquire_lock(directory)
    outcome.put("took")
  except workdir.WorkdirError:
    outcome.put("refused")
  except BaseException as e:  # noqa: BLE001  # Reported: the test fails on it.
    outcome.put(f"{type(e).__name__}: {e}")
  hold.wait()  # A live holder until both have tried.


# The forked children only read and write files (no JAX), and a hang fails the join below.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.parametrize("stale", [False, True], ids=["no_lock", "dead_holders_lock"])
def test_of_two_processes_starting_at_once_exactly_one_takes_the_lock(tmp_path, stale):
  """Fresh: the lock's content appears with it (a reader saw an empty lock, took it as stale).
  Stale: both read the dead holder's lock; one replaced the other's new lock, or crashed."""
  fork = multiprocessing.get_context("fork")  # Only file operations in the children.
  lock = tmp_path / workdir.LOCK
  dead = subprocess.Popen(["true"])
  dead.wait()
  for _ in range(8):  # The old code failed 3 trials in 4 of each case.
    lock.unlink(missing_ok=True)
    if stale:
      lock.write_text(json.dumps(dict(pid=dead.pid, host=platform.node(), started="then")))
    start, hold, outcome = fork.Barrier(2), fork.Barrier(2), fork.Queue()
    procs = [fork.Process(target=_take_lock, args=(str(tmp_path), start, outcome, hold))]
    procs.append(fork.Process(target=_take_lock, args=(str(tmp_path), start, outcome, hold)))
    for p in procs:
      p.start()
    for p in procs:
      p.join(timeout=60)
    assert sorted(outcome.get(timeout=10) for _ in procs) == ["refused", "took"]
  assert sorted(os.listdir(tmp_path)) == [workdir.LOCK]  # No lock being taken is left.


def test_a_lock_with_this_pid_that_this_process_does_not_hold_is_stale(tmp_path, caplog):
  """After a restart (a container's pid 1 again) a run can find its own pid in a dead lock."""
  me = dict(pid=os.getpid(), host=platform.node(), started="before the restart")
  (tmp_path / workdir.LOCK).write_text(json.dumps(me))
  with caplog.at_level(logging.WARNING), opened(tmp_path):
    assert json.loads((tmp_path / workdir.LOCK).read_text())["started"] != me["started"]
  assert f"stale lock of dead pid {os.getpid()}" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_holder_of_the_lock_counts_as_dead(tmp_path, caplog):
  """A --workers worker killed with its parent stays a zombie until init reaps it."""
  zombie = subprocess.Popen(["true"])  # Exits at once; not waited for: a zombie.
  deadline = time.time() + 30
  while not workdir._zombie(zombie.pid):
    assert time.time() < deadline
    time.sleep(0.01)
  host = platform.node()
  (tmp_path / workdir.LOCK).write_text(json.dumps(dict(pid=zombie.pid, host=host)))
  with caplog.at_level(logging.WARNING), opened(tmp_path):
    assert json.loads((tmp_path / workdir.LOCK).read_text())["pid"] == os.getpid()
  assert f"stale lock of dead pid {zombie.pid}" in caplog.text
  zombie.wait()


def test_loading_reaches_arrays_by_cell_and_decoding(blog_workdir):
  directory, rows = blog_workdir
  study = workdir.load(directory)
  assert [r.label for r in study.rows] == [r.label for r in rows]
  row = study.rows[1]
  arrays = study.of(row)
  assert arrays["loss_curve"].shape == (4, 3) and arrays["seed_collapsed"].shape == (4,)
  with np.load(os.path.join(directory, "per_seed.npz")) as z:
    np.testing.assert_array_equal(z[f"{row.cell}/loss_curve"], arrays["loss_curve"])
    np.testing.assert_array_equal(z[f"{row.cell}/greedy/tail_period_P"], arrays["tail_period_P"])


def test_loading_an_empty_directory_fails_clearly(tmp_path):
  with pytest.raises(workdir.WorkdirError, match="no results.json"):
    workdir.load(str(tmp_path))


def test_the_note_replaces_only_its_own_stale_plots(tmp_path):
  with opened(tmp_path):
    workdir.write_note(str(tmp_path), "# old", {"old": b"png"}, ("old",))
  (tmp_path / "mine.png").write_bytes(b"mine")
  path = workdir.write_note(str(tmp_path), "# note", {"new": b"png"}, ("old", "new", "mine"))
  assert open(path).read() == "# note"
  assert not (tmp_path / "old.png").exists() and (tmp_path / "new.png").read_bytes() == b"png"
  assert (tmp_path / "mine.png").read_bytes() == b"mine"  # Not written by the tool.


def test_an_edited_corpus_file_is_not_taken_for_the_old_one(tmp_path, caplog):
  corpus = tmp_path / "text.txt"
  corpus.write_text("the cat sat on the mat and the dog sat on the log")
  config = tiny_config()
  config.data.corpus_file = str(corpus)
  (cell,) = config_lib.expand_cells(config)
  directory = tmp_path / "w"
  with opened(directory, config):
    workdir.write_cell(str(directory), cell, fake_meta(cell), fake_arrays())
    assert workdir.cell_done(str(directory), cell)
    corpus.write_text("the cat sat on the mat and the dog sat on the rug")
    with caplog.at_level(logging.WARNING):
      assert not workdir.cell_done(str(directory), cell)
  assert "made by another config" in caplog.text
