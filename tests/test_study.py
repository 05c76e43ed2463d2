"""Studies end to end, in process: outputs, grids, chunking, resume, divergence."""

import functools
import json
import math
import os
import pathlib
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_results, blog_tiny_config, grid_config, load_per_seed, tiny_config

from configs import blog
from research import config_lib, data, programs, results, study, train, workdir


def test_blog_study_outputs(blog_workdir):
  directory, rows = blog_workdir
  tmp_path = pathlib.Path(directory)
  assert [r.label for r in rows] == [s["name"] for s in blog.get_config().study.scenarios]
  assert [r.scenario_index for r in rows] == [0, 1, 2]
  for name in ("config.json", "results.json", "results.csv", "per_seed.npz"):
    assert os.path.exists(tmp_path / name), name
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["config"]["study"]["seeds"] == 4
  corpus = saved["corpora"][rows[0].cell]
  assert corpus["name"] == "blog_repetitive" and corpus["chars"] == 39
  assert len(corpus["sha256"]) == 64
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


@pytest.mark.slow  # Whole studies compiled twice: ~10-20 s each with an empty cache.
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


@pytest.mark.slow  # Whole studies compiled twice: ~10-20 s each with an empty cache.
def test_seed_chunks_give_identical_results(tmp_path):
  whole = grid_config()
  study.run_study(whole, str(tmp_path / "whole"))
  chunked = grid_config(max_parallel_seeds=3, epochs_per_call=1)
  study.run_study(chunked, str(tmp_path / "chunked"))
  assert_same_results(load_per_seed(tmp_path / "whole"), load_per_seed(tmp_path / "chunked"))


@pytest.mark.slow  # Two studies; the Pallas one's kernels interpreted on a CPU.
def test_a_study_with_the_pallas_kernels_gives_the_fused_results(tmp_path, caplog):
  fused = grid_config()
  study.run_study(fused, str(tmp_path / "fused"))
  pallas = grid_config()
  pallas.model.impl = "pallas"
  study.run_study(pallas, str(tmp_path / "pallas"))
  if jax.default_backend() != "gpu":
    assert "its kernels run in Pallas' interpreter" in caplog.text
  assert_same_results(load_per_seed(tmp_path / "fused"), load_per_seed(tmp_path / "pallas"))


def test_phases_time_every_program_compiled_with_its_cells(blog_workdir):
  directory, rows = blog_workdir
  phases = json.loads((pathlib.Path(directory) / "results.json").read_text())["phases"]
  records = phases["compile_programs"]
  assert len(records) == phases["programs_compiled"] > 0
  assert sum(r["cache_hit"] for r in records) == phases["compilation_cache_hits"]
  assert sum(r["seconds"] for r in records) <= phases["compile"] + 1e-3
  for r in records:
    assert r["seconds"] == pytest.approx(r["trace"] + r["lower"] + r["backend"], abs=1e-3)
  # The blog's two groups (scenario 1; scenarios 2 and 3) each compiled the study's programs.
  groups = [f"{rows[0].cell}", f"{rows[1].cell} (+1 more)"]
  # A cold run compiles some programs ahead, in a thread: "<cells>, ahead".
  named = [(r["cells"].removesuffix(", ahead"), r["program"]) for r in records if r["cells"]]
  for group in groups:
    for program in ("init", "train", "evaluate", "dynamics"):
      assert (group, program) in named, (group, program, named)


