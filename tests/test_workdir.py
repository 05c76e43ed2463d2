"""The workdir layout: cell files, refusal of another config's workdir, loading, the note."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config

from research import config_lib, results, workdir


def one_cell():
  (cell,) = config_lib.expand_cells(tiny_config())
  return cell


def fake_arrays(seeds=3):
  return results.SeedArrays(
    train=dict(final_loss=np.arange(seeds, dtype=np.float32), diverged=np.zeros(seeds, bool)),
    decodings=dict(greedy=dict(seed_collapsed=np.ones(seeds, bool))),
  )


def fake_meta(cell):
  return results.CellMeta(
    name=cell.name, scenario=cell.scenario, scenario_index=0, axes={}, config={},
    decodings=["greedy"], labels={"greedy": cell.name}, vocab=["<pad>", "a"], num_windows=4,
    seconds=0.5,
  )  # fmt: skip


def test_cell_round_trip(tmp_path):
  cell = one_cell()
  os.makedirs(tmp_path / workdir.CELLS_DIR)
  assert not workdir.cell_done(str(tmp_path), cell)
  workdir.write_cell(str(tmp_path), cell, fake_meta(cell), fake_arrays())
  assert workdir.cell_done(str(tmp_path), cell)
  meta, arrays = workdir.read_cell(str(tmp_path), cell)
  assert meta == fake_meta(cell)
  np.testing.assert_array_equal(arrays.of("greedy")["final_loss"], [0, 1, 2])
  assert arrays.of("greedy")["seed_collapsed"].all()
  with np.load(tmp_path / "cells" / "default.npz") as z:
    assert sorted(z) == ["diverged", "final_loss", "greedy/seed_collapsed"]


def test_a_workdir_of_another_config_is_refused(tmp_path):
  workdir.prepare(str(tmp_path), tiny_config(), overwrite=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["fingerprint"] == config_lib.fingerprint(tiny_config())
  assert saved["versions"]["jax"] and saved["devices"]["backend"] == "cpu"
  assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in saved["xla_flags"]
  # Execution-only fields don't change results, so they don't count as another config.
  workdir.prepare(str(tmp_path), tiny_config(max_parallel_seeds=2), overwrite=False)
  changed = tiny_config()
  changed.train.learning_rate = 0.05
  with pytest.raises(workdir.WorkdirError, match="different config.*--overwrite"):
    workdir.prepare(str(tmp_path), changed, overwrite=False)
  (tmp_path / "results.json").write_text("{}")
  workdir.prepare(str(tmp_path), changed, overwrite=True)
  assert not (tmp_path / "results.json").exists()


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(workdir.WorkdirError, match="is not writable"):
    workdir.prepare(str(blocker / "sub"), tiny_config(), overwrite=False)


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


def test_the_note_replaces_stale_plots(tmp_path):
  (tmp_path / "old.png").write_bytes(b"x")
  (tmp_path / "keep.png").write_bytes(b"mine")
  path = workdir.write_note(str(tmp_path), "# note", {"new": b"png"}, ("old", "new"))
  assert open(path).read() == "# note"
  assert not (tmp_path / "old.png").exists() and (tmp_path / "new.png").read_bytes() == b"png"
  assert (tmp_path / "keep.png").read_bytes() == b"mine"  # Not one of the note's plots.
