"""The blog's model: Embed -> LSTM -> Dropout -> Dense, in flax.linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

MODES = ("last", "all")


def keras_lstm_kernel_init(key, shape, dtype=jnp.float32):
  """Keras glorot_uniform on the fused (in, 4*hidden) kernel, applied to one gate's slice."""
  fan_in, hidden = shape
  limit = jnp.sqrt(6.0 / (fan_in + 4 * hidden))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def keras_embed_init(key, shape, dtype=jnp.float32):
  """Keras Embedding's default: uniform in [-0.05, 0.05]."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


def dropout(x, rate, rng):
  """Inverted dropout whose rate may be a traced array (nn.Dropout needs a Python float).

  A traced rate lets one compiled program vmap over a grid of dropout rates.
  """
  if rng is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LSTMLanguageModel(nn.Module):
  """Predicts the next token from the last LSTM state ("last") or at every position ("all")."""

  vocab_size: int
  embed_dim: int = 10
  hidden: int = 50
  layers: int = 1
  mode: str = "last"
  keras_init: bool = True  # Keras defaults (the blog's); else flax defaults.

  @nn.compact
  def __call__(self, tokens_BxT, dropout_rate=0.0, dropout_rng=None, lengths_B=None):
    """Logits BxV ("last") or BxTxV ("all").

    lengths_B: valid tokens per row (right padding); "last" reads the state after them.
    dropout_rng None means deterministic (evaluation, generation).
    """
    if self.keras_init:
      embed_init = keras_embed_init
      cell_kw = dict(kernel_init=keras_lstm_kernel_init)
      dense_init = nn.initializers.glorot_uniform()
    else:
      embed_init, cell_kw, dense_init = (
        nn.initializers.normal(1.0),
        {},
        nn.initializers.lecun_normal(),
      )
    x_BxTxE = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=embed_init)(tokens_BxT)
    h_BxTxH = x_BxTxE
    for layer in range(self.layers):
      name = "lstm" if layer == 0 else f"lstm_{layer}"
      cell = nn.OptimizedLSTMCell(self.hidden, name=name, **cell_kw)
      (_, h_BxH), h_BxTxH = nn.RNN(cell, return_carry=True)(h_BxTxH, seq_lengths=lengths_B)
    h = h_BxH if self.mode == "last" else h_BxTxH
    h = dropout(h, dropout_rate, dropout_rng)
    return nn.Dense(self.vocab_size, kernel_init=dense_init)(h)


def model_from_config(model_cfg, vocab_size: int) -> LSTMLanguageModel:
  return LSTMLanguageModel(
    vocab_size=vocab_size,
    embed_dim=model_cfg.embed_dim,
    hidden=model_cfg.hidden,
    layers=model_cfg.layers,
    mode=model_cfg.mode,
    keras_init=model_cfg.init == "keras",
  )


def init_params(model: LSTMLanguageModel, key, context_length: int):
  """Initial parameters; Keras' unit_forget_bias=True sets every forget-gate bias to 1."""
  params = model.init(key, jnp.zeros((1, context_length), jnp.int32))["params"]
  if not model.keras_init:
    return params
  flat = traverse_util.flatten_dict(params)
  flat = {k: (jnp.ones_like(v) if k[-2:] == ("hf", "bias") else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)
