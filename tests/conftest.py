"""Shared test helpers: a tiny config, a shared tiny blog study, and a compilation cache."""

import os
import sys
import tempfile

# This checkout's code first, whatever an editable install elsewhere points at.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import blog, tiny  # noqa: E402

# Tests build the same small programs many times (each study makes new closures): JAX's
# persistent cache turns every repeat into a disk read, also across the fast and slow tiers.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "collapse-study-tests-jax-cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# As flax's lm1b train_test: most XLA optimisations off halves compile times of the small test
# programs; every comparison in the tests is between runs compiled the same way.
jax.config.update("jax_disable_most_optimizations", True)
# The study runs every matmul in float32 (model.matmul_precision); tests that apply the model
# directly do too, rather than a GPU's tensorfloat32 or a TPU's bfloat16 default.
jax.config.update("jax_default_matmul_precision", "float32")


def rounding_slack() -> float:
  """How much looser than on CPU a comparison of two differently compiled float32 programs is.

  On GPUs, XLA's Triton gemms and fusions order float32 sums differently from one program to
  the next (split-K, tile shapes), so two implementations of one function differ by up to
  ~10x CPU's rounding. Still far below tensorfloat32's ~1e-3, which these tests must catch.
  """
  return 1.0 if jax.default_backend() == "cpu" else 10.0


def tiny_config(**study):
  """The blog model at a smaller size: 4 seeds, 3 epochs, short generations."""
  config = tiny.get_config()
  for key, value in study.items():
    config.study[key] = value
  return config


def grid_config(**study_kw):
  """Two texts x a 2 x 2 learning-rate x dropout grid: 8 cells in 2 programs."""
  config = tiny_config(**study_kw)
  config.study.scenarios = [
    dict(name="rep", data=dict(corpus="blog_repetitive")),
    dict(name="var", data=dict(corpus="blog_varied")),
  ]
  config.study.grid = ml_collections.ConfigDict(
    {"train": {"learning_rate": (1e-3, 1e-1)}, "model": {"dropout": (0.0, 0.5)}}
  )
  return config


def blog_tiny_config(seeds: int = 4):
  """The blog's three scenarios at the tiny size."""
  config = blog.get_config()
  small = tiny_config()
  for group in ("model", "train", "generate"):
    config[group] = small[group]
  config.study.seeds = seeds
  return config


@pytest.fixture(scope="session")
def blog_workdir(tmp_path_factory):
  """A finished tiny blog study with its note, shared by the study, workdir and note tests."""
  from research import report, study

  workdir = str(tmp_path_factory.mktemp("blog"))
  rows = study.run_study(blog_tiny_config(), workdir)
  report.write_report(workdir)
  return workdir, rows


def load_per_seed(workdir):
  """A finished workdir's per_seed.npz as a dict."""
  with np.load(os.path.join(workdir, "per_seed.npz")) as z:
    return dict(z)


def assert_same_results(a, b):
  """Two per_seed dicts hold the same keys and equal arrays (float tolerance).

  On a GPU two runs of one program differ too: the embedding gradient's scatter-add uses
  float atomics, whose order varies (measured on an H100: 1 of 3200 loss values 6.6e-5 apart).
  """
  assert sorted(a) == sorted(b)
  for key in a:
    tol = 2e-5 * rounding_slack()
    np.testing.assert_allclose(a[key], b[key], rtol=tol, atol=1e-6, err_msg=key)


# Several processes or devices are simulated with CPU devices: on a machine with one GPU, JAX
# would put every process on that GPU, and NCCL refuses two ranks on one device.
SIMULATED_HOSTS = dict(JAX_PLATFORMS="cpu")


def subprocess_env(**extra) -> dict:
  """Environment for running run.py or a script in a subprocess from the repo root."""
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.update(extra)
  return env
