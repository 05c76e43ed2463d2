"""The LSTM recurrence as two Pallas kernels for GPUs: one seed's T forward steps in one kernel,
its T backward steps in another.

The same math as lstm.lstm_recurrence (tests/test_pallas_lstm.py). Why: at tens of thousands
of seeds on a GPU, XLA runs each step as batched 32x50 @ 50x200 matmuls plus elementwise
kernels, every gate and gradient through memory. Here a seed's gates, cell and hidden state
stay on chip for all T steps; the forward keeps h and the cell for the backward, which
recomputes the gates (or reads them: STORE_GATES); dW_h and the bias gradient are summed on
chip. Under vmap each seed is
one program of the kernels' grid (Pallas' batching rule), so the study's vmapped train program
needs no change.

Two entry points: `lookup_recurrence` for the first layer at a small vocabulary, where each
step's input x_t @ W_i is a row of a per-token table: the kernels gather the rows from the
table by token, rather than read a T x B x 4H input, and sum the table's gradient as a
one-hot product (no T x B x 4H gradient, no scatter-add); `lstm_recurrence` for any given
input projection.

Triton (Pallas' GPU backend here) needs power-of-2 array sizes, so the hidden size H is padded
to Hp, each gate on its own (a gate is an Hp-wide block of the 4Hp gate axis), the batch B to
Bp and the vocabulary V to Vp, all powers of two. The padding stays exactly zero: zero weights
and inputs give a zero cell and hidden state, and zero gradients; padded batch rows get zero
gradients. Off a GPU the kernels run in Pallas' interpreter: slow, for tests and small runs.
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import pallas as pl

from research import lstm

NUM_GATES = 4  # i, f, g, o: nn.OptimizedLSTMCell's order, as research/lstm.py.
# Triton warps per seed's program: 4 x 32 threads share a step's 32 x 64 blocks. Untuned;
# bench/profile.py's "pallas:warpsN" variants time other counts.
NUM_WARPS = 4
# lookup_recurrence's largest padded vocabulary: the table's gradient is a one-hot product,
# Vp x Bp @ Bp x Hp a gate and step.
MAX_LOOKUP_VOCAB = 128
EXACT = jax.lax.Precision.HIGHEST  # The one-hot product (a scatter-add): IEEE float32.
# The float32 dots on a GPU: IEEE float32 (FMA, no tensor cores). bench/profile.py's "pallas:x3"
# variants time TF32_TF32_F32_X3 (three tf32 tensor-core passes, close to float32) instead.
FLOAT32_DOT = EXACT
# Whether the forward also writes the activated gates for the backward (T x Bp x 4Hp a seed)
# instead of the backward recomputing them (a forward product a step): memory against FLOPs,
# timed by bench/profile.py's "pallas:gates" variants.
STORE_GATES = False


def _pow2(n: int) -> int:
  return max(1 << max(n - 1, 0).bit_length(), 16)  # Triton's dots need sides >= 16.


def _dot_precision(interpret: bool = False):
  """The kernels' matmul precision, from jax.default_matmul_precision as the study sets it
  (programs.at_precision): float32 unless a reduced precision is asked for."""
  name = jax.config.jax_default_matmul_precision
  if name in ("tensorfloat32", "high", "default"):
    return jax.lax.Precision.HIGH  # Triton's tf32 dot.
  if name in ("bfloat16", "fastest"):
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  return EXACT if interpret else FLOAT32_DOT  # A CPU has no tf32 passes.


def _dot(a, b, precision, trans_a=False, trans_b=False):
  """a @ b, a^T @ b or a @ b^T, float32 accumulation."""
  contract = (0 if trans_a else 1, 1 if trans_b else 0)
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _gate(ref, k: int, padded: int, *index):
  """Gate k's Hp-wide block of a ref whose last axis is the 4Hp gate axis."""
  return ref[(*index, pl.ds(k * padded, padded))]


def _add_gate(ref, k: int, padded: int, value, *index):
  """ref's gate-k block += value (outputs summed over the steps, zeroed first)."""
  at = (*index, pl.ds(k * padded, padded))
  ref[at] = ref[at] + value


def _barrier(compiled: bool):
  """Orders a program's stores to an output before it reads them back (CUDA's
  __syncthreads): Triton may give an element's load to another thread than its store."""
  if compiled:  # The interpreter runs a program's operations in order.
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

    pltriton.debug_barrier()


