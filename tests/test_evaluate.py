"""Per-seed evaluation: training-set metrics and decoding metrics equal direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from research import config_lib, data, evaluate, generate, metrics, model, train


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  config.study.decodings = [
    dict(name="greedy", strategy="greedy"),
    dict(name="hot", strategy="temperature", temperature=2.0),
  ]
  (cell,) = config_lib.expand_cells(config)
  dataset = data.dataset_from_config(config.data)
  trainer = train.make_train(cell.config, dataset)
  state = trainer.init(jax.random.key(3), train.Hparams(jnp.float32(1e-3), jnp.float32(0.0)))
  # Large weights give peaked, input-dependent predictions, as a trained model has.
  state = state.replace(params=jax.tree_util.tree_map(lambda p: 6.0 * p, state.params))
  run = jax.jit(evaluate.make_evaluate(cell.config, dataset, cell.decodings))
  return cell, dataset, state, run(state)


def test_training_set_metrics(setup):
  cell, dataset, state, result = setup
  lm = model.model_from_config(cell.config.model, dataset.vocab_size)
  inputs, targets = train.split_window(jnp.asarray(dataset.windows_NxW), "last")
  logits_NxV = lm.apply({"params": state.params}, inputs)
  expected = train.cross_entropy(logits_NxV, targets, jnp.ones(len(targets)))
  np.testing.assert_allclose(result.train.final_loss, expected, rtol=1e-5)
  accuracy = np.mean(np.argmax(logits_NxV, -1) == np.asarray(targets))
  np.testing.assert_allclose(result.train.accuracy, accuracy, rtol=1e-6)
  the = lm.apply({"params": state.params}, jnp.asarray([dataset.encode("the")]))[0]
  assert int(result.train.probe) == int(jnp.argmax(the))
  assert not bool(result.train.diverged)


def test_decoding_metrics_are_the_metrics_of_the_generated_tokens(setup):
  cell, dataset, state, result = setup
  assert sorted(result.decodings) == ["greedy", "hot"]
  lm = model.model_from_config(cell.config.model, dataset.vocab_size)
  prompts_PxT, lengths_P = generate.prepare_prompts(
    evaluate.prompt_ids(cell.config, dataset), dataset.context_length
  )
  greedy = generate.make_generate(lm, cell.decodings[0].generate)
  x_PxL = greedy(state.params, prompts_PxT, lengths_P, jax.random.key(0)).tokens_PxL
  got = result.decodings["greedy"]
  np.testing.assert_array_equal(got.probe_continuation_L, x_PxL[0])
  np.testing.assert_array_equal(got.tail_period_P, metrics.tail_period(x_PxL))
  assert bool(got.seed_collapsed) == bool(metrics.seed_collapsed(x_PxL))
  np.testing.assert_allclose(got.distinct_2, metrics.distinct_n(x_PxL, 2))
  assert int(got.collapse_token) == int(x_PxL[0, -1])
  # Sampling at temperature 2 from a different key continues differently.
  hot = result.decodings["hot"].probe_continuation_L
  assert not np.array_equal(hot, got.probe_continuation_L)


def test_prompts_are_the_configured_ones_then_every_distinct_context():
  config = tiny_config()
  dataset = data.dataset_from_config(config.data)
  ids = evaluate.prompt_ids(config, dataset)
  assert dataset.decode(ids[0]) == "the"
  assert len(ids) == 1 + len(dataset.distinct_contexts_CxT)
  config.generate.prompts = ("the", "   ")
  config.data.tokenization = "word"
  dataset = data.dataset_from_config(config.data)
  with pytest.raises(data.DataError, match="prompt '   ' has no tokens"):
    evaluate.prompt_ids(config, dataset)
