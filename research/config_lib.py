"""Config checking, scenario/grid expansion into cells, and fingerprints."""

import copy
import dataclasses
import hashlib
import itertools
import json
import re

import ml_collections

from research import claims as claims_lib
from research import data as data_lib
from research import generate as generate_lib
from research import model as model_lib
from research import train as train_lib

# Fields that only change how a study is executed, never its numbers.
EXECUTION_FIELDS = ("study.max_parallel_seeds", "study.epochs_per_call", "study.claims")
# Fields that change no array shape: traced, so cells differing only here share one program.
TRACED_FIELDS = {"train.learning_rate": "learning_rate", "model.dropout": "dropout"}


class ConfigError(ValueError):
  """An invalid config value, with a one-line message naming the field."""


@dataclasses.dataclass(frozen=True, eq=False)
class Cell:
  """One scenario (x grid point): a full config to run over all seeds."""

  name: str
  config: ml_collections.ConfigDict
  axes: dict  # Grid axis (dotted field) -> value, for tables and plots.

  @property
  def slug(self) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", self.name)


def _check(ok: bool, field: str, rule: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{field} must be {rule}, got {value!r}")


def _one_of(field: str, value, allowed) -> None:
  _check(value in allowed, field, f"one of {list(allowed)}", value)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field."""
  d, m, t, g, s = config.data, config.model, config.train, config.generate, config.study
  _one_of("data.tokenization", d.tokenization, data_lib.TOKENIZATIONS)
  if not d.corpus_file:
    _one_of("data.corpus", d.corpus, sorted(data_lib.CORPORA))
  _check(
    _is_int(d.context_length) and d.context_length >= 1,
    "data.context_length",
    "an int >= 1",
    d.context_length,
  )
  for field in ("embed_dim", "hidden", "layers"):
    value = m[field]
    _check(_is_int(value) and value >= 1, f"model.{field}", "an int >= 1", value)
  _check(0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)", m.dropout)
  _one_of("model.mode", m.mode, model_lib.MODES)
  _one_of("model.init", m.init, ("keras", "flax"))
  _one_of("train.optimizer", t.optimizer, train_lib.OPTIMIZERS)
  _check(t.learning_rate > 0, "train.learning_rate", "> 0", t.learning_rate)
  _check(t.adam_eps > 0, "train.adam_eps", "> 0", t.adam_eps)
  _check(t.divergence_factor > 1, "train.divergence_factor", "> 1", t.divergence_factor)
  _check(
    _is_int(t.batch_size) and t.batch_size >= 1, "train.batch_size", "an int >= 1", t.batch_size
  )
  _check(_is_int(t.epochs) and t.epochs >= 1, "train.epochs", "an int >= 1", t.epochs)
  _check(_is_int(g.length) and g.length >= 8, "generate.length", "an int >= 8", g.length)
  _one_of("generate.strategy", g.strategy, generate_lib.STRATEGIES)
  _check(g.temperature > 0, "generate.temperature", "> 0", g.temperature)
  _check(_is_int(g.top_k) and g.top_k >= 1, "generate.top_k", "an int >= 1", g.top_k)
  _check(0.0 < g.top_p <= 1.0, "generate.top_p", "in (0, 1]", g.top_p)
  _check(
    len(g.prompts) >= 1 or g.include_training_contexts,
    "generate.prompts",
    "non-empty (or include_training_contexts set)",
    g.prompts,
  )
  _one_of("study.claims", s.claims, claims_lib.CLAIM_SETS)
  _check(_is_int(s.seeds) and s.seeds >= 1, "study.seeds", "an int >= 1", s.seeds)
  _check(
    _is_int(s.seed_offset) and s.seed_offset >= 0, "study.seed_offset", "an int >= 0", s.seed_offset
  )
  _check(
    _is_int(s.max_parallel_seeds) and s.max_parallel_seeds >= 0,
    "study.max_parallel_seeds",
    "an int >= 0 (0 = all seeds at once)",
    s.max_parallel_seeds,
  )
  _check(
    _is_int(s.epochs_per_call) and s.epochs_per_call >= 1,
    "study.epochs_per_call",
    "an int >= 1",
    s.epochs_per_call,
  )


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
    if isinstance(current, float) and _is_int(value):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{where}: config field {path!r}: {e}") from None
  return config


def _short(path: str) -> str:
  return path.split(".")[-1]


def format_value(value) -> str:
  """A grid value as it appears in cell names: floats in %g form."""
  return f"{value:g}" if isinstance(value, float) else str(value)


def expand_cells(config: ml_collections.ConfigDict) -> list[Cell]:
  """Every scenario x grid point as a validated Cell."""
  validate(config)
  scenarios = list(config.study.scenarios) or [dict(name="default")]
  grid = flatten(config.study.grid)
  for path, values in grid.items():
    if not isinstance(values, list | tuple) or not values:
      raise ConfigError(f"config.study.grid.{path} must be a non-empty list of values")
  cells, names = [], set()
  for scenario in scenarios:
    scenario = dict(scenario)
    if "name" not in scenario or not str(scenario["name"]):
      raise ConfigError(f"config.study.scenarios: every scenario needs a name, got {scenario}")
    name = str(scenario.pop("name"))
    base = override(config, flatten(scenario), f"scenario {name!r}")
    for point in itertools.product(*grid.values()):
      axes = dict(zip(grid.keys(), point, strict=True))
      cell_name = name
      if axes:
        cell_name += "[" + ",".join(f"{_short(k)}={format_value(v)}" for k, v in axes.items()) + "]"
      cell_config = override(base, axes, f"grid point {cell_name!r}")
      try:
        validate(cell_config)
      except ConfigError as e:
        raise ConfigError(f"{cell_name}: {e}") from None
      if cell_name in names:
        raise ConfigError(f"config.study.scenarios: duplicate cell name {cell_name!r}")
      names.add(cell_name)
      cells.append(Cell(cell_name, cell_config, axes))
  return cells


def _without(config, paths) -> dict:
  flat = flatten(config.to_dict())
  return {k: v for k, v in flat.items() if k not in paths}


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that affects results (execution-only fields excluded)."""
  payload = json.dumps(_without(config, EXECUTION_FIELDS), sort_keys=True, default=str)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def program_key(cell: Cell) -> str:
  """Cells with equal keys differ only in traced hparams: one compiled program serves them."""
  skip = set(TRACED_FIELDS) | {k for k in flatten(cell.config.to_dict()) if k.startswith("study.")}
  return json.dumps(_without(cell.config, skip), sort_keys=True, default=str)
