"""The compiled, seed-vmapped programs of one program key: init, run_epochs and evaluate.

The study and bench/ build their programs here, so both time and run the same code. The
footprint estimates what one seed costs in memory, from which the study picks chunk sizes.
"""

import dataclasses
import functools
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from research import config_lib
from research import data as data_lib
from research import evaluate as evaluate_lib
from research import train as train_lib

# What a chunk of training windows may hold per seed during evaluation: its logits and LSTM
# activations.
EVAL_CHUNK_BYTES = 16 << 20
# Safety factor over the counted arrays: XLA temporaries, fusion buffers, host copies.
SLACK = 3


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Estimated bytes one seed takes in the programs (conservative; see footprint())."""

  state: int  # Its TrainState: parameters and optimizer moments.
  train: int  # Training: the state in and out, gradients, one step's activations.
  evaluate: int  # Evaluation: a window chunk's logits, generation over every prompt.
  window_chunk: int  # Training windows evaluated at once.
  prompts: int


def footprint(config, dataset: data_lib.Dataset, state_bytes: int, prompts: int) -> Footprint:
  """Bytes per seed: counted arrays x SLACK. Checked against measured peaks in bench/."""
  f = 8 if jax.config.jax_enable_x64 else 4
  v, t, h = dataset.vocab_size, dataset.context_length, config.model.hidden
  d, length = config.model.embed_dim, config.generate.length
  batch = min(config.train.batch_size, dataset.windows_NxW.shape[0])
  gates = 4 * h * config.model.layers
  activations = batch * (t * (d + 3 * gates + 2 * h) + 3 * v) * f
  plan = dataset.windows_NxW.size * 4  # One epoch's shuffled windows, gathered per seed.
  train = 4 * state_bytes + 3 * activations + plan
  per_window = (4 * v + 2 * t * gates) * f  # Logits, softmax and the LSTM's activations.
  window_chunk = int(min(dataset.windows_NxW.shape[0], max(64, EVAL_CHUNK_BYTES // per_window)))
  logits = window_chunk * per_window
  generation = prompts * (per_window + length * (length // 4 + 8) * 4)
  evaluate = state_bytes + logits + generation
  return Footprint(
    state=state_bytes,
    train=SLACK * train,
    evaluate=SLACK * evaluate,
    window_chunk=window_chunk,
    prompts=prompts,
  )


def default_budget() -> int:
  """A safe share of the memory this process's programs run in: 70% of its accelerators',
  else half of the host's available memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if jax.default_backend() != "cpu" and stats.get("bytes_limit"):
    return int(0.7 * stats["bytes_limit"]) * jax.local_device_count()
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return int(0.5 * info["MemAvailable"])
  except (OSError, KeyError, ValueError, IndexError):
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def named(fn, name: str):
  """fn under a program's name: JAX's compile events (the run's per-program compile times)
  and the compiled module are named after the jitted function."""
  fn.__name__ = fn.__qualname__ = name
  return fn


def at_precision(fn, precision: str):
  """fn, traced with every matmul at this precision (forward, backward and custom VJPs)."""

  @functools.wraps(fn)
  def traced(*args):
    with jax.default_matmul_precision(precision):
      return fn(*args)

  return traced


def mesh() -> Mesh:
  """Every device of every process, along one "seeds" axis."""
  return Mesh(np.asarray(jax.devices()), ("seeds",))


def per_seed(fn, chunk_bytes: int = 0):
  """vmap(fn) over the seed axis; with several devices, each runs its own block of seeds.

  A shard_map rather than jit's partitioner: per-seed functions need no communication, and
  inside it a device's vmap sees only its own seeds, so they can be cut into cache-sized chunks
  on every CPU device: by train.chunked_vmap when chunk_bytes > 0, or by a train.seed_chunked
  inside fn.
  """
  vmapped = train_lib.chunked_vmap(fn, chunk_bytes) if chunk_bytes else jax.vmap(fn)
  if jax.device_count() == 1:
    return vmapped
  # check_vma off: constants built inside (scan carries, the epoch plan) are the same on every
  # device, which the check would have to be told, and nothing here communicates.
  sharded = jax.shard_map(
    vmapped, mesh=mesh(), in_specs=P("seeds"), out_specs=P("seeds"), check_vma=False
  )

  def run(*args):
    seeds = jax.tree_util.tree_leaves(args)[0].shape[0]
    # A seed count that does not split over the devices (a bench's 1 seed, say): jit's own
    # partitioning, as before. The study's calls always split.
    return sharded(*args) if seeds % jax.device_count() == 0 else vmapped(*args)

  return run


def matmul_precision(config) -> str:
  return config.model.get("matmul_precision", "float32")  # Configs recorded before the field.


@dataclasses.dataclass
class Programs:
  """jit(vmap(...)) of the per-seed functions; inputs and outputs have the seed axis first."""

  trainer: train_lib.Trainer
  init: callable  # (seeds_S uint32, learning_rates_S, dropouts_S) -> TrainState
  evaluate: callable  # TrainState -> evaluate.Evaluation
  dynamics: callable  # TrainState -> evaluate.Dynamics (at evaluation points in training)
  footprint: Footprint
  precision: str = "float32"
  _run_epochs: dict = dataclasses.field(default_factory=dict)

  def epochs_program(self, num_epochs: int):
    """The jitted state -> (state, losses SxE) of num_epochs epochs; the state is donated."""
    if num_epochs not in self._run_epochs:
      run = per_seed(lambda s: self.trainer.run_epochs(s, num_epochs))
      train = named(at_precision(run, self.precision), "train")
      self._run_epochs[num_epochs] = jax.jit(train, donate_argnums=0)
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

  prompts = len(evaluate_lib.choose_prompts(config, dataset).ids)
  one = jax.eval_shape(init_one, jax.ShapeDtypeStruct((), np.uint32), 1.0, 0.0)
  state_bytes = sum(
    math.prod(x.shape) * x.dtype.itemsize
    for x in jax.tree_util.tree_leaves(one)
    if jax.numpy.issubdtype(x.dtype, jax.numpy.number)
  )
  fp = footprint(config, dataset, state_bytes, prompts)
  evaluators = evaluate_lib.make_evaluate(config, dataset, decodings, fp.window_chunk)
  # Evaluation, like training, runs cache-sized chunks of seeds in turn on a CPU: the blog
  # study's evaluation phase runs 1.3x as fast at 256 seeds (README, Set-up and use).
  chunk = train_lib.CPU_CHUNK_BYTES
  precision = matmul_precision(config)

  def program(fn, name: str, chunk_bytes: int = 0):
    return jax.jit(named(at_precision(per_seed(fn, chunk_bytes), precision), name))

  return Programs(
    trainer=trainer,
    init=program(init_one, "init"),
    evaluate=program(evaluators.final, "evaluate", chunk),
    dynamics=program(evaluators.dynamics, "dynamics", chunk),
    footprint=fp,
    precision=precision,
  )
