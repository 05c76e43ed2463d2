"""Scenarios x grid points -> cells, each with its decodings; overrides and fingerprints."""

import copy
import dataclasses
import hashlib
import itertools
import json
import re

import ml_collections

from research import data, schema
from research.schema import ConfigError, validate

__all__ = ["Cell", "ConfigError", "Decoding", "expand_cells", "validate"]

# Fields that only change how a study is executed, never its numbers.
EXECUTION_FIELDS = (
  "study.max_parallel_seeds",
  "study.epochs_per_call",
  "study.claims",
  "study.memory_budget_mb",
  "study.save_models",
  "study.checkpoint_seconds",
)
# Fields added after workdirs were written, with the value that reproduces the older code: at
# that value they are left out of fingerprints, so those workdirs still match their configs.
ADDED_FIELDS = {"model.unroll": 0, "model.matmul_precision": "float32"}
# Fields that change no array shape: traced, so cells differing only here share one program.
TRACED_FIELDS = ("train.learning_rate", "model.dropout")


@dataclasses.dataclass(frozen=True)
class Decoding:
  """One way of continuing the prompts: a name and the generate config it uses."""

  name: str
  generate: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True, eq=False)
class Cell:
  """One scenario (x grid point): a full config to run over all seeds, and its decodings."""

  name: str  # The scenario's name, plus "[axis=value,...]" at a grid point.
  scenario: str
  scenario_index: int  # Position in study.scenarios (the blog claims read scenarios 0-2).
  axes: dict  # Grid axis (dotted field) -> value.
  config: ml_collections.ConfigDict
  decodings: tuple[Decoding, ...]
  named_decodings: bool  # study.decodings given: rows are labelled "<cell>@<decoding>".

  def label(self, decoding: str) -> str:
    """How a (cell, decoding) row is named in tables."""
    return f"{self.name}@{decoding}" if self.named_decodings else self.name


def slug(cell_name: str) -> str:
  """A cell name as a file name."""
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", cell_name)


def flatten(tree, prefix: str = "") -> dict:
  """Nested dict/ConfigDict -> {dotted.path: leaf}."""
  out = {}
  items = tree.items() if hasattr(tree, "items") else []
  for key, value in items:
    path = f"{prefix}{key}"
    if isinstance(value, dict | ml_collections.ConfigDict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def override(config, updates: dict, where: str) -> ml_collections.ConfigDict:
  """A copy of config with dotted-path updates; an unknown field is a ConfigError."""
  config = copy.deepcopy(config)
  for path, value in updates.items():
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"{where}: unknown config field {path!r}")
      node = node[part]
    if leaf not in node or path.startswith("study."):
      raise ConfigError(f"{where}: unknown or non-overridable config field {path!r}")
    current = node[leaf]
    # Let ints stand for floats (grid values such as 0 for dropout), keep everything else typed.
    if isinstance(current, float) and schema.is_int(value):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{where}: config field {path!r}: {e}") from None
  return config


def format_value(value) -> str:
  """A grid value as it appears in cell names: floats in %g form."""
  return f"{value:g}" if isinstance(value, float) else str(value)


# The prompts a cell's programs continue: one set for all its decodings.
PROMPT_FIELDS = ("prompts", "include_training_contexts", "max_prompts")


def _seq(value):
  return tuple(value) if isinstance(value, list | tuple) else value


