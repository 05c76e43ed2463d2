"""A seconds-long smoke study: the blog setup at toy size (tests and quick checks)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.embed_dim = 8  # Smaller than the blog's 10 so tests run fast.
  config.model.hidden = 16  # Smaller than the blog's 50.
  config.train.epochs = 3  # A few epochs: enough for the loss to move.
  config.generate.length = 16  # Short continuations (>= 8).
  config.study.seeds = 4  # A handful of seeds.
  config.study.epochs_per_call = 2  # Two calls per cell, so chunking is exercised.
  return config
