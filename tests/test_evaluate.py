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
  run = jax.jit(evaluate.make_evaluate(cell.config, dataset, cell.decodings).final)
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
    evaluate.choose_prompts(cell.config, dataset).ids, dataset.context_length
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


def test_prompts_are_the_configured_ones_then_the_distinct_contexts_up_to_the_cap():
  config = tiny_config()
  dataset = data.dataset_from_config(config.data)
  contexts = len(dataset.distinct_contexts_CxT)
  chosen = evaluate.choose_prompts(config, dataset)
  assert dataset.decode(chosen.ids[0]) == "the"
  assert len(chosen.ids) == 1 + contexts and chosen.contexts_used == chosen.contexts == contexts
  config.generate.max_prompts = 11
  capped = evaluate.choose_prompts(config, dataset)
  assert len(capped.ids) == 11 and capped.contexts_used == 10 and capped.contexts == contexts
  # Evenly spaced over the corpus, first and last contexts included, deterministic.
  np.testing.assert_array_equal(capped.ids[1], dataset.distinct_contexts_CxT[0])
  np.testing.assert_array_equal(capped.ids[-1], dataset.distinct_contexts_CxT[-1])
  again = evaluate.choose_prompts(config, dataset)
  assert all(np.array_equal(a, b) for a, b in zip(capped.ids, again.ids, strict=True))
  config.generate.prompts = ("the", "   ")
  config.data.tokenization = "word"
  dataset = data.dataset_from_config(config.data)
  with pytest.raises(data.DataError, match="prompt '   ' has no tokens"):
    evaluate.choose_prompts(config, dataset)


@pytest.mark.parametrize("mode", ["last", "all"])
def test_windows_in_chunks_give_the_one_pass_metrics(mode):
  config = tiny_config()
  config.model.mode = mode
  dataset = data.dataset_from_config(config.data)
  (cell,) = config_lib.expand_cells(config)
  trainer = train.make_train(cell.config, dataset)
  state = trainer.init(jax.random.key(0), train.Hparams(jnp.float32(1e-3), jnp.float32(0.0)))
  state = state.replace(params=jax.tree_util.tree_map(lambda p: 6.0 * p, state.params))
  whole = jax.jit(evaluate.make_evaluate(cell.config, dataset, cell.decodings).final)(state)
  # 95 windows in chunks of 8: the last chunk is padded and must not count.
  chunked = jax.jit(evaluate.make_evaluate(cell.config, dataset, cell.decodings, 8).final)(state)
  for field in ("final_loss", "accuracy", "entropy", "unigram_kl"):
    np.testing.assert_allclose(
      getattr(chunked.train, field), getattr(whole.train, field), rtol=1e-5, err_msg=field
    )
  assert bool(chunked.train.argmax_constant) == bool(whole.train.argmax_constant)
  constant = state.replace(params=jax.tree_util.tree_map(jnp.zeros_like, state.params))
  run = jax.jit(evaluate.make_evaluate(cell.config, dataset, cell.decodings, 8).final)
  assert bool(run(constant).train.argmax_constant)  # All-zero weights: one prediction.


def test_unigram_kl_is_the_mean_over_distinct_contexts(setup):
  """Read from the window pass (chunked: test_windows_in_chunks_give_the_one_pass_metrics)."""
  cell, dataset, state, result = setup
  contexts_NxT = dataset.contexts_NxT
  assert len(dataset.distinct_contexts_CxT) < len(contexts_NxT)  # Some contexts repeat.
  np.testing.assert_array_equal(
    dataset.distinct_contexts_CxT, contexts_NxT[dataset.first_windows_C]
  )
  lm = model.model_from_config(cell.config.model, dataset.vocab_size)
  u_V = metrics.unigram_distribution(jnp.asarray(dataset.windows_NxW[:, -1]), dataset.vocab_size)

  def mean_kl(contexts):
    logits_XxV = lm.apply({"params": state.params}, contexts)
    return np.mean([metrics.unigram_kl(row_V[None], u_V) for row_V in logits_XxV])

  expected = mean_kl(dataset.distinct_contexts_CxT)
  np.testing.assert_allclose(result.train.unigram_kl, expected, rtol=1e-5)
  # Each context counts once: a mean over every window weights repeated contexts more.
  assert not np.isclose(mean_kl(contexts_NxT), expected, rtol=1e-3)


def test_dynamics_measure_what_the_final_evaluation_measures(setup):
  cell, dataset, state, result = setup
  dynamics = jax.jit(evaluate.make_evaluate(cell.config, dataset, cell.decodings).dynamics)(state)
  greedy = result.decodings["greedy"]
  assert bool(dynamics.collapsed) == bool(greedy.seed_collapsed)
  assert bool(dynamics.argmax_constant) == bool(result.train.argmax_constant)
  np.testing.assert_allclose(dynamics.loss, result.train.final_loss, rtol=1e-6)
  np.testing.assert_allclose(dynamics.unigram_kl, result.train.unigram_kl, rtol=1e-6)
  np.testing.assert_allclose(dynamics.top_token_share, greedy.top_token_share, rtol=1e-6)
  assert float(result.train.unigram_kl) > 0  # A random model is not the unigram prior.
