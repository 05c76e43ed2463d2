"""The fused LSTM kernels: an embedding lookup and the LSTM recurrence, with hand-written VJPs.

Both compute exactly what flax's nn.Embed and nn.RNN(nn.OptimizedLSTMCell) compute (tested in
tests/test_lstm.py); the backward passes are written out because the vmapped autodiff ones are
slow on CPU (a scatter-add for the lookup; padded, per-gate gradients for the recurrence).
"""

import functools

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


def _gates(z_Bx4H, hidden):
  """The activated gates i, f, g, o of one step's pre-activations (nn.OptimizedLSTMCell's)."""
  i, f, g, o = (z_Bx4H[:, k * hidden : (k + 1) * hidden] for k in range(4))
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _step_fwd(z_Bx4H, c_prev, hidden):
  """One step from its pre-activations and the previous cell (None at step 0, a zero carry):
  (the new cell, the step's residuals i, f, g, o, c_prev, tanh_c, h)."""
  i, f, g, o = _gates(z_Bx4H, hidden)
  c_BxH = i * g if c_prev is None else f * c_prev + i * g
  tanh_c = jnp.tanh(c_BxH)
  return c_BxH, (i, f, g, o, c_prev, tanh_c, o * tanh_c)


def _loop_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H):
  """The recurrence as a Python loop: T steps unrolled into the program at trace time."""
  hidden = kernel_h_Hx4H.shape[0]
  c_BxH = h_BxH = None
  steps = []
  for t in range(xproj_TxBx4H.shape[0]):
    # As flax's cell: (h @ W_h + b) + x @ W_i; at step 0, h = 0 and h @ W_h is exactly zero.
    rec_Bx4H = bias_4H if h_BxH is None else h_BxH @ kernel_h_Hx4H + bias_4H
    c_BxH, residuals = _step_fwd(rec_Bx4H + xproj_TxBx4H[t], c_BxH, hidden)
    h_BxH = residuals[-1]
    steps.append(residuals)
  return jnp.stack([s[-1] for s in steps]), steps


def _scan_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, unroll: int):
  """The same steps, step 0 (zero carry) written out and steps 1..T-1 in a lax.scan.

  The residuals are the loop's, with steps 1..T-1 stacked along a leading time axis.
  """
  hidden = kernel_h_Hx4H.shape[0]
  c_BxH, first = _step_fwd(bias_4H + xproj_TxBx4H[0], None, hidden)

  def step(carry, x_Bx4H):
    c_prev, h_prev = carry
    c_BxH, residuals = _step_fwd(h_prev @ kernel_h_Hx4H + bias_4H + x_Bx4H, c_prev, hidden)
    return (c_BxH, residuals[-1]), residuals

  _, rest = jax.lax.scan(step, (c_BxH, first[-1]), xproj_TxBx4H[1:], unroll=unroll)
  h_TxBxH = jnp.concatenate([first[-1][None], rest[-1]])
  return h_TxBxH, (first, rest)


def _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, unroll=0):
  if unroll:
    h_TxBxH, steps = _scan_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, unroll)
  else:
    h_TxBxH, steps = _loop_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H)
  # A transposed copy for the backward's dh = da @ W_h^T: XLA's CPU matmul is much slower
  # on a transposed operand than on a row-major one (the barrier stops XLA folding it back).
  kernel_h_T_4HxH = jax.lax.optimization_barrier(kernel_h_Hx4H.T)
  return h_TxBxH, (kernel_h_T_4HxH, h_TxBxH, steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lstm_recurrence(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, unroll=0):
  """nn.OptimizedLSTMCell over time from a zero carry, given x @ W_i: h at every step, TxBxH.

  Same math as flax's cell, with a hand-written backward: gate gradients are concatenated
  (autodiff pads and adds them) and dW_h is one matmul over all steps.

  unroll: 0 runs the T steps as a Python loop, unrolled into the program (its size and
  compile time grow with T); k >= 1 runs steps 1..T-1 forward and backward in a lax.scan
  with k steps per loop iteration (the program's size barely grows with T). Both run the
  same operations in the same order; XLA may fuse them differently, so they agree to float
  rounding (bit for bit in the blog's T=3 programs; tests/test_lstm.py, bench/README.md).
  """
  return _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, unroll)[0]


