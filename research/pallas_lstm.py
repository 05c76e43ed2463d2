"""The LSTM recurrence as two Pallas kernels for GPUs: one seed's T forward steps in one kernel,
its T backward steps in another.

The same math as lstm.lstm_recurrence (tests/test_pallas_lstm.py). Why: at tens of thousands
of seeds on a GPU, XLA runs each step as batched 32x50 @ 50x200 matmuls plus elementwise
kernels, every gate through memory. Here a seed's gates, cell and hidden state stay on chip for
all T steps, and dW_h is summed there too. Under vmap each seed is one program of the kernels'
grid (Pallas' batching rule), so the study's vmapped train program needs no change.

Triton (Pallas' GPU backend here) needs power-of-2 array sizes, so the hidden size H is padded
to Hp, each gate on its own (a gate is an Hp-wide block of the 4Hp gate axis), and the batch B
to Bp, both powers of two. The padding stays exactly zero: zero weights and inputs give a zero
cell and hidden state, and zero gradients. Off a GPU the kernels run in Pallas' interpreter:
slow, for tests and small runs.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NUM_GATES = 4  # i, f, g, o: nn.OptimizedLSTMCell's order, as research/lstm.py.
# Triton warps per seed's program: 4 x 32 threads share a step's 32 x 64 blocks. Untuned;
# bench/profile.py's "pallas:warpsN" variants time other counts.
NUM_WARPS = 4


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _dot_precision():
  """The kernels' matmul precision, from jax.default_matmul_precision as the study sets it
  (programs.at_precision): exact float32 unless a reduced precision is asked for."""
  name = jax.config.jax_default_matmul_precision
  if name in ("tensorfloat32", "high", "default"):
    return jax.lax.Precision.HIGH  # Triton's tf32 dot.
  if name in ("bfloat16", "fastest"):
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  return jax.lax.Precision.HIGHEST  # IEEE float32.


def _dot(a, b, precision, trans_a=False, trans_b=False):
  """a @ b, a^T @ b or a @ b^T, float32 accumulation."""
  contract = (0 if trans_a else 1, 1 if trans_b else 0)
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _gate(ref, k: int, padded: int, *index):
  """Gate k's Hp-wide block of a ref whose last axis is the 4Hp gate axis."""
  return ref[(*index, pl.ds(k * padded, padded))]


def _forward_kernel(w_ref, b_ref, x_ref, h_ref, c_ref, gates_ref, *, precision):
  """One seed: from a zero carry, T steps of z = h @ W_h + b + x, the gates and the cell.

  w_ref Hp x 4Hp, b_ref 1 x 4Hp, x_ref T x Bp x 4Hp (x @ W_i); out: h, c T x Bp x Hp, the
  activated gates T x Bp x 4Hp (the backward's residuals).
  """
  steps, batch, padded = h_ref.shape
  h_BpxHp = c_BpxHp = None
  for t in range(steps):  # T is small (the context length): unrolled.
    acts = []
    for k in range(NUM_GATES):
      # As flax's cell: (h @ W_h + b) + x; at step 0, h = 0 and h @ W_h is exactly zero.
      z_BpxHp = jnp.broadcast_to(_gate(b_ref, k, padded, 0)[None, :], (batch, padded))
      if h_BpxHp is not None:
        z_BpxHp = _dot(h_BpxHp, _gate(w_ref, k, padded, slice(None)), precision) + z_BpxHp
      z_BpxHp = z_BpxHp + _gate(x_ref, k, padded, t, slice(None))
      acts.append(jnp.tanh(z_BpxHp) if k == 2 else jax.nn.sigmoid(z_BpxHp))
    i, f, g, o = acts
    c_BpxHp = i * g if c_BpxHp is None else f * c_BpxHp + i * g
    h_BpxHp = o * jnp.tanh(c_BpxHp)
    for k, act in enumerate(acts):
      gates_ref[t, :, pl.ds(k * padded, padded)] = act
    c_ref[t] = c_BpxHp
    h_ref[t] = h_BpxHp


def _backward_kernel(w_ref, h_ref, c_ref, gates_ref, dh_ref, da_ref, dw_ref, *, precision):
  """One seed's backward: d(pre-activations) T x Bp x 4Hp and dW_h Hp x 4Hp, given dh.

  lstm._loop_bwd's steps, with dW_h = sum_t h_{t-1}^T @ da_t summed as it goes.
  """
  steps, batch, padded = h_ref.shape
  dh_next = dc_next = None
  if steps == 1:
    dw_ref[...] = jnp.zeros(dw_ref.shape, jnp.float32)
  for t in reversed(range(steps)):
    i, f, g, o = (_gate(gates_ref, k, padded, t, slice(None)) for k in range(NUM_GATES))
    tanh_c = jnp.tanh(c_ref[t])
    dh = dh_ref[t] if dh_next is None else dh_ref[t] + dh_next
    dc = dh * o * (1.0 - tanh_c * tanh_c)
    dc = dc if dc_next is None else dc + dc_next
    # d(pre-activation) = d(activation) * sigmoid' (a(1 - a)) or tanh' (1 - a^2).
    di = dc * g * i * (1.0 - i)
    df = jnp.zeros_like(dc) if t == 0 else dc * c_ref[t - 1] * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dh * tanh_c * o * (1.0 - o)
    da = (di, df, dg, do)
    for k in range(NUM_GATES):
      da_ref[t, :, pl.ds(k * padded, padded)] = da[k]
    if t > 0:
      h_prev = h_ref[t - 1]
      dh_next = None
      for k in range(NUM_GATES):
        w_k = _gate(w_ref, k, padded, slice(None))
        dh_k = _dot(da[k], w_k, precision, trans_b=True)
        dh_next = dh_k if dh_next is None else dh_next + dh_k
        # Summed in the output block rather than in registers: four Hp x Hp accumulators
        # would not fit beside the step's values.
        dw_k = _dot(h_prev, da[k], precision, trans_a=True)
        if t < steps - 1:
          dw_k = _gate(dw_ref, k, padded, slice(None)) + dw_k
        dw_ref[:, pl.ds(k * padded, padded)] = dw_k
      dc_next = dc * f


