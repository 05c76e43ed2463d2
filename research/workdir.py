"""The one owner of the workdir layout, for the writer (the study) and the readers (the note).

.collapse-study.json     the manifest: marks a study workdir and lists every file the tool wrote
.collapse-study.lock     held while a run writes (pid, host); a dead holder's lock is taken over
config.json              resolved config, fingerprint, versions, devices
cells/<slug>.npz, .json  one finished cell: per-seed arrays, then its CellMeta (written last)
cells/set-aside/         cell files that could not be read, kept for inspection
models/<slug>/seeds_<first>-<last>/   trained TrainStates of those seeds (orbax, seed axis first)
checkpoints/<group>/     the train state of the chunk in progress (orbax), for mid-cell resume
results.json, .csv       one Row per cell x decoding
per_seed.npz             every cell's arrays, keyed "<cell>/" + array_key(decoding, field)
report.md, *.png         the note

--overwrite deletes only files listed in the manifest; a directory that has files but no
manifest is not a study workdir and is refused.
"""

import contextlib
import dataclasses
import glob
import json
import logging as std_logging
import os
import platform
import shutil
import sys
import time
import zipfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from research import config_lib, files, hosts, results
from research import data as data_lib
from research import model as model_lib
from research import train as train_lib

MANIFEST, LOCK = ".collapse-study.json", ".collapse-study.lock"


class _NotOrbax:
  """Drops orbax's INFO and debug lines (thousands per run), keeping its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


# Orbax logs through absl's logger; filtering there also covers its background threads.
logging.get_absl_logger().addFilter(_NotOrbax())


CELLS_DIR = "cells"
SET_ASIDE_DIR = os.path.join(CELLS_DIR, "set-aside")
MODELS_DIR, CHECKPOINTS_DIR = "models", "checkpoints"
WORKERS_DIR = "workers"  # run.py --workers: each worker process's own workdir, until merged.
CONFIG, RESULTS_JSON, RESULTS_CSV, PER_SEED, REPORT = (
  "config.json",
  "results.json",
  "results.csv",
  "per_seed.npz",
  "report.md",
)


class WorkdirError(RuntimeError):
  """A problem with the workdir, with a message meant for the user."""


def array_key(decoding: str, field: str) -> str:
  """A cell file's key: "<field>" for training metrics (decoding ""), "<decoding>/<field>"."""
  return f"{decoding}/{field}" if decoding else field


# ----------------------------------------------------------------------------- manifest


def _manifest(directory: str) -> set[str]:
  """Files the tool wrote (relative paths); empty when there is no manifest."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return set()
  try:
    return set(files.read_json(path)["files"])
  except (OSError, ValueError, KeyError, TypeError):
    raise WorkdirError(f"{path} is unreadable: delete it to treat {directory!r} as new") from None


def _record(directory: str, *relpaths: str) -> None:
  """Adds written files to the manifest (rewritten atomically when it grows)."""
  if not hosts.is_writer():  # Every write passes here: a second writer would be a bug.
    raise WorkdirError(f"only process 0 writes the workdir, not process {jax.process_index()}")
  known = _manifest(directory)
  if set(relpaths) <= known and os.path.exists(os.path.join(directory, MANIFEST)):
    return
  manifest = dict(tool="collapse-study", files=sorted(known | set(relpaths)))
  files.write_json(os.path.join(directory, MANIFEST), manifest)


def _write(directory: str, relpath: str, writer, payload) -> None:
  """Writes one of the tool's files atomically and records it in the manifest first."""
  _record(directory, relpath)
  writer(os.path.join(directory, relpath), payload)


# ----------------------------------------------------------------------------- opening


