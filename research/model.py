"""The blog's model: Embed -> LSTM -> Dropout -> Dense, in flax.linen.

model.impl picks the recurrence: "fused" (research/lstm.py's custom-VJP kernels, fastest on
CPU), "flax" (nn.RNN(nn.OptimizedLSTMCell)) or "pallas" ("fused", with the training
recurrence as research/pallas_lstm.py's GPU kernels). All have the same parameters, names and
initial values, and compute the same function and gradients (tests/test_model.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from research import lstm, pallas_lstm, schema

MODES = schema.MODES
IMPLS = schema.IMPLS
GATES = ("i", "f", "g", "o")  # nn.OptimizedLSTMCell's gate order.


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


class _GateParams(nn.Module):
  """One gate's kernel (and bias), named like nn.Dense (flax's DenseParams)."""

  features: int
  use_bias: bool
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int):
    shape = (in_features, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    if not self.use_bias:
      return kernel, None
    return kernel, self.param("bias", self.bias_init, (self.features,), self.param_dtype)


class LSTMParams(nn.Module):
  """nn.OptimizedLSTMCell's parameters (same names, shapes, init), fused into LSTMWeights."""

  hidden: int
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
  recurrent_kernel_init: nn.initializers.Initializer = nn.initializers.orthogonal()
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> lstm.LSTMWeights:
    input_kernels, hidden_kernels, biases = [], [], []
    dtype = self.param_dtype
    for gate in GATES:  # Creation order as in the cell: ii, hi, if, hf, ...
      kernel, _ = _GateParams(
        self.hidden, False, self.kernel_init, param_dtype=dtype, name=f"i{gate}"
      )(in_features)
      kernel_h, bias = _GateParams(
        self.hidden, True, self.recurrent_kernel_init, param_dtype=dtype, name=f"h{gate}"
      )(self.hidden)
      input_kernels.append(kernel)
      hidden_kernels.append(kernel_h)
      biases.append(bias)
    return lstm.LSTMWeights(
      kernel_i_Ix4H=jnp.concatenate(input_kernels, axis=-1),
      kernel_h_Hx4H=jnp.concatenate(hidden_kernels, axis=-1),
      bias_4H=jnp.concatenate(biases, axis=-1),
    )


