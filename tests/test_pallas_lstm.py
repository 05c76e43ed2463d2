"""The Pallas kernels equal the fused recurrence and lookup (values and VJPs), per seed and
vmapped, and lower for a GPU from any host. On a CPU they run in Pallas' interpreter; on a
GPU, compiled."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rounding_slack
from test_lstm import random_problem

from research import lstm, pallas_lstm


def loss(fn, weights_TxBxH):
  return lambda *args: jnp.sum(fn(*args) * weights_TxBxH)


def values_and_grads(recurrence, weights_TxBxH):
  """jit of (h, the gradient of sum(h * weights) for the three float arguments): one program
  per shape."""

  def fn(*args):
    grads = jax.grad(loss(recurrence, weights_TxBxH), argnums=(0, 1, 2))(*args)
    return recurrence(*args), grads

  return jax.jit(fn)


# (steps, hidden, batch): the blog's shape (H and B padded to 64 and 32); one step (no
# recurrent matmul, no dW_h). Sizes below Triton's 16: the lookup's test.
@pytest.mark.parametrize(("steps", "hidden", "batch"), [(3, 50, 32), (1, 20, 17)])
def test_values_and_gradients_equal_the_fused_recurrence(steps, hidden, batch):
  args, weights_TxBxH = random_problem(steps, hidden, batch)
  tol = 1e-6 * rounding_slack()
  with jax.default_matmul_precision("float32"):
    h_TxBxH, ours = values_and_grads(pallas_lstm.lstm_recurrence, weights_TxBxH)(*args)
    fused_h_TxBxH, fused = values_and_grads(lstm.lstm_recurrence, weights_TxBxH)(*args)
  np.testing.assert_allclose(h_TxBxH, fused_h_TxBxH, rtol=tol, atol=tol)
  for a, b in zip(ours, fused, strict=True):
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=10 * tol)
  if steps == 1:
    np.testing.assert_array_equal(ours[0], 0.0)  # No recurrent step: h_0 @ W_h never runs.


def lookup_problem(steps: int, hidden: int, batch: int, vocab: int, seed: int = 0):
  """(kernel_h, bias, xtable) with tokens, and weights for a scalar loss sum(h * weights)."""
  (kernel_h_Hx4H, bias_4H, _), weights_TxBxH = random_problem(steps, hidden, batch, seed)
  k1, k2 = jax.random.split(jax.random.key(seed + 100))
  xtable_Vx4H = jax.random.normal(k1, (vocab, 4 * hidden))
  tokens_TxB = jax.random.randint(k2, (steps, batch), 0, vocab)
  return (kernel_h_Hx4H, bias_4H, xtable_Vx4H), tokens_TxB, weights_TxBxH


# (steps, hidden, batch, vocab): the blog's scenario 2 (V = 26 padded to 32); everything
# below Triton's 16; the largest vocabulary taken.
@pytest.mark.parametrize(
  ("steps", "hidden", "batch", "vocab"), [(3, 50, 32, 26), (4, 6, 5, 7), (2, 8, 16, 128)]
)
def test_lookup_values_and_gradients_equal_the_fused_lookup(steps, hidden, batch, vocab):
  """The kernels' one-hot lookup and its gradient (a table row sums its tokens' gradients)."""
  args, tokens_TxB, weights_TxBxH = lookup_problem(steps, hidden, batch, vocab)
  tol = 1e-6 * rounding_slack()
  with jax.default_matmul_precision("float32"):
    h_TxBxH, ours = values_and_grads(
      lambda *a: pallas_lstm.lookup_recurrence(*a, tokens_TxB), weights_TxBxH
    )(*args)
    fused_h_TxBxH, fused = values_and_grads(
      lambda k, b, t: lstm.lstm_recurrence(k, b, lstm.lookup(t, tokens_TxB)), weights_TxBxH
    )(*args)
  np.testing.assert_allclose(h_TxBxH, fused_h_TxBxH, rtol=tol, atol=tol)
  for a, b in zip(ours, fused, strict=True):
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=10 * tol)
  unused = np.setdiff1d(np.arange(vocab), np.asarray(tokens_TxB))
  np.testing.assert_array_equal(ours[2][unused], 0.0)  # Rows no token read get nothing.


def test_lookup_refuses_a_vocabulary_above_its_limit():
  args, tokens_TxB, _ = lookup_problem(2, 8, 16, 129)
  assert not pallas_lstm.fits_lookup(129) and pallas_lstm.fits_lookup(128)
  with pytest.raises(ValueError, match="lookup_recurrence takes V <= 128, got 129"):
    jax.eval_shape(pallas_lstm.lookup_recurrence, *args, tokens_TxB)


def test_vmapped_seeds_equal_single_seeds():
  """Under vmap a seed is one program of the kernels' grid: each equals its own call."""
  problems = [random_problem(3, 10, 8, seed=s) for s in range(3)]
  args_S = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[p[0] for p in problems])
  weights_SxTxBxH = jnp.stack([p[1] for p in problems])

  @jax.jit
  def grads(args, weights_TxBxH):
    return jax.grad(loss(pallas_lstm.lstm_recurrence, weights_TxBxH), argnums=(0, 1, 2))(*args)

  with jax.default_matmul_precision("float32"):
    vmapped = jax.vmap(grads)(args_S, weights_SxTxBxH)
    for s, (args, weights_TxBxH) in enumerate(problems):
      single = grads(args, weights_TxBxH)
      for a, b in zip(vmapped, single, strict=True):
        np.testing.assert_allclose(a[s], b, rtol=1e-6, atol=1e-6 * rounding_slack())


