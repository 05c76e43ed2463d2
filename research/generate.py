"""Autoregressive decoding from a sliding context window: greedy, temperature, top-k, top-p."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from research import metrics, schema

STRATEGIES = schema.STRATEGIES


@struct.dataclass
class Generation:
  tokens_PxL: jax.Array  # Generated tokens only (the prompt is not included).
  first_logits_PxV: jax.Array  # The next-token logits right after each prompt.


def prepare_prompts(prompts_ids: list[np.ndarray], context_length: int):
  """Right-pads (or keeps the last context_length of) each prompt: (prompts_PxT, lengths_P)."""
  prompts_PxT = np.zeros((len(prompts_ids), context_length), np.int32)
  lengths_P = np.zeros((len(prompts_ids),), np.int32)
  for i, ids in enumerate(prompts_ids):
    if len(ids) == 0:
      raise ValueError("generate.prompts: a prompt has no tokens")
    ids = ids[-context_length:]
    prompts_PxT[i, : len(ids)] = ids
    lengths_P[i] = len(ids)
  return prompts_PxT, lengths_P


def choose(logits_PxV, key, gen_cfg):
  """Picks the next token per row with the configured decoding strategy."""
  strategy = gen_cfg.strategy
  if strategy == "greedy":
    return metrics.argmax_last(logits_PxV)
  logits = logits_PxV / gen_cfg.temperature
  if strategy == "top_k":
    kth_V = jax.lax.top_k(logits, gen_cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_V, -jnp.inf, logits)
  elif strategy == "top_p":
    # Keep the smallest set of tokens, most probable first, whose mass reaches top_p.
    sorted_V = jnp.sort(logits, axis=-1)[..., ::-1]
    cum_V = jnp.cumsum(jax.nn.softmax(sorted_V, axis=-1), axis=-1)
    keep_V = (cum_V - jax.nn.softmax(sorted_V, axis=-1)) < gen_cfg.top_p
    threshold = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  elif strategy != "temperature":
    raise ValueError(f"generate.strategy must be one of {STRATEGIES}, got {strategy!r}")
  return jax.random.categorical(key, logits, axis=-1)


def make_generate(model, gen_cfg):
  """generate(params, prompts_PxT, lengths_P, key) -> Generation, for one seed."""

  def next_logits(params, window_PxT, n_P):
    logits = model.apply({"params": params}, window_PxT, lengths_B=n_P)
    if logits.ndim == 3:  # "all" mode: read the prediction at the last valid position.
      logits = jnp.take_along_axis(logits, (n_P - 1)[:, None, None], axis=1)[:, 0]
    return logits

  def generate(params, prompts_PxT, lengths_P, key) -> Generation:
    num_prompts, context = prompts_PxT.shape
    rows_P = jnp.arange(num_prompts)

    def step(carry, key_t):
      window_PxT, n_P = carry
      token_P = choose(next_logits(params, window_PxT, n_P), key_t, gen_cfg)
      full_P = n_P == context
      # A full window slides left by one; a short prompt's window grows first.
      window_PxT = jnp.where(full_P[:, None], jnp.roll(window_PxT, -1, axis=1), window_PxT)
      window_PxT = window_PxT.at[rows_P, jnp.where(full_P, context - 1, n_P)].set(token_P)
      return (window_PxT, jnp.minimum(n_P + 1, context)), token_P

    keys = jax.random.split(key, gen_cfg.length)
    _, tokens_LxP = jax.lax.scan(step, (prompts_PxT, lengths_P), keys)
    first = next_logits(params, prompts_PxT, lengths_P)
    return Generation(tokens_PxL=tokens_LxP.T, first_logits_PxV=first)

  return generate