class LSTMLanguageModel(nn.Module):
  """Predicts the next token from the last LSTM state ("last") or at every position ("all")."""

  vocab_size: int
  embed_dim: int = 10
  hidden: int = 50
  layers: int = 1
  mode: str = "last"
  keras_init: bool = True  # Keras defaults (the blog's); else flax defaults.
  impl: str = "fused"  # "fused": research/lstm.py; "flax": nn.RNN(...); "pallas": see above.
  unroll: int = 0  # "fused" (and "pallas" inference): 0 = a Python loop over T; k >= 1 = lax.scan.
  param_dtype: jnp.dtype = jnp.float32  # float64 when JAX runs with --jax_enable_x64.

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
    embed = nn.Embed(
      self.vocab_size, self.embed_dim, embedding_init=embed_init, param_dtype=self.param_dtype
    )
    if self.impl == "flax":
      h_BxTxH, h_BxH = self._flax_lstm(embed(tokens_BxT), lengths_B, cell_kw)
    elif self.impl in ("fused", "pallas"):
      inference = dropout_rng is None  # Training always passes one (even at rate 0).
      h_BxTxH, h_BxH = self._fused_lstm(embed, tokens_BxT, lengths_B, cell_kw, inference)
    else:
      raise ValueError(f"model.impl must be one of {IMPLS}, got {self.impl!r}")
    h = h_BxTxH if self.mode == "all" else h_BxH
    h = dropout(h, dropout_rate, dropout_rng)
    dense = nn.Dense(self.vocab_size, kernel_init=dense_init, param_dtype=self.param_dtype)
    return dense(h)

  def _flax_lstm(self, x_BxTxD, lengths_B, cell_kw):
    """flax's own layers: (every step's h BxTxH, the h after each row's last token BxH)."""
    h_BxTxH = x_BxTxD
    for layer in range(self.layers):
      name = "lstm" if layer == 0 else f"lstm_{layer}"
      cell = nn.OptimizedLSTMCell(self.hidden, param_dtype=self.param_dtype, name=name, **cell_kw)
      (_, h_BxH), h_BxTxH = nn.RNN(cell, return_carry=True)(h_BxTxH, seq_lengths=lengths_B)
    return h_BxTxH, h_BxH

  def _fused_lstm(self, embed, tokens_BxT, lengths_B, cell_kw, inference=False):
    """The custom-VJP kernels, time-major inside: the same two outputs as _flax_lstm.

    inference: layer 0 may read its first two steps from per-token tables (lstm.py's
    window_recurrence: the same values, a third less work when decoding at T = 3). "pallas"
    runs the kernels in training only: evaluation and decoding are "fused"'s programs.
    """
    tokens_TxB = tokens_BxT.T
    h_TxBxH = None
    pallas = self.impl == "pallas" and not inference
    for layer in range(self.layers):
      name = "lstm" if layer == 0 else f"lstm_{layer}"
      in_features = self.embed_dim if layer == 0 else self.hidden
      w = LSTMParams(self.hidden, param_dtype=self.param_dtype, name=name, **cell_kw)(in_features)
      if layer == 0 and inference and self.unroll == 0 and self.vocab_size <= tokens_TxB.shape[1]:
        xtable_Vx4H = embed.embedding @ w.kernel_i_Ix4H
        h_TxBxH = lstm.window_recurrence(w.kernel_h_Hx4H, w.bias_4H, xtable_Vx4H, tokens_TxB)
        continue
      if layer == 0 and self.vocab_size <= tokens_TxB.size:
        # Small vocabulary: project the table once (V x 4H), then look rows up.
        xtable_Vx4H = embed.embedding @ w.kernel_i_Ix4H
        if pallas and pallas_lstm.fits_lookup(self.vocab_size):  # The kernels look them up.
          h_TxBxH = pallas_lstm.lookup_recurrence(
            w.kernel_h_Hx4H, w.bias_4H, xtable_Vx4H, tokens_TxB
          )
          continue
        xproj_TxBx4H = lstm.lookup(xtable_Vx4H, tokens_TxB)
      elif layer == 0:
        xproj_TxBx4H = lstm.lookup(embed.embedding, tokens_TxB) @ w.kernel_i_Ix4H
      else:
        xproj_TxBx4H = h_TxBxH @ w.kernel_i_Ix4H
      if pallas:
        h_TxBxH = pallas_lstm.lstm_recurrence(w.kernel_h_Hx4H, w.bias_4H, xproj_TxBx4H)
      else:
        h_TxBxH = lstm.lstm_recurrence(w.kernel_h_Hx4H, w.bias_4H, xproj_TxBx4H, self.unroll)
    if lengths_B is None:
      h_BxH = h_TxBxH[-1]
    else:  # The state after each row's last valid token, as nn.RNN(seq_lengths=...) returns.
      h_BxH = h_TxBxH[lengths_B - 1, jnp.arange(h_TxBxH.shape[1])]
    return h_TxBxH.transpose(1, 0, 2), h_BxH


def model_from_config(model_cfg, vocab_size: int) -> LSTMLanguageModel:
  return LSTMLanguageModel(
    vocab_size=vocab_size,
    embed_dim=model_cfg.embed_dim,
    hidden=model_cfg.hidden,
    layers=model_cfg.layers,
    mode=model_cfg.mode,
    keras_init=model_cfg.init == "keras",
    impl=model_cfg.impl,
    unroll=model_cfg.get("unroll", 0),  # Configs recorded before the field: the Python loop.
    param_dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32,
  )


def init_params(model: LSTMLanguageModel, key, context_length: int):
  """Initial parameters; Keras' unit_forget_bias=True sets every forget-gate bias to 1."""
  params = model.init(key, jnp.zeros((1, context_length), jnp.int32))["params"]
  if not model.keras_init:
    return params
  flat = traverse_util.flatten_dict(params)
  flat = {k: (jnp.ones_like(v) if k[-2:] == ("hf", "bias") else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)
