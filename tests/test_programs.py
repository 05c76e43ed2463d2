"""The study's compiled programs: seed-vmapped init, epochs in pieces, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from research import config_lib, data, programs, train


def test_programs_equal_the_per_seed_functions():
  (cell,) = config_lib.expand_cells(tiny_config())
  dataset = data.dataset_from_config(cell.config.data)
  progs = programs.build(cell.config, dataset, cell.decodings)
  seeds = jnp.asarray([0, 5, 7], jnp.int32)
  lrs, dropouts = jnp.full(3, 1e-2), jnp.asarray([0.0, 0.2, 0.5])
  state = progs.init(seeds, lrs, dropouts)
  state, first_Sx1 = progs.run_epochs(state, 1)
  state, rest_Sx2 = progs.run_epochs(state, 2)
  loss_SxE = np.concatenate([first_Sx1, rest_Sx2], axis=1)
  assert loss_SxE.shape == (3, 3) and state.epoch.tolist() == [3, 3, 3]
  # Seed 5 alone, through the per-seed functions in one call, is the same run.
  one = progs.trainer.train(jax.random.key(5), train.Hparams(jnp.float32(1e-2), jnp.float32(0.2)))
  np.testing.assert_allclose(loss_SxE[1], one.loss_E, rtol=1e-5, atol=1e-6)
  evaluation = progs.evaluate(state)
  assert evaluation.train.final_loss.shape == (3,)
  assert evaluation.decodings["greedy"].tail_period_P.shape[0] == 3
