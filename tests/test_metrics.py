"""Metrics on hand-written token arrays."""

import math

import jax
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
  assert float(metrics.distinct_n(big, 2, 40003)) == pytest.approx(1.0)  # Packed keys.
  assert float(metrics.distinct_n(x, 1, 3)) == pytest.approx(2 / 8)
  assert float(metrics.seq_rep_n(big, 2, 40003)) == pytest.approx(0.0)


@pytest.mark.parametrize("vocab_size, n", [(26, 1), (26, 2), (26, 4), (215, 4), (46340, 2)])
def test_count_unique_rows_packed_keys_count_as_the_lexsort_does(vocab_size, n):
  # vocab_size ** n fits an int32 here (46340 ** 2 and 215 ** 4 just do): one packed key a row.
  assert vocab_size**n <= np.iinfo(np.int32).max
  rng = np.random.default_rng(n)
  for high in (3, vocab_size):  # Few distinct rows, and ids up to the top of the vocabulary.
    rows = jnp.asarray(rng.integers(max(high - 3, 0), high, (500, n)), jnp.int32)
    want = int(metrics.count_unique_rows(rows))  # vocab_size None: the lexsort.
    assert want == len(np.unique(np.asarray(rows), axis=0))
    assert int(metrics.count_unique_rows(rows, vocab_size)) == want


def test_count_unique_rows_beyond_int32_keys_falls_back_to_the_lexsort():
  # At V = 20 001 a packed 4-gram key wraps around 2**32: these two rows would get the same key.
  rows = jnp.asarray([[0, 11, 0, 0], [0, 0, 5273, 7442], [0, 11, 0, 0]], jnp.int32)
  assert int(metrics.count_unique_rows(rows, 20001)) == 2
  # As one continuation: 9 fourgrams, of which (0, 11, 0, 0) twice.
  assert float(metrics.seq_rep_n(rows.reshape(1, -1), 4, 20001)) == pytest.approx(1 - 8 / 9)


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


