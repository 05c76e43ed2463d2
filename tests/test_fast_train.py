"""The training speed-ups keep the math: flax's LSTM cell, and chunked vmaps equal plain ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from research import data, model, train


class FlaxReference(nn.Module):
  """The model as written with flax's own layers (nn.Embed, nn.RNN(nn.OptimizedLSTMCell))."""

  vocab_size: int
  layers: int
  mode: str

  @nn.compact
  def __call__(self, tokens_BxT, dropout_rate=0.0, dropout_rng=None, lengths_B=None):
    h_BxTxH = nn.Embed(self.vocab_size, 8)(tokens_BxT)
    for layer in range(self.layers):
      cell = nn.OptimizedLSTMCell(16, name="lstm" if layer == 0 else f"lstm_{layer}")
      (_, h_BxH), h_BxTxH = nn.RNN(cell, return_carry=True)(h_BxTxH, seq_lengths=lengths_B)
    h = h_BxH if self.mode == "last" else h_BxTxH
    return nn.Dense(self.vocab_size)(model.dropout(h, dropout_rate, dropout_rng))


@pytest.mark.parametrize(
  ("mode", "layers", "vocab"), [("last", 1, 12), ("all", 2, 12), ("last", 1, 300)]
)
def test_model_matches_flax_lstm_cell(mode, layers, vocab):
  ours = model.LSTMLanguageModel(vocab, embed_dim=8, hidden=16, layers=layers, mode=mode)
  reference = FlaxReference(vocab, layers, mode)
  tokens_BxT = jax.random.randint(jax.random.key(0), (6, 5), 0, vocab)
  params = model.init_params(ours, jax.random.key(1), 5)
  ref_params = reference.init(jax.random.key(1), tokens_BxT)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params)

  lengths_B = jnp.asarray([1, 2, 3, 4, 5, 5])
  for args in [(tokens_BxT,), (tokens_BxT, 0.0, None, lengths_B)]:
    np.testing.assert_allclose(
      ours.apply({"params": params}, *args),
      reference.apply({"params": params}, *args),
      rtol=1e-5,
      atol=1e-6,
    )

  def loss(m):
    return lambda p: jnp.sum(m.apply({"params": p}, tokens_BxT, 0.3, jax.random.key(2)) ** 2)

  grads, ref_grads = jax.grad(loss(ours))(params), jax.grad(loss(reference))(params)
  leaves = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)
  for a, b in zip(*leaves, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_seeds", [17, 20])  # 17: the last chunk is padded.
def test_seed_chunks_equal_one_vmap(monkeypatch, num_seeds):
  config = tiny_config()
  config.train.epochs = 2
  dataset = data.dataset_from_config(config.data)
  hparams = train.Hparams(jnp.float32(1e-2), jnp.float32(0.2))
  keys = jax.vmap(jax.random.key)(jnp.arange(num_seeds))

  def run():
    trainer = train.make_train(config, dataset)
    return jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(keys, hparams)

  whole = run()
  monkeypatch.setattr(train, "CPU_CHUNK_BYTES", 1)  # The smallest chunks: 8 seeds or fewer.
  chunked = run()
  np.testing.assert_allclose(chunked.loss_E, whole.loss_E, rtol=1e-6, atol=1e-7)
  assert chunked.state.epoch.tolist() == [2] * num_seeds
  leaves = jax.tree_util.tree_leaves(chunked.state), jax.tree_util.tree_leaves(whole.state)
  for a, b in zip(*leaves, strict=True):
    if jnp.issubdtype(a.dtype, jnp.number):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