def _check_location(directory: str) -> None:
  if not directory:
    raise WorkdirError("--workdir is empty: name a directory for the results")
  real = os.path.realpath(directory)
  if real in ("/", os.path.realpath(os.path.expanduser("~"))):
    raise WorkdirError(f"--workdir {directory!r} is {real}: choose a directory of its own")
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise WorkdirError(f"--workdir {directory!r} is not writable: it is a file")
  has_files = os.path.isdir(directory) and any(
    name != MANIFEST and not name.startswith(LOCK) for name in os.listdir(directory)
  )  # LOCK + ".<pid>": a lock being taken (or left by a kill while taking it).
  if has_files and not os.path.exists(os.path.join(directory, MANIFEST)):
    raise WorkdirError(
      f"--workdir {directory!r} has files but holds no collapse-study run (no {MANIFEST}): "
      "choose a new or empty directory"
    )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return not _zombie(pid)


def _zombie(pid: int) -> bool:
  """Whether pid has exited but not been reaped: a --workers worker whose parent was killed
  stays one until init reaps it, which some containers' init never does. It holds no lock."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] == "Z"
  except (OSError, IndexError):
    return False  # No /proc (macOS): os.kill's answer stands.


_HELD: set[str] = set()  # The lock files this process holds.
# How long a process that took a stale lock over waits before checking it still holds it.
TAKEOVER_SETTLE_SECONDS = 0.1


def _link_lock(mine: str, path: str) -> bool:
  """Puts the lock file `mine` in place at `path` unless a lock is there; whether it did."""
  try:
    os.link(mine, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # A file system without hard links: create it exclusively, then fill it.
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f, open(mine) as source:
      f.write(source.read())
    return True


def _still_holds(path: str, me: dict) -> bool:
  """Whether the lock at path is still `me` a moment after a takeover (unreadable: no, it is
  being replaced)."""
  time.sleep(TAKEOVER_SETTLE_SECONDS)
  try:
    return files.read_json(path) == me
  except (OSError, ValueError):
    return False


def _acquire_lock(directory: str) -> str:
  """Takes the workdir's lock file, whose JSON names its holder; a dead holder's is taken over.

  The lock appears with its content at once (written aside, then hard-linked into place,
  which fails if a lock exists), so no reader sees an empty one. A stale lock is renamed away
  before the new one is linked; a process that took one over reads the lock again a moment
  later, and stands down if another process, which had read the same stale lock, replaced it.
  """
  path = os.path.join(directory, LOCK)
  me = dict(pid=os.getpid(), host=platform.node(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
  mine = f"{path}.{os.getpid()}"
  files.write_text(mine, json.dumps(me))
  took_over = False
  try:
    for _ in range(4):
      if _link_lock(mine, path):
        if took_over and not _still_holds(path, me):
          continue  # Replaced: the next try finds the other process's live lock.
        _HELD.add(os.path.abspath(path))
        return path
      try:
        holder = files.read_json(path)
      except FileNotFoundError:
        continue  # Released, or taken over by another process, meanwhile: try again.
      except (OSError, ValueError):
        holder = {}
      same_host = holder.get("host") == platform.node()
      pid = holder.get("pid")
      # Our own pid in a lock this process does not hold: a run before a restart (a
      # container's pid 1 again), dead.
      mine_before = pid == os.getpid() and os.path.abspath(path) not in _HELD
      alive = isinstance(pid, int) and not mine_before and _pid_alive(pid)
      if same_host and alive:
        raise WorkdirError(
          f"--workdir {directory!r} is in use by pid {pid} on {holder['host']} "
          f"(since {holder.get('started', '?')}); wait for it, or use another workdir"
        )
      if holder and not same_host:
        raise WorkdirError(
          f"--workdir {directory!r} is locked by pid {pid} on host "
          f"{holder.get('host')}; if that run is dead, delete {path}"
        )
      logging.warning("taking over the stale lock of dead pid %s in %s", pid, path)
      with contextlib.suppress(FileNotFoundError):  # Another process took it over first.
        os.rename(path, f"{mine}.stale")
        os.unlink(f"{mine}.stale")
      took_over = True
  finally:
    os.unlink(mine)
  raise WorkdirError(f"cannot take the lock {path}: other processes keep taking it")


def _release(lock: str) -> None:
  _HELD.discard(os.path.abspath(lock))
  if os.path.exists(lock):
    os.unlink(lock)


@dataclasses.dataclass
class Workdir:
  """A study workdir opened for writing: locked until close()."""

  path: str
  lock: str

  def close(self) -> None:
    _release(self.lock)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_for_study(directory: str, config, overwrite: bool, corpora: dict | None = None) -> Workdir:
  """Checks, locks and prepares the workdir; refuses another config's results unless overwrite.

  Nothing is created before the checks pass; --overwrite deletes only the manifest's files.
  """
  _check_location(directory)
  try:
    files.check_writable(directory)
  except OSError as e:
    raise WorkdirError(f"--workdir {directory!r} is not writable: {e.strerror or e}") from None
  lock = _acquire_lock(directory)
  try:
    _prepare(directory, config, overwrite, corpora or {})
  except BaseException:
    _release(lock)
    raise
  return Workdir(directory, lock)


def open_for_reevaluation(directory: str, config, corpora: dict | None = None) -> Workdir:
  """Locks a finished workdir whose models the config can re-decode (same training config)."""
  config_path = os.path.join(directory, CONFIG)
  if not os.path.exists(os.path.join(directory, MANIFEST)) or not os.path.exists(config_path):
    raise WorkdirError(f"--workdir {directory!r} holds no finished study to re-evaluate")
  try:
    saved = ml_collections.ConfigDict(files.read_json(config_path)["config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f"{config_path} is damaged ({type(e).__name__}: {e})") from None
  old, new = config_lib.training_fingerprint(saved), config_lib.training_fingerprint(config)
  if old != new:
    raise WorkdirError(
      f"--reevaluate: the config trains differently from the one in {directory!r} (training "
      f"fingerprint {old} != {new}); only generate.* and study.decodings may change"
    )
  # Checked before anything is written: the study must be finished, not interrupted (its
  # checkpoints are resumed by running the training command again).
  unfinished = [
    c.name
    for c in config_lib.expand_cells(config)
    if not all(os.path.exists(os.path.join(directory, p)) for p in _cell_relpaths(c.name))
  ]
  if unfinished:
    raise WorkdirError(
      f"--reevaluate: the study in {directory!r} is not finished ({len(unfinished)} cells "
      f"not trained, e.g. {unfinished[0]!r}): run it to the end first (the same command "
      "without --reevaluate resumes it)"
    )
  lock = _acquire_lock(directory)
  try:
    _write_config(directory, config, corpora or {})
  except BaseException:
    _release(lock)
    raise
  return Workdir(directory, lock)


def _prepare(directory: str, config, overwrite: bool, corpora: dict) -> None:
  config_path = os.path.join(directory, CONFIG)
  new = config_lib.fingerprint(config)
  if os.path.exists(config_path) and not overwrite:
    try:
      old = files.read_json(config_path).get("fingerprint")
    except (OSError, ValueError, AttributeError):
      old = None
    if old != new:
      raise WorkdirError(
        f"--workdir {directory!r} holds results of a different config (fingerprint {old} != "
        f"{new}); use a new workdir, or pass --overwrite to delete them"
      )
  if overwrite:
    _delete_written(directory)
  os.makedirs(os.path.join(directory, CELLS_DIR), exist_ok=True)
  _write_config(directory, config, corpora)


def _write_config(directory: str, config, corpora: dict) -> None:
  _write(
    directory,
    CONFIG,
    files.write_json,
    dict(
      fingerprint=config_lib.fingerprint(config),
      config=json.loads(config.to_json_best_effort()),
      versions=versions(),
      devices=device_summary(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      x64=bool(jax.config.jax_enable_x64),
      corpora=corpora,  # Cell name -> name, characters, sha256 (and Python version) of its text.
    ),
  )


def _delete_written(directory: str) -> None:
  """Deletes every file in the manifest (and folders left empty); nothing else."""
  written = _manifest(directory)
  for relpath in sorted(written):
    path = os.path.join(directory, relpath)
    if os.path.isdir(path):  # An orbax checkpoint: a folder the tool wrote whole.
      shutil.rmtree(path)
    elif os.path.isfile(path):
      os.unlink(path)
  for folder in (SET_ASIDE_DIR, CELLS_DIR, MODELS_DIR, CHECKPOINTS_DIR, WORKERS_DIR):
    path = os.path.join(directory, folder)
    for sub in sorted(glob.glob(os.path.join(path, "*")), reverse=True):
      if os.path.isdir(sub) and not os.listdir(sub):
        os.rmdir(sub)
    path = os.path.join(directory, folder)
    if os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
  files.write_json(os.path.join(directory, MANIFEST), dict(tool="collapse-study", files=[]))


# ----------------------------------------------------------------------------- cells


def _cell_relpaths(cell_name: str) -> tuple[str, str]:
  base = os.path.join(CELLS_DIR, config_lib.slug(cell_name))
  return base + ".npz", base + ".json"


def _flat(arrays: results.SeedArrays) -> dict:
  flat = {array_key("", k): v for k, v in arrays.train.items()}
  for name, fields in arrays.decodings.items():
    flat.update({array_key(name, k): v for k, v in fields.items()})
  return flat


def write_cell(
  directory: str, cell: config_lib.Cell, meta: results.CellMeta, arrays: results.SeedArrays
) -> None:
  npz, meta_json = _cell_relpaths(cell.name)
  _write(directory, npz, files.write_npz, _flat(arrays))
  record = dict(
    dataclasses.asdict(meta),
    train_fields=list(arrays.train),
    decode_fields=list(next(iter(arrays.decodings.values()))),
  )
  _write(directory, meta_json, files.write_json, record)  # Last: it marks the cell finished.


def _unflat(npz_path: str, train_fields: list, decode_fields: dict) -> results.SeedArrays:
  """_flat's inverse: the arrays of an .npz, decode_fields by decoding name."""
  with np.load(npz_path) as z:
    return results.SeedArrays(
      train={f: z[array_key("", f)] for f in train_fields},
      decodings={d: {f: z[array_key(d, f)] for f in fields} for d, fields in decode_fields.items()},
    )


