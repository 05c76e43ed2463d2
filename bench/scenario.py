"""The cell the training benches time: configs/blog.py's scenario 2 (bench/throughput.py,
bench/profile.py, bench/cores.py), and its training compiled as the study compiles it."""

import time

import jax
import jax.numpy as jnp

from configs import blog
from research import config_lib, programs
from research import data as data_lib

NAME = "2_varied_lr1e-3_do0.2"  # blog_varied text, Adam lr 1e-3, dropout 0.2, batch 32.


def cell(config=None) -> config_lib.Cell:
  """Scenario 2 of `config`: configs/blog.py's, as the caller edited it (default: as it is)."""
  config = config if config is not None else blog.get_config()
  return {c.name: c for c in config_lib.expand_cells(config)}[NAME]


def init_args(config, num_seeds: int):
  """The init program's arguments for seeds 0..num_seeds-1: seeds, learning rates, dropouts."""
  dtype = jnp.zeros(()).dtype
  return (
    jnp.arange(num_seeds, dtype=jnp.int32),
    jnp.full((num_seeds,), config.train.learning_rate, dtype),
    jnp.full((num_seeds,), config.model.dropout, dtype),
  )


def compile_vmapped(cell: config_lib.Cell, num_seeds: int):
  """The study's programs for num_seeds seeds, compiled: (run() -> (state, losses), compile s)."""
  config = cell.config
  progs = programs.build(config, data_lib.dataset_from_config(config.data), cell.decodings)
  init = progs.init
  epochs, per_call = config.train.epochs, config.study.epochs_per_call
  calls = [min(per_call, epochs - done) for done in range(0, epochs, per_call)]
  args = init_args(config, num_seeds)
  t0 = time.perf_counter()
  init_c = init.lower(*args).compile()
  state_shape = jax.eval_shape(init, *args)
  epoch_c = {n: progs.epochs_program(n).lower(state_shape).compile() for n in set(calls)}
  compile_s = time.perf_counter() - t0

  def run():
    state = init_c(*args)
    losses = []
    for n in calls:
      state, loss = epoch_c[n](state)
      losses.append(loss)
    jax.block_until_ready((state, losses))
    return state, losses

  return run, compile_s
