"""Config validation: every bad value fails with one line naming the field."""

import ml_collections
import pytest
from conftest import tiny_config

from research import config_lib, schema

INVALID = [
  ("train.learning_rate", -0.1, "config.train.learning_rate must be > 0, got -0.1"),
  ("train.learning_rate", 0.0, "config.train.learning_rate must be > 0"),
  ("train.learning_rate", float("nan"), "config.train.learning_rate must be > 0, got nan"),
  ("train.learning_rate", float("inf"), "config.train.learning_rate must be > 0, got inf"),
  ("model.dropout", 1.0, "config.model.dropout must be in [0, 1), got 1.0"),
  ("model.dropout", -0.1, "config.model.dropout must be in [0, 1)"),
  ("model.impl", "cudnn", "config.model.impl must be one of ['fused', 'flax', 'pallas']"),
  ("model.unroll", -1, "config.model.unroll must be an int >= 0 (0 = a Python loop over the T"),
  ("model.matmul_precision", "tf32", "config.model.matmul_precision must be one of ['float32', "),
  ("train.batch_size", 0, "config.train.batch_size must be an int in [1, 2147483647], got 0"),
  ("train.epochs", 0, "config.train.epochs must be an int in [1, "),
  ("study.seeds", 0, "config.study.seeds must be an int in [1, "),
  ("data.context_length", 0, "config.data.context_length must be an int in [1, "),
  ("generate.length", 4, "config.generate.length must be an int in [8, 2147483647], got 4"),
  ("data.tokenization", "bpe", "config.data.tokenization must be one of ['char', 'word']"),
  ("generate.strategy", "beam", "config.generate.strategy must be one of ['greedy',"),
  ("train.optimizer", "lion", "config.train.optimizer must be one of ['adam', 'sgd',"),
  ("generate.top_p", 1.5, "config.generate.top_p must be in (0, 1], got 1.5"),
  ("generate.top_p", 0.0, "config.generate.top_p must be in (0, 1]"),
  ("generate.temperature", 0.0, "config.generate.temperature must be > 0"),
  ("generate.top_k", 0, "config.generate.top_k must be an int in [1, "),
  ("model.mode", "every", "config.model.mode must be one of ['last', 'all']"),
  ("study.claims", "paper", "config.study.claims must be one of ['', 'blog']"),
  ("data.max_chars", -1, "config.data.max_chars must be an int >= 0 (0 = the whole text), got -1"),
]


@pytest.mark.parametrize("field, value, message", INVALID)
def test_invalid_values_name_the_field(field, value, message):
  group, key = field.split(".")
  config = tiny_config()
  config[group][key] = value
  with pytest.raises(schema.ConfigError) as e:
    schema.validate(config)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_invalid_max_chars_names_the_field(value):
  config = tiny_config()
  # A new data group, as a config file may build one: ConfigDict type checks would refuse 1.5.
  config.data = ml_collections.ConfigDict({**config.data.to_dict(), "max_chars": value})
  with pytest.raises(schema.ConfigError) as e:
    schema.validate(config)
  assert str(e.value) == (
    f"config.data.max_chars must be an int >= 0 (0 = the whole text), got {value!r}"
  )


def test_the_default_configs_are_valid():
  from configs import blog, decoding, default, epochs, real_text, sweep_lr_dropout, tiny, word_level

  for module in (blog, decoding, default, epochs, real_text, sweep_lr_dropout, tiny, word_level):
    schema.validate(module.get_config())


def test_seeds_must_fit_uint32_keys():
  config = tiny_config(seeds=10, seed_offset=2**32 - 10)
  schema.validate(config)  # The last seed is 2**32 - 1.
  config.study.seed_offset = 2**32 - 9
  with pytest.raises(schema.ConfigError, match=r"config.study.seed_offset must be an int in \["):
    schema.validate(config)
  config.study.seed_offset = 2**40
  with pytest.raises(schema.ConfigError, match="study.seed_offset"):
    schema.validate(config)


def test_counts_must_fit_int32():
  config = tiny_config()
  config.train.epochs = 2**31
  with pytest.raises(schema.ConfigError, match="config.train.epochs must be an int in"):
    schema.validate(config)


def test_top_k_is_checked_against_the_vocabulary():
  gen = tiny_config().generate
  gen.strategy, gen.top_k = "top_k", 27
  with pytest.raises(schema.ConfigError, match=r"config.generate.top_k must be <= the voc"):
    schema.check_vocabulary(gen, 26)
  gen.top_k = 26
  schema.check_vocabulary(gen, 26)


def test_real_text_expands_into_the_blog_settings_at_char_and_word_level():
  from configs import real_text

  config = real_text.get_config()
  cells = config_lib.expand_cells(config)
  assert [c.name for c in cells] == [
    f"{tok}_{setting}"
    for tok in ("char", "word")
    for setting in ("1_lr0.1_do0.0", "2_lr1e-3_do0.2", "3_lr1e-4_do0.5")
  ]
  settings = [(0.1, 0.0), (1e-3, 0.2), (1e-4, 0.5)] * 2
  for cell, (lr, dropout) in zip(cells, settings, strict=True):
    c = cell.config
    assert (c.train.learning_rate, c.model.dropout) == (lr, dropout)
    assert c.data.tokenization == cell.name.split("_")[0]
    assert (c.data.corpus, c.data.context_length) == ("pydoc_topics", 3)
    assert c.data.max_chars > 0 and c.generate.include_training_contexts
    assert (c.train.epochs, c.train.batch_size, c.study.seeds) == (100, 32, 256)
  assert config.study.claims == ""