def _read_cell_files(npz_path: str, json_path: str):
  record = files.read_json(json_path)
  train_fields, decode_fields = record.pop("train_fields"), record.pop("decode_fields")
  meta = results.CellMeta(**record)
  arrays = _unflat(npz_path, train_fields, {d: decode_fields for d in meta.decodings})
  return meta, arrays


# What a damaged cell file raises when read: truncated zip, bad JSON, missing keys or fields.
_DAMAGED = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def read_cell(directory: str, cell_name: str) -> tuple[results.CellMeta, results.SeedArrays]:
  """A finished cell's record and arrays; WorkdirError naming the file if it is damaged."""
  npz, meta_json = _cell_relpaths(cell_name)
  try:
    return _read_cell_files(os.path.join(directory, npz), os.path.join(directory, meta_json))
  except _DAMAGED as e:
    path = os.path.join(directory, meta_json)
    raise WorkdirError(f"{path} is damaged ({type(e).__name__}: {e})") from None


def cell_done(directory: str, cell: config_lib.Cell) -> bool:
  """Whether the cell's files hold its finished results, made by this cell's config.

  A cell made by another config is recomputed; a damaged one is set aside and recomputed.
  Either is said in one log line naming the file.
  """
  npz, meta_json = _cell_relpaths(cell.name)
  if not os.path.exists(os.path.join(directory, meta_json)):
    return False
  try:
    meta, arrays = read_cell(directory, cell.name)
    seeds = {len(v) for v in arrays.train.values()}
    seeds |= {len(v) for fields in arrays.decodings.values() for v in fields.values()}
    if seeds != {cell.config.study.seeds}:
      raise WorkdirError(f"{os.path.join(directory, meta_json)} is damaged (seeds {seeds})")
  except WorkdirError as e:
    _set_aside(directory, (npz, meta_json))
    logging.warning("%s: set aside in %s, recomputing the cell", e, SET_ASIDE_DIR)
    return False
  fingerprint = config_lib.cell_fingerprint(cell)
  if meta.fingerprint != fingerprint:
    logging.warning(
      "%s was made by another config or corpus (fingerprint %s != %s): recomputing the cell",
      os.path.join(directory, meta_json), meta.fingerprint, fingerprint,
    )  # fmt: skip
    return False
  return True


