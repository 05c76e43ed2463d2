"""The jaxlib 0.10 CPU hang workaround is set by the package and holds at >=256 seeds."""

import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

from research import platform


def test_flag_added_when_absent():
  env = {}
  platform.configure_xla_flags(env)
  assert env["XLA_FLAGS"] == platform.CPU_SCHEDULER_FLAG


def test_user_flags_are_kept():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  platform.configure_xla_flags(env)
  assert env["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=4",
    platform.CPU_SCHEDULER_FLAG,
  ]


def test_user_choice_of_the_scheduler_wins():
  env = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
  platform.configure_xla_flags(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"


@pytest.mark.slow
def test_importing_research_sets_the_flag_before_jax_starts():
  code = "import os, research, jax; jax.devices();print(os.environ['XLA_FLAGS'])"
  out = subprocess.run(
    [sys.executable, "-c", code],
    env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    capture_output=True, text=True, timeout=120, cwd=ROOT, check=True,
  )  # fmt: skip
  flags = ["--xla_force_host_platform_device_count=1", platform.CPU_SCHEDULER_FLAG]
  assert out.stdout.split() == flags


# Without the flag this program parks every XLA thread forever on jaxlib 0.10 (measured here);
# the timeout turns such a regression into a failure instead of a stuck CI.
HANG_PROGRAM = """
import research
import jax, jax.numpy as jnp
from configs import blog
from research import config_lib, data, train
cfg = config_lib.expand_cells(blog.get_config())[1].config
cfg.train.epochs = 1
trainer = train.make_train(cfg, data.dataset_from_config(cfg.data))
seeds = 256
keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
hparams = train.Hparams(jnp.full(seeds, 1e-3), jnp.full(seeds, 0.2))
result = jax.jit(jax.vmap(trainer.train))(keys, hparams)
print("finished", result.loss_E.shape)
"""


@pytest.mark.slow
def test_256_vmapped_seeds_finish_under_a_timeout():
  env = subprocess_env()
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [sys.executable, "-c", HANG_PROGRAM],
    env=env, capture_output=True, text=True, timeout=240, cwd=ROOT,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert "finished (256, 1)" in out.stdout
