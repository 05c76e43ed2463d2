"""Shared test helpers: a tiny config, so tests train real models in seconds."""

import os
import sys

import research  # noqa: F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402


def tiny_config(**study):
  """The blog model at a smaller size: 4 seeds, 3 epochs, short generations."""
  config = tiny.get_config()
  for key, value in study.items():
    config.study[key] = value
  return config


def subprocess_env(**extra) -> dict:
  """Environment for running run.py or a script in a subprocess from the repo root."""
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env