def _set_aside(directory: str, relpaths) -> None:
  os.makedirs(os.path.join(directory, SET_ASIDE_DIR), exist_ok=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for relpath in relpaths:
    source = os.path.join(directory, relpath)
    if os.path.exists(source):
      target = os.path.join(SET_ASIDE_DIR, f"{os.path.basename(relpath)}.{stamp}")
      _record(directory, target)
      os.replace(source, os.path.join(directory, target))


# ----------------------------------------------------------------------------- train states


def _save_state(directory: str, relpath: str, tree) -> None:
  """An orbax checkpoint of a pytree of arrays, recorded in the manifest before it is written.

  Called by every process: with several, each writes the shards of the global arrays it holds
  and orbax's primary host (process 0) the metadata, as orbax does for multi-host.
  """
  path = os.path.abspath(os.path.join(directory, relpath))
  if hosts.is_writer():
    _record(directory, relpath)
    _remove_tree(path)
    # Checked first: orbax makes its folders in a thread and, refused, reports only a timeout.
    try:
      files.check_writable(os.path.dirname(path))
    except OSError as e:
      raise files.WriteError(f"cannot write {path}: {e.strerror or e}") from None
  hosts.sync(f"save {relpath}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()  # Orbax writes to a temporary folder, then renames it.
  except OSError as e:
    raise files.WriteError(f"cannot write {path}: {e}") from None


def _remove_tree(path: str) -> None:
  """Deletes one of the tool's folders (saved models, a checkpoint), if there."""
  try:
    if os.path.exists(path):
      shutil.rmtree(path)
  except OSError as e:
    raise files.WriteError(f"cannot delete {path}: {e.strerror or e}") from None


def _restore_state(path: str, abstract):
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


def save_models(directory: str, cell_name: str, seeds_S: np.ndarray, state_S) -> None:
  """Trained states of one cell's consecutive seeds, seed axis first (saved state form)."""
  relpath = os.path.join(
    MODELS_DIR, config_lib.slug(cell_name), f"seeds_{int(seeds_S[0])}-{int(seeds_S[-1])}"
  )
  _save_state(directory, relpath, dict(seeds=np.asarray(seeds_S), state=state_S.to_saved()))


def models_of(directory: str, cell_name: str) -> list[tuple[int, int, str]]:
  """(first seed, last seed, path) of every saved chunk of a cell's models."""
  out = []
  for path in glob.glob(os.path.join(directory, MODELS_DIR, config_lib.slug(cell_name), "*")):
    first, _, last = os.path.basename(path).removeprefix("seeds_").partition("-")
    if first.isdigit() and last.isdigit():
      out.append((int(first), int(last), path))
  return sorted(out)


def load_model(directory: str, cell_name: str, seed: int):
  """(params, model) of one trained seed: logits = model.apply({"params": params}, tokens_BxT)."""
  for first, last, path in models_of(directory, cell_name):
    if first <= seed <= last:
      trainer, model = _trainer(directory, cell_name)
      row = seed - first
      state = load_states(trainer, first, last, path)
      return jax.tree_util.tree_map(lambda x, row=row: x[row], state.params), model
  raise WorkdirError(f"no saved model of seed {seed} of cell {cell_name!r} in {directory!r}")


def _trainer(directory: str, cell_name: str):
  """The cell's Trainer and model, rebuilt from its recorded config."""
  meta, _ = read_cell(directory, cell_name)
  config = ml_collections.ConfigDict(meta.config)
  dataset = data_lib.dataset_from_config(config.data)
  return train_lib.make_train(config, dataset), model_lib.model_from_config(
    config.model, dataset.vocab_size
  )


def _sharded(abstract, sharding):
  """Shapes to restore, each split over the seed axis by `sharding` (None: one device)."""
  if sharding is None:
    return abstract
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
  )


def load_states(trainer: train_lib.Trainer, first: int, last: int, path: str, sharding=None):
  """One saved chunk of TrainStates (seeds first..last, seed axis first), on the device(s)."""
  num = last - first + 1
  abstract = dict(
    seeds=jax.ShapeDtypeStruct((num,), np.uint32),
    state=_sharded(abstract_states(trainer, num), sharding),
  )
  return _restore_state(path, abstract)["state"].from_saved()


def abstract_states(trainer: train_lib.Trainer, num_seeds: int):
  """Shapes and dtypes of num_seeds saved TrainStates (what a restore is checked against)."""
  dtype = jax.numpy.zeros(()).dtype

  def init(seed):
    hparams = train_lib.Hparams(jax.numpy.asarray(1.0, dtype), jax.numpy.asarray(0.0, dtype))
    return trainer.init(jax.random.key(seed), hparams).to_saved()

  return jax.eval_shape(jax.vmap(init), jax.ShapeDtypeStruct((num_seeds,), np.uint32))


def remove_models(directory: str, cell_name: str, keep=frozenset()) -> None:
  """Deletes a cell's saved models (before it is trained again) but the (first, last) seed
  ranges in `keep` (chunks a resumed run does not train again)."""
  for first, last, path in models_of(directory, cell_name):
    if (first, last) not in keep:
      _remove_tree(path)


def _link_or_copy(source: str, target: str) -> None:
  try:
    os.link(source, target)
  except OSError:  # Another file system, or links not allowed: a copy.
    shutil.copy2(source, target)


def copy_models(directory: str, cell_name: str, source: str) -> None:
  """A cell's saved model chunks from another workdir (a worker's), hard-linked when possible.

  Each chunk is linked into a temporary folder, then renamed into place, so a kill leaves
  either the whole chunk or none of it.
  """
  for _, _, path in models_of(source, cell_name):
    relpath = os.path.join(MODELS_DIR, config_lib.slug(cell_name), os.path.basename(path))
    _record(directory, relpath)
    target = os.path.join(directory, relpath)
    partial = target + ".partial"
    for stale in (partial, target):
      if os.path.exists(stale):
        shutil.rmtree(stale)
    shutil.copytree(path, partial, copy_function=_link_or_copy)
    os.replace(partial, target)


# ----------------------------------------------------------------------------- workers


def worker_path(directory: str, first: int, last: int) -> str:
  """Where the --workers process that runs seeds first..last of the study writes."""
  return os.path.join(directory, WORKERS_DIR, f"seeds_{first}-{last}")


def reevaluation_out(directory: str, first: int, last: int) -> str:
  """A --reevaluate worker's folder for its cells (worker_path, made here: the parent, which
  holds the lock, recorded it)."""
  path = worker_path(directory, first, last)
  os.makedirs(os.path.join(path, CELLS_DIR), exist_ok=True)
  return path


def worker_dir(directory: str, first: int, last: int) -> str:
  """worker_path, recorded in the manifest (so --overwrite deletes it with the rest) and its
  folder made: the parent's part, before any worker starts."""
  relpath = os.path.relpath(worker_path(directory, first, last), directory)
  _record(directory, relpath, relpath + ".log")
  os.makedirs(os.path.join(directory, WORKERS_DIR), exist_ok=True)
  return os.path.join(directory, relpath)


def remove_workers(directory: str, keep=()) -> None:
  """Deletes worker workdirs and logs, except those of the workdirs in keep."""
  keep = {os.path.abspath(k) for k in keep}
  for path in glob.glob(os.path.join(directory, WORKERS_DIR, "seeds_*")):
    if os.path.abspath(path.removesuffix(".log")) in keep:
      continue
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.unlink(path)
  folder = os.path.join(directory, WORKERS_DIR)
  if not keep and os.path.isdir(folder) and not os.listdir(folder):
    os.rmdir(folder)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """The chunk in progress: which rows, how far, and the losses so far."""

  group: str  # Hash of the group's program and its cells' fingerprints.
  signature: str  # That, the chunk size and the chunk's first row.
  chunk: int  # Rows per chunk when it was written (reused on resume).
  start: int  # First row of the chunk.
  epoch: int  # Epochs done.
  loss_SxE: np.ndarray  # Losses of the epochs done.
  curves: dict  # evaluate.Dynamics field -> rows x evaluation points done.


def _checkpoint_dir(group: str) -> str:
  return os.path.join(CHECKPOINTS_DIR, group)


def save_checkpoint(directory: str, group: str, checkpoint: Checkpoint, state) -> None:
  """Writes the new checkpoint, then drops the older one: one always stays whole."""
  name = f"rows_{checkpoint.start}_epoch_{checkpoint.epoch}"
  relpath = os.path.join(_checkpoint_dir(group), name)
  tree = dict(state=state.to_saved(), loss_SxE=checkpoint.loss_SxE, curves=checkpoint.curves)
  _save_state(directory, relpath, tree)
  if not hosts.is_writer():
    return
  record = dict(dataclasses.asdict(checkpoint), loss_SxE=None, path=relpath)
  record["curves"] = {k: [str(v.dtype), v.shape[1]] for k, v in checkpoint.curves.items()}
  _write(directory, os.path.join(_checkpoint_dir(group), "latest.json"), files.write_json, record)
  for old in glob.glob(os.path.join(directory, _checkpoint_dir(group), "rows_*")):
    if os.path.basename(old) != name:
      shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: str, group: str) -> dict | None:
  """The group's latest checkpoint record ({} fields of Checkpoint and its path), if any."""
  path = os.path.join(directory, _checkpoint_dir(group), "latest.json")
  try:
    record = files.read_json(path)
  except (OSError, ValueError):
    return None
  return record if os.path.isdir(os.path.join(directory, record.get("path", ""))) else None


