"""The study's compiled programs: seed-vmapped init, epochs in pieces, evaluation."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, SIMULATED_HOSTS, subprocess_env, tiny_config

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


def dot_precisions(lowered) -> set[str]:
  """The precision of every dot_general in a lowered program's StableHLO."""
  return set(re.findall(r"dot_general.*precision = \[(\w+), \w+\]", lowered.as_text()))


def test_every_matmul_runs_at_the_configured_precision():
  """Forward, backward (the fused LSTM's custom VJP too) and evaluation: float32 unless the
  config asks for less, whatever JAX's global default (a GPU's is tensorfloat32)."""
  (cell,) = config_lib.expand_cells(tiny_config())
  dataset = data.dataset_from_config(cell.config.data)
  seeds, lrs, dropouts = jnp.arange(2), jnp.full(2, 1e-2), jnp.full(2, 0.2)
  expected = {"float32": "HIGHEST", "tensorfloat32": "HIGH", "bfloat16": "DEFAULT"}
  with jax.default_matmul_precision("bfloat16"):  # A global default the config overrides.
    for precision, stablehlo in expected.items():
      config = cell.config.copy_and_resolve_references()
      config.model.matmul_precision = precision
      progs = programs.build(config, dataset, cell.decodings)
      state = jax.eval_shape(progs.init, seeds, lrs, dropouts)
      for program in (progs.epochs_program(1), progs.evaluate, progs.dynamics):
        assert dot_precisions(program.lower(state)) == {stablehlo}, (precision, program)


def test_evaluation_in_seed_chunks_equals_one_vmap(monkeypatch):
  """On a CPU, evaluation runs cache-sized chunks of seeds in turn (train.chunked_vmap): the
  same metrics as all seeds at once, discrete ones exactly. Other backends run one vmap."""
  (cell,) = config_lib.expand_cells(tiny_config())
  dataset = data.dataset_from_config(cell.config.data)
  seeds = jnp.arange(17, dtype=jnp.int32)  # Chunks of 8: the last one is padded.
  args = seeds, jnp.full(17, 1e-2), jnp.full(17, 0.2)

  def evaluate():
    progs = programs.build(cell.config, dataset, cell.decodings)
    state, _ = progs.run_epochs(progs.init(*args), 2)
    whiles = progs.evaluate.lower(state).as_text().count("stablehlo.while")
    return (progs.evaluate(state), progs.dynamics(state)), whiles

  whole, whiles_whole = evaluate()
  monkeypatch.setattr(train, "CPU_CHUNK_BYTES", 1)  # The smallest chunks: 8 seeds.
  chunked, whiles_chunked = evaluate()
  if jax.default_backend() == "cpu":
    assert whiles_chunked > whiles_whole  # The chunks' loop.
  else:
    assert whiles_chunked == whiles_whole
  for a, b in zip(
    jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole), strict=True
  ):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)


# Seeds 0-3 on two CPU devices: sharded (4 split), then seeds 0-2 (3 do not split: one vmap).
TWO_DEVICES = """
import numpy as np, jax, jax.numpy as jnp
from conftest import tiny_config
from research import config_lib, data, programs
assert jax.device_count() == 2
(cell,) = config_lib.expand_cells(tiny_config())
progs = programs.build(cell.config, data.dataset_from_config(cell.config.data), cell.decodings)
out = {}
for n in (4, 3):
  state = progs.init(jnp.arange(n, dtype=jnp.int32), jnp.full(n, 1e-2), jnp.full(n, 0.2))
  state, loss = progs.run_epochs(state, 2)
  out[n] = np.asarray(loss), np.asarray(progs.evaluate(state).train.final_loss)
  if n == 4:
    assert len(state.params["Dense_0"]["kernel"].sharding.device_set) == 2
np.testing.assert_allclose(out[3][0], out[4][0][:3], rtol=1e-6, atol=1e-7)
np.testing.assert_allclose(out[3][1], out[4][1][:3], rtol=1e-6, atol=1e-7)
print("ok")
"""


@pytest.mark.slow
def test_several_devices_each_run_their_own_seeds():
  """With several devices the programs are a shard_map over the seed axis; a seed count that
  does not split over them still runs (as one vmap), with the same per-seed results."""
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", **SIMULATED_HOSTS)
  env["PYTHONPATH"] = os.path.join(ROOT, "tests") + os.pathsep + env["PYTHONPATH"]
  proc = subprocess.run(
    [sys.executable, "-c", TWO_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True,
    timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
