"""The cell the training benches time: configs/blog.py's scenario 2 (bench/throughput.py,
bench/profile.py)."""

import jax.numpy as jnp

from configs import blog
from research import config_lib

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
