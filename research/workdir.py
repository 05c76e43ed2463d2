"""The one owner of the workdir layout, for the writer (the study) and the readers (the note).

config.json              resolved config, fingerprint, versions, devices
cells/<slug>.npz, .json  one finished cell: per-seed arrays, then its CellMeta (written last)
results.json, .csv       one Row per cell x decoding
per_seed.npz             every cell's arrays, keyed "<cell>/" + array_key(decoding, field)
report.md, *.png         the note
"""

import dataclasses
import json
import os
import platform
import shutil
import sys

import jax
import numpy as np

from research import config_lib, files, results

CELLS_DIR = "cells"
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


# ----------------------------------------------------------------------------- cells


def _cell_paths(workdir: str, cell: config_lib.Cell) -> tuple[str, str]:
  base = os.path.join(workdir, CELLS_DIR, config_lib.slug(cell.name))
  return base + ".npz", base + ".json"


def cell_done(workdir: str, cell: config_lib.Cell) -> bool:
  npz_path, json_path = _cell_paths(workdir, cell)
  return os.path.exists(json_path) and os.path.exists(npz_path)


def _flat(arrays: results.SeedArrays) -> dict:
  flat = {array_key("", k): v for k, v in arrays.train.items()}
  for name, fields in arrays.decodings.items():
    flat.update({array_key(name, k): v for k, v in fields.items()})
  return flat


def write_cell(
  workdir: str, cell: config_lib.Cell, meta: results.CellMeta, arrays: results.SeedArrays
) -> None:
  npz_path, json_path = _cell_paths(workdir, cell)
  files.write_npz(npz_path, _flat(arrays))
  record = dict(
    dataclasses.asdict(meta),
    train_fields=list(arrays.train),
    decode_fields=list(next(iter(arrays.decodings.values()))),
  )
  files.write_json(json_path, record)  # Written last: its presence marks the cell finished.


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


def read_cell(workdir: str, cell: config_lib.Cell) -> tuple[results.CellMeta, results.SeedArrays]:
  return _read_cell_files(*_cell_paths(workdir, cell))


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


def prepare(workdir: str, config, overwrite: bool) -> None:
  """Checks the workdir is writable and holds no results of a different config."""
  try:
    os.makedirs(os.path.join(workdir, CELLS_DIR), exist_ok=True)
    files.write_text(os.path.join(workdir, ".write-test"), "ok")
    os.unlink(os.path.join(workdir, ".write-test"))
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir!r} is not writable: {e.strerror or e}") from None
  config_path = os.path.join(workdir, CONFIG)
  new = config_lib.fingerprint(config)
  if os.path.exists(config_path):
    try:
      old = files.read_json(config_path).get("fingerprint")
    except (OSError, ValueError):
      old = None
    if old != new and not overwrite:
      raise WorkdirError(
        f"--workdir {workdir!r} holds results of a different config (fingerprint {old} != "
        f"{new}); use a new workdir, or pass --overwrite to delete them"
      )
  if overwrite:
    shutil.rmtree(os.path.join(workdir, CELLS_DIR))
    os.makedirs(os.path.join(workdir, CELLS_DIR))
    for name in os.listdir(workdir):
      if name in (RESULTS_JSON, RESULTS_CSV, PER_SEED, REPORT) or name.endswith(".png"):
        os.unlink(os.path.join(workdir, name))
  files.write_json(
    config_path,
    dict(
      fingerprint=new,
      config=json.loads(config.to_json_best_effort()),
      versions=versions(),
      devices=device_summary(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      x64=bool(jax.config.jax_enable_x64),
    ),
  )


# ----------------------------------------------------------------------------- results


def write_results(workdir: str, cells: list[config_lib.Cell], seeds: int, wall_seconds: float):
  """results.json, results.csv and per_seed.npz from every finished cell; returns the rows."""
  rows, per_seed = [], {}
  for cell in cells:
    meta, arrays = read_cell(workdir, cell)
    rows += [results.summarize(meta, arrays, d) for d in meta.decodings]
    per_seed.update({f"{cell.name}/{key}": value for key, value in _flat(arrays).items()})
  files.write_json(
    os.path.join(workdir, RESULTS_JSON),
    dict(
      rows=[results.to_jsonable(r) for r in rows],
      seeds=seeds,
      wall_seconds=wall_seconds,
      devices=device_summary(),
    ),
  )
  files.write_text(os.path.join(workdir, RESULTS_CSV), results.to_csv(rows))
  files.write_npz(os.path.join(workdir, PER_SEED), per_seed)
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


def load(workdir: str) -> Finished:
  """Reads results.json, config.json and the rows' cells."""
  results_path = os.path.join(workdir, RESULTS_JSON)
  if not os.path.exists(results_path):
    raise WorkdirError(f"no results.json in {workdir!r}: run the study first")
  saved = files.read_json(results_path)
  config_path = os.path.join(workdir, CONFIG)
  run_info = files.read_json(config_path) if os.path.exists(config_path) else {}
  rows = [results.from_jsonable(r) for r in saved["rows"]]
  cells, arrays = {}, {}
  for row in rows:
    if row.cell not in cells:
      base = os.path.join(workdir, CELLS_DIR, config_lib.slug(row.cell))
      cells[row.cell], arrays[row.cell] = _read_cell_files(base + ".npz", base + ".json")
  return Finished(
    rows=rows,
    run=run_info,
    seeds=saved["seeds"],
    wall_seconds=saved["wall_seconds"],
    devices=saved.get("devices", {}),
    cells=cells,
    arrays=arrays,
  )


def write_note(workdir: str, text: str, figures: dict, all_names) -> str:
  """report.md and its PNGs ({name: png bytes}); stale plots among all_names are removed."""
  for name in all_names:
    path = os.path.join(workdir, f"{name}.png")
    if name in figures:
      files.write_bytes(path, figures[name])
    elif os.path.exists(path):
      os.unlink(path)  # A plot of an earlier, different study.
  path = os.path.join(workdir, REPORT)
  files.write_text(path, text)
  return path