def restore_checkpoint(directory: str, record: dict, state, rows: int, sharding=None):
  """(state, loss_SxE, curves) of a checkpoint record; `state` gives the expected shapes,
  `sharding` the seed axis's split over the devices (None: one device)."""
  dtype = jax.numpy.zeros(()).dtype
  abstract = dict(
    state=_sharded(jax.eval_shape(lambda s: s.to_saved(), state), sharding),
    loss_SxE=jax.ShapeDtypeStruct((rows, record["epoch"]), dtype),
    curves={
      k: jax.ShapeDtypeStruct((rows, points), np.dtype(kind))
      for k, (kind, points) in record["curves"].items()
    },
  )
  tree = _restore_state(os.path.join(directory, record["path"]), abstract)
  curves = {k: np.asarray(v) for k, v in tree["curves"].items()}
  return tree["state"].from_saved(), np.asarray(tree["loss_SxE"]), curves


def _part_base(group: str, signature: str, cell_name: str) -> str:
  return os.path.join(_checkpoint_dir(group), f"part_{signature}_{config_lib.slug(cell_name)}")


def save_chunk_part(
  directory: str, group: str, signature: str, cell_name: str, arrays: results.SeedArrays, timing
) -> None:
  """A finished chunk's per-seed arrays of one cell, kept until the whole cell is written.

  A resumed run skips the chunks whose parts are all here, rather than training them again.
  """
  base = _part_base(group, signature, cell_name)
  os.makedirs(os.path.join(directory, _checkpoint_dir(group)), exist_ok=True)  # None saved yet.
  _write(directory, base + ".npz", files.write_npz, _flat(arrays))
  record = dict(
    cell=cell_name,
    timing=timing,
    train_fields=list(arrays.train),
    decodings={name: list(fields) for name, fields in arrays.decodings.items()},
  )
  _write(directory, base + ".json", files.write_json, record)  # Last: it marks the part whole.


