"""The fused LSTM kernels: an embedding lookup and the LSTM recurrence, with hand-written VJPs.

Both compute exactly what flax's nn.Embed and nn.RNN(nn.OptimizedLSTMCell) compute (tested in
tests/test_lstm.py); the backward passes are written out because the vmapped autodiff ones are
slow on CPU (a scatter-add for the lookup; padded, per-gate gradients for the recurrence).
"""

import jax
import jax.numpy as jnp
from flax import struct


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
