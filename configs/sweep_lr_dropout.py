"""Grid: 7 learning rates x 3 dropout rates x both blog texts, 128 seeds per cell."""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  config.study.seeds = 128  # 42 cells x 128 seeds = 5376 trained models.
  config.study.scenarios = [
    dict(name="repetitive", data=dict(corpus="blog_repetitive")),  # The blog's example-1 text.
    dict(name="varied", data=dict(corpus="blog_varied")),  # The blog's example-2/3 text.
  ]
  # One compiled program per text: learning rate and dropout are traced, so vmapped.
  config.study.grid = ml_collections.ConfigDict(
    {
      "train": {"learning_rate": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},
      "model": {"dropout": (0.0, 0.2, 0.5)},
    }
  )
  return config