def test_compile_clock_names_each_program_and_its_cache_hit():
  clock = study._CompileClock()
  jax.monitoring.register_event_duration_secs_listener(clock.on_duration)
  jax.monitoring.register_event_listener(clock.on_event)
  token = float(np.random.default_rng().integers(1 << 30))  # A program no cache holds yet.

  def compile_once():  # A new function each time: traced, lowered and compiled again.
    def scaled(x):
      return x * token

    return jax.jit(programs.named(scaled, "scaled"))(jnp.ones(3)).block_until_ready()

  try:
    mark = clock.mark()
    with clock.group("a cell"):
      compile_once()
    compile_once()
  finally:
    jax.monitoring.unregister_event_duration_listener(clock.on_duration)
    jax.monitoring.unregister_event_listener(clock.on_event)
  phases = clock.since(mark)
  scaled = [r for r in phases["compile_programs"] if r["program"] == "scaled"]
  assert [(r["cells"], r["cache_hit"]) for r in scaled] == [("a cell", False), ("", True)]
  assert phases["programs_compiled"] == len(phases["compile_programs"])
  assert phases["compile"] + 1e-3 >= sum(r["seconds"] for r in phases["compile_programs"]) > 0


def test_a_study_started_at_another_group_gives_the_same_results(tmp_path, monkeypatch):
  """run.py --workers' worker k starts at group k; only the order of the work changes."""
  config = blog_tiny_config()  # Two groups: scenario 1; scenarios 2 and 3.
  names = [s["name"] for s in config.study.scenarios]
  groups = [names[0], f"{names[1]} (+1 more)"]
  monkeypatch.setattr(study, "_cold", lambda group, since: False)  # Nothing compiled ahead.
  order = {}
  for first in (0, 1, 2):
    rows = study.run_study(config, str(tmp_path / str(first)), first_group=first)
    assert [r.label for r in rows] == names  # Results in config order.
    phases = json.loads((tmp_path / str(first) / "results.json").read_text())["phases"]
    trains = [r["cells"] for r in phases["compile_programs"] if r["program"] == "train"]
    order[first] = list(dict.fromkeys(trains))
  assert order == {0: groups, 1: groups[::-1], 2: groups}
  assert_same_results(load_per_seed(tmp_path / "0"), load_per_seed(tmp_path / "1"))


def test_programs_compiled_ahead_give_the_same_results(tmp_path, monkeypatch):
  config = tiny_config()
  monkeypatch.setattr(study, "_cores", lambda: study.AHEAD_MIN_CORES)  # CI has 2.
  group_jobs = study._group_jobs

  def slow(job):  # Slower than the main thread's first steps.
    time.sleep(1.0)
    return job()

  def slow_group_jobs(*args, **kwargs):
    return [functools.partial(slow, job) for job in group_jobs(*args, **kwargs)]

  monkeypatch.setattr(study, "_group_jobs", slow_group_jobs)
  runs = {}
  for ahead in (False, True):
    monkeypatch.setattr(study, "_cold", lambda group, since, ahead=ahead: ahead)
    study.run_study(config, str(tmp_path / str(ahead)))
    phases = json.loads((tmp_path / str(ahead) / "results.json").read_text())["phases"]
    runs[ahead] = [(r["cells"], r["program"]) for r in phases["compile_programs"]]
  # Ahead, a background thread compiled the training calls and the final evaluation; the
  # main thread waited for it (rather than compile them too) and found them compiled.
  ahead = [program for cells, program in runs[True] if cells == "default, ahead"]
  assert sorted(ahead) == ["evaluate", "train"], runs[True]  # tiny: 1-epoch calls only.
  assert ("default", "evaluate") in runs[False] and ("default", "evaluate") not in runs[True]
  assert_same_results(load_per_seed(tmp_path / "False"), load_per_seed(tmp_path / "True"))
  # Below AHEAD_MIN_CORES cores nothing compiles ahead, cold or not.
  monkeypatch.setattr(study, "_cores", lambda: study.AHEAD_MIN_CORES - 1)
  study.run_study(config, str(tmp_path / "few_cores"))
  phases = json.loads((tmp_path / "few_cores" / "results.json").read_text())["phases"]
  assert not [r for r in phases["compile_programs"] if r["cells"].endswith(", ahead")]