def blog_shape_problem(lookup: bool):
  """The blog's shape (T 3, H 50, B 32, V 26) for either entry point: (args, tokens, loss
  weights, the recurrence taking args)."""
  args, tokens_TxB, weights_TxBxH = lookup_problem(3, 50, 32, 26)
  if lookup:
    recurrence = functools.partial(pallas_lstm.lookup_recurrence, tokens_TxB=tokens_TxB)
  else:
    args = random_problem(3, 50, 32)[0]
    recurrence = pallas_lstm.lstm_recurrence
  return args, tokens_TxB, weights_TxBxH, recurrence


@pytest.mark.parametrize("lookup", [False, True])
def test_lowers_to_triton_kernels_for_a_gpu_from_any_host(monkeypatch, lookup):
  """The vmapped forward and backward lower for CUDA (Triton's power-of-2 and dot-size rules
  checked at lowering), as two kernels, without a GPU here."""
  monkeypatch.setattr(pallas_lstm, "NUM_WARPS", 8)  # bench/profile.py's warpsN variants.
  args, tokens_TxB, weights_TxBxH, recurrence = blog_shape_problem(lookup)
  args_S = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), args)
  compiled = functools.partial(recurrence, interpret=False)
  grads = jax.vmap(jax.grad(loss(compiled, weights_TxBxH), argnums=(0, 1, 2)))
  with jax.default_matmul_precision("float32"):
    lowered = jax.jit(grads).trace(*args_S).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2
  assert "grid_x = 2" in text  # One program per seed.
  assert text.count("num_warps = 8") == 2
  # The backward reads its summed outputs back: a block-wide barrier orders the stores first.
  assert "debug_barrier" in text


@pytest.mark.parametrize("lookup", [False, True])
def test_kept_gates_give_the_recomputed_gates_results(monkeypatch, lookup):
  """bench/profile.py's pallas:gates: the forward writes the gates, the backward reads them
  rather than recomputing them; the same values and gradients, and it lowers for CUDA."""
  args, tokens_TxB, weights_TxBxH, recurrence = blog_shape_problem(lookup)
  with jax.default_matmul_precision("float32"):
    recomputed = values_and_grads(recurrence, weights_TxBxH)(*args)
    monkeypatch.setattr(pallas_lstm, "STORE_GATES", True)
    kept = values_and_grads(recurrence, weights_TxBxH)(*args)
    compiled = functools.partial(recurrence, interpret=False)
    grads = jax.grad(loss(compiled, weights_TxBxH), argnums=(0, 1, 2))
    text = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    forward = pallas_lstm._lookup_fwd if lookup else pallas_lstm._recurrence_fwd
    extra = (tokens_TxB,) if lookup else ()
    _, residuals = jax.eval_shape(lambda *a: forward(*a, *extra, None), *args)
  assert residuals.gates_TxBpx4Hp.shape == (3, 32, 256)  # Kept: T x Bp x 4Hp.
  for a, b in zip(*map(jax.tree_util.tree_leaves, (kept, recomputed)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * rounding_slack())
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2


def test_float32_dots_as_three_tf32_passes_lower_for_a_gpu_and_stay_exact_interpreted(
  monkeypatch,
):
  """bench/profile.py's pallas:x3: the kernels' float32 dots as TF32_TF32_F32_X3 lower for
  CUDA; in the interpreter (a CPU has no tf32) they stay IEEE float32."""
  x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  monkeypatch.setattr(pallas_lstm, "FLOAT32_DOT", x3)
  with jax.default_matmul_precision("float32"):
    assert pallas_lstm._dot_precision() == x3
    assert pallas_lstm._dot_precision(interpret=True) == jax.lax.Precision.HIGHEST
    args, tokens_TxB, weights_TxBxH = lookup_problem(3, 50, 32, 26)
    compiled = functools.partial(
      pallas_lstm.lookup_recurrence, tokens_TxB=tokens_TxB, interpret=False
    )
    grads = jax.grad(loss(compiled, weights_TxBxH), argnums=(0, 1, 2))
    text = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize(
  ("name", "expected"),
  [
    ("float32", jax.lax.Precision.HIGHEST),
    ("tensorfloat32", jax.lax.Precision.HIGH),
    ("bfloat16", jax.lax.DotAlgorithmPreset.BF16_BF16_F32),
  ],
)
def test_dots_follow_the_configured_matmul_precision(name, expected):
  with jax.default_matmul_precision(name):
    assert pallas_lstm._dot_precision() == expected


def test_float64_parameters_are_refused_with_a_clear_error():
  args, _ = random_problem(2, 4, 4)
  with jax.enable_x64(True):  # run.py --jax_enable_x64: the model's parameters are float64.
    args64 = [jax.ShapeDtypeStruct(a.shape, jnp.float64) for a in args]
    with pytest.raises(ValueError, match="model.impl='pallas' needs float32 parameters"):
      jax.eval_shape(pallas_lstm.lstm_recurrence, *args64)
