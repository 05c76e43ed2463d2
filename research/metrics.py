"""Per-seed collapse and diversity metrics: pure jnp functions on int token arrays.

Continuations are PxL (prompts x generated tokens). Definitions: ../shared/DESIGN.md.
"""

import jax
import jax.numpy as jnp


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


def count_unique_rows(rows_Gxn) -> jax.Array:
  """Number of distinct rows, by lexicographic sort (no hashing, so any vocabulary size)."""
  order = jnp.lexsort([rows_Gxn[:, k] for k in reversed(range(rows_Gxn.shape[1]))])
  sorted_Gxn = rows_Gxn[order]
  return 1 + jnp.sum(jnp.any(sorted_Gxn[1:] != sorted_Gxn[:-1], axis=-1))


def distinct_n(x_PxL, n: int) -> jax.Array:
  """Unique n-grams / total n-grams, pooled over all continuations (Li et al. 2016)."""
  rows = jax.vmap(lambda x: ngrams(x, n))(x_PxL).reshape(-1, n)
  return count_unique_rows(rows) / rows.shape[0]


def seq_rep_n(x_PxL, n: int = 4) -> jax.Array:
  """1 - unique n-grams / total n-grams within each continuation, averaged (Welleck et al.)."""
  unique_P = jax.vmap(lambda x: count_unique_rows(ngrams(x, n)))(x_PxL)
  return jnp.mean(1.0 - unique_P / (x_PxL.shape[-1] - n + 1))


def top_token_share(x_PxL, vocab_size: int) -> jax.Array:
  """Share of all generated tokens taken by the most frequent one."""
  return jnp.max(jnp.bincount(x_PxL.reshape(-1), length=vocab_size)) / x_PxL.size


def mean_entropy(logits_NxV) -> jax.Array:
  """Mean entropy (nats) of the next-token distributions."""
  logp = jax.nn.log_softmax(logits_NxV, axis=-1)
  return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def argmax_constant(logits_NxV) -> jax.Array:
  """The argmax prediction is the same for every context."""
  pred_N = jnp.argmax(logits_NxV, axis=-1)
  return jnp.all(pred_N == pred_N[0])