# ----------------------------------------------------------------------------- padding


def _pad_gates(x, hidden: int, padded: int):
  """... x 4H -> ... x 4Hp, each gate's H columns followed by Hp - H zeros."""
  lead = x.shape[:-1]
  x = x.reshape(*lead, NUM_GATES, hidden)
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, padded - hidden)])
  return x.reshape(*lead, NUM_GATES * padded)


def _unpad_gates(x, hidden: int, padded: int):
  lead = x.shape[:-1]
  return x.reshape(*lead, NUM_GATES, padded)[..., :hidden].reshape(*lead, NUM_GATES * hidden)


def _pad_axis(x, axis: int, size: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _call(kernel, out_shape, interpret, *args):
  precision = _dot_precision()
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  params = None
  if not interpret:
    # Imported here: ~60 ms that every run (and --workers process) would pay at start-up.
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

    params = pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  return pl.pallas_call(
    functools.partial(kernel, precision=precision),
    out_shape=out_shape,
    interpret=interpret,
    # Triton rather than Mosaic GPU (the default in some jax versions): float32 dots.
    compiler_params=params,
    name=kernel.__name__.strip("_"),
  )(*args)


# ----------------------------------------------------------------------------- the VJP


def _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, interpret):
  if kernel_h_Hx4H.dtype != jnp.float32:
    raise ValueError(f"model.impl='pallas' needs float32 parameters, got {kernel_h_Hx4H.dtype}")
  hidden = kernel_h_Hx4H.shape[0]
  steps, batch, _ = xproj_TxBx4H.shape
  padded, padded_batch = max(_pow2(hidden), 16), max(_pow2(batch), 16)  # Triton dots: >= 16.
  w_Hpx4Hp = _pad_axis(_pad_gates(kernel_h_Hx4H, hidden, padded), 0, padded)
  b_1x4Hp = _pad_gates(bias_4H, hidden, padded)[None]
  x_TxBpx4Hp = _pad_axis(_pad_gates(xproj_TxBx4H, hidden, padded), 1, padded_batch)
  state = jax.ShapeDtypeStruct((steps, padded_batch, padded), jnp.float32)
  gates = jax.ShapeDtypeStruct((steps, padded_batch, NUM_GATES * padded), jnp.float32)
  h_TxBpxHp, c_TxBpxHp, gates_TxBpx4Hp = _call(
    _forward_kernel, (state, state, gates), interpret, w_Hpx4Hp, b_1x4Hp, x_TxBpx4Hp
  )
  h_TxBxH = h_TxBpxHp[:, :batch, :hidden]
  return h_TxBxH, (w_Hpx4Hp, h_TxBpxHp, c_TxBpxHp, gates_TxBpx4Hp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lstm_recurrence(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, interpret=None):
  """nn.OptimizedLSTMCell over time from a zero carry, given x @ W_i: h at every step, TxBxH.

  interpret: None runs the kernels compiled on a GPU and in Pallas' interpreter elsewhere;
  False always compiles them (lowering for a GPU from any host: tests/test_pallas_lstm.py).
  """
  return _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, interpret)[0]


def _recurrence_bwd(interpret, residuals, dh_TxBxH):
  w_Hpx4Hp, h_TxBpxHp, c_TxBpxHp, gates_TxBpx4Hp = residuals
  steps, batch, hidden = dh_TxBxH.shape
  padded, padded_batch = h_TxBpxHp.shape[2], h_TxBpxHp.shape[1]
  dh_TxBpxHp = _pad_axis(_pad_axis(dh_TxBxH, 2, padded), 1, padded_batch)
  da_TxBpx4Hp, dw_Hpx4Hp = _call(
    _backward_kernel,
    (
      jax.ShapeDtypeStruct(gates_TxBpx4Hp.shape, jnp.float32),
      jax.ShapeDtypeStruct(w_Hpx4Hp.shape, jnp.float32),
    ),
    interpret,
    w_Hpx4Hp,
    h_TxBpxHp,
    c_TxBpxHp,
    gates_TxBpx4Hp,
    dh_TxBpxHp,
  )
  da_TxBx4H = _unpad_gates(da_TxBpx4Hp[:, :batch], hidden, padded)
  dkernel_h = _unpad_gates(dw_Hpx4Hp[:hidden], hidden, padded)
  return dkernel_h, da_TxBx4H.sum(axis=(0, 1)), da_TxBx4H


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