@pytest.mark.parametrize("vocab", [7, 256, 257, 300, 384, 1000, 20001])
def test_argmax_last_is_jnp_argmax(vocab):
  """The same index as jnp.argmax on every row: ties, NaNs, infinities, a short last block."""
  x = jax.random.normal(jax.random.key(vocab), (2, 40, vocab))
  x = x.at[:, 0].set(1.0)  # Every column ties: the first wins.
  x = x.at[:, 1, vocab - 1].set(9.0)  # The maximum in the last (short) block.
  x = x.at[:, 2, [3, vocab - 1]].set(9.0)  # A tie across the first and the last block.
  x = x.at[:, 3, [vocab // 2, vocab - 2]].set(jnp.nan)  # NaN wins (on a CPU, the first one).
  x = x.at[:, 4].set(-jnp.inf)
  x = x.at[:, 5, vocab // 3].set(jnp.inf)
  x = x.at[:, 6, [0, vocab // 2]].set(jnp.inf)
  expected = jnp.argmax(x, axis=-1)
  np.testing.assert_array_equal(metrics.argmax_last(x), expected)
  np.testing.assert_array_equal(jax.jit(jax.vmap(metrics.argmax_last))(x), expected)
  np.testing.assert_array_equal(metrics.argmax_last(x[0, 7]), expected[0, 7])  # One row.
  assert expected[0, 0] == 0 and expected[0, 2] == 3
  # Which of two NaNs jnp.argmax picks is the backend's: XLA:GPU's reduction order gave the
  # second at V = 300 and 20 001 (an H200, jax 0.11.2); the CPU's is always the first.
  nans = (vocab // 2,) if jax.default_backend() == "cpu" else (vocab // 2, vocab - 2)
  assert expected[0, 3] in nans


def test_unigram_distribution_skips_id_0():
  targets = jnp.asarray([0, 1, 1, 2, 3, 3, 3, 0])
  u = metrics.unigram_distribution(targets, 5)
  np.testing.assert_allclose(u, [0.0, 2 / 6, 1 / 6, 3 / 6, 0.0], rtol=1e-6)


def test_unigram_kl_known_values():
  u = jnp.asarray([0.0, 2 / 6, 1 / 6, 3 / 6, 0.0])
  # Predicting u on its support is 0, whatever mass sits off it (id 0 and the unseen id 4).
  prior = jnp.log(u).at[0].set(9.0).at[4].set(-3.0)
  assert float(metrics.unigram_kl(jnp.stack([prior, prior + 2.0]), u)) == pytest.approx(
    0.0, abs=1e-6
  )
  # Uniform, renormalised to 1/3 on the support; all mass on id 3: log(1 / u[3]) = log 2.
  uniform = jnp.zeros(5)
  peaked = jnp.full(5, -50.0).at[3].set(0.0)
  kl_uniform = (np.log((1 / 3) / (2 / 6)) + np.log((1 / 3) / (1 / 6)) + np.log((1 / 3) / 0.5)) / 3
  assert float(metrics.unigram_kl(uniform[None], u)) == pytest.approx(kl_uniform, rel=1e-5)
  assert float(metrics.unigram_kl(peaked[None], u)) == pytest.approx(np.log(2), rel=1e-5)
  assert float(metrics.unigram_kl(jnp.stack([uniform, peaked]), u)) == pytest.approx(
    (kl_uniform + np.log(2)) / 2, rel=1e-5
  )


def test_unigram_kl_under_vmap_jit_and_grad():
  targets_SxN = jnp.asarray([[1, 2, 2, 0], [3, 3, 1, 1]])
  logits_SxCxV = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  per_seed = jax.jit(
    jax.vmap(lambda t, lg: metrics.unigram_kl(lg, metrics.unigram_distribution(t, 4)))
  )(targets_SxN, logits_SxCxV)
  for s in range(2):
    u = metrics.unigram_distribution(targets_SxN[s], 4)
    assert float(per_seed[s]) == pytest.approx(float(metrics.unigram_kl(logits_SxCxV[s], u)))
  assert np.all(np.asarray(per_seed) > 0)
  grad = jax.grad(metrics.unigram_kl)(
    logits_SxCxV[0], metrics.unigram_distribution(targets_SxN[0], 4)
  )
  assert np.all(np.isfinite(grad))


# Jitted as in the per-seed evaluation: op-by-op, every primitive of the census compiles apart.
census_jit = jax.jit(metrics.attractor_census, static_argnums=1)
cycles_jit = jax.jit(metrics.canonical_cycles, static_argnums=1)


def greedy(next_token, prompt, length: int):
  """`length` tokens from iterating a deterministic next-token map on windows of len(prompt)."""
  window, out = list(prompt), []
  for _ in range(length):
    out.append(next_token(tuple(window)))
    window = window[1:] + out[-1:]
  return out


def census_reference(x_PxL, context_length: int):
  """The census definition, written plainly: (distinct, largest share, fixed point, periods)."""
  names, periods = [], []
  for x in np.asarray(x_PxL).tolist():
    seen, name, period = {}, None, 0
    for t in range(len(x) - context_length + 1):
      window = tuple(x[t : t + context_length])
      if window in seen:
        i = seen[window]
        period, cycle = t - i, x[i:t]
        name = min(tuple(cycle[r:] + cycle[:r]) for r in range(period))
        break
      seen[window] = t
    names.append(name)
    periods.append(period)
  resolved = [n for n in names if n is not None]
  counts = {n: resolved.count(n) for n in set(resolved)}
  if not counts:
    return 0, math.nan, False, periods
  top = max(counts.values())
  largest = min((n for n in counts if counts[n] == top), key=lambda n: (len(n), n))
  return len(counts), top / len(resolved), len(largest) == 1, periods


def assert_census(census, distinct, share, fixed, unresolved, periods):
  assert int(census.distinct_cycles) == distinct
  if math.isnan(share):
    assert math.isnan(float(census.largest_basin_share))
  else:
    assert float(census.largest_basin_share) == pytest.approx(share)
  assert bool(census.largest_is_fixed_point) == fixed
  assert float(census.unresolved_share) == pytest.approx(unresolved)
  np.testing.assert_array_equal(census.period_P, periods)


def test_census_two_cycles_with_known_basins():
  # On the last token: 1 -> 2 -> 3 -> 1 (a 3-cycle), 6 -> 1 (a transient); 5 -> 4 -> 4.
  step = {1: 2, 2: 3, 3: 1, 4: 4, 5: 4, 6: 1}
  prompts = [(9, 1), (9, 2), (9, 3), (9, 6), (9, 4), (9, 5)]
  x = jnp.asarray([greedy(lambda w: step[w[-1]], p, 16) for p in prompts])
  census = census_jit(x, 2)
  # Four prompts enter the 3-cycle, at three different phases: one cycle, named (1, 2, 3).
  assert_census(census, 2, 4 / 6, False, 0.0, [3, 3, 3, 3, 1, 1])
  cycles = cycles_jit(x, 2)
  np.testing.assert_array_equal(cycles.cycle_PxL[:4], np.tile([1, 2, 3] * 6, (4, 1))[:, :16])
  np.testing.assert_array_equal(cycles.cycle_PxL[4], np.full(16, 4))


def test_census_fixed_point_basin():
  # Most windows fall to the fixed point 5; the 2-cycle 7 <-> 8 keeps two prompts.
  step = {1: 5, 2: 5, 3: 5, 5: 5, 7: 8, 8: 7}
  prompts = [(1,), (2,), (3,), (5,), (7,), (8,)]
  x = jnp.asarray([greedy(lambda w: step[w[-1]], p, 12) for p in prompts])
  assert_census(census_jit(x, 1), 2, 4 / 6, True, 0.0, [1, 1, 1, 1, 2, 2])
  # Equal basins (two prompts each): the smaller period, the fixed point, counts as the largest.
  tie = jnp.asarray([greedy(lambda w: step[w[-1]], p, 12) for p in [(1,), (5,), (7,), (8,)]])
  assert_census(census_jit(tie, 1), 2, 2 / 4, True, 0.0, [1, 1, 2, 2])


def test_census_fibonacci_windows():
  # (a, b) -> (b, a + b mod 4) uses both tokens of the window; it is a bijection on the 16
  # windows, whose cycles are (0, 0) and three more of periods 6, 3 and 6.
  prompts = [(a, b) for a in range(4) for b in range(4)]
  x = jnp.asarray([greedy(lambda w: (w[0] + w[1]) % 4, p, 24) for p in prompts])
  census = census_jit(x, 2)
  assert_census(census, 4, 6 / 16, False, 0.0, census_reference(x, 2)[3])
  # From (3, 3) the continuation cycles through 2 1 3 0 3 3; its least rotation is 0 3 3 2 1 3.
  cycles = cycles_jit(x, 2)
  np.testing.assert_array_equal(cycles.cycle_PxL[prompts.index((3, 3)), :6], [0, 3, 3, 2, 1, 3])


def test_census_least_rotation_with_repeated_tokens():
  x = jnp.asarray([[2, 1, 1] * 4, [1, 2, 1] * 4, [1, 1, 2] * 4])
  cycles = cycles_jit(x, 2)
  np.testing.assert_array_equal(cycles.period_P, [3, 3, 3])
  np.testing.assert_array_equal(cycles.cycle_PxL, np.tile([1, 1, 2] * 4, (3, 1)))
  assert int(census_jit(x, 2).distinct_cycles) == 1


def test_census_unresolved():
  resolved = jnp.asarray(greedy(lambda w: 7, (1, 2), 16))
  mixed = jnp.stack([jnp.arange(16), resolved, jnp.arange(16) + 20])
  assert_census(census_jit(mixed, 2), 1, 1.0, True, 2 / 3, [0, 1, 0])
  none = jnp.stack([jnp.arange(16), jnp.arange(16) + 20])
  assert_census(census_jit(none, 2), 0, math.nan, False, 1.0, [0, 0])
  # A window as long as the continuation leaves a single window: nothing can repeat.
  assert_census(census_jit(mixed, 16), 0, math.nan, False, 1.0, [0, 0, 0])


@pytest.mark.parametrize("context", [1, 2, 3, 5])
def test_census_matches_reference_on_random_maps_under_vmap(context):
  # Random next-token tables on 3^T windows: some prompts resolve within L = 20, some not.
  rng = np.random.default_rng(context)
  vocab, length = 3, 20
  seeds = []
  for _ in range(6):
    table = rng.integers(0, vocab, (vocab,) * context)
    prompts = rng.integers(0, vocab, (10, context))
    seeds.append([greedy(lambda w, t=table: int(t[w]), tuple(p), length) for p in prompts])
  x_SxPxL = jnp.asarray(seeds)
  census = jax.jit(jax.vmap(lambda x: metrics.attractor_census(x, context)))(x_SxPxL)
  for s in range(len(seeds)):
    distinct, share, fixed, periods = census_reference(x_SxPxL[s], context)
    unresolved = np.mean(np.asarray(periods) == 0)
    one = jax.tree.map(lambda leaf, s=s: leaf[s], census)
    assert_census(one, distinct, share, fixed, unresolved, periods)
  # The tables are varied enough to test something: periods above 1, and some unresolved.
  assert np.any(np.asarray(census.period_P) > 1)
  if context == 5:
    assert np.any(np.asarray(census.period_P) == 0)


# Collapsed at evaluation epochs 0, 5, 10, 15, 20, one seed per row.
EPOCHS = jnp.asarray([0, 5, 10, 15, 20])
CURVES = {
  "never": ([0, 0, 0, 0, 0], -1, -1, metrics.NEVER_COLLAPSED),
  "always": ([1, 1, 1, 1, 1], 0, -1, metrics.COLLAPSED_AT_END),
  "collapse": ([0, 0, 1, 1, 1], 10, -1, metrics.COLLAPSED_AT_END),
  "escape": ([0, 1, 1, 0, 0], 5, 15, metrics.ESCAPED),
  "recollapse_then_escape": ([1, 0, 1, 1, 0], 0, 20, metrics.ESCAPED),
  "escape_then_recollapse": ([0, 1, 0, 0, 1], 5, -1, metrics.COLLAPSED_AT_END),
}


def test_onset_escape_and_class():
  collapsed_SxQ = jnp.asarray([c[0] for c in CURVES.values()], bool)
  onset = metrics.onset_epoch(collapsed_SxQ, EPOCHS)
  escape = metrics.escape_epoch(collapsed_SxQ, EPOCHS)
  kind = metrics.collapse_class(collapsed_SxQ)
  for s, (name, (_, want_onset, want_escape, want_class)) in enumerate(CURVES.items()):
    assert int(onset[s]) == want_onset, name
    assert int(escape[s]) == want_escape, name
    assert int(kind[s]) == want_class, name
  assert metrics.COLLAPSE_CLASSES[metrics.ESCAPED] == "escaped"
  # The same from numpy inputs and under jit.
  jitted = jax.jit(metrics.escape_epoch)(np.asarray(collapsed_SxQ), np.asarray(EPOCHS))
  np.testing.assert_array_equal(jitted, escape)