def chunk_part(directory: str, group: str, signature: str, cell_name: str):
  """(arrays, timing) of a saved chunk part, or None where it is missing or damaged."""
  base = os.path.join(directory, _part_base(group, signature, cell_name))
  try:
    record = files.read_json(base + ".json")
    arrays = _unflat(base + ".npz", record["train_fields"], record["decodings"])
  except _DAMAGED:
    return None
  return arrays, record["timing"]


def clear_checkpoints(directory: str, group: str) -> None:
  shutil.rmtree(os.path.join(directory, _checkpoint_dir(group)), ignore_errors=True)


# ----------------------------------------------------------------------------- config.json


def versions() -> dict:
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


# ----------------------------------------------------------------------------- results


def write_results(
  directory: str, cells: list[config_lib.Cell], seeds: int, wall_seconds: float, phases: dict
):
  """results.json, results.csv and per_seed.npz from every finished cell; returns the rows."""
  rows, pairs, per_seed = [], [], {}
  for cell in cells:
    meta, arrays = read_cell(directory, cell.name)
    rows += [results.summarize(meta, arrays, d) for d in meta.decodings]
    pairs += results.pairs(meta, arrays)
    per_seed.update({f"{cell.name}/{key}": value for key, value in _flat(arrays).items()})
  summary = dict(
    rows=[results.to_jsonable(r) for r in rows],
    pairs=[results.to_jsonable(p) for p in pairs],
    seeds=seeds,
    wall_seconds=wall_seconds,
    phases=phases,  # Seconds: startup, compile, train, evaluate, total (+ report, later).
    devices=device_summary(),
  )
  _write(directory, RESULTS_JSON, files.write_json, summary)
  _write(directory, RESULTS_CSV, files.write_text, results.to_csv(rows))
  _write(directory, PER_SEED, files.write_npz, per_seed)
  return rows


