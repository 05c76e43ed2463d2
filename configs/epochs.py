"""The blog's scenarios at 100, 300 and 1000 epochs: is low-lr collapse just underfitting?"""

import ml_collections

from configs import blog


def get_config():
  config = blog.get_config()
  # Every scenario at each epoch budget; rows gain an "epochs" column.
  config.study.grid = ml_collections.ConfigDict({"train": {"epochs": (100, 300, 1000)}})
  config.study.seeds = 64  # 9 cells x up to 1000 epochs: 64 seeds keep a CPU run to minutes.
  config.study.epochs_per_call = 50  # Fewer, longer calls: progress every 50 epochs is plenty.
  return config
