"""Scheduling: cells -> programs, seed chunks, sharding, progress; each cell written when done."""

import collections
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from research import config_lib, programs, results, schema, workdir
from research import data as data_lib

# ----------------------------------------------------------------------------- devices


def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("seeds",))


def _to_global(x: np.ndarray, sharding: NamedSharding):
  """Host array (identical on every process) -> global array sharded along its first axis."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(tree):
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


# ----------------------------------------------------------------------------- groups


@dataclasses.dataclass
class Group:
  """Cells sharing one program key (they differ only in traced hyperparameters)."""

  cells: list
  dataset: data_lib.Dataset
  programs: programs.Programs

  @classmethod
  def build(cls, cells: list[config_lib.Cell]) -> "Group":
    config = cells[0].config
    dataset = data_lib.dataset_from_config(config.data)
    for decoding in cells[0].decodings:  # Checks that need the corpus, still before training.
      try:
        schema.check_vocabulary(decoding.generate, dataset.vocab_size)
      except schema.ConfigError as e:
        raise schema.ConfigError(f"{cells[0].name}@{decoding.name}: {e}") from None
    return cls(cells, dataset, programs.build(config, dataset, cells[0].decodings))

  @property
  def config(self):
    return self.cells[0].config


def group_cells(cells: list[config_lib.Cell]) -> list[Group]:
  """One Group per program key, in first-appearance order; datasets and prompts built now."""
  groups = collections.OrderedDict()
  for cell in cells:
    groups.setdefault(config_lib.program_key(cell), []).append(cell)
  return [Group.build(group) for group in groups.values()]


def _chunk_size(total: int, config) -> int:
  ndev = jax.device_count()
  size = config.study.max_parallel_seeds or total
  size = min(size, total)
  return math.ceil(size / ndev) * ndev  # Padding rows are dropped after the call.


def _cell_meta(cell: config_lib.Cell, dataset: data_lib.Dataset, seconds: float):
  return results.CellMeta(
    name=cell.name,
    scenario=cell.scenario,
    scenario_index=cell.scenario_index,
    axes=cell.axes,
    config=cell.config.to_dict(),
    decodings=[d.name for d in cell.decodings],
    labels={d.name: cell.label(d.name) for d in cell.decodings},
    vocab=list(dataset.vocab),
    num_windows=int(dataset.windows_NxW.shape[0]),
    seconds=seconds,
    fingerprint=config_lib.cell_fingerprint(cell),
  )


class _CellBuffer:
  """Per-seed rows of one cell, gathered chunk by chunk until all its seeds are in."""

  def __init__(self, seeds: int):
    self.remaining = seeds
    self.train = collections.defaultdict(list)
    self.decodings = collections.defaultdict(lambda: collections.defaultdict(list))
    self.seconds = 0.0

  def add(self, mine: np.ndarray, loss_SxE, evaluation, seconds: float) -> None:
    self.train["loss_curve"].append(loss_SxE[mine])
    for field, value in vars(evaluation.train).items():
      self.train[field].append(np.asarray(value)[mine])
    for name, decoded in evaluation.decodings.items():
      for field, value in vars(decoded).items():
        self.decodings[name][field].append(np.asarray(value)[mine])
    self.seconds += seconds
    self.remaining -= int(mine.sum())

  def arrays(self) -> results.SeedArrays:
    return results.SeedArrays(
      train={k: np.concatenate(v) for k, v in self.train.items()},
      decodings={
        name: {k: np.concatenate(v) for k, v in fields.items()}
        for name, fields in self.decodings.items()
      },
    )


def _run_group(group: Group, pending, directory: str, progress: "_Progress") -> None:
  """Trains and evaluates every (cell, seed) of `pending` cells, writing each cell when done."""
  config = group.config
  seeds = config.study.seeds
  float_dtype = jnp.zeros(()).dtype
  cell_of = np.repeat(np.arange(len(pending)), seeds)
  seed_of = np.tile(np.arange(seeds, dtype=np.uint32) + config.study.seed_offset, len(pending))
  lr_of = np.asarray([c.config.train.learning_rate for c in pending], float_dtype)[cell_of]
  dropout_of = np.asarray([c.config.model.dropout for c in pending], float_dtype)[cell_of]
  total = len(cell_of)
  chunk = _chunk_size(total, config)
  sharding = NamedSharding(_mesh(), P("seeds"))
  buffers = [_CellBuffer(seeds) for _ in pending]
  epochs, per_call = config.train.epochs, config.study.epochs_per_call

  for start in range(0, total, chunk):
    rows = np.arange(start, min(start + chunk, total))
    padded = np.concatenate([rows, np.full(chunk - len(rows), rows[-1])])
    t0 = time.time()
    state = group.programs.init(
      _to_global(seed_of[padded], sharding),
      _to_global(lr_of[padded], sharding),
      _to_global(dropout_of[padded], sharding),
    )
    losses = []
    for done in range(0, epochs, per_call):
      state, loss_SxE = group.programs.run_epochs(state, min(per_call, epochs - done))
      losses.append(loss_SxE)
      jax.block_until_ready(loss_SxE)
      progress.epochs(len(rows), min(done + per_call, epochs), epochs, t0)
    real = slice(0, len(rows))  # Drop the rows that pad the chunk.
    evaluation = _to_host(group.programs.evaluate(state))
    evaluation = jax.tree_util.tree_map(lambda x, real=real: np.asarray(x)[real], evaluation)
    loss_SxE = np.concatenate([np.asarray(_to_host(x)) for x in losses], axis=1)[real]
    seconds = time.time() - t0
    for i in np.unique(cell_of[rows]):
      mine = cell_of[rows] == i
      buffers[i].add(mine, loss_SxE, evaluation, seconds * mine.sum() / len(rows))
      if buffers[i].remaining == 0:
        meta = _cell_meta(pending[i], group.dataset, buffers[i].seconds)
        workdir.write_cell(directory, pending[i], meta, buffers[i].arrays())
        buffers[i] = None
        progress.cell_done(pending[i].name)


class _Progress:
  """Logs cells done / total, seeds per second and an ETA for the whole study."""

  def __init__(self, total_cells: int, seed_epochs: int):
    self.total_cells, self.cells_done = total_cells, 0
    self.seed_epochs_total, self.seed_epochs_done = seed_epochs, 0
    self.start = time.time()
    self.last = 0.0

  def epochs(self, num_seeds: int, epochs_done: int, epochs: int, chunk_start: float) -> None:
    """Called after each jitted call of `epochs_done` of `epochs` epochs on num_seeds seeds."""
    now = time.time()
    seed_epochs = self.seed_epochs_done + num_seeds * epochs_done
    if epochs_done == epochs:
      self.seed_epochs_done = seed_epochs
    if now - self.last < 2.0 and epochs_done != epochs:
      return
    self.last = now
    rate = seed_epochs / max(now - self.start, 1e-9)  # Compile time included: an honest ETA.
    eta = (self.seed_epochs_total - seed_epochs) / max(rate, 1e-9)
    logging.info(
      "cells %d/%d | epoch %d/%d of %d seeds | %.1f seeds/s | ETA %.0fs",
      self.cells_done, self.total_cells, epochs_done, epochs, num_seeds,
      num_seeds * epochs_done / epochs / max(now - chunk_start, 1e-9), eta,
    )  # fmt: skip

  def cell_done(self, name: str) -> None:
    self.cells_done += 1
    elapsed = time.time() - self.start
    logging.info(
      "finished %s (%d/%d cells, %.0fs elapsed)", name, self.cells_done, self.total_cells, elapsed
    )


def run_study(config, directory: str, overwrite: bool = False) -> list[results.Row]:
  """Runs every unfinished cell of `config` into `directory`; returns the results rows.

  The workdir is locked while the study runs.
  """
  start = time.time()
  cells = config_lib.expand_cells(config)
  groups = group_cells(cells)  # Datasets and prompts now: bad data fails before any training.
  with workdir.open_for_study(directory, config, overwrite):
    return _run(config, cells, groups, directory, start)


def _run(config, cells, groups, directory: str, start: float) -> list[results.Row]:
  logging.info(
    "%d cells x %d seeds in %d compiled program(s) on %s",
    len(cells), config.study.seeds, len(groups), workdir.device_summary(),
  )  # fmt: skip
  pending_of = [[c for c in g.cells if not workdir.cell_done(directory, c)] for g in groups]
  seed_epochs = sum(c.config.train.epochs for p in pending_of for c in p) * config.study.seeds
  progress = _Progress(len(cells), seed_epochs)
  for group, pending in zip(groups, pending_of, strict=True):
    for cell in group.cells:
      if cell not in pending:
        logging.info("skipping %s: already finished in %s", cell.name, directory)
        progress.cell_done(cell.name)
    if pending:
      _run_group(group, pending, directory, progress)
  return workdir.write_results(directory, cells, config.study.seeds, time.time() - start)
