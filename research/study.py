"""Runs a study: cells -> compiled vmapped programs -> per-seed metrics -> results files."""

import collections
import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from research import config_lib, files, metrics, stats
from research import data as data_lib
from research import generate as generate_lib
from research import model as model_lib
from research import train as train_lib

CELLS_DIR = "cells"


class StudyError(RuntimeError):
  """A problem with the workdir or study, with a message meant for the user."""


@struct.dataclass
class EvalMetrics:
  """Decoding-independent per-seed metrics, on every training window (no dropout)."""

  final_loss: jax.Array
  accuracy: jax.Array
  entropy: jax.Array
  argmax_constant: jax.Array
  probe: jax.Array  # Argmax next token right after the first prompt (the blog's "the").
  diverged: jax.Array


@struct.dataclass
class DecodeMetrics:
  """Per-seed metrics of one decoding of every prompt."""

  seed_collapsed: jax.Array
  collapsed_fraction: jax.Array  # Share of prompts whose continuation collapsed.
  collapse_token: jax.Array  # Last token of the probe continuation.
  tail_period_P: jax.Array
  distinct_1: jax.Array
  distinct_2: jax.Array
  seq_rep_4: jax.Array
  top_token_share: jax.Array
  probe_continuation_L: jax.Array


def decodings(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, generate config) pairs; study.decodings overrides config.generate by name."""
  if not config.study.decodings:
    return [("", config.generate)]
  out = []
  for spec in config.study.decodings:
    spec = dict(spec)
    name = str(spec.pop("name", ""))
    if not name:
      raise config_lib.ConfigError("config.study.decodings: every decoding needs a name")
    updated = config_lib.override(config, {f"generate.{k}": v for k, v in spec.items()}, name)
    config_lib.validate(updated)
    out.append((name, updated.generate))
  return out


def prompt_ids(config, dataset: data_lib.Dataset) -> list[np.ndarray]:
  """Encoded prompts: config.generate.prompts, then every distinct training context."""
  ids = [dataset.encode(p) for p in config.generate.prompts]
  for i, p in zip(range(len(ids)), config.generate.prompts, strict=True):
    if len(ids[i]) == 0:
      raise data_lib.DataError(f"generate.prompts: prompt {p!r} has no tokens")
  if config.generate.include_training_contexts:
    ids.extend(dataset.distinct_contexts_CxT)
  return ids


def make_finalize(config, dataset: data_lib.Dataset):
  """finalize(state) -> (EvalMetrics, {decoding: DecodeMetrics}) for one trained seed."""
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  inputs_NxT, targets = train_lib.split_window(jnp.asarray(dataset.windows_NxW), config.model.mode)
  prompts_PxT, lengths_P = generate_lib.prepare_prompts(
    prompt_ids(config, dataset), dataset.context_length
  )
  decoders = [(n, g, generate_lib.make_generate(model, g)) for n, g in decodings(config)]
  vocab_size = dataset.vocab_size

  def finalize(state: train_lib.TrainState):
    logits = model.apply({"params": state.params}, inputs_NxT)
    ones_N = jnp.ones(inputs_NxT.shape[0])
    logits_V = logits if logits.ndim == 2 else logits[:, -1]  # "all": the last position.
    targets_N = targets if targets.ndim == 1 else targets[:, -1]
    decoded = {}
    for index, (name, _, generate) in enumerate(decoders):
      key = jax.random.fold_in(jax.random.fold_in(state.key, 2), index)
      gen = generate(state.params, prompts_PxT, lengths_P, key)
      x_PxL = gen.tokens_PxL
      if index == 0:  # The probe's next-token logits are the same under every decoding.
        probe = jnp.argmax(gen.first_logits_PxV[0])
      decoded[name] = DecodeMetrics(
        seed_collapsed=metrics.seed_collapsed(x_PxL),
        collapsed_fraction=jnp.mean(metrics.collapsed(x_PxL)),
        collapse_token=x_PxL[0, -1],
        tail_period_P=metrics.tail_period(x_PxL),
        distinct_1=metrics.distinct_n(x_PxL, 1),
        distinct_2=metrics.distinct_n(x_PxL, 2),
        seq_rep_4=metrics.seq_rep_n(x_PxL, 4),
        top_token_share=metrics.top_token_share(x_PxL, vocab_size),
        probe_continuation_L=x_PxL[0],
      )
    final_loss = train_lib.cross_entropy(logits, targets, ones_N)
    # LSTM gates saturate, so even absurd step sizes rarely overflow: a loss far above the
    # untrained log(V) counts as diverged too.
    exploded = ~(final_loss <= config.train.divergence_factor * jnp.log(vocab_size))
    evals = EvalMetrics(
      final_loss=final_loss,
      accuracy=jnp.mean(jnp.argmax(logits_V, -1) == targets_N),
      entropy=metrics.mean_entropy(logits_V),
      argmax_constant=metrics.argmax_constant(logits_V),
      probe=probe,
      diverged=state.diverged | exploded,
    )
    return evals, decoded

  return finalize


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


def device_summary() -> dict:
  devices = jax.devices()
  return dict(
    backend=jax.default_backend(),
    device_count=len(devices),
    device_kind=devices[0].device_kind,
    process_count=jax.process_count(),
    host=platform.node(),
    cpu_count=os.cpu_count(),
  )


# ----------------------------------------------------------------------------- running


class _Group:
  """Cells sharing one compiled program (they differ only in traced hyperparameters)."""

  def __init__(self, cells: list[config_lib.Cell]):
    self.cells = cells
    self.config = cells[0].config
    self.dataset = data_lib.dataset_from_config(self.config.data)
    self.trainer = train_lib.make_train(self.config, self.dataset)
    self._finalize = make_finalize(self.config, self.dataset)
    self._epoch_fns = {}
    self.init = jax.jit(jax.vmap(self._init_one))
    self.finalize = jax.jit(jax.vmap(self._finalize))

  def _init_one(self, seed, learning_rate, dropout):
    hparams = train_lib.Hparams(learning_rate=learning_rate, dropout=dropout)
    return self.trainer.init(jax.random.key(seed), hparams)

  def run_epochs(self, state, num_epochs: int):
    if num_epochs not in self._epoch_fns:
      run = jax.vmap(lambda s: self.trainer.run_epochs(s, num_epochs))
      self._epoch_fns[num_epochs] = jax.jit(run, donate_argnums=0)
    return self._epoch_fns[num_epochs](state)


def _chunk_size(total: int, config) -> int:
  ndev = jax.device_count()
  size = config.study.max_parallel_seeds or total
  size = min(size, total)
  return math.ceil(size / ndev) * ndev  # Padding rows are dropped after the call.


def _run_group(group: _Group, pending, workdir: str, progress: "_Progress") -> None:
  """Trains and evaluates every (cell, seed) of `pending` cells, writing each cell when done."""
  config = group.config
  seeds = config.study.seeds
  float_dtype = jnp.zeros(()).dtype
  cell_of = np.repeat(np.arange(len(pending)), seeds)
  seed_of = np.tile(np.arange(seeds) + config.study.seed_offset, len(pending))
  lr_of = np.asarray([c.config.train.learning_rate for c in pending], float_dtype)[cell_of]
  dropout_of = np.asarray([c.config.model.dropout for c in pending], float_dtype)[cell_of]
  total = len(cell_of)
  chunk = _chunk_size(total, config)
  sharding = NamedSharding(_mesh(), P("seeds"))
  buffers = [collections.defaultdict(list) for _ in pending]
  remaining = [seeds] * len(pending)
  epochs, per_call = config.train.epochs, config.study.epochs_per_call

  for start in range(0, total, chunk):
    rows = np.arange(start, min(start + chunk, total))
    padded = np.concatenate([rows, np.full(chunk - len(rows), rows[-1])])
    t0 = time.time()
    state = group.init(
      _to_global(seed_of[padded].astype(np.int32), sharding),
      _to_global(lr_of[padded], sharding),
      _to_global(dropout_of[padded], sharding),
    )
    losses = []
    for done in range(0, epochs, per_call):
      state, loss_CxE = group.run_epochs(state, min(per_call, epochs - done))
      losses.append(loss_CxE)
      jax.block_until_ready(loss_CxE)
      progress.epochs(len(rows), min(done + per_call, epochs), epochs, t0)
    evals, decoded = _to_host(group.finalize(state))
    loss_CxE = np.concatenate([np.asarray(_to_host(x)) for x in losses], axis=1)
    seconds = time.time() - t0
    keep = slice(0, len(rows))
    for i in np.unique(cell_of[rows]):
      mine = (cell_of[rows] == i)[keep]
      buf = buffers[i]
      buf["loss_curve"].append(loss_CxE[keep][mine])
      for field, value in vars(evals).items():
        buf[field].append(np.asarray(value)[keep][mine])
      for name, dec in decoded.items():
        for field, value in vars(dec).items():
          buf[f"{name}/{field}" if name else field].append(np.asarray(value)[keep][mine])
      buf["_seconds"].append(np.full(mine.sum(), seconds / len(rows)))
      remaining[i] -= int(mine.sum())
      if remaining[i] == 0:
        arrays = {k: np.concatenate(v) for k, v in buf.items()}
        _write_cell(workdir, pending[i], group.dataset, arrays)
        buffers[i] = None
        progress.cell_done(pending[i].name)


def _cell_paths(workdir: str, cell: config_lib.Cell) -> tuple[str, str]:
  base = os.path.join(workdir, CELLS_DIR, cell.slug)
  return base + ".npz", base + ".json"


def _write_cell(workdir, cell: config_lib.Cell, dataset: data_lib.Dataset, arrays) -> None:
  npz_path, json_path = _cell_paths(workdir, cell)
  seconds = float(arrays.pop("_seconds").sum())
  files.write_npz(npz_path, arrays)
  meta = dict(
    name=cell.name,
    axes=cell.axes,
    config=cell.config.to_dict(),
    vocab=list(dataset.vocab),
    num_windows=int(dataset.windows_NxW.shape[0]),
    seconds=seconds,
  )
  files.write_json(json_path, meta)  # Written last: its presence marks the cell finished.


def _cell_done(workdir: str, cell: config_lib.Cell) -> bool:
  npz_path, json_path = _cell_paths(workdir, cell)
  return os.path.exists(json_path) and os.path.exists(npz_path)


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


# ----------------------------------------------------------------------------- workdir


def _versions() -> dict:
  import flax
  import optax

  return dict(
    python=sys.version.split()[0],
    jax=jax.__version__,
    jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
    flax=flax.__version__,
    optax=optax.__version__,
    numpy=np.__version__,
  )


def prepare_workdir(workdir: str, config, overwrite: bool) -> None:
  """Checks the workdir is writable and holds no results of a different config."""
  try:
    os.makedirs(os.path.join(workdir, CELLS_DIR), exist_ok=True)
    files.write_text(os.path.join(workdir, ".write-test"), "ok")
    os.unlink(os.path.join(workdir, ".write-test"))
  except OSError as e:
    raise StudyError(f"--workdir {workdir!r} is not writable: {e.strerror or e}") from None
  config_path = os.path.join(workdir, "config.json")
  new = config_lib.fingerprint(config)
  if os.path.exists(config_path):
    try:
      old = files.read_json(config_path).get("fingerprint")
    except (OSError, ValueError):
      old = None
    if old != new and not overwrite:
      raise StudyError(
        f"--workdir {workdir!r} holds results of a different config (fingerprint {old} != "
        f"{new}); use a new workdir, or pass --overwrite to delete them"
      )
  if overwrite:
    shutil.rmtree(os.path.join(workdir, CELLS_DIR))
    os.makedirs(os.path.join(workdir, CELLS_DIR))
    for name in os.listdir(workdir):
      if name in ("results.json", "results.csv", "per_seed.npz", "report.md") or name.endswith(
        ".png"
      ):
        os.unlink(os.path.join(workdir, name))
  files.write_json(
    config_path,
    dict(
      fingerprint=new,
      config=json.loads(config.to_json_best_effort()),
      versions=_versions(),
      devices=device_summary(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      x64=bool(jax.config.jax_enable_x64),
    ),
  )


# ----------------------------------------------------------------------------- results


def _distribution(tokens: np.ndarray, vocab) -> dict:
  counts = collections.Counter(vocab[int(t)] for t in tokens)
  return {tok: n / max(len(tokens), 1) for tok, n in counts.most_common()}


def _interval(prefix, successes, trials) -> dict:
  ci = stats.wilson(int(successes), int(trials))
  return {f"{prefix}_rate": ci.estimate, f"{prefix}_low": ci.low, f"{prefix}_high": ci.high}


def _mean(values, ok) -> float:
  values = np.asarray(values, np.float64)[ok]
  return float(values.mean()) if values.size else math.nan


def summarize(meta: dict, arrays: dict, decoding: str) -> dict:
  """One results row: collapse rate with Wilson CI and the other metrics, diverged excluded."""
  pre = f"{decoding}/" if decoding else ""
  vocab = meta["vocab"]
  ok = ~arrays["diverged"].astype(bool)
  n_ok = int(ok.sum())
  collapsed = arrays[pre + "seed_collapsed"].astype(bool) & ok
  cfg = meta["config"]
  probe = _distribution(arrays["probe"][ok], vocab)
  row = dict(
    scenario=meta["name"] + (f"@{decoding}" if decoding else ""),
    cell=meta["name"],
    decoding=decoding or cfg["generate"]["strategy"],
    corpus=cfg["data"]["corpus_file"] or cfg["data"]["corpus"],
    tokenization=cfg["data"]["tokenization"],
    learning_rate=cfg["train"]["learning_rate"],
    dropout=cfg["model"]["dropout"],
    epochs=cfg["train"]["epochs"],
    vocab_size=len(vocab),
    trivial_vocab=len(vocab) <= 2,  # One distinct token: collapse is the only possible output.
    seeds=int(ok.size),
    diverged=int((~ok).sum()),
    **_interval("collapse", collapsed.sum(), n_ok),
    **_interval("argmax_constant", (arrays["argmax_constant"].astype(bool) & ok).sum(), n_ok),
    collapsed_prompt_fraction=_mean(arrays[pre + "collapsed_fraction"], ok),
    final_loss_mean=_mean(arrays["final_loss"], ok),
    final_loss_median=float(np.median(arrays["final_loss"][ok])) if n_ok else math.nan,
    accuracy_mean=_mean(arrays["accuracy"], ok),
    entropy_mean=_mean(arrays["entropy"], ok),
    distinct_1_mean=_mean(arrays[pre + "distinct_1"], ok),
    distinct_2_mean=_mean(arrays[pre + "distinct_2"], ok),
    seq_rep_4_mean=_mean(arrays[pre + "seq_rep_4"], ok),
    top_token_share_mean=_mean(arrays[pre + "top_token_share"], ok),
    probe_top=next(iter(probe), ""),
    probe_top_share=next(iter(probe.values()), math.nan),
    probe_distribution=probe,
    collapse_tokens=_distribution(arrays[pre + "collapse_token"][collapsed], vocab),
    seconds=meta["seconds"],
  )
  for path, value in meta["axes"].items():  # Grid axes beyond the standard columns.
    row.setdefault(path.split(".")[-1], value)
  return row


def load_cells(workdir: str, cells) -> list[tuple[dict, dict]]:
  out = []
  for cell in cells:
    npz_path, json_path = _cell_paths(workdir, cell)
    with np.load(npz_path) as z:
      out.append((files.read_json(json_path), dict(z)))
  return out


def write_results(workdir: str, config, cells, wall_seconds: float) -> list[dict]:
  """results.json, results.csv and per_seed.npz from every finished cell."""
  rows, per_seed = [], {}
  for meta, arrays in load_cells(workdir, cells):
    for name, _ in decodings(config):
      row = summarize(meta, arrays, name)
      rows.append(row)
    for key, value in arrays.items():
      per_seed[f"{meta['name']}/{key}"] = value
  files.write_json(
    os.path.join(workdir, "results.json"),
    dict(rows=rows, seeds=config.study.seeds, wall_seconds=wall_seconds, devices=device_summary()),
  )
  files.write_text(os.path.join(workdir, "results.csv"), to_csv(rows))
  files.write_npz(os.path.join(workdir, "per_seed.npz"), per_seed)
  return rows


def to_csv(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
  return buffer.getvalue()


def format_table(rows: list[dict]) -> str:
  """A compact fixed-width table of the headline numbers."""
  w = max([len("scenario"), *(len(r["scenario"]) for r in rows)])
  header = (
    f"{'scenario':<{w}} {'seeds':>5} {'div':>4} {'collapse [95% CI]':>22} {'argmax-const':>12} "
    f"{'loss':>6} {'acc':>5} {'dist-2':>6} {'probe':>10}"
  )
  lines = [header, "-" * len(header)]
  for r in rows:
    ci = f"{r['collapse_rate']:.3f} [{r['collapse_low']:.3f},{r['collapse_high']:.3f}]"
    if r["diverged"] == r["seeds"]:
      ci = "all seeds diverged"
    probe = f"{r['probe_top']!r}:{r['probe_top_share']:.2f}" if r["probe_top"] else "-"
    lines.append(
      f"{r['scenario']:<{w}} {r['seeds']:>5} {r['diverged']:>4} {ci:>22} "
      f"{r['argmax_constant_rate']:>12.3f} {r['final_loss_mean']:>6.3f} "
      f"{r['accuracy_mean']:>5.2f} {r['distinct_2_mean']:>6.3f} {probe:>10}"
    )
  for r in rows:
    if r["trivial_vocab"]:
      lines.append(f"note: {r['scenario']}: one distinct token in the corpus, collapse is trivial")
  return "\n".join(lines)


def run_study(config, workdir: str, overwrite: bool = False) -> list[dict]:
  """Runs every unfinished cell of `config` into `workdir`; returns the results rows."""
  start = time.time()
  cells = config_lib.expand_cells(config)
  decodings(config)  # Validate decodings before any training.
  groups = collections.OrderedDict()
  for cell in cells:
    groups.setdefault(config_lib.program_key(cell), []).append(cell)
  # Build datasets and prompts up front: bad data fails before any training.
  built = [(_Group(group_cells), group_cells) for group_cells in groups.values()]
  prepare_workdir(workdir, config, overwrite)
  logging.info(
    "%d cells x %d seeds in %d compiled program(s) on %s",
    len(cells), config.study.seeds, len(built), device_summary(),
  )  # fmt: skip
  pending_of = [[c for c in group if not _cell_done(workdir, c)] for _, group in built]
  seed_epochs = sum(c.config.train.epochs for p in pending_of for c in p) * config.study.seeds
  progress = _Progress(len(cells), seed_epochs)
  for (group, group_cells), pending in zip(built, pending_of, strict=True):
    for cell in group_cells:
      if cell not in pending:
        logging.info("skipping %s: already finished in %s", cell.name, workdir)
        progress.cell_done(cell.name)
    if pending:
      _run_group(group, pending, workdir, progress)
  return write_results(workdir, config, cells, time.time() - start)