def test_compile_ahead_threads_run_jobs_at_once_and_a_group_waits_for_its_follow_ups():
  ahead = study._AheadCompiles(["a", "b"])
  together = threading.Barrier(2, timeout=30)  # Passes only when two jobs run at once.
  ran = []

  def job(name, follow=(), meet=False):
    def run():
      if meet:
        together.wait()
      ran.append((name, ahead.ready[name[0]].is_set()))  # Its group's event, as it runs.
      return list(follow)

    return run

  def fails():
    raise RuntimeError("a compile that fails")

  ahead.add("a", [job("a0", meet=True)])
  ahead.add("b", [job("b0", follow=[job("b1"), fails], meet=True)])  # As a later group's init.
  threads = [threading.Thread(target=ahead.work) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=60)
  assert not any(thread.is_alive() for thread in threads)
  assert sorted(ran) == [("a0", False), ("b0", False), ("b1", False)]
  assert ahead.ready["a"].is_set() and ahead.ready["b"].is_set()  # The failure too counted.
  # Stopped, the jobs not started are dropped and every group is ready for the main thread.
  stopped = study._AheadCompiles(["c"])
  stopped.add("c", [job("c0")])
  assert not stopped.ready["c"].is_set()
  stopped.stop()
  stopped.work()
  assert stopped.ready["c"].is_set() and [name for name, *_ in ran].count("c0") == 0


def test_programs_compiled_ahead_for_a_group_not_started_serve_its_calls(tmp_path, monkeypatch):
  """What the compile-ahead thread does for the later groups: from shapes alone, the very
  programs the study then calls (else it would only waste time)."""
  config = tiny_config()
  study.run_study(config, str(tmp_path / "plain"))
  groups = study.group_cells(config_lib.expand_cells(config))
  jobs = study._init_job(groups[0], study.budget_bytes(config), jnp.zeros(()).dtype)
  assert len(jobs) == 3  # dynamics, the 1-epoch training call, evaluate.
  for job in jobs:
    assert job() == []
  monkeypatch.setattr(study, "group_cells", lambda cells: groups)
  study.run_study(config, str(tmp_path / "ahead"))
  phases = json.loads((tmp_path / "ahead" / "results.json").read_text())["phases"]
  compiled = {r["program"] for r in phases["compile_programs"]}
  assert not compiled & {"init", "dynamics", "train", "evaluate"}, compiled  # All found.
  assert_same_results(load_per_seed(tmp_path / "plain"), load_per_seed(tmp_path / "ahead"))


def test_a_group_is_cold_when_its_init_program_was_compiled():
  group = study.group_cells(config_lib.expand_cells(tiny_config()))[0]
  before = list(study._CLOCK.programs)
  try:
    since = len(before)
    assert not study._cold(group, since)  # No init program of it yet.
    study._CLOCK.programs.append(study.ProgramCompile("init", group.label, cache_hit=True))
    assert not study._cold(group, since)
    study._CLOCK.programs.append(study.ProgramCompile("train", group.label, cache_hit=False))
    assert not study._cold(group, since)
    study._CLOCK.programs.append(study.ProgramCompile("init", "other cells", cache_hit=False))
    assert not study._cold(group, since)
    study._CLOCK.programs.append(study.ProgramCompile("init", group.label, cache_hit=False))
    assert study._cold(group, since)
    assert not study._cold(group, len(study._CLOCK.programs))  # Only records after `since`.
  finally:
    study._CLOCK.programs[:] = before


def test_resume_skips_finished_cells(tmp_path, caplog):
  config = tiny_config()
  config.study.scenarios = [dict(name="a"), dict(name="b", train=dict(learning_rate=0.01))]
  workdir = str(tmp_path)
  study.run_study(config, workdir)
  first = load_per_seed(workdir)
  stamp = os.path.getmtime(tmp_path / "cells" / "a.npz")
  os.unlink(tmp_path / "cells" / "b.json")  # As if the run died before finishing b.
  stale = tmp_path / study.workdir.WORKERS_DIR / "seeds_0-1"  # An interrupted --workers run's.
  stale.mkdir(parents=True)
  (stale / "cells").mkdir()
  with caplog.at_level("INFO"):
    study.run_study(config, workdir)
  assert "skipping a: already finished" in caplog.text
  assert not (tmp_path / study.workdir.WORKERS_DIR).exists()  # Finished: stale folders go.
  assert os.path.getmtime(tmp_path / "cells" / "a.npz") == stamp
  assert_same_results(first, load_per_seed(workdir))
  study.run_study(config, workdir, overwrite=True)
  assert os.path.getmtime(tmp_path / "cells" / "a.npz") > stamp
  # A rerun compiles nothing: every program comes from the persistent compilation cache.
  phases = json.loads((tmp_path / "results.json").read_text())["phases"]
  assert phases["compilation_cache_hits"] == phases["programs_compiled"] > 0


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