class _Input:
  """A step's input x_t @ W_i in the kernels: read from a T x Bp x 4Hp ref, or gathered from a
  Vp x 4Hp table's rows by T x Bp tokens (a padded batch row reads row 0 and, its dh being
  zero, gives it no gradient)."""

  def __init__(self, refs, lookup: bool, padded: int):
    self.lookup, self.padded = lookup, padded
    if lookup:
      self.tokens_ref, self.table_ref = refs
    else:
      (self.x_ref,) = refs

  def gates(self, t: int):
    """x_t's four Hp-wide gate blocks, each Bp x Hp."""
    if not self.lookup:
      return [_gate(self.x_ref, k, self.padded, t, slice(None)) for k in range(NUM_GATES)]
    tokens_Bp = self.tokens_ref[t]
    return [_gate(self.table_ref, k, self.padded, tokens_Bp) for k in range(NUM_GATES)]

  def one_hot(self, t: int):
    """Bp x Vp: row b is token b's one-hot, for the table's gradient as a product."""
    tokens_Bp = self.tokens_ref[t]
    vocab = self.table_ref.shape[0]
    ids_BpxVp = jax.lax.broadcasted_iota(jnp.int32, (tokens_Bp.shape[0], vocab), 1)
    return (tokens_Bp[:, None] == ids_BpxVp).astype(jnp.float32)


def _activations(x_gates, h_prev, w_ref, b_ref, padded: int, precision):
  """A step's activated gates i, f, g, o from its input and the previous h (None at step 0)."""
  acts = []
  for k, x_BpxHp in enumerate(x_gates):
    # As flax's cell: (h @ W_h + b) + x; at step 0, h = 0 and h @ W_h is exactly zero.
    z_BpxHp = jnp.broadcast_to(_gate(b_ref, k, padded, 0)[None, :], x_BpxHp.shape)
    if h_prev is not None:
      z_BpxHp = _dot(h_prev, _gate(w_ref, k, padded, slice(None)), precision) + z_BpxHp
    z_BpxHp = z_BpxHp + x_BpxHp
    acts.append(jnp.tanh(z_BpxHp) if k == 2 else jax.nn.sigmoid(z_BpxHp))
  return acts


def _forward_kernel(*refs, lookup: bool, precision, compiled: bool, store_gates: bool):
  """One seed from a zero carry: h and the cell at every step, T x Bp x Hp each.

  refs: the input's refs (_Input), w Hp x 4Hp, b 1 x 4Hp; out: h, c (and with store_gates the
  activated gates, T x Bp x 4Hp).
  """
  del compiled  # Nothing is read back.
  gates_ref = refs[-1] if store_gates else None
  *input_refs, w_ref, b_ref, h_ref, c_ref = refs[:-1] if store_gates else refs
  steps, _, padded = h_ref.shape
  x = _Input(input_refs, lookup, padded)
  h_BpxHp = c_BpxHp = None
  for t in range(steps):  # T is small (the context length): unrolled.
    acts = _activations(x.gates(t), h_BpxHp, w_ref, b_ref, padded, precision)
    i, f, g, o = acts
    c_BpxHp = i * g if c_BpxHp is None else f * c_BpxHp + i * g
    h_BpxHp = o * jnp.tanh(c_BpxHp)
    c_ref[t] = c_BpxHp
    h_ref[t] = h_BpxHp
    for k, act in enumerate(acts if store_gates else ()):
      gates_ref[t, :, pl.ds(k * padded, padded)] = act


