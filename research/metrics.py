"""Per-seed collapse and diversity metrics: pure jnp functions on int token arrays.

Continuations are PxL (prompts x generated tokens). Definitions: ../shared/DESIGN.md.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Collapse classes of a seed's collapsed-at-each-evaluation curve (collapse_class); the names
# are indexed by class id.
NEVER_COLLAPSED, ESCAPED, COLLAPSED_AT_END = 0, 1, 2
COLLAPSE_CLASSES = ("never", "escaped", "collapsed_at_end")


def tail_period(x_L) -> jax.Array:
  """Smallest p <= L/4 such that the last L/2 tokens repeat with period p; 0 when none does.

  "Repeat with period p" means x[t] == x[t - p] for every pair of positions inside the tail.
  """
  length = x_L.shape[-1]
  tail = x_L[..., length - length // 2 :]
  ok_A = jnp.stack(
    [jnp.all(tail[..., p:] == tail[..., :-p], axis=-1) for p in range(1, length // 4 + 1)],
    axis=-1,
  )
  return jnp.where(ok_A.any(axis=-1), jnp.argmax(ok_A, axis=-1) + 1, 0)


def collapsed(x_L) -> jax.Array:
  """The continuation's tail is one token repeated (tail period 1)."""
  return tail_period(x_L) == 1


def seed_collapsed(x_PxL) -> jax.Array:
  """Every prompt's continuation collapsed, and all onto the same token."""
  last_P = x_PxL[:, -1]
  return jnp.all(collapsed(x_PxL)) & jnp.all(last_P == last_P[0])


def ngrams(x_L, n: int):
  """All n-grams of one sequence as rows: (L - n + 1) x n."""
  length = x_L.shape[-1]
  return jnp.stack([x_L[i : length - n + 1 + i] for i in range(n)], axis=-1)


def count_unique_rows(rows_Gxn, vocab_size: int | None = None) -> jax.Array:
  """Number of distinct rows of token ids in [0, vocab_size), by sorting (no hashing).

  When vocab_size ** n fits in an int32, each row is packed into one integer key (exact) and
  one single-key sort counts them: on a CPU ~5-9x faster than the n-key lexsort, which any
  vocabulary size (or vocab_size None) falls back to.
  """
  n = rows_Gxn.shape[1]
  if vocab_size is not None and int(vocab_size) ** n <= np.iinfo(np.int32).max:
    key_G = rows_Gxn[:, 0].astype(jnp.int32)
    for k in range(1, n):
      key_G = key_G * vocab_size + rows_Gxn[:, k]
    sorted_GxK = jnp.sort(key_G)[:, None]  # K = 1 column: the packed key.
  else:
    sorted_GxK = rows_Gxn[jnp.lexsort([rows_Gxn[:, k] for k in reversed(range(n))])]
  return 1 + jnp.sum(jnp.any(sorted_GxK[1:] != sorted_GxK[:-1], axis=-1))


def distinct_n(x_PxL, n: int, vocab_size: int | None = None) -> jax.Array:
  """Unique n-grams / total n-grams, pooled over all continuations (Li et al. 2016)."""
  rows = jax.vmap(lambda x: ngrams(x, n))(x_PxL).reshape(-1, n)
  return count_unique_rows(rows, vocab_size) / rows.shape[0]


def seq_rep_n(x_PxL, n: int = 4, vocab_size: int | None = None) -> jax.Array:
  """1 - unique n-grams / total n-grams within each continuation, averaged (Welleck et al.)."""
  unique_P = jax.vmap(lambda x: count_unique_rows(ngrams(x, n), vocab_size))(x_PxL)
  return jnp.mean(1.0 - unique_P / (x_PxL.shape[-1] - n + 1))


def top_token_share(x_PxL, vocab_size: int) -> jax.Array:
  """Share of all generated tokens taken by the most frequent one."""
  return jnp.max(jnp.bincount(x_PxL.reshape(-1), length=vocab_size)) / x_PxL.size


ARGMAX_BLOCK = 128  # Columns per block in argmax_last; rows up to twice this use jnp.argmax.


