"""The fused kernels equal plain autodiff: the lookup and the LSTM recurrence, values and VJPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rounding_slack

from research import lstm


def reference_recurrence(kernel_h_Hx4H, bias_4H, xproj_TxBx4H):
  """nn.OptimizedLSTMCell's math from a zero carry, written plainly (autodiff backward)."""
  hidden = kernel_h_Hx4H.shape[0]

  def step(carry, x_Bx4H):
    c_BxH, h_BxH = carry
    z_Bx4H = h_BxH @ kernel_h_Hx4H + bias_4H + x_Bx4H
    i, f, g, o = jnp.split(z_Bx4H, 4, axis=-1)
    c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_BxH = jax.nn.sigmoid(o) * jnp.tanh(c_BxH)
    return (c_BxH, h_BxH), h_BxH

  zeros_BxH = jnp.zeros((xproj_TxBx4H.shape[1], hidden))
  return jax.lax.scan(step, (zeros_BxH, zeros_BxH), xproj_TxBx4H)[1]


def random_problem(steps: int, hidden: int = 6, batch: int = 5, seed: int = 0):
  """(kernel_h, bias, xproj) and weights for a scalar loss sum(h * weights)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  kernel_h_Hx4H = jax.random.normal(k1, (hidden, 4 * hidden)) * 0.5
  bias_4H = jax.random.normal(k2, (4 * hidden,)) * 0.5
  xproj_TxBx4H = jax.random.normal(k3, (steps, batch, 4 * hidden))
  weights_TxBxH = jax.random.normal(k4, (steps, batch, hidden))
  return (kernel_h_Hx4H, bias_4H, xproj_TxBx4H), weights_TxBxH


@pytest.mark.parametrize("unroll", [0, 1, 2])
def test_recurrence_values_and_gradients_match_autodiff(unroll):
  args, weights_TxBxH = random_problem(steps=4)
  fused = functools.partial(lstm.lstm_recurrence, unroll=unroll)
  np.testing.assert_allclose(fused(*args), reference_recurrence(*args), rtol=1e-5, atol=1e-6)

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a) * weights_TxBxH)

  ours = jax.grad(loss(fused), argnums=(0, 1, 2))(*args)
  ref = jax.grad(loss(reference_recurrence), argnums=(0, 1, 2))(*args)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lookup_gradient_is_a_segment_sum():
  table_VxD = jax.random.normal(jax.random.key(1), (7, 3))
  tokens_TxB = jnp.asarray([[0, 3, 3], [6, 3, 1]])
  np.testing.assert_array_equal(lstm.lookup(table_VxD, tokens_TxB), table_VxD[tokens_TxB])
  weights = jax.random.normal(jax.random.key(2), (2, 3, 3))
  ours = jax.grad(lambda t: jnp.sum(lstm.lookup(t, tokens_TxB) * weights))(table_VxD)
  ref = jax.grad(lambda t: jnp.sum(t[tokens_TxB] * weights))(table_VxD)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def value_and_grads(unroll: int, args, weights_TxBxH):
  def loss(*a):
    return jnp.sum(lstm.lstm_recurrence(*a, unroll) * weights_TxBxH)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_scan_and_python_loop_compute_the_same_steps(steps):
  """unroll >= 1 (lax.scan) runs the Python loop's (unroll=0) operations in the same order:
  the same h and gradients up to XLA's fusion choices, whatever the scan's unroll factor.

  (With the study's full XLA optimisation the blog's T=3 programs are bit for bit equal; these
  tests compile with most optimisations off, which fuses the two differently.)
  """
  args, weights_TxBxH = random_problem(steps, seed=steps)
  loop_loss, loop_grads = value_and_grads(0, args, weights_TxBxH)
  h_loop = lstm.lstm_recurrence(*args, 0)
  tol = 1e-6 * rounding_slack()
  for unroll in (1, 2, 3):
    np.testing.assert_allclose(lstm.lstm_recurrence(*args, unroll), h_loop, rtol=tol, atol=tol / 10)
    scan_loss, scan_grads = value_and_grads(unroll, args, weights_TxBxH)
    np.testing.assert_allclose(scan_loss, loop_loss, rtol=tol)
    for a, b in zip(scan_grads, loop_grads, strict=True):
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_scan_program_size_does_not_grow_with_steps():
  """The point of unroll >= 1: the lowered program of 16 steps is about as large as that of 4."""

  def ops(unroll, steps):
    args, weights_TxBxH = random_problem(steps)

    def loss(*a):
      return jnp.sum(lstm.lstm_recurrence(*a, unroll) * weights_TxBxH)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).as_text()
    return sum(1 for line in text.splitlines() if " = " in line)

  assert ops(1, 16) == ops(1, 4)
  assert ops(0, 16) > 3 * ops(0, 4) // 2


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_window_recurrence_reads_the_first_steps_from_token_tables(steps):
  """Inference's recurrence from per-token tables equals the recurrence over looked-up rows."""
  vocab, batch, hidden = 7, 9, 6
  (kernel_h_Hx4H, bias_4H, _), _ = random_problem(steps, hidden=hidden, batch=batch)
  xtable_Vx4H = jax.random.normal(jax.random.key(3), (vocab, 4 * hidden))
  tokens_TxB = jax.random.randint(jax.random.key(4), (steps, batch), 0, vocab)
  want = lstm.lstm_recurrence(kernel_h_Hx4H, bias_4H, xtable_Vx4H[tokens_TxB])
  got = lstm.window_recurrence(kernel_h_Hx4H, bias_4H, xtable_Vx4H, tokens_TxB)
  tol = 1e-6 * rounding_slack()
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol / 10)
  with pytest.raises(ValueError, match=r"vocabulary \(7\) <= the batch \(5\)"):
    lstm.window_recurrence(kernel_h_Hx4H, bias_4H, xtable_Vx4H, tokens_TxB[:, :5])