def _backward_kernel(*refs, lookup: bool, precision, compiled: bool, store_gates: bool):
  """One seed's backward, given dh T x Bp x Hp: the input's gradient (T x Bp x 4Hp, or the
  table's Vp x 4Hp), dW_h Hp x 4Hp and the bias's 1 x 4Hp.

  lstm._loop_bwd's steps; each step's gates are read (store_gates) or recomputed from the
  forward's h_{t-1} and x_t.
  """
  inputs = 2 if lookup else 1  # The input's refs (_Input), then the forward's and dh.
  w_ref, b_ref, h_ref, c_ref, *gates = refs[inputs:-4]
  dh_ref, dx_ref, dw_ref, db_ref = refs[-4:]
  steps, _, padded = h_ref.shape
  x = _Input(refs[:inputs], lookup, padded)
  for ref in (dw_ref, db_ref) + ((dx_ref,) if lookup else ()):
    ref[...] = jnp.zeros(ref.shape, jnp.float32)
  _barrier(compiled)
  dh_next = dc_next = None
  for t in reversed(range(steps)):
    h_prev = h_ref[t - 1] if t > 0 else None
    if store_gates:
      i, f, g, o = (_gate(gates[0], k, padded, t, slice(None)) for k in range(NUM_GATES))
    else:
      i, f, g, o = _activations(x.gates(t), h_prev, w_ref, b_ref, padded, precision)
    dh = dh_ref[t] if dh_next is None else dh_ref[t] + dh_next
    c_prev = c_ref[t - 1] if t > 0 else None
    da, dc = lstm.gate_grads(dh, dc_next, i, f, g, o, c_prev, jnp.tanh(c_ref[t]))
    one_hot_BpxVp = x.one_hot(t) if lookup else None
    dh_next = None
    for k in range(NUM_GATES):
      if lookup:  # The lookup's gradient: each table row sums its tokens' rows of da.
        _add_gate(dx_ref, k, padded, _dot(one_hot_BpxVp, da[k], EXACT, trans_a=True), slice(None))
      else:
        dx_ref[t, :, pl.ds(k * padded, padded)] = da[k]
      _add_gate(db_ref, k, padded, jnp.sum(da[k], axis=0), 0)
      if t > 0:
        w_k = _gate(w_ref, k, padded, slice(None))
        dh_k = _dot(da[k], w_k, precision, trans_b=True)
        dh_next = dh_k if dh_next is None else dh_next + dh_k
        # Summed in the output block rather than in registers: four Hp x Hp accumulators
        # would not fit beside the step's values.
        _add_gate(dw_ref, k, padded, _dot(h_prev, da[k], precision, trans_a=True), slice(None))
    dc_next = dc * f
    _barrier(compiled)  # The sums are read again at the next step.


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


def _call(kernel, lookup: bool, store_gates: bool, out_shape, interpret, *args):
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  params = None
  if not interpret:
    # Imported here: ~60 ms that every run (and --workers process) would pay at start-up.
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

    params = pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  return pl.pallas_call(
    functools.partial(
      kernel,
      lookup=lookup,
      precision=_dot_precision(interpret),
      compiled=not interpret,
      store_gates=store_gates,
    ),
    out_shape=out_shape,
    interpret=interpret,
    # Triton rather than Mosaic GPU (the default in some jax versions): float32 dots.
    compiler_params=params,
    name=kernel.__name__.strip("_"),
  )(*args)


# ----------------------------------------------------------------------------- the VJPs


@struct.dataclass
class _Residuals:
  """What the backward kernel reads besides dh: the forward's padded inputs and its h and c."""

  inputs: tuple  # The kernels' input refs: (x T x Bp x 4Hp,) or (tokens T x Bp, table Vp x 4Hp).
  w_Hpx4Hp: jax.Array
  b_1x4Hp: jax.Array
  h_TxBpxHp: jax.Array
  c_TxBpxHp: jax.Array
  gates_TxBpx4Hp: jax.Array | None = None  # With STORE_GATES.
  vocab: int = struct.field(pytree_node=False, default=0)  # The table's V, before padding.


def _forward(kernel_h_Hx4H, bias_4H, inputs: tuple, lookup: bool, batch: int, interpret):
  """Both entry points' forward on padded inputs: (h T x B x H, the backward's residuals)."""
  if kernel_h_Hx4H.dtype != jnp.float32:
    raise ValueError(f"model.impl='pallas' needs float32 parameters, got {kernel_h_Hx4H.dtype}")
  hidden = kernel_h_Hx4H.shape[0]
  padded = _pow2(hidden)
  w_Hpx4Hp = _pad_axis(_pad_gates(kernel_h_Hx4H, hidden, padded), 0, padded)
  b_1x4Hp = _pad_gates(bias_4H, hidden, padded)[None]
  steps, padded_batch = inputs[0].shape[:2]
  state = jax.ShapeDtypeStruct((steps, padded_batch, padded), jnp.float32)
  gates = jax.ShapeDtypeStruct((steps, padded_batch, NUM_GATES * padded), jnp.float32)
  out_shape = (state, state, gates) if STORE_GATES else (state, state)
  outs = _call(
    _forward_kernel, lookup, STORE_GATES, out_shape, interpret, *inputs, w_Hpx4Hp, b_1x4Hp
  )
  h_TxBpxHp = outs[0]
  residuals = _Residuals(inputs, w_Hpx4Hp, b_1x4Hp, *outs)
  return h_TxBpxHp[:, :batch, :hidden], residuals