def expand_decodings(config) -> tuple[Decoding, ...]:
  """study.decodings as Decodings (each a named generate override); else the base decoding."""
  if not config.study.decodings:
    return (Decoding(config.generate.strategy, config.generate),)
  out, names = [], set()
  for spec in config.study.decodings:
    spec = dict(spec)
    name = str(spec.pop("name", ""))
    if not name:
      raise ConfigError("config.study.decodings: every decoding needs a name")
    if name in names:
      raise ConfigError(f"config.study.decodings: duplicate decoding name {name!r}")
    names.add(name)
    updated = override(config, {f"generate.{k}": v for k, v in spec.items()}, name)
    try:
      validate(updated)
    except ConfigError as e:
      raise ConfigError(f"decoding {name!r}: {e}") from None
    for field in PROMPT_FIELDS:  # Checked after validation: unknown fields are named first.
      if _seq(updated.generate[field]) != _seq(config.generate[field]):
        raise ConfigError(
          f"decoding {name!r}: generate.{field} cannot differ between decodings (every "
          "decoding continues the cell's prompts, so they compare seed by seed); set "
          f"generate.{field} for the whole study or in a scenario"
        )
    out.append(Decoding(name, updated.generate))
  return tuple(out)


def expand_cells(config: ml_collections.ConfigDict) -> list[Cell]:
  """Every scenario x grid point as a validated Cell with its decodings."""
  validate(config)
  scenarios = list(config.study.scenarios) or [dict(name="default")]
  grid = flatten(config.study.grid)
  for path, values in grid.items():
    if not isinstance(values, list | tuple) or not values:
      raise ConfigError(f"config.study.grid.{path} must be a non-empty list of values")
  cells, names = [], set()
  for index, scenario in enumerate(scenarios):
    scenario = dict(scenario)
    if "name" not in scenario or not str(scenario["name"]):
      raise ConfigError(f"config.study.scenarios: every scenario needs a name, got {scenario}")
    name = str(scenario.pop("name"))
    base = override(config, flatten(scenario), f"scenario {name!r}")
    for point in itertools.product(*grid.values()):
      axes = dict(zip(grid.keys(), point, strict=True))
      cell_name = name
      if axes:
        short = (f"{k.split('.')[-1]}={format_value(v)}" for k, v in axes.items())
        cell_name += "[" + ",".join(short) + "]"
      cell_config = override(base, axes, f"grid point {cell_name!r}")
      try:
        validate(cell_config)
        decodings = expand_decodings(cell_config)
      except ConfigError as e:
        raise ConfigError(f"{cell_name}: {e}") from None
      if cell_name in names:
        raise ConfigError(f"config.study.scenarios: duplicate cell name {cell_name!r}")
      names.add(cell_name)
      named = bool(config.study.decodings)
      cells.append(Cell(cell_name, name, index, axes, cell_config, decodings, named))
  return cells


def _without(config, paths) -> dict:
  flat = flatten(config.to_dict())
  return {
    k: v
    for k, v in flat.items()
    if k not in paths and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])
  }


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that affects results (execution-only fields excluded)."""
  payload = json.dumps(_without(config, EXECUTION_FIELDS), sort_keys=True, default=str)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of what trained models depend on: all but decoding (generate.*, study.decodings)."""
  flat = _without(config, EXECUTION_FIELDS)
  kept = {k: v for k, v in flat.items() if not k.startswith(("generate.", "study.decodings"))}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_fingerprint(cell: Cell) -> str:
  """Hash of everything that affects this cell's numbers: its config (not the other cells'
  scenarios) and the text it trains on, so an edited corpus file is not taken for the old."""
  flat = _without(cell.config, EXECUTION_FIELDS)
  mine = {k: v for k, v in flat.items() if not k.startswith(("study.scenarios", "study.grid."))}
  mine["corpus_sha256"] = data.corpus_info(cell.config.data).sha256
  payload = json.dumps(mine, sort_keys=True, default=str)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def program_key(cell: Cell) -> str:
  """Cells with equal keys differ only in traced hparams: one compiled program serves them."""
  flat = flatten(cell.config.to_dict())
  skip = set(TRACED_FIELDS) | {k for k in flat if k.startswith("study.")}
  key = {k: v for k, v in flat.items() if k not in skip}
  key["decodings"] = [(d.name, d.generate.to_dict()) for d in cell.decodings]
  return json.dumps(key, sort_keys=True, default=str)
