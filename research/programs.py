"""The compiled, seed-vmapped programs of one program key: init, run_epochs and evaluate.

The study and bench/ build their programs here, so both time and run the same code.
"""

import dataclasses

import jax

from research import config_lib
from research import data as data_lib
from research import evaluate as evaluate_lib
from research import train as train_lib


@dataclasses.dataclass
class Programs:
  """jit(vmap(...)) of the per-seed functions; inputs and outputs have the seed axis first."""

  trainer: train_lib.Trainer
  init: callable  # (seeds_S int32, learning_rates_S, dropouts_S) -> TrainState
  evaluate: callable  # TrainState -> evaluate.Evaluation
  _run_epochs: dict = dataclasses.field(default_factory=dict)

  def epochs_program(self, num_epochs: int):
    """The jitted state -> (state, losses SxE) of num_epochs epochs; the state is donated."""
    if num_epochs not in self._run_epochs:
      run = jax.vmap(lambda s: self.trainer.run_epochs(s, num_epochs))
      self._run_epochs[num_epochs] = jax.jit(run, donate_argnums=0)
    return self._run_epochs[num_epochs]

  def run_epochs(self, state: train_lib.TrainState, num_epochs: int):
    """(state, losses SxE) after num_epochs more epochs; the input state is donated."""
    return self.epochs_program(num_epochs)(state)


def build(
  config, dataset: data_lib.Dataset, decodings: tuple[config_lib.Decoding, ...]
) -> Programs:
  """Programs for every cell sharing config's program key (they differ in traced hparams)."""
  trainer = train_lib.make_train(config, dataset)

  def init_one(seed, learning_rate, dropout):
    hparams = train_lib.Hparams(learning_rate=learning_rate, dropout=dropout)
    return trainer.init(jax.random.key(seed), hparams)

  evaluate = evaluate_lib.make_evaluate(config, dataset, decodings)
  return Programs(
    trainer=trainer, init=jax.jit(jax.vmap(init_one)), evaluate=jax.jit(jax.vmap(evaluate))
  )
