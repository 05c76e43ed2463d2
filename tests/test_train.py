"""The pure vmappable training loop, and its seed-chunked vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from research import data, model, train


def blog_config(corpus="blog_varied", lr=1e-3, dropout=0.2, epochs=3):
  config = tiny_config()
  config.data.corpus = corpus
  config.train.learning_rate = lr
  config.model.dropout = dropout
  config.train.epochs = epochs
  return config


def setup(config):
  dataset = data.dataset_from_config(config.data)
  hparams = train.Hparams(
    learning_rate=jnp.asarray(config.train.learning_rate, jnp.float32),
    dropout=jnp.asarray(config.model.dropout, jnp.float32),
  )
  return dataset, train.make_train(config, dataset), hparams


def full_loss(config, dataset, params):
  lm = model.model_from_config(config.model, dataset.vocab_size)
  inputs, targets = train.split_window(jnp.asarray(dataset.windows_NxW), config.model.mode)
  logits = lm.apply({"params": params}, inputs)
  return float(train.cross_entropy(logits, targets, jnp.ones(inputs.shape[0])))


def test_one_step_changes_every_parameter():
  config = blog_config()
  dataset, trainer, hparams = setup(config)
  state = trainer.init(jax.random.key(0), hparams)
  lm = model.model_from_config(config.model, dataset.vocab_size)
  tx = train.make_optimizer(config.train, hparams.learning_rate)
  inputs, targets = train.split_window(jnp.asarray(dataset.windows_NxW[:32]), "last")
  batch = train.Batch(inputs_BxT=inputs, targets=targets, weights_B=jnp.ones(32))
  step = jax.jit(functools.partial(train.train_step, model=lm, tx=tx))
  new, loss = step(state, batch, jax.random.key(1))
  assert np.isfinite(float(loss))
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree_util.tree_leaves(changed)), changed


def test_loss_falls_on_the_repetitive_text():
  config = blog_config(corpus="blog_repetitive", lr=1e-2, dropout=0.0, epochs=30)
  dataset, trainer, hparams = setup(config)
  result = jax.jit(trainer.train)(jax.random.key(0), hparams)
  loss_E = np.asarray(result.loss_E)
  assert loss_E[0] > 1.5
  assert loss_E[-1] < 0.5 * loss_E[0]
  assert full_loss(config, dataset, result.state.params) < 0.5 * loss_E[0]
  assert not bool(result.state.diverged)


def test_vmapped_seed_i_equals_single_run_of_seed_i():
  config = blog_config()
  _, trainer, hparams = setup(config)
  seeds = jnp.arange(5)
  batched = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(
    jax.vmap(jax.random.key)(seeds), hparams
  )
  single = jax.jit(trainer.train)
  for i in (0, 3):
    one = single(jax.random.key(i), hparams)
    np.testing.assert_allclose(batched.loss_E[i], one.loss_E, rtol=1e-5, atol=1e-6)
    leaves = (
      jax.tree_util.tree_leaves(batched.state.params),
      jax.tree_util.tree_leaves(one.state.params),
    )
    for a, b in zip(*leaves, strict=True):
      np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5)


def test_same_key_same_result_and_different_keys_differ():
  config = blog_config()
  _, trainer, hparams = setup(config)
  run = jax.jit(trainer.train)
  a, b, c = (run(jax.random.key(s), hparams) for s in (7, 7, 8))
  np.testing.assert_array_equal(a.loss_E, b.loss_E)
  assert not np.allclose(a.loss_E, c.loss_E)


def test_epoch_chunks_equal_one_scan():
  config = blog_config(epochs=4)
  _, trainer, hparams = setup(config)
  whole = jax.jit(trainer.train)(jax.random.key(0), hparams)
  state = trainer.init(jax.random.key(0), hparams)
  state, first = trainer.run_epochs(state, 1)
  state, rest = trainer.run_epochs(state, 3)
  np.testing.assert_allclose(jnp.concatenate([first, rest]), whole.loss_E, rtol=1e-6)
  assert int(state.epoch) == 4


def test_vmapped_hparams_equal_separate_runs():
  config = blog_config()
  _, trainer, _ = setup(config)
  lrs, dropouts = jnp.asarray([1e-3, 1e-2]), jnp.asarray([0.0, 0.5])
  grid = jax.jit(jax.vmap(trainer.train))(
    jax.vmap(jax.random.key)(jnp.zeros(2, jnp.int32)), train.Hparams(lrs, dropouts)
  )
  for i in range(2):
    one = jax.jit(trainer.train)(jax.random.key(0), train.Hparams(lrs[i], dropouts[i]))
    np.testing.assert_allclose(grid.loss_E[i], one.loss_E, rtol=1e-5, atol=1e-6)
  assert not np.allclose(grid.loss_E[0], grid.loss_E[1])


def test_partial_last_batch_is_weighted_like_keras():
  # 5 windows, batch 4: the second minibatch holds one real row and three padding rows.
  config = blog_config()
  config.train.batch_size = 4
  config.train.shuffle = False
  config.model.dropout = 0.0
  dataset = data.make_dataset("abcdefghi", "char", 3)
  assert dataset.windows_NxW.shape[0] == 6
  dataset = data.Dataset("char", dataset.vocab, dataset.tokens, dataset.windows_NxW[:5])
  trainer = train.make_train(config, dataset)
  hparams = train.Hparams(jnp.float32(1e-3), jnp.float32(0.0))
  state = trainer.init(jax.random.key(0), hparams)
  _, loss_E = trainer.run_epochs(state, 1)
  # Reference: two plain steps on rows 0-3 and row 4 alone, epoch loss weighted by rows.
  lm = model.model_from_config(config.model, dataset.vocab_size)
  tx = train.make_optimizer(config.train, hparams.learning_rate)
  step = jax.jit(functools.partial(train.train_step, model=lm, tx=tx))
  losses = []
  for rows in (slice(0, 4), slice(4, 5)):
    inputs, targets = train.split_window(jnp.asarray(dataset.windows_NxW[rows]), "last")
    batch = train.Batch(inputs, targets, jnp.ones(inputs.shape[0]))
    state, loss = step(state, batch, jax.random.key(0))
    losses.append(float(loss))
  assert float(loss_E[0]) == pytest.approx((4 * losses[0] + losses[1]) / 5, rel=1e-5)


def test_divergence_is_flagged_not_raised():
  config = blog_config(lr=3e38, dropout=0.0, epochs=3)
  config.train.optimizer = "sgd"
  _, trainer, hparams = setup(config)
  result = jax.jit(trainer.train)(jax.random.key(0), hparams)
  assert bool(result.state.diverged)


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


def test_chunked_vmap_traces_once_and_equals_vmap():
  """programs.per_seed's chunking: one trace of fn (a custom_vmap traces it twice), the chunks'
  loop in the program on a CPU (none elsewhere: vmap is left alone), and the plain vmap's
  values, the padded last chunk cut off."""
  traces = []

  def fn(x_3, key):
    traces.append(1)
    return jnp.tanh(x_3 * 2.0 + 1.0) + jax.random.uniform(key)

  x_Sx3 = jnp.arange(20 * 3, dtype=jnp.float32).reshape(20, 3) / 10
  keys = jax.vmap(jax.random.key)(jnp.arange(20))
  chunked = jax.jit(train.chunked_vmap(fn, 1))  # Chunks of 8: 8, 8 and 4 padded to 8.
  out = chunked(x_Sx3, keys)
  assert len(traces) == 1
  whiles = [
    jax.jit(f).lower(x_Sx3, keys).as_text().count("stablehlo.while")
    for f in (train.chunked_vmap(fn, 1), jax.vmap(fn))
  ]
  assert whiles[0] == whiles[1] + (jax.default_backend() == "cpu")  # The chunks' loop.
  np.testing.assert_allclose(out, jax.vmap(fn)(x_Sx3, keys), rtol=1e-6)
  assert chunked.__name__ == "fn"  # The program's name, as jax.vmap's: the cache key is kept.