def window_recurrence(kernel_h_Hx4H, bias_4H, xtable_Vx4H, tokens_TxB):
  """lstm_recurrence(kernel_h, bias, xtable[tokens]) for inference (no hand-written VJP), the
  first two steps read from per-token tables: h at every step, TxBxH.

  From a zero carry, step 0 depends on a window's first token only, and so does step 1's
  recurrent input h_0 @ W_h. Both are computed once per vocabulary entry (V rows) rather than
  once per window, which saves one of a window's T - 1 recurrent matmuls: a third of greedy
  decoding's time at the blog's T = 3. The table's matmul runs on as many rows as the batch
  (rows repeated): at the same shape XLA computes every row exactly as in the per-window
  matmul, so the blog study's results stayed bit for bit the same on a CPU (README, Results;
  tests/test_lstm.py checks it to float tolerance). Needs V <= B.
  """
  hidden, vocab = kernel_h_Hx4H.shape[0], xtable_Vx4H.shape[0]
  batch = tokens_TxB.shape[1]
  if vocab > batch:
    raise ValueError(f"window_recurrence needs a vocabulary ({vocab}) <= the batch ({batch})")
  c_VxH, first = _step_fwd(bias_4H + xtable_Vx4H, None, hidden)
  h_VxH = first[-1]
  c_BxH, h_BxH = c_VxH[tokens_TxB[0]], h_VxH[tokens_TxB[0]]
  steps = [h_BxH]
  for t in range(1, tokens_TxB.shape[0]):
    if t == 1:
      rows_B = jnp.minimum(jnp.arange(batch), vocab - 1)
      rec_Bx4H = (h_VxH[rows_B] @ kernel_h_Hx4H)[tokens_TxB[0]]
    else:
      rec_Bx4H = h_BxH @ kernel_h_Hx4H
    c_BxH, residuals = _step_fwd(rec_Bx4H + bias_4H + xtable_Vx4H[tokens_TxB[t]], c_BxH, hidden)
    h_BxH = residuals[-1]
    steps.append(h_BxH)
  return jnp.stack(steps)


def gate_grads(dh, dc_next, i, f, g, o, c_prev, tanh_c):
  """One step's d(pre-activations) per gate (di, df, dg, do), each BxH, and dc, given dh, the
  next step's dc (or None), the activated gates, the previous cell (None at step 0) and
  tanh(c). Also research/pallas_lstm.py's kernels' step."""
  dc = dh * o * (1.0 - tanh_c * tanh_c)
  dc = dc if dc_next is None else dc + dc_next
  # d(pre-activation) = d(activation) * sigmoid' (a(1 - a)) or tanh' (1 - a^2).
  di = dc * g * i * (1.0 - i)
  df = jnp.zeros_like(dc) if c_prev is None else dc * c_prev * f * (1.0 - f)
  dg = dc * i * (1.0 - g * g)
  do = dh * tanh_c * o * (1.0 - o)
  return (di, df, dg, do), dc


def _step_bwd(dh, dc_next, i, f, g, o, c_prev, tanh_c):
  """One step's d(pre-activations) Bx4H and dc, given dh and the next step's dc (or None)."""
  da, dc = gate_grads(dh, dc_next, i, f, g, o, c_prev, tanh_c)
  return jnp.concatenate(da, axis=-1), dc


def _loop_bwd(kernel_h_T_4HxH, steps, dh_TxBxH):
  dh_next = dc_next = None
  da_T = []
  for t in reversed(range(len(steps))):
    i, f, g, o, c_prev, tanh_c, _ = steps[t]
    dh = dh_TxBxH[t] if dh_next is None else dh_TxBxH[t] + dh_next
    da_Bx4H, dc = _step_bwd(dh, dc_next, i, f, g, o, c_prev, tanh_c)
    da_T.append(da_Bx4H)
    if t > 0:
      dh_next = da_Bx4H @ kernel_h_T_4HxH
      dc_next = dc * f
  return jnp.stack(da_T[::-1])


def _scan_bwd(kernel_h_T_4HxH, steps, dh_TxBxH, unroll: int):
  """_loop_bwd's steps: T-1 written out, T-2..1 in a reversed lax.scan, then step 0."""
  first, rest = steps
  num_steps = dh_TxBxH.shape[0]

  def step(dh_next, dc_next, dh_t, residuals):
    i, f, g, o, c_prev, tanh_c, _ = residuals
    dh = dh_t if dh_next is None else dh_t + dh_next
    da_Bx4H, dc = _step_bwd(dh, dc_next, i, f, g, o, c_prev, tanh_c)
    return da_Bx4H, da_Bx4H @ kernel_h_T_4HxH, dc * f

  if num_steps == 1:
    return step(None, None, dh_TxBxH[0], first)[0][None]
  last = jax.tree_util.tree_map(lambda x: x[-1], rest)
  da_last, dh_next, dc_next = step(None, None, dh_TxBxH[-1], last)

  def scan_step(carry, xs):
    dh_t, residuals = xs
    da_Bx4H, dh_next, dc_next = step(*carry, dh_t, residuals)
    return (dh_next, dc_next), da_Bx4H

  middle = (dh_TxBxH[1:-1], jax.tree_util.tree_map(lambda x: x[:-1], rest))
  (dh_next, dc_next), da_mid = jax.lax.scan(
    scan_step, (dh_next, dc_next), middle, reverse=True, unroll=unroll
  )
  da_0 = _step_bwd(dh_TxBxH[0] + dh_next, dc_next, *first[:4], None, first[5])[0]
  return jnp.concatenate([da_0[None], da_mid, da_last[None]])


def _recurrence_bwd(unroll, residuals, dh_TxBxH):
  kernel_h_T_4HxH, h_TxBxH, steps = residuals
  if unroll:
    da_TxBx4H = _scan_bwd(kernel_h_T_4HxH, steps, dh_TxBxH, unroll)
  else:
    da_TxBx4H = _loop_bwd(kernel_h_T_4HxH, steps, dh_TxBxH)
  dkernel_h = jnp.einsum("tbh,tbg->hg", h_TxBxH[:-1], da_TxBx4H[1:])
  return dkernel_h, da_TxBx4H.sum(axis=(0, 1)), da_TxBx4H


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
