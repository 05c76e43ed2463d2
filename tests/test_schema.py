"""Config validation: every bad value fails with one line naming the field."""

import pytest
from conftest import tiny_config

from research import schema

INVALID = [
  ("train.learning_rate", -0.1, "config.train.learning_rate must be > 0, got -0.1"),
  ("train.learning_rate", 0.0, "config.train.learning_rate must be > 0"),
  ("train.learning_rate", float("nan"), "config.train.learning_rate must be > 0, got nan"),
  ("train.learning_rate", float("inf"), "config.train.learning_rate must be > 0, got inf"),
  ("model.dropout", 1.0, "config.model.dropout must be in [0, 1), got 1.0"),
  ("model.dropout", -0.1, "config.model.dropout must be in [0, 1)"),
  ("model.impl", "cudnn", "config.model.impl must be one of ['fused', 'flax']"),
  ("train.batch_size", 0, "config.train.batch_size must be an int >= 1, got 0"),
  ("train.epochs", 0, "config.train.epochs must be an int >= 1"),
  ("study.seeds", 0, "config.study.seeds must be an int >= 1"),
  ("data.context_length", 0, "config.data.context_length must be an int >= 1"),
  ("generate.length", 4, "config.generate.length must be an int >= 8, got 4"),
  ("data.tokenization", "bpe", "config.data.tokenization must be one of ['char', 'word']"),
  ("generate.strategy", "beam", "config.generate.strategy must be one of ['greedy',"),
  ("train.optimizer", "lion", "config.train.optimizer must be one of ['adam', 'sgd',"),
  ("generate.top_p", 1.5, "config.generate.top_p must be in (0, 1], got 1.5"),
  ("generate.top_p", 0.0, "config.generate.top_p must be in (0, 1]"),
  ("generate.temperature", 0.0, "config.generate.temperature must be > 0"),
  ("generate.top_k", 0, "config.generate.top_k must be an int >= 1"),
  ("model.mode", "every", "config.model.mode must be one of ['last', 'all']"),
  ("study.claims", "paper", "config.study.claims must be one of ['', 'blog']"),
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


def test_the_default_configs_are_valid():
  from configs import blog, decoding, default, epochs, sweep_lr_dropout, tiny, word_level

  for module in (blog, decoding, default, epochs, sweep_lr_dropout, tiny, word_level):
    schema.validate(module.get_config())
