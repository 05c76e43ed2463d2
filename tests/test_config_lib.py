"""Scenarios x grid -> cells with their decodings; overrides, program keys and fingerprints."""

import ml_collections
import pytest
from conftest import grid_config, tiny_config

from research import config_lib


def test_grid_cells_are_typed_and_share_one_program_per_text():
  cells = config_lib.expand_cells(grid_config())
  assert len(cells) == 8
  cell = cells[6]
  assert cell.name == "var[dropout=0.5,learning_rate=0.001]"
  assert (cell.scenario, cell.scenario_index) == ("var", 1)
  assert cell.axes == {"model.dropout": 0.5, "train.learning_rate": 1e-3}
  assert cell.config.data.corpus == "blog_varied" and cell.config.model.dropout == 0.5
  assert len({config_lib.program_key(c) for c in cells}) == 2  # One per training text.


def test_an_int_grid_value_for_a_float_field_becomes_a_float():
  config = tiny_config()
  config.study.grid = ml_collections.ConfigDict({"model": {"dropout": (0, 0.5)}})
  cell = config_lib.expand_cells(config)[0]
  assert cell.name == "default[dropout=0]"
  assert isinstance(cell.config.model.dropout, float) and cell.config.model.dropout == 0.0


def test_decodings_expand_with_the_cells():
  config = tiny_config()
  assert [d.name for d in config_lib.expand_cells(config)[0].decodings] == ["greedy"]
  config.study.decodings = [
    dict(name="g", strategy="greedy"),
    dict(name="t", strategy="temperature", temperature=0.5),
  ]
  (cell,) = config_lib.expand_cells(config)
  assert [d.name for d in cell.decodings] == ["g", "t"]
  assert cell.decodings[1].generate.temperature == 0.5
  assert cell.decodings[0].generate.length == config.generate.length
  assert cell.label("t") == "default@t"
  # The cell's own prompts, restated (a list for its tuple), are no override.
  config.study.decodings = [dict(name="same", prompts=list(config.generate.prompts))]
  assert config_lib.expand_cells(config)[0].decodings[0].generate.prompts == ("the",)


@pytest.mark.parametrize(
  "decodings, message",
  [
    ([dict(strategy="greedy")], "every decoding needs a name"),
    ([dict(name="a"), dict(name="a")], "duplicate decoding name 'a'"),
    ([dict(name="hot", temperature=-1.0)], "decoding 'hot': config.generate.temperature"),
    ([dict(name="x", beam=4)], "unknown or non-overridable config field 'generate.beam'"),
    ([dict(name="p", prompts=("a",))], "decoding 'p': generate.prompts cannot differ"),
    ([dict(name="m", max_prompts=2)], "decoding 'm': generate.max_prompts cannot differ"),
  ],
)
def test_bad_decodings_are_config_errors(decodings, message):
  config = tiny_config()
  config.study.decodings = decodings
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.expand_cells(config)


def test_invalid_scenario_and_grid_values_name_the_cell():
  config = tiny_config()
  config.study.scenarios = [dict(name="bad", train=dict(learning_rat=0.1))]
  with pytest.raises(
    config_lib.ConfigError, match="scenario 'bad': unknown .*'train.learning_rat'"
  ):
    config_lib.expand_cells(config)
  config.study.scenarios = [dict(name="ok")]
  config.study.grid = ml_collections.ConfigDict({"model": {"dropout": (0.0, 1.5)}})
  with pytest.raises(config_lib.ConfigError, match=r"ok\[dropout=1.5\]: config.model.dropout"):
    config_lib.expand_cells(config)
  config.study.grid = ml_collections.ConfigDict({"model": {"dropout": ()}})
  with pytest.raises(config_lib.ConfigError, match="non-empty list"):
    config_lib.expand_cells(config)
  config.study.grid = ml_collections.ConfigDict()
  config.study.scenarios = [dict(name="a"), dict(name="a")]
  with pytest.raises(config_lib.ConfigError, match="duplicate cell name 'a'"):
    config_lib.expand_cells(config)


def test_fields_added_later_keep_older_fingerprints_at_their_old_value():
  config = tiny_config()
  base = config_lib.fingerprint(config), config_lib.training_fingerprint(config)
  older = tiny_config()
  del older.model["unroll"]  # A config written before model.unroll existed...
  del older.model["matmul_precision"]  # ...or model.matmul_precision.
  assert (config_lib.fingerprint(older), config_lib.training_fingerprint(older)) == base
  for field, value in (("unroll", 2), ("matmul_precision", "tensorfloat32")):
    changed = tiny_config()
    changed.model[field] = value
    assert config_lib.fingerprint(changed) != base[0]
    assert config_lib.training_fingerprint(changed) != base[1]


def test_fingerprint_ignores_execution_fields_only():
  base = config_lib.fingerprint(tiny_config())
  assert config_lib.fingerprint(tiny_config(max_parallel_seeds=2, epochs_per_call=1)) == base
  changed = tiny_config()
  changed.train.learning_rate = 0.05
  assert config_lib.fingerprint(changed) != base
  assert config_lib.fingerprint(tiny_config(seeds=5)) != base


def test_slug_is_a_safe_file_name():
  assert config_lib.slug("a[lr=0.1,x=1]/b c") == "a_lr=0.1_x=1__b_c"
