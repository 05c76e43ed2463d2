"""Pure, vmappable training: make_train(config, dataset) -> Trainer(init, run_epochs, train)."""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from research import data as data_lib
from research import model as model_lib

OPTIMIZERS = ("adam", "sgd", "rmsprop")


@struct.dataclass
class Hparams:
  """Hyperparameters that change no shape: traced, so a grid of them can be vmapped."""

  learning_rate: jax.Array
  dropout: jax.Array


@struct.dataclass
class Batch:
  inputs_BxT: jax.Array
  targets: jax.Array  # B ("last") or BxT ("all").
  weights_B: jax.Array  # 0 for rows that pad the final, partial minibatch.


@struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  key: jax.Array  # Per-seed key; per-epoch keys are fold_in(key, epoch), so chunking is exact.
  epoch: jax.Array
  hparams: Hparams
  diverged: jax.Array  # Any non-finite loss so far.


@struct.dataclass
class TrainResult:
  state: TrainState
  loss_E: jax.Array  # Per-epoch training loss (sample-weighted mean of minibatch losses).


class Trainer(NamedTuple):
  init: Callable[[jax.Array, Hparams], TrainState]
  run_epochs: Callable[[TrainState, int], tuple[TrainState, jax.Array]]
  train: Callable[[jax.Array, Hparams], TrainResult]


def make_optimizer(train_cfg, learning_rate) -> optax.GradientTransformation:
  """The optimizer, with a (possibly traced) learning rate."""
  if train_cfg.optimizer == "adam":
    # Keras' Adam defaults (the blog's): eps=1e-7, not optax's 1e-8.
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=train_cfg.adam_eps)
  if train_cfg.optimizer == "sgd":
    return optax.sgd(learning_rate)
  if train_cfg.optimizer == "rmsprop":
    return optax.rmsprop(learning_rate)
  raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {train_cfg.optimizer!r}")


def cross_entropy(logits, targets, weights_B):
  """Weighted mean cross-entropy; "all"-mode logits average over positions first."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  ce_B = ce if ce.ndim == 1 else ce.mean(axis=-1)
  return jnp.sum(ce_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def split_window(windows_BxW, mode: str):
  inputs_BxT = windows_BxW[:, :-1]
  targets = windows_BxW[:, -1] if mode == "last" else windows_BxW[:, 1:]
  return inputs_BxT, targets


def train_step(state: TrainState, batch: Batch, dropout_rng, *, model, tx):
  """One Adam step on one minibatch; returns the new state and the minibatch loss."""

  def loss_fn(params):
    logits = model.apply(
      {"params": params}, batch.inputs_BxT, state.hparams.dropout, dropout_rng=dropout_rng
    )
    return cross_entropy(logits, batch.targets, batch.weights_B)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  diverged = state.diverged | ~jnp.isfinite(loss)
  return state.replace(params=params, opt_state=opt_state, diverged=diverged), loss


def params_finite(params) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(params)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train(config, dataset: data_lib.Dataset) -> Trainer:
  """Builds pure per-seed training functions; vmap them over keys and Hparams."""
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  mode = config.model.mode
  windows_NxW = jnp.asarray(dataset.windows_NxW)
  num_windows = windows_NxW.shape[0]
  batch_size = min(config.train.batch_size, num_windows)
  steps = math.ceil(num_windows / batch_size)
  num_padded = steps * batch_size
  # Which rows of the padded epoch are real: the last minibatch may be partial, as in Keras.
  weights_SxB = (jnp.arange(num_padded) < num_windows).astype(jnp.float32)
  weights_SxB = weights_SxB.reshape(steps, batch_size)
  counts_S = weights_SxB.sum(axis=1)

  def init(key, hparams: Hparams) -> TrainState:
    params = model_lib.init_params(model, jax.random.fold_in(key, 0), dataset.context_length)
    tx = make_optimizer(config.train, hparams.learning_rate)
    return TrainState(
      params=params,
      opt_state=tx.init(params),
      key=key,
      epoch=jnp.zeros((), jnp.int32),
      hparams=hparams,
      diverged=jnp.zeros((), bool),
    )

  def run_epoch(state: TrainState, _):
    tx = make_optimizer(config.train, state.hparams.learning_rate)
    epoch_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.epoch)
    perm_key, dropout_key = jax.random.split(epoch_key)
    if config.train.shuffle:
      order_N = jax.random.permutation(perm_key, num_windows)
    else:
      order_N = jnp.arange(num_windows)
    order_SxB = jnp.pad(order_N, (0, num_padded - num_windows)).reshape(steps, batch_size)

    def step(state, xs):
      order_B, weights_B, index = xs
      inputs_BxT, targets = split_window(windows_NxW[order_B], mode)
      batch = Batch(inputs_BxT=inputs_BxT, targets=targets, weights_B=weights_B)
      rng = jax.random.fold_in(dropout_key, index)
      return train_step(state, batch, rng, model=model, tx=tx)

    state, loss_S = jax.lax.scan(step, state, (order_SxB, weights_SxB, jnp.arange(steps)))
    epoch_loss = jnp.sum(loss_S * counts_S) / num_windows
    return state.replace(epoch=state.epoch + 1), epoch_loss

  def run_epochs(state: TrainState, num_epochs: int):
    state, loss_E = jax.lax.scan(run_epoch, state, None, length=num_epochs)
    return state.replace(diverged=state.diverged | ~params_finite(state.params)), loss_E

  def train(key, hparams: Hparams) -> TrainResult:
    state, loss_E = run_epochs(init(key, hparams), config.train.epochs)
    return TrainResult(state=state, loss_E=loss_E)

  return Trainer(init=init, run_epochs=run_epochs, train=train)