@dataclasses.dataclass(frozen=True)
class Finished:
  """A finished study as the note reads it."""

  rows: list  # results.Row, in results.json order.
  pairs: list  # results.Pair: decodings compared on the same seeds.
  phases: dict  # Seconds per phase of the last run.
  run: dict  # config.json ({} when missing).
  seeds: int
  wall_seconds: float
  devices: dict
  cells: dict  # Cell name -> results.CellMeta.
  arrays: dict  # Cell name -> results.SeedArrays.

  def of(self, row: results.Row) -> dict:
    """The per-seed arrays behind a row (training metrics and its decoding's)."""
    return self.arrays[row.cell].of(row.decoding)


def load(directory: str) -> Finished:
  """Reads results.json, config.json and the rows' cells."""
  results_path = os.path.join(directory, RESULTS_JSON)
  if not os.path.exists(results_path):
    raise WorkdirError(f"no results.json in {directory!r}: run the study first")
  try:
    saved = files.read_json(results_path)
    config_path = os.path.join(directory, CONFIG)
    run_info = files.read_json(config_path) if os.path.exists(config_path) else {}
    rows = [results.from_jsonable(r) for r in saved["rows"]]
    cells, arrays = {}, {}
    for row in rows:
      if row.cell not in cells:
        cells[row.cell], arrays[row.cell] = read_cell(directory, row.cell)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f"cannot read the results in {directory!r}: {e}") from None
  return Finished(
    rows=rows,
    pairs=[results.from_jsonable(p, results.Pair) for p in saved.get("pairs", [])],
    phases=saved.get("phases", {}),
    run=run_info,
    seeds=saved["seeds"],
    wall_seconds=saved["wall_seconds"],
    devices=saved.get("devices", {}),
    cells=cells,
    arrays=arrays,
  )


def record_phases(directory: str, phases: dict) -> None:
  """Adds the finished run's phase timings to results.json and config.json."""
  for name in (RESULTS_JSON, CONFIG):
    record = files.read_json(os.path.join(directory, name))
    record["phases"] = phases
    _write(directory, name, files.write_json, record)


def write_note(directory: str, text: str, figures: dict, all_names) -> str:
  """report.md and its PNGs ({name: png bytes}); stale plots among all_names are removed."""
  for name in all_names:
    relpath = f"{name}.png"
    if name in figures:
      _write(directory, relpath, files.write_bytes, figures[name])
    elif relpath in _manifest(directory) and os.path.exists(os.path.join(directory, relpath)):
      os.unlink(os.path.join(directory, relpath))  # A plot of an earlier, different study.
  _write(directory, REPORT, files.write_text, text)
  return os.path.join(directory, REPORT)