def argmax_last(x_NxV) -> jax.Array:
  """jnp.argmax(x, axis=-1): the same indices (the first maximum, or the first NaN), faster.

  XLA:CPU runs argmax as a (value, index) reduction that it does not vectorise: at
  V = 20 001 that is ~10x a max, and half of a greedy decoding step. On a CPU, plain maxima of
  128-column blocks (NaN-free ones; reduce_window's max drops NaN) pick the block, and argmax
  runs within that block only: ~3x faster. Other backends keep jnp.argmax.
  """
  num = x_NxV.shape[-1]
  if num <= 2 * ARGMAX_BLOCK or jax.default_backend() != "cpu":
    return jnp.argmax(x_NxV, axis=-1)
  blocks = -(-num // ARGMAX_BLOCK)
  window = (1,) * (x_NxV.ndim - 1) + (ARGMAX_BLOCK,)
  padding = ((0, 0),) * (x_NxV.ndim - 1) + ((0, blocks * ARGMAX_BLOCK - num),)

  def block_max(v, lowest):
    return jax.lax.reduce_window(v, lowest, jax.lax.max, window, window, padding)

  maxima = block_max(x_NxV, jnp.array(-jnp.inf, x_NxV.dtype))
  nan_blocks = block_max((x_NxV != x_NxV).astype(jnp.int8), jnp.int8(0))  # int8: ~4x faster.
  has_nan = jnp.max(nan_blocks, axis=-1) > 0
  block = jnp.where(has_nan, jnp.argmax(nan_blocks, axis=-1), jnp.argmax(maxima, axis=-1))
  # The last block's columns past the end are clamped to the last column: repeats after it,
  # which argmax (the first maximum) never picks.
  cols = jnp.minimum(block[..., None] * ARGMAX_BLOCK + jnp.arange(ARGMAX_BLOCK), num - 1)
  within = jnp.argmax(jnp.take_along_axis(x_NxV, cols, axis=-1), axis=-1)
  return block * ARGMAX_BLOCK + within


def mean_entropy(logits_NxV) -> jax.Array:
  """Mean entropy (nats) of the next-token distributions."""
  logp = jax.nn.log_softmax(logits_NxV, axis=-1)
  return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def argmax_constant(logits_NxV) -> jax.Array:
  """The argmax prediction is the same for every context."""
  pred_N = argmax_last(logits_NxV)
  return jnp.all(pred_N == pred_N[0])


# --- Mechanism: the corpus prior ---


def unigram_distribution(targets_N, vocab_size: int) -> jax.Array:
  """Frequency of each next token over the windows; id 0 (padding) is never counted, u[0] = 0.

  NaN everywhere when every target is id 0.
  """
  counts_V = jnp.bincount(targets_N, length=vocab_size).at[0].set(0)
  return counts_V / jnp.sum(counts_V)


def unigram_kl(logits_CxV, u_V) -> jax.Array:
  """Mean over contexts of KL(p_model(.|c) || u), in nats.

  u is zero for id 0 and for tokens that never follow a window, so p_model is renormalised over
  the support of u (tokens with u > 0) first: the result is finite whatever mass the model puts
  off that support, and exactly 0 when it predicts u (up to that renormalisation) everywhere.
  """
  support_V = u_V > 0
  logq_CxV = jax.nn.log_softmax(jnp.where(support_V, logits_CxV, -jnp.inf), axis=-1)
  # Zeros off the support before exp/products, so neither values nor gradients meet inf - inf.
  logq_CxV = jnp.where(support_V, logq_CxV, 0.0)
  logu_V = jnp.log(jnp.where(support_V, u_V, 1.0))
  kl_CxV = jnp.where(support_V, jnp.exp(logq_CxV) * (logq_CxV - logu_V), 0.0)
  return jnp.mean(jnp.sum(kl_CxV, axis=-1))


# --- Mechanism: attractors of greedy decoding ---


@struct.dataclass
class Cycles:
  """The cycle each continuation ends in, named by its least rotation (canonical_cycles)."""

  period_P: jax.Array  # 0 when unresolved (no window repeats).
  cycle_PxL: jax.Array  # The least rotation repeated to L tokens; all -1 when unresolved.


@struct.dataclass
class AttractorCensus:
  """One seed's greedy attractors over its prompts (attractor_census)."""

  distinct_cycles: jax.Array  # Distinct cycles over the resolved prompts; 0 if none.
  largest_basin_share: jax.Array  # Prompts on the most common cycle / resolved; NaN if none.
  largest_is_fixed_point: jax.Array  # That cycle has period 1; False if none resolved.
  unresolved_share: jax.Array  # Prompts with no repeated window / P.
  period_P: jax.Array  # Each prompt's cycle period; 0 when unresolved.


def _all_over_windows(ok_LxL, width: int) -> jax.Array:
  """out[:, t] = all(ok[:, t : t + width]), False where the window runs past the end.

  Doubling (a sparse table: two overlapping power-of-two blocks cover any width) keeps it to
  log2(width) static shifts; a cumulative count is several times slower on CPU.
  """

  def shift(a, s):  # a[:, t + s], False past the end.
    return jnp.pad(a[:, s:], ((0, 0), (0, s)))

  block, span = ok_LxL, 1
  while 2 * span <= width:
    block, span = block & shift(block, span), 2 * span
  return block & shift(block, width - span)


def _first_repeat(x_L, context_length: int):
  """(i, p) for the first window x[j:j+T] equal to an earlier x[i:i+T], p = j - i; p = 0 if none.

  Found for every lag p at once from where x[k] == x[k + p], so the cost is O(L^2 log T) rather
  than O(L^2 T) for comparing windows pairwise.
  """
  length = x_L.shape[-1]
  lag_L = jnp.arange(length)[:, None]  # Rows: lag p.
  pos_L = jnp.arange(length)[None, :]  # Columns: token k, or window start t.
  later_LxL = pos_L + lag_L
  # Row p is x[p:] padded, by tiling with a row stride one longer than the padded x: [p, k] is
  # padded[p + k]. Static, where a gather of x[k + p] is slower and stacked slices compile slowly.
  padded_2L = jnp.concatenate([x_L, jnp.zeros_like(x_L)])
  tiled = jnp.tile(padded_2L, length + 1)[: length * (2 * length + 1)]
  shifted_LxL = tiled.reshape(length, 2 * length + 1)[:, :length]
  agree_LxL = (x_L[None, :] == shifted_LxL) & (later_LxL < length)
  same_LxL = _all_over_windows(agree_LxL, context_length)  # Window t equals window t + p.
  match_LxL = (lag_L >= 1) & (later_LxL + context_length <= length) & same_LxL
  # For the smallest j the earlier window i is unique (two would repeat before j), so argmin
  # over j = t + p picks the pair.
  first = jnp.argmin(jnp.where(match_LxL, later_LxL, 2 * length).reshape(-1))
  period = jnp.where(jnp.any(match_LxL), first // length, 0)
  return first % length, period


def _least_rotation(x_L, start, period) -> jax.Array:
  """x[start:start+period] rotated to its lexicographically least rotation, repeated to L."""
  length = x_L.shape[-1]
  # The cycle repeated to 2L tokens: rotation r is twice[r : r + L]. start + period <= L - T,
  # so the indices stay in x.
  twice = x_L[start + jnp.arange(2 * length) % jnp.maximum(period, 1)]
  largest = jnp.iinfo(x_L.dtype).max

  def narrow(k, candidate_L):
    """Keeps the rotations whose token k is the least among those still tied."""
    token_L = jax.lax.dynamic_slice(twice, (k,), (length,))
    return candidate_L & (token_L == jnp.min(jnp.where(candidate_L, token_L, largest)))

  # The rotations r < period are periodic, so comparing L >= period tokens orders them as
  # their first period tokens do; the cycle is primitive (the first repeat is at its least
  # period), so exactly one rotation survives.
  candidate_L = jax.lax.fori_loop(0, length, narrow, jnp.arange(length) < period)
  least_L = jax.lax.dynamic_slice(twice, (jnp.argmax(candidate_L),), (length,))
  return jnp.where(period > 0, least_L, -1)


def canonical_cycles(x_PxL, context_length: int) -> Cycles:
  """Each continuation's greedy cycle, from the first repeated T-token window.

  With a T-token window, greedy decoding is a deterministic map on windows, so once a window
  x[j:j+T] equals an earlier x[i:i+T] the continuation repeats x[i:j] for ever. A prompt is
  unresolved when no window of its L generated tokens repeats.
  """
  if x_PxL.shape[-1] - context_length < 1:  # Fewer than two windows: nothing can repeat.
    return Cycles(
      period_P=jnp.zeros(x_PxL.shape[0], jnp.int32), cycle_PxL=jnp.full(x_PxL.shape, -1)
    )

  def one(x_L):
    start, period = _first_repeat(x_L, context_length)
    return period, _least_rotation(x_L, start, period)

  period_P, cycle_PxL = jax.vmap(one)(x_PxL)
  return Cycles(period_P=period_P.astype(jnp.int32), cycle_PxL=cycle_PxL)


def attractor_census(x_PxL, context_length: int) -> AttractorCensus:
  """Which greedy cycles one seed's prompts end in, and how the prompts split among them.

  Two prompts reach the same cycle when their canonical cycles (period, least rotation) are
  equal, whatever phase they entered it at. Basin shares count resolved prompts only; among
  equally large basins the one with the smallest period (then least tokens) is "the largest".
  """
  cycles = canonical_cycles(x_PxL, context_length)
  num_prompts = x_PxL.shape[0]
  resolved_P = cycles.period_P > 0
  # Rows (period, cycle) sorted by period first: equal cycles become runs, unresolved go first.
  names = jnp.concatenate([cycles.period_P[:, None], cycles.cycle_PxL], axis=1)  # P x (L + 1).
  order_P = jnp.lexsort(names.T[::-1])
  sorted_names = names[order_P]
  new_P = jnp.concatenate([jnp.ones(1, bool), jnp.any(sorted_names[1:] != sorted_names[:-1], -1)])
  group_P = jnp.cumsum(new_P) - 1
  size_P = jnp.zeros(num_prompts, jnp.int32).at[group_P].add(resolved_P[order_P])
  group_period_P = jnp.zeros(num_prompts, jnp.int32).at[group_P].max(sorted_names[:, 0])
  largest = jnp.argmax(size_P)
  num_resolved = jnp.sum(resolved_P)
  return AttractorCensus(
    distinct_cycles=jnp.sum(size_P > 0),
    largest_basin_share=jnp.where(
      num_resolved > 0, size_P[largest] / jnp.maximum(num_resolved, 1), jnp.nan
    ),
    largest_is_fixed_point=(num_resolved > 0) & (group_period_P[largest] == 1),
    unresolved_share=jnp.mean(~resolved_P),
    period_P=cycles.period_P,
  )


# --- Dynamics: collapsed at each evaluation point ---


def onset_epoch(collapsed_SxQ, epochs_Q) -> jax.Array:
  """Per seed, the first evaluation epoch at which it is collapsed; -1 if never."""
  collapsed_SxQ = jnp.asarray(collapsed_SxQ, bool)
  first_S = jnp.argmax(collapsed_SxQ, axis=-1)
  return jnp.where(collapsed_SxQ.any(axis=-1), jnp.asarray(epochs_Q)[first_S], -1)


def escape_epoch(collapsed_SxQ, epochs_Q) -> jax.Array:
  """Per seed collapsed at some evaluation but not the last, the epoch after its last collapse.

  That is the first evaluation epoch from which the seed is not collapsed at that and every
  later evaluation; -1 for seeds never collapsed or collapsed at the end.
  """
  collapsed_SxQ = jnp.asarray(collapsed_SxQ, bool)
  num_evals = collapsed_SxQ.shape[-1]
  last_S = num_evals - 1 - jnp.argmax(collapsed_SxQ[:, ::-1], axis=-1)
  escaped_S = collapse_class(collapsed_SxQ) == ESCAPED
  return jnp.where(escaped_S, jnp.asarray(epochs_Q)[jnp.minimum(last_S + 1, num_evals - 1)], -1)


def collapse_class(collapsed_SxQ) -> jax.Array:
  """Per seed: NEVER_COLLAPSED, ESCAPED (collapsed, then not at the end) or COLLAPSED_AT_END."""
  collapsed_SxQ = jnp.asarray(collapsed_SxQ, bool)
  ever_S = collapsed_SxQ.any(axis=-1)
  return jnp.where(
    collapsed_SxQ[:, -1], COLLAPSED_AT_END, jnp.where(ever_S, ESCAPED, NEVER_COLLAPSED)
  )


@dataclasses.dataclass(frozen=True)
class CollapseTiming:
  """collapse_class, onset_epoch and escape_epoch of every seed, as host arrays."""

  class_S: np.ndarray
  onset_S: np.ndarray
  escape_S: np.ndarray


@jax.jit
def _collapse_timing(collapsed_SxQ, epochs_Q):
  return (
    collapse_class(collapsed_SxQ),
    onset_epoch(collapsed_SxQ, epochs_Q),
    escape_epoch(collapsed_SxQ, epochs_Q),
  )


def collapse_timing(collapsed_SxQ, epochs_Q) -> CollapseTiming:
  """The three per-seed dynamics of a finished cell in one compiled program (host callers:
  called eagerly, each jnp op above would compile a program of its own)."""
  out = _collapse_timing(np.asarray(collapsed_SxQ, bool), np.asarray(epochs_Q))
  return CollapseTiming(*(np.asarray(x) for x in out))
