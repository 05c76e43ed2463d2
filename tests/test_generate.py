"""Decoding: sliding window, greedy and the sampling strategies."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import rounding_slack, tiny_config

from research import data, generate, model


def gen_cfg(**kw):
  cfg = tiny_config().generate
  cfg.update(kw)
  return cfg


def trained_like_params(vocab_size=6, context=3, seed=0):
  lm = model.LSTMLanguageModel(vocab_size, embed_dim=8, hidden=16)
  # Large random weights give peaked, input-dependent predictions.
  params = model.init_params(lm, jax.random.key(seed), context)
  params = jax.tree_util.tree_map(lambda p: p * 8.0, params)
  return lm, params


def test_greedy_matches_a_hand_rolled_sliding_window():
  lm, params = trained_like_params()
  prompts, lengths = generate.prepare_prompts([np.array([1, 2, 3]), np.array([4])], 3)
  np.testing.assert_array_equal(prompts, [[1, 2, 3], [4, 0, 0]])
  out = generate.make_generate(lm, gen_cfg(length=10))(params, prompts, lengths, jax.random.key(0))
  for row, ids in enumerate(([1, 2, 3], [4])):
    seq = list(ids)
    for _ in range(10):
      window = jnp.asarray([seq[-3:]])
      seq.append(int(jnp.argmax(lm.apply({"params": params}, window)[0])))
    np.testing.assert_array_equal(out.tokens_PxL[row], seq[len(ids) :])
  first = lm.apply({"params": params}, jnp.asarray([[1, 2, 3]]))[0]
  tol = 1e-5 * rounding_slack()
  np.testing.assert_allclose(out.first_logits_PxV[0], first, rtol=tol, atol=tol)


def test_prompt_longer_than_context_keeps_its_end():
  prompts, lengths = generate.prepare_prompts([np.array([1, 2, 3, 4, 5])], 3)
  np.testing.assert_array_equal(prompts, [[3, 4, 5]])
  assert lengths.tolist() == [3]


@pytest.mark.parametrize(
  "kw, allowed",
  [
    (dict(strategy="top_k", top_k=1), "argmax"),
    (dict(strategy="top_p", top_p=1e-6), "argmax"),
    (dict(strategy="temperature", temperature=1e-4), "argmax"),
    (dict(strategy="top_k", top_k=2), "top2"),
    (dict(strategy="top_p", top_p=0.5), "top2"),
  ],
)
def test_sampling_strategies_keep_the_right_tokens(kw, allowed):
  # p = [0.45, 0.35, 0.1, 0.1]: top-p 0.5 keeps the first two tokens, as does top-k 2.
  logits = jnp.log(jnp.asarray([[0.45, 0.35, 0.1, 0.1]]))
  keys = jax.random.split(jax.random.key(0), 400)
  picks = np.asarray(jax.vmap(lambda k: generate.choose(logits, k, gen_cfg(**kw))[0])(keys))
  expected = {"argmax": {0}, "top2": {0, 1}}[allowed]
  assert set(picks.tolist()) == expected


def test_temperature_one_samples_the_model_distribution():
  probs = jnp.asarray([0.5, 0.3, 0.2])
  keys = jax.random.split(jax.random.key(1), 4000)
  cfg = gen_cfg(strategy="temperature", temperature=1.0)
  picks = jax.vmap(lambda k: generate.choose(jnp.log(probs)[None], k, cfg)[0])(keys)
  freq = np.bincount(np.asarray(picks), minlength=3) / 4000
  np.testing.assert_allclose(freq, probs, atol=0.03)


def test_word_level_prompt_shorter_than_context():
  ds = data.make_dataset(data.BLOG_VARIED, "word", 3)
  lm, params = trained_like_params(vocab_size=ds.vocab_size)
  prompts, lengths = generate.prepare_prompts([ds.encode("the")], 3)
  out = generate.make_generate(lm, gen_cfg(length=8))(params, prompts, lengths, jax.random.key(0))
  assert out.tokens_PxL.shape == (1, 8)
  expected = lm.apply({"params": params}, jnp.asarray([ds.encode("the")]))[0]
  assert int(out.tokens_PxL[0, 0]) == int(jnp.argmax(expected))


def test_unknown_strategy_is_an_error():
  bad = ml_collections.ConfigDict(dict(strategy="beam", temperature=1.0))
  with pytest.raises(ValueError, match="generate.strategy"):
    generate.choose(jnp.zeros((1, 3)), jax.random.key(0), bad)
