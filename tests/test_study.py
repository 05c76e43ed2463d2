"""Studies end to end, in process: outputs, grids, chunking, resume, divergence."""

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import assert_same_results, grid_config, load_per_seed, tiny_config

from configs import blog
from research import config_lib, results, study


def test_blog_study_outputs(blog_workdir):
  directory, rows = blog_workdir
  tmp_path = pathlib.Path(directory)
  assert [r.label for r in rows] == [s["name"] for s in blog.get_config().study.scenarios]
  assert [r.scenario_index for r in rows] == [0, 1, 2]
  for name in ("config.json", "results.json", "results.csv", "per_seed.npz"):
    assert os.path.exists(tmp_path / name), name
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["config"]["study"]["seeds"] == 4
  per_seed = load_per_seed(tmp_path)
  name = rows[1].cell
  assert per_seed[f"{name}/loss_curve"].shape == (4, 3)
  # The probe prompt plus every distinct training context was continued.
  assert per_seed[f"{name}/greedy/tail_period_P"].shape[1] > 50
  row = rows[0]
  assert 0.0 <= row.collapse_low <= row.collapse_rate <= row.collapse_high <= 1.0
  assert row.learning_rate == 0.1 and row.dropout == 0.0
  assert sum(row.probe_distribution.values()) == pytest.approx(1.0)
  saved_rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [results.from_jsonable(r) for r in saved_rows] == rows
  csv_lines = (tmp_path / "results.csv").read_text().splitlines()
  assert len(csv_lines) == 4 and csv_lines[0].startswith("label,scenario,")


def test_grid_shares_programs_and_matches_single_cells(tmp_path):
  config = grid_config()
  cells = config_lib.expand_cells(config)
  assert len(cells) == 8
  assert len({config_lib.program_key(c) for c in cells}) == 2  # One per training text.
  rows = study.run_study(config, str(tmp_path / "grid"))
  assert {r.learning_rate for r in rows} == {1e-3, 1e-1}
  assert rows[5].axes == cells[5].axes
  # A single cell run on its own gives the same per-seed numbers as inside the grid.
  cell = cells[5]
  alone = tiny_config()
  alone.data.corpus = cell.config.data.corpus
  alone.train.learning_rate = cell.config.train.learning_rate
  alone.model.dropout = cell.config.model.dropout
  study.run_study(alone, str(tmp_path / "alone"))
  grid_seed = load_per_seed(tmp_path / "grid")
  alone_seed = load_per_seed(tmp_path / "alone")
  for metric in ("loss_curve", "final_loss", "greedy/seed_collapsed", "greedy/tail_period_P"):
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


def test_diverged_seeds_are_counted_and_excluded(tmp_path):
  config = tiny_config()
  config.train.optimizer = "sgd"
  config.study.scenarios = [
    dict(name="fine", train=dict(learning_rate=0.01)),
    dict(name="boom", train=dict(learning_rate=1e30)),
  ]
  rows = study.run_study(config, str(tmp_path))
  fine, boom = rows
  assert fine.diverged == 0
  assert boom.diverged == boom.seeds == 4
  assert np.isnan(boom.collapse_rate) and np.isnan(boom.final_loss_mean)
  assert "all seeds diverged" in results.format_table(rows)


def test_top_k_beyond_the_vocabulary_fails_before_anything_is_written(tmp_path):
  config = tiny_config()
  config.generate.strategy, config.generate.top_k = "top_k", 500
  with pytest.raises(config_lib.ConfigError, match=r"default@top_k: config.generate.top_k"):
    study.run_study(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