def _backward(lookup: bool, res: _Residuals, dh_TxBxH, interpret):
  """(the input's gradient, unpadded: T x B x 4H, or the table's V x 4H; dkernel_h H x 4H;
  dbias 4H)."""
  _, batch, hidden = dh_TxBxH.shape
  padded_batch, padded = res.h_TxBpxHp.shape[1:]
  dh_TxBpxHp = _pad_axis(_pad_axis(dh_TxBxH, 2, padded), 1, padded_batch)
  dx_shape = res.inputs[-1].shape  # The T x Bp x 4Hp input, or the Vp x 4Hp table.
  out_shape = tuple(
    jax.ShapeDtypeStruct(shape, jnp.float32)
    for shape in (dx_shape, res.w_Hpx4Hp.shape, res.b_1x4Hp.shape)
  )
  gates = () if res.gates_TxBpx4Hp is None else (res.gates_TxBpx4Hp,)
  dx, dw_Hpx4Hp, db_1x4Hp = _call(
    _backward_kernel,
    lookup,
    bool(gates),
    out_shape,
    interpret,
    *res.inputs,
    res.w_Hpx4Hp,
    res.b_1x4Hp,
    res.h_TxBpxHp,
    res.c_TxBpxHp,
    *gates,
    dh_TxBpxHp,
  )
  dx = dx[: res.vocab] if lookup else dx[:, :batch]
  return (
    _unpad_gates(dx, hidden, padded),
    _unpad_gates(dw_Hpx4Hp[:hidden], hidden, padded),
    _unpad_gates(db_1x4Hp[0], hidden, padded),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lstm_recurrence(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, interpret=None):
  """nn.OptimizedLSTMCell over time from a zero carry, given x @ W_i: h at every step, TxBxH.

  interpret: None runs the kernels compiled on a GPU and in Pallas' interpreter elsewhere;
  False always compiles them (lowering for a GPU from any host: tests/test_pallas_lstm.py).
  """
  return _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, interpret)[0]


def _recurrence_fwd(kernel_h_Hx4H, bias_4H, xproj_TxBx4H, interpret):
  hidden, (_, batch, _) = kernel_h_Hx4H.shape[0], xproj_TxBx4H.shape
  x_TxBpx4Hp = _pad_gates(xproj_TxBx4H, hidden, _pow2(hidden))
  x_TxBpx4Hp = _pad_axis(x_TxBpx4Hp, 1, _pow2(batch))
  return _forward(kernel_h_Hx4H, bias_4H, (x_TxBpx4Hp,), False, batch, interpret)


def _recurrence_bwd(interpret, residuals, dh_TxBxH):
  dxproj_TxBx4H, dkernel_h, dbias = _backward(False, residuals, dh_TxBxH, interpret)
  return dkernel_h, dbias, dxproj_TxBx4H


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def fits_lookup(vocab_size: int) -> bool:
  """Whether lookup_recurrence takes this vocabulary (its one-hot products stay small)."""
  return _pow2(vocab_size) <= MAX_LOOKUP_VOCAB


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lookup_recurrence(kernel_h_Hx4H, bias_4H, xtable_Vx4H, tokens_TxB, interpret=None):
  """lstm_recurrence(kernel_h, bias, xtable[tokens]): h at every step, TxBxH, with the table's
  gradient summed in the kernels (no T x B x 4H input or gradient in memory). V <= 128."""
  return _lookup_fwd(kernel_h_Hx4H, bias_4H, xtable_Vx4H, tokens_TxB, interpret)[0]


def _lookup_fwd(kernel_h_Hx4H, bias_4H, xtable_Vx4H, tokens_TxB, interpret):
  (vocab, _), (_, batch) = xtable_Vx4H.shape, tokens_TxB.shape
  if not fits_lookup(vocab):
    raise ValueError(f"lookup_recurrence takes V <= {MAX_LOOKUP_VOCAB}, got {vocab}")
  hidden = kernel_h_Hx4H.shape[0]
  table_Vpx4Hp = _pad_axis(_pad_gates(xtable_Vx4H, hidden, _pow2(hidden)), 0, _pow2(vocab))
  tokens_TxBp = _pad_axis(tokens_TxB.astype(jnp.int32), 1, _pow2(batch))
  inputs = (tokens_TxBp, table_Vpx4Hp)
  h_TxBxH, residuals = _forward(kernel_h_Hx4H, bias_4H, inputs, True, batch, interpret)
  return h_TxBxH, residuals.replace(vocab=vocab)


def _lookup_bwd(interpret, residuals, dh_TxBxH):
  dtable_Vx4H, dkernel_h, dbias = _backward(True, residuals, dh_TxBxH, interpret)
  return dkernel_h, dbias, dtable_Vx4H, None


lookup_recurrence.defvjp(_lookup_fwd, _lookup_bwd)
