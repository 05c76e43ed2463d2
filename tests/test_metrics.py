"""Metrics on hand-written token arrays."""

import jax.numpy as jnp
import numpy as np
import pytest

from research import metrics


def seq(text: str, length: int = 64):
  """Repeats `text` (one char = one token id) to `length` tokens."""
  ids = [ord(c) for c in text] * (length // len(text) + 1)
  return jnp.asarray(ids[:length])


@pytest.mark.parametrize(
  "text, period", [("5", 1), ("the cat ", 8), ("ab", 2), ("abc", 3), ("the cat the dog ", 16)]
)
def test_tail_period(text, period):
  assert int(metrics.tail_period(seq(text))) == period


def test_tail_period_none_and_late_collapse():
  assert int(metrics.tail_period(jnp.arange(64))) == 0
  # Period longer than L/4 counts as none.
  assert int(metrics.tail_period(seq("abcdefghijklmnopq"))) == 0
  late = jnp.concatenate([jnp.arange(32), jnp.full(32, 7)])  # Constant from token 32 on.
  assert bool(metrics.collapsed(late))
  almost = late.at[40].set(3)
  assert not bool(metrics.collapsed(almost))


def test_seed_collapsed_needs_every_prompt_on_one_token():
  same = jnp.stack([seq("5"), seq("5")])
  different = jnp.stack([seq("5"), seq("6")])
  partly = jnp.stack([seq("5"), seq("56")])
  assert bool(metrics.seed_collapsed(same))
  assert not bool(metrics.seed_collapsed(different))
  assert not bool(metrics.seed_collapsed(partly))


def test_distinct_n():
  x = jnp.asarray([[1, 2, 1, 2], [1, 1, 1, 1]])
  # unigrams: {1, 2} of 8; bigrams: (1,2),(2,1),(1,1) of 6.
  assert float(metrics.distinct_n(x, 1)) == pytest.approx(2 / 8)
  assert float(metrics.distinct_n(x, 2)) == pytest.approx(3 / 6)
  # Large ids (word vocabularies) are counted exactly.
  big = jnp.asarray([[40000, 40001, 40000, 40002]])
  assert float(metrics.distinct_n(big, 2)) == pytest.approx(1.0)


def test_seq_rep_4():
  x = jnp.stack([seq("5", 8), jnp.arange(8)])
  # 5 fourgrams each: constant -> 1 - 1/5, all distinct -> 0.
  assert float(metrics.seq_rep_n(x, 4)) == pytest.approx((0.8 + 0.0) / 2)


def test_top_token_share():
  x = jnp.asarray([[1, 1, 1, 2], [3, 1, 2, 2]])
  assert float(metrics.top_token_share(x, 4)) == pytest.approx(4 / 8)


def test_entropy_and_argmax_constant():
  uniform = jnp.zeros((3, 5))
  assert float(metrics.mean_entropy(uniform)) == pytest.approx(np.log(5), rel=1e-6)
  peaked = jnp.asarray([[0.0, 50.0, 0.0], [0.0, 40.0, 1.0]])
  assert float(metrics.mean_entropy(peaked)) < 1e-6
  assert bool(metrics.argmax_constant(peaked))
  assert not bool(metrics.argmax_constant(jnp.asarray([[0.0, 1.0], [1.0, 0.0]])))
