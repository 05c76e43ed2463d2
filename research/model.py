"""The blog's model: Embed -> LSTM -> Dropout -> Dense, in flax.linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

MODES = ("last", "all")
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


@jax.custom_vjp
def lookup(table_VxD, tokens_TxB):
  """table[tokens], with a segment-sum backward (the vmapped scatter-add autodiff emits is slow)."""
  return table_VxD[tokens_TxB]


def _lookup_fwd(table_VxD, tokens_TxB):
  return lookup(table_VxD, tokens_TxB), (table_VxD.shape[0], tokens_TxB)


def _lookup_bwd(residuals, d_TxBxD):
  vocab_size, tokens_TxB = residuals
  d_NxD = d_TxBxD.reshape(tokens_TxB.size, -1)
  return jax.ops.segment_sum(d_NxD, tokens_TxB.reshape(-1), vocab_size), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)


@struct.dataclass
class LSTMWeights:
  """One layer's gate kernels and biases, concatenated in GATES order."""

  kernel_i_Ix4H: jax.Array
  kernel_h_Hx4H: jax.Array
  bias_4H: jax.Array


def _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H):
  hidden = kernel_h_Hx4H.shape[0]
  c_BxH = h_BxH = None
  steps = []
  for t in range(xproj_TxBx4H.shape[0]):
    # As flax's cell: (h @ W_h + b) + x @ W_i; at step 0, h = 0 and h @ W_h is exactly zero.
    rec_Bx4H = bias_4H if h_BxH is None else h_BxH @ kernel_h_Hx4H + bias_4H
    z_Bx4H = rec_Bx4H + xproj_TxBx4H[t]
    i, f, g, o = (z_Bx4H[:, k * hidden : (k + 1) * hidden] for k in range(4))
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_prev = c_BxH
    c_BxH = i * g if c_prev is None else f * c_prev + i * g
    tanh_c = jnp.tanh(c_BxH)
    h_BxH = o * tanh_c
    steps.append((i, f, g, o, c_prev, tanh_c, h_BxH))
  h_TxBxH = jnp.stack([s[-1] for s in steps])
  # A transposed copy for the backward's dh = da @ W_h^T: XLA's CPU matmul is much slower
  # on a transposed operand than on a row-major one (the barrier stops XLA folding it back).
  kernel_h_T_4HxH = jax.lax.optimization_barrier(kernel_h_Hx4H.T)
  return h_TxBxH, (kernel_h_T_4HxH, h_TxBxH, steps)


@jax.custom_vjp
def lstm_recurrence(kernel_h_Hx4H, bias_4H, xproj_TxBx4H):
  """nn.OptimizedLSTMCell over time from a zero carry, given x @ W_i: h at every step, TxBxH.

  Same math as flax's cell, with a hand-written backward: gate gradients are concatenated
  (autodiff pads and adds them) and dW_h is one matmul over all steps.
  """
  return _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H)[0]


def _recurrence_bwd(residuals, dh_TxBxH):
  kernel_h_T_4HxH, h_TxBxH, steps = residuals
  dh_next = dc_next = None
  da_T = []
  for t in reversed(range(len(steps))):
    i, f, g, o, c_prev, tanh_c, _ = steps[t]
    dh = dh_TxBxH[t] if dh_next is None else dh_TxBxH[t] + dh_next
    dc = dh * o * (1.0 - tanh_c * tanh_c)
    dc = dc if dc_next is None else dc + dc_next
    # d(pre-activation) = d(activation) * sigmoid' (a(1 - a)) or tanh' (1 - a^2).
    di = dc * g * i * (1.0 - i)
    df = jnp.zeros_like(dc) if c_prev is None else dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dh * tanh_c * o * (1.0 - o)
    da_Bx4H = jnp.concatenate([di, df, dg, do], axis=-1)
    da_T.append(da_Bx4H)
    if t > 0:
      dh_next = da_Bx4H @ kernel_h_T_4HxH
      dc_next = dc * f
  da_TxBx4H = jnp.stack(da_T[::-1])
  dkernel_h = jnp.einsum("tbh,tbg->hg", h_TxBxH[:-1], da_TxBx4H[1:])
  return dkernel_h, da_TxBx4H.sum(axis=(0, 1)), da_TxBx4H


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


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
  def __call__(self, in_features: int) -> LSTMWeights:
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
    return LSTMWeights(
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
    tokens_TxB = tokens_BxT.T  # Time-major inside the model.
    h_TxBxH = None
    for layer in range(self.layers):
      name = "lstm" if layer == 0 else f"lstm_{layer}"
      in_features = self.embed_dim if layer == 0 else self.hidden
      w = LSTMParams(self.hidden, param_dtype=self.param_dtype, name=name, **cell_kw)(in_features)
      if layer == 0 and self.vocab_size <= tokens_TxB.size:
        # Small vocabulary: project the table once (V x 4H), then look rows up.
        xproj_TxBx4H = lookup(embed.embedding @ w.kernel_i_Ix4H, tokens_TxB)
      elif layer == 0:
        xproj_TxBx4H = lookup(embed.embedding, tokens_TxB) @ w.kernel_i_Ix4H
      else:
        xproj_TxBx4H = h_TxBxH @ w.kernel_i_Ix4H
      h_TxBxH = lstm_recurrence(w.kernel_h_Hx4H, w.bias_4H, xproj_TxBx4H)
    if self.mode == "all":
      h = h_TxBxH.transpose(1, 0, 2)
    elif lengths_B is None:
      h = h_TxBxH[-1]
    else:  # The state after each row's last valid token, as nn.RNN(seq_lengths=...) returns.
      h = h_TxBxH[lengths_B - 1, jnp.arange(h_TxBxH.shape[1])]
    h = dropout(h, dropout_rate, dropout_rng)
    dense = nn.Dense(self.vocab_size, kernel_init=dense_init, param_dtype=self.param_dtype)
    return dense(h)


def model_from_config(model_cfg, vocab_size: int) -> LSTMLanguageModel:
  return LSTMLanguageModel(
    vocab_size=vocab_size,
    embed_dim=model_cfg.embed_dim,
    hidden=model_cfg.hidden,
    layers=model_cfg.layers,
    mode=model_cfg.mode,
    keras_init=model_cfg.init == "keras",
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
