"""The fused kernels equal plain autodiff: the lookup and the LSTM recurrence, values and VJPs."""

import jax
import jax.numpy as jnp
import numpy as np

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


def test_recurrence_values_and_gradients_match_autodiff():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden, steps, batch = 6, 4, 5
  kernel_h_Hx4H = jax.random.normal(k1, (hidden, 4 * hidden)) * 0.5
  bias_4H = jax.random.normal(k2, (4 * hidden,)) * 0.5
  xproj_TxBx4H = jax.random.normal(k3, (steps, batch, 4 * hidden))
  weights_TxBxH = jax.random.normal(k4, (steps, batch, hidden))
  args = (kernel_h_Hx4H, bias_4H, xproj_TxBx4H)
  np.testing.assert_allclose(
    lstm.lstm_recurrence(*args), reference_recurrence(*args), rtol=1e-5, atol=1e-6
  )

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a) * weights_TxBxH)

  ours = jax.grad(loss(lstm.lstm_recurrence), argnums=(0, 1, 2))(*args)
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
