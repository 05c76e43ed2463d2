"""The one owner of the workdir layout, for the writer (the study) and the readers (the note).

.collapse-study.json     the manifest: marks a study workdir and lists every file the tool wrote
.collapse-study.lock     held while a run writes (pid, host); a dead holder's lock is taken over
config.json              resolved config, fingerprint, versions, devices
cells/<slug>.npz, .json  one finished cell: per-seed arrays, then its CellMeta (written last)
cells/set-aside/         cell files that could not be read, kept for inspection
results.json, .csv       one Row per cell x decoding
per_seed.npz             every cell's arrays, keyed "<cell>/" + array_key(decoding, field)
report.md, *.png         the note

--overwrite deletes only files listed in the manifest; a directory that has files but no
manifest is not a study workdir and is refused.
"""

import dataclasses
import json
import os
import platform
import sys
import time
import zipfile

import jax
import numpy as np
from absl import logging

from research import config_lib, files, results

MANIFEST, LOCK = ".collapse-study.json", ".collapse-study.lock"
CELLS_DIR = "cells"
SET_ASIDE_DIR = os.path.join(CELLS_DIR, "set-aside")
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
    name not in (MANIFEST, LOCK) for name in os.listdir(directory)
  )
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
  return True


def _acquire_lock(directory: str) -> str:
  path = os.path.join(directory, LOCK)
  me = dict(pid=os.getpid(), host=platform.node(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = files.read_json(path)
      except (OSError, ValueError):
        holder = {}
      same_host = holder.get("host") == platform.node()
      if same_host and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
        raise WorkdirError(
          f"--workdir {directory!r} is in use by pid {holder['pid']} on {holder['host']} "
          f"(since {holder.get('started', '?')}); wait for it, or use another workdir"
        ) from None
      if holder and not same_host:
        raise WorkdirError(
          f"--workdir {directory!r} is locked by pid {holder.get('pid')} on host "
          f"{holder.get('host')}; if that run is dead, delete {path}"
        ) from None
      logging.warning("taking over the stale lock of dead pid %s in %s", holder.get("pid"), path)
      os.unlink(path)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise WorkdirError(f"cannot take the lock {path}")


@dataclasses.dataclass
class Workdir:
  """A study workdir opened for writing: locked until close()."""

  path: str
  lock: str

  def close(self) -> None:
    if os.path.exists(self.lock):
      os.unlink(self.lock)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_for_study(directory: str, config, overwrite: bool) -> Workdir:
  """Checks, locks and prepares the workdir; refuses another config's results unless overwrite.

  Nothing is created before the checks pass; --overwrite deletes only the manifest's files.
  """
  _check_location(directory)
  try:
    os.makedirs(directory, exist_ok=True)
    files.write_text(os.path.join(directory, ".write-test"), "ok")
    os.unlink(os.path.join(directory, ".write-test"))
  except OSError as e:
    raise WorkdirError(f"--workdir {directory!r} is not writable: {e.strerror or e}") from None
  lock = _acquire_lock(directory)
  try:
    _prepare(directory, config, overwrite)
  except BaseException:
    os.unlink(lock)
    raise
  return Workdir(directory, lock)


def _prepare(directory: str, config, overwrite: bool) -> None:
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
  _write(
    directory,
    CONFIG,
    files.write_json,
    dict(
      fingerprint=new,
      config=json.loads(config.to_json_best_effort()),
      versions=versions(),
      devices=device_summary(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      x64=bool(jax.config.jax_enable_x64),
    ),
  )


def _delete_written(directory: str) -> None:
  """Deletes every file in the manifest (and folders left empty); nothing else."""
  written = _manifest(directory)
  for relpath in sorted(written):
    path = os.path.join(directory, relpath)
    if os.path.isfile(path):
      os.unlink(path)
  for folder in (SET_ASIDE_DIR, CELLS_DIR):
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


def _read_cell_files(npz_path: str, json_path: str):
  record = files.read_json(json_path)
  train_fields, decode_fields = record.pop("train_fields"), record.pop("decode_fields")
  meta = results.CellMeta(**record)
  with np.load(npz_path) as z:
    arrays = results.SeedArrays(
      train={f: z[array_key("", f)] for f in train_fields},
      decodings={d: {f: z[array_key(d, f)] for f in decode_fields} for d in meta.decodings},
    )
  return meta, arrays


def read_cell(directory: str, cell_name: str) -> tuple[results.CellMeta, results.SeedArrays]:
  npz, meta_json = _cell_relpaths(cell_name)
  return _read_cell_files(os.path.join(directory, npz), os.path.join(directory, meta_json))


# What a damaged cell file raises when read: truncated zip, bad JSON, missing keys or fields.
_DAMAGED = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


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
      raise ValueError(f"seed counts {sorted(seeds)}")
  except _DAMAGED as e:
    _set_aside(directory, (npz, meta_json))
    logging.warning(
      "%s is damaged (%s: %s): set aside in %s, recomputing the cell",
      os.path.join(directory, meta_json), type(e).__name__, e, SET_ASIDE_DIR,
    )  # fmt: skip
    return False
  fingerprint = config_lib.cell_fingerprint(cell)
  if meta.fingerprint != fingerprint:
    logging.warning(
      "%s was made by another config (fingerprint %s != %s): recomputing the cell",
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


def write_results(directory: str, cells: list[config_lib.Cell], seeds: int, wall_seconds: float):
  """results.json, results.csv and per_seed.npz from every finished cell; returns the rows."""
  rows, per_seed = [], {}
  for cell in cells:
    meta, arrays = read_cell(directory, cell.name)
    rows += [results.summarize(meta, arrays, d) for d in meta.decodings]
    per_seed.update({f"{cell.name}/{key}": value for key, value in _flat(arrays).items()})
  summary = dict(
    rows=[results.to_jsonable(r) for r in rows],
    seeds=seeds,
    wall_seconds=wall_seconds,
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
  except _DAMAGED as e:
    raise WorkdirError(f"cannot read the results in {directory!r}: {e}") from None
  return Finished(
    rows=rows,
    run=run_info,
    seeds=saved["seeds"],
    wall_seconds=saved["wall_seconds"],
    devices=saved.get("devices", {}),
    cells=cells,
    arrays=arrays,
  )


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
