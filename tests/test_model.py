"""The LSTM language model: its recurrences equal (values, gradients, init), Keras init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rounding_slack, tiny_config

from research import data, lstm, model, train


def pair(vocab: int, layers: int, mode: str):
  kw = dict(embed_dim=8, hidden=16, layers=layers, mode=mode)
  return (
    model.LSTMLanguageModel(vocab, impl="fused", **kw),
    model.LSTMLanguageModel(vocab, impl="flax", **kw),
  )


@pytest.mark.parametrize(
  ("mode", "layers", "vocab"), [("last", 1, 12), ("all", 2, 12), ("last", 1, 300)]
)
def test_fused_and_flax_lstm_are_the_same_function(mode, layers, vocab):
  fused, flax_rnn = pair(vocab, layers, mode)
  tokens_BxT = jax.random.randint(jax.random.key(0), (6, 5), 0, vocab)
  params = model.init_params(fused, jax.random.key(1), 5)
  flax_params = model.init_params(flax_rnn, jax.random.key(1), 5)
  # Same names, shapes and initial values: a saved model loads under either impl.
  for a, b in zip(*map(jax.tree_util.tree_leaves, (params, flax_params)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(flax_params)

  lengths_B = jnp.asarray([1, 2, 3, 4, 5, 5])
  for args in [(tokens_BxT,), (tokens_BxT, 0.0, None, lengths_B)]:
    np.testing.assert_allclose(
      fused.apply({"params": params}, *args),
      flax_rnn.apply({"params": params}, *args),
      rtol=1e-5 * rounding_slack(),
      atol=1e-6 * rounding_slack(),
    )

  def loss(m):
    return lambda p: jnp.sum(m.apply({"params": p}, tokens_BxT, 0.3, jax.random.key(2)) ** 2)

  grads, flax_grads = jax.grad(loss(fused))(params), jax.grad(loss(flax_rnn))(params)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (grads, flax_grads)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * rounding_slack())


def test_pallas_impl_is_the_fused_model_with_kernels_in_training():
  """impl="pallas": fused's parameters; in training (a dropout key) the Pallas kernels give
  fused's values and gradients (layer 0 through the lookup kernels, layer 1 through the
  others); evaluation and decoding run fused's own code, bit for bit."""
  kw = dict(embed_dim=8, hidden=16, layers=2, mode="all")
  fused = model.LSTMLanguageModel(12, impl="fused", **kw)
  pallas = model.LSTMLanguageModel(12, impl="pallas", **kw)
  params = model.init_params(fused, jax.random.key(1), 5)
  pallas_params = model.init_params(pallas, jax.random.key(1), 5)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (params, pallas_params)), strict=True):
    np.testing.assert_array_equal(a, b)
  tokens_BxT = jax.random.randint(jax.random.key(0), (6, 5), 0, 12)
  lengths_B = jnp.asarray([1, 2, 3, 4, 5, 5])

  def infer(m):
    return jax.jit(lambda p: m.apply({"params": p}, tokens_BxT, lengths_B=lengths_B))

  def loss_and_grads(m):
    def loss(p):
      logits = m.apply({"params": p}, tokens_BxT, 0.3, jax.random.key(2), lengths_B)
      return jnp.sum(logits**2)

    return jax.jit(jax.value_and_grad(loss))

  with jax.default_matmul_precision("float32"):
    np.testing.assert_array_equal(infer(pallas)(params), infer(fused)(params))
    (value, grads), (fused_value, fused_grads) = (
      loss_and_grads(m)(params) for m in (pallas, fused)
    )
  tol = 1e-5 * rounding_slack()
  np.testing.assert_allclose(value, fused_value, rtol=tol)
  for a, b in zip(*map(jax.tree_util.tree_leaves, (grads, fused_grads)), strict=True):
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol)


def test_keras_init_sets_forget_bias_to_one_and_small_embeddings():
  lm = model.LSTMLanguageModel(10, embed_dim=8, hidden=16)
  params = model.init_params(lm, jax.random.key(0), 3)
  np.testing.assert_array_equal(params["lstm"]["hf"]["bias"], 1.0)
  np.testing.assert_array_equal(params["lstm"]["hi"]["bias"], 0.0)
  assert float(jnp.abs(params["Embed_0"]["embedding"]).max()) <= 0.05


@pytest.mark.parametrize("mode", ["last", "all"])
def test_initial_loss_is_about_log_vocab(mode):
  config = tiny_config()
  config.model.mode = mode
  dataset = data.dataset_from_config(config.data)
  lm = model.model_from_config(config.model, dataset.vocab_size)
  inputs, targets = train.split_window(jnp.asarray(dataset.windows_NxW), mode)
  losses = []
  for seed in range(4):
    params = model.init_params(lm, jax.random.key(seed), dataset.context_length)
    logits = lm.apply({"params": params}, inputs)
    losses.append(float(train.cross_entropy(logits, targets, jnp.ones(inputs.shape[0]))))
  assert np.mean(losses) == pytest.approx(np.log(dataset.vocab_size), rel=0.02)


def test_dropout_with_a_traced_rate():
  x = jnp.ones((1000,))
  dropped = jax.jit(model.dropout)(x, jnp.float32(0.5), jax.random.key(0))
  assert 0.4 < float(jnp.mean(dropped == 0)) < 0.6
  np.testing.assert_allclose(dropped[dropped != 0], 2.0)
  np.testing.assert_array_equal(model.dropout(x, 0.5, None), x)


def test_model_from_a_config_recorded_before_model_unroll_runs_the_python_loop():
  recorded = tiny_config().model
  del recorded["unroll"]
  assert model.model_from_config(recorded, 7).unroll == 0
  config = tiny_config()
  config.model.unroll = 2
  assert model.model_from_config(config.model, 7).unroll == 2


@pytest.mark.parametrize(
  ("mode", "layers", "batch"), [("last", 1, 12), ("all", 2, 12), ("last", 1, 4)]
)
def test_inference_reads_token_tables_and_computes_the_training_logits(
  monkeypatch, mode, layers, batch
):
  """Without a dropout key (evaluation, decoding) the first layer's first steps come from
  per-token tables when the vocabulary is no larger than the batch; the logits are those of
  the training path at dropout 0."""
  calls, original = [], lstm.window_recurrence
  monkeypatch.setattr(lstm, "window_recurrence", lambda *a: calls.append(1) or original(*a))
  lm = model.LSTMLanguageModel(10, embed_dim=8, hidden=16, layers=layers, mode=mode)
  params = model.init_params(lm, jax.random.key(0), 3)
  tokens_BxT = jax.random.randint(jax.random.key(1), (batch, 3), 0, 10)
  lengths_B = jnp.minimum(jnp.arange(batch) % 3 + 1, 3)
  training = lm.apply({"params": params}, tokens_BxT, 0.0, jax.random.key(2), lengths_B=lengths_B)
  assert not calls
  inference = lm.apply({"params": params}, tokens_BxT, lengths_B=lengths_B)
  assert len(calls) == (1 if batch >= 10 else 0)
  tol = 1e-6 * rounding_slack()
  np.testing.assert_allclose(inference, training, rtol=tol, atol=tol / 10)