def test_saved_models_reload_and_give_the_same_losses(blog_workdir):
  directory, rows = blog_workdir
  cell = rows[1].cell
  params, model = workdir.load_model(directory, cell, seed=2)
  config = config_lib.expand_cells(blog_tiny_config())[1].config
  dataset = data.dataset_from_config(config.data)
  inputs, targets = train.split_window(jnp.asarray(dataset.windows_NxW), "last")
  logits = model.apply({"params": params}, inputs)
  loss = train.cross_entropy(logits, targets, jnp.ones(len(targets)))
  final = workdir.read_cell(directory, cell)[1].train["final_loss"]
  np.testing.assert_allclose(loss, final[2], rtol=1e-5)
  with pytest.raises(workdir.WorkdirError, match="no saved model of seed 99"):
    workdir.load_model(directory, cell, seed=99)


def test_reevaluation_decodes_saved_models_again_without_training(tmp_path):
  config = tiny_config()
  # run.py writes the note through `note`, before the lock is let go: a second run (say with
  # --overwrite, deleting results.json) cannot start before the note is written.
  held = []

  def note():
    lock = json.loads((tmp_path / workdir.LOCK).read_text())
    held.append((lock["pid"], (tmp_path / "results.json").exists()))

  first = study.run_study(config, str(tmp_path), note=note)
  assert held == [(os.getpid(), True)] and not (tmp_path / workdir.LOCK).exists()
  before = load_per_seed(tmp_path)
  config.study.decodings = [dict(name="greedy"), dict(name="hot", strategy="temperature")]
  rows = study.reevaluate_study(config, str(tmp_path), note=note)
  assert held[1:] == [(os.getpid(), True)] and not (tmp_path / workdir.LOCK).exists()
  assert [r.label for r in rows] == ["default@greedy", "default@hot"]
  after = load_per_seed(tmp_path)
  for key in ("loss_curve", "final_loss", "greedy/seed_collapsed", "greedy/tail_period_P"):
    np.testing.assert_allclose(after[f"default/{key}"], before[f"default/{key}"], rtol=1e-6)
  assert rows[0].collapse_rate == first[0].collapse_rate
  assert "default/hot/distinct_2" in after
  config.train.epochs = 5
  with pytest.raises(workdir.WorkdirError, match="trains differently"):
    study.reevaluate_study(config, str(tmp_path))
  # An interrupted study (a cell not written yet) is refused before anything is changed: the
  # training command must still resume it.
  config.train.epochs = tiny_config().train.epochs
  (tmp_path / "cells" / "default.json").unlink()
  saved = (tmp_path / "config.json").read_bytes()
  with pytest.raises(workdir.WorkdirError, match="is not finished .*'default'.* resumes it"):
    study.reevaluate_study(config, str(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == saved
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(workdir.WorkdirError, match="config.json is damaged"):
    study.reevaluate_study(config, str(tmp_path))


def count_calls(monkeypatch, interrupt_at: int = 0) -> list:
  """Records each training call's epochs; raises KeyboardInterrupt at call `interrupt_at`."""
  calls, run_epochs = [], programs.Programs.run_epochs

  def counted(self, state, num_epochs):
    calls.append(num_epochs)
    if len(calls) == interrupt_at:
      raise KeyboardInterrupt
    return run_epochs(self, state, num_epochs)

  monkeypatch.setattr(programs.Programs, "run_epochs", counted)
  return calls


@pytest.mark.slow  # Whole studies compiled twice: ~10-20 s each with an empty cache.
def test_a_cell_killed_mid_training_resumes_from_its_checkpoint(tmp_path, monkeypatch, caplog):
  config = tiny_config(epochs_per_call=1, checkpoint_seconds=0.0)
  config.train.epochs = 6
  study.run_study(config, str(tmp_path / "whole"))
  count_calls(monkeypatch, interrupt_at=4)
  with pytest.raises(KeyboardInterrupt):
    study.run_study(config, str(tmp_path / "killed"))
  monkeypatch.undo()
  assert not (tmp_path / "killed" / "cells" / "default.json").exists()
  with caplog.at_level("INFO"):
    study.run_study(config, str(tmp_path / "killed"))
  assert "resuming rows 0-3 from their checkpoint at epoch 3" in caplog.text
  assert_same_results(load_per_seed(tmp_path / "whole"), load_per_seed(tmp_path / "killed"))
  assert not os.listdir(tmp_path / "killed" / "checkpoints")  # Dropped once the cell is done.


@pytest.mark.slow  # Whole studies compiled twice: ~10-20 s each with an empty cache.
def test_a_resumed_cell_reads_back_its_finished_chunks(tmp_path, monkeypatch, caplog):
  """A cell of many chunks (100k seeds: hundreds) does not train its finished chunks again."""
  config = tiny_config(epochs_per_call=1, checkpoint_seconds=0.0, max_parallel_seeds=2)
  config.train.epochs = 4
  study.run_study(config, str(tmp_path / "whole"))
  count_calls(monkeypatch, interrupt_at=7)  # Chunk 0 (rows 0-1): calls 1-4; chunk 1: epoch 2.
  with pytest.raises(KeyboardInterrupt):
    study.run_study(config, str(tmp_path / "killed"))
  monkeypatch.undo()
  assert os.listdir(tmp_path / "killed" / "models" / "default") == ["seeds_0-1"]
  # Chunk 0's record, as if its training had taken 1000 s: the cell's seconds count it, and
  # the resumed run's phases, which time this run only, do not.
  (part,) = (tmp_path / "killed" / "checkpoints").glob("*/part_*.json")
  record = json.loads(part.read_text())
  record["timing"] = dict(total=1500.0, train=1000.0, evaluate=500.0)
  part.write_text(json.dumps(record))
  calls = count_calls(monkeypatch)
  with caplog.at_level("INFO"):
    study.run_study(config, str(tmp_path / "killed"))
  assert "rows 0-1: finished by an earlier run, read back" in caplog.text
  phases = json.loads((tmp_path / "killed" / "results.json").read_text())["phases"]
  assert 0 < phases["train"] < 1000 and 0 < phases["evaluate"] < 500
  assert phases["train"] + phases["evaluate"] <= phases["total"]
  meta, _ = workdir.read_cell(str(tmp_path / "killed"), "default")
  assert meta.train_seconds > 1000 and meta.eval_seconds > 500 and meta.seconds > 1500
  assert "resuming rows 2-3 from their checkpoint at epoch 2" in caplog.text
  assert calls == [1, 1]  # Chunk 1's last two epochs only.
  assert_same_results(load_per_seed(tmp_path / "whole"), load_per_seed(tmp_path / "killed"))
  assert sorted(os.listdir(tmp_path / "killed" / "models" / "default")) == [
    "seeds_0-1",
    "seeds_2-3",
  ]
  assert not os.listdir(tmp_path / "killed" / "checkpoints")  # Dropped once the cell is done.
  _, arrays = workdir.read_cell(str(tmp_path / "killed"), "default")
  assert arrays.train["final_loss"].shape == (4,)


@pytest.mark.slow  # Whole studies compiled twice: ~10-20 s each with an empty cache.
def test_evaluation_in_small_chunks_equals_one_pass(tmp_path):
  corpus = tmp_path / "words.txt"
  rng = np.random.default_rng(0)
  corpus.write_text(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"], 600)))
  config = tiny_config(seeds=6)
  config.data.corpus_file, config.data.tokenization = str(corpus), "word"
  config.generate.max_prompts = 48  # Far fewer than the corpus' ~200 distinct contexts.
  roomy = study.run_study(config, str(tmp_path / "roomy"))
  (cell,) = config_lib.expand_cells(config)
  group = study.group_cells([cell])[0]
  budget_mb = math.ceil(2.5 * group.programs.footprint.evaluate / 2**20)
  assert study.plan(group, 6, budget_mb << 20).eval_seeds < 6  # Several evaluation calls.
  tight = tiny_config(seeds=6, memory_budget_mb=budget_mb)
  tight.data, tight.generate = config.data, config.generate
  rows = study.run_study(tight, str(tmp_path / "tight"))
  assert rows[0].collapse_rate == roomy[0].collapse_rate
  meta, _ = workdir.read_cell(str(tmp_path / "tight"), "default")
  assert meta.prompts == 48 and meta.contexts_used == 47 and meta.contexts > 48
  assert_same_results(load_per_seed(tmp_path / "roomy"), load_per_seed(tmp_path / "tight"))


def test_an_impossible_memory_budget_is_refused_before_training(tmp_path):
  config = tiny_config(memory_budget_mb=1)
  config.model.hidden = 256
  with pytest.raises(workdir.WorkdirError, match=r"memory_budget_mb=1 is too small .* MiB"):
    study.run_study(config, str(tmp_path))
  assert not os.listdir(tmp_path / "cells")


@pytest.mark.slow  # Whole studies compiled twice: ~10-20 s each with an empty cache.
def test_evaluation_during_training_leaves_the_final_results_unchanged(tmp_path):
  config = tiny_config(eval_every=1)
  rows = study.run_study(config, str(tmp_path / "every"))
  study.run_study(tiny_config(eval_every=3), str(tmp_path / "sparse"))
  every, few = load_per_seed(tmp_path / "every"), load_per_seed(tmp_path / "sparse")
  assert every["default/curve_collapsed"].shape == (4, 4)  # Epochs 0, 1, 2, 3.
  assert few["default/curve_collapsed"].shape == (4, 2)  # Epochs 0, 3.
  meta, _ = workdir.read_cell(str(tmp_path / "every"), "default")
  assert meta.eval_epochs == [0, 1, 2, 3]
  for key in few:
    if "/curve_" not in key:
      np.testing.assert_allclose(every[key], few[key], rtol=1e-6, err_msg=key)
  # The last evaluation point is the trained model: it agrees with the final evaluation.
  np.testing.assert_array_equal(
    every["default/curve_collapsed"][:, -1], every["default/greedy/seed_collapsed"]
  )
  np.testing.assert_allclose(every["default/curve_loss"][:, -1], every["default/final_loss"])
  np.testing.assert_allclose(
    every["default/curve_unigram_kl"][:, -1], every["default/unigram_kl"], rtol=1e-6
  )
  assert 0.0 <= rows[0].never_collapsed_share <= 1.0


def test_progress_shows_slow_and_fast_rates(caplog):
  """A word-level chunk of 8 seeds takes ~10 min: its rate must not print as 0.0 seeds/s."""
  progress = study._Progress(total_cells=1, seed_epochs=256)
  with caplog.at_level("INFO"):
    progress.epochs(num_seeds=8, epochs_done=1, epochs=1, chunk_start=time.time() - 600)
    progress.epochs(num_seeds=4096, epochs_done=1, epochs=1, chunk_start=time.time() - 1)
  assert "of 8 seeds | 0.013 seeds/s | ETA" in caplog.text
  assert re.search(r"of 4096 seeds \| 40\d\d\.\d seeds/s \| ETA", caplog.text), caplog.text
