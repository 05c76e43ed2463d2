"""The blog's scenarios trained for 1000 epochs, evaluated every 10: when does collapse end?"""

from configs import blog


def get_config():
  config = blog.get_config()
  config.train.epochs = 1000  # Long enough for scenario 3 to leave collapse (README, Results).
  config.study.eval_every = 10  # 101 evaluation points: onset and escape to 10 epochs.
  config.study.epochs_per_call = 10  # A multiple of eval_every: no extra compiled program.
  config.study.seeds = 64  # 3 cells x 1000 epochs: 64 seeds keep a CPU run to minutes.
  return config
