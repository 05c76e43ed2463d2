"""Bad input never gives a deep traceback, a silent wrong result or a lost run (run.py)."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from conftest import ROOT, subprocess_env, tiny_config

from research import config_lib, study


def run(*args, timeout=300):
  cmd = [sys.executable, "run.py", *args]
  return subprocess.run(
    cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
  )


def run_tiny(workdir, *overrides):
  return run("--config=configs/tiny.py", f"--workdir={workdir}", *overrides)


def assert_clean_error(out, message):
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]


INVALID = [
  ("train.learning_rate", -0.1, "config.train.learning_rate must be > 0, got -0.1"),
  ("train.learning_rate", 0.0, "config.train.learning_rate must be > 0"),
  ("model.dropout", 1.0, "config.model.dropout must be in [0, 1), got 1.0"),
  ("model.dropout", -0.1, "config.model.dropout must be in [0, 1)"),
  ("train.batch_size", 0, "config.train.batch_size must be an int >= 1, got 0"),
  ("train.epochs", 0, "config.train.epochs must be an int >= 1"),
  ("study.seeds", 0, "config.study.seeds must be an int >= 1"),
  ("data.context_length", 0, "config.data.context_length must be an int >= 1"),
  ("generate.length", 4, "config.generate.length must be an int >= 8, got 4"),
  ("data.tokenization", "bpe", "config.data.tokenization must be one of ['char', 'word']"),
  ("generate.strategy", "beam", "config.generate.strategy must be one of ['greedy',"),
  ("train.optimizer", "lion", "config.train.optimizer must be one of ['adam', 'sgd',"),
  ("generate.top_p", 1.5, "config.generate.top_p must be in (0, 1], got 1.5"),
  ("generate.top_p", 0.0, "config.generate.top_p must be in (0, 1]"),
  ("generate.temperature", 0.0, "config.generate.temperature must be > 0"),
  ("generate.top_k", 0, "config.generate.top_k must be an int >= 1"),
  ("model.mode", "every", "config.model.mode must be one of ['last', 'all']"),
]


@pytest.mark.parametrize("field, value, message", INVALID)
def test_invalid_values_name_the_field(tmp_path, field, value, message):
  group, key = field.split(".")
  config = tiny_config()
  config[group][key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    study.run_study(config, str(tmp_path / "w"))
  assert message in str(e.value)
  assert not (tmp_path / "w").exists(), "nothing is written before the config is valid"


def test_invalid_scenario_and_grid_values_name_the_cell(tmp_path):
  config = tiny_config()
  config.study.scenarios = [dict(name="bad", train=dict(learning_rat=0.1))]
  with pytest.raises(
    config_lib.ConfigError, match="scenario 'bad': unknown .*'train.learning_rat'"
  ):
    study.run_study(config, str(tmp_path))
  config.study.scenarios = [dict(name="ok")]
  config.study.grid = ml_collections.ConfigDict({"model": {"dropout": (0.0, 1.5)}})
  with pytest.raises(config_lib.ConfigError, match=r"ok\[dropout=1.5\]: config.model.dropout"):
    study.run_study(config, str(tmp_path))


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


def write(tmp_path, name, payload: bytes):
  path = tmp_path / name
  path.write_bytes(payload)
  return str(path)


@pytest.mark.parametrize(
  "payload, message",
  [
    (None, "data.corpus_file: no such file"),
    (b"", "the corpus is empty"),
    (b"abc", "too few for one training window"),
    (b"the cat \xff\xfe sat", "is not valid UTF-8"),
  ],
)
def test_bad_corpus_files(tmp_path, payload, message):
  path = str(tmp_path / "missing.txt") if payload is None else write(tmp_path, "c.txt", payload)
  out = run_tiny(tmp_path / "w", f"--config.data.corpus_file={path}")
  assert_clean_error(out, message)


def test_prompt_with_unknown_tokens_names_them(tmp_path):
  out = run_tiny(
    tmp_path / "w", "--config.data.corpus=blog_repetitive", "--config.generate.prompts=('thx!',)"
  )
  assert_clean_error(out, "tokens not in the training vocabulary: ['!', 'x']")


def test_single_token_corpus_runs_and_is_trivially_collapsed(tmp_path):
  corpus = write(tmp_path, "a.txt", b"aaaaaaaaaaaa")
  out = run_tiny(
    tmp_path / "w", f"--config.data.corpus_file={corpus}", "--config.generate.prompts=('a',)"
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "collapse is trivial" in out.stdout
  row = json.loads((tmp_path / "w" / "results.json").read_text())["rows"][0]
  assert row["trivial_vocab"] and row["collapse_rate"] == 1.0


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = write(tmp_path, "file", b"x")
  out = run_tiny(f"{blocker}/sub")
  assert_clean_error(out, "is not writable")
  assert "epoch" not in out.stderr


def test_workdir_of_a_different_config_is_refused(tmp_path):
  assert run_tiny(tmp_path).returncode == 0
  out = run_tiny(tmp_path, "--config.train.learning_rate=0.05")
  assert_clean_error(out, "holds results of a different config")
  assert run_tiny(tmp_path, "--config.train.learning_rate=0.05", "--overwrite").returncode == 0
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["config"]["train"]["learning_rate"] == 0.05


def test_diverging_seeds_are_reported_not_raised(tmp_path):
  out = run_tiny(tmp_path / "adam", "--config.train.learning_rate=10")
  assert out.returncode == 0, out.stderr[-3000:]
  out = run_tiny(
    tmp_path / "sgd", "--config.train.optimizer=sgd", "--config.train.learning_rate=1000"
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "all seeds diverged" in out.stdout
  row = json.loads((tmp_path / "sgd" / "results.json").read_text())["rows"][0]
  assert row["diverged"] == row["seeds"] == 4


def test_float64_opt_in(tmp_path):
  out = run_tiny(tmp_path, "--jax_enable_x64")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((tmp_path / "config.json").read_text())["x64"] is True
  with np.load(tmp_path / "per_seed.npz") as z:
    assert z["default/final_loss"].dtype == np.float64
    assert z["default/loss_curve"].dtype == np.float64
