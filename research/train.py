"""Pure, vmappable training: make_train(config, dataset) -> Trainer(init, run_epochs, train)."""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from research import data as data_lib
from research import model as model_lib
from research import schema

OPTIMIZERS = schema.OPTIMIZERS
# Per-seed state bytes (params, optimizer moments) per chunk of a vmapped CPU run; see
# seed_chunked. On the 2-core Intel Xeon (2 MiB of L2 a core), 2 MiB (the blog's model: 12
# seeds, cut to 8) trains 16-21% faster than 6 MiB (32 seeds) in a process pinned to one core,
# as --workers runs them; one process left to float over both cores trains 6-11% slower
# (bench/README.md, "Cores"). On the earlier 2-core EPYC, 4-8 MiB measured fastest.
CPU_CHUNK_BYTES = 2 << 20


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

  def to_saved(self) -> "TrainState":
    """The same state with the typed PRNG key as raw uint32 data, as checkpoints store it."""
    return self.replace(key=jax.random.key_data(self.key))

  def from_saved(self) -> "TrainState":
    """Inverse of to_saved."""
    return self.replace(key=jax.random.wrap_key_data(self.key))


@struct.dataclass
class TrainResult:
  state: TrainState
  loss_E: jax.Array  # Per-epoch training loss (sample-weighted mean of minibatch losses).


@struct.dataclass
class EpochPlan:
  """One epoch's minibatches, as Keras' fit(shuffle=True) forms them, and its dropout key."""

  windows_KxBxW: jax.Array  # Shuffled windows; the last minibatch is padded with window 0.
  weights_KxB: jax.Array  # 1 for real rows, 0 for padding.
  dropout_key: jax.Array  # Step s uses fold_in(dropout_key, s).


def plan_epoch(key, epoch, windows_NxW, batch_size: int, shuffle: bool) -> EpochPlan:
  """The minibatches of one seed's epoch: a pure function of (key, epoch), so chunking is exact."""
  num_windows = windows_NxW.shape[0]
  batch_size = min(batch_size, num_windows)
  steps = math.ceil(num_windows / batch_size)
  num_padded = steps * batch_size
  epoch_key = jax.random.fold_in(jax.random.fold_in(key, 1), epoch)
  perm_key, dropout_key = jax.random.split(epoch_key)
  order_N = jax.random.permutation(perm_key, num_windows) if shuffle else jnp.arange(num_windows)
  order_N = jnp.pad(order_N, (0, num_padded - num_windows))
  weights_KxB = (jnp.arange(num_padded) < num_windows).astype(jnp.float32)
  return EpochPlan(
    windows_KxBxW=windows_NxW[order_N].reshape(steps, batch_size, -1),  # One gather an epoch.
    weights_KxB=weights_KxB.reshape(steps, batch_size),
    dropout_key=dropout_key,
  )


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Pure per-seed functions: vmap them over keys and Hparams."""

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
  """Weighted mean cross-entropy; "all"-mode logits average over positions first.

  optax.softmax_cross_entropy_with_integer_labels' math, with the label logit picked by a
  one-hot select rather than a gather (whose gradient, a scatter, is slow when vmapped).
  """
  is_label = targets[..., None] == jnp.arange(logits.shape[-1])
  label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
  ce = jax.nn.logsumexp(logits, axis=-1) - label_logit
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


def _bytes_per_row(tree, rows: int) -> float:
  leaves = jax.tree_util.tree_leaves(tree)
  numeric = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.number)]
  return sum(x.size * x.dtype.itemsize for x in numeric) / rows


def _chunk_rows(total: int, target: int) -> int:
  """Rows per chunk near target: an exact divisor of total if one is close (no padding)."""
  for size in range(target, target // 2, -1):
    if total % size == 0:
      return size
  return math.ceil(total / math.ceil(total / target))  # Balanced; the last chunk is padded.


def chunked_vmap(fn: Callable, chunk_bytes: int) -> Callable:
  """jax.vmap(fn) over every argument's leading (seed) axis, on a CPU in chunks of about
  chunk_bytes of arguments, one chunk after another (seed_chunked says why)."""

  @functools.wraps(fn)  # As jax.vmap: the program keeps fn's name (and its cache key).
  def run(*args):
    axis_size = jax.tree_util.tree_leaves(args)[0].shape[0]
    chunk = max(8, int(chunk_bytes // max(_bytes_per_row(args, axis_size), 1.0)))
    if jax.default_backend() != "cpu" or axis_size <= chunk:
      return jax.vmap(fn)(*args)
    size = _chunk_rows(axis_size, chunk)
    chunks = math.ceil(axis_size / size)
    if chunks * size > axis_size:  # Pad the last chunk with copies of the last row.
      rows = jnp.minimum(jnp.arange(chunks * size), axis_size - 1)
      args = jax.tree_util.tree_map(lambda x: x[rows], args)
    args = jax.tree_util.tree_map(lambda x: x.reshape(chunks, size, *x.shape[1:]), args)
    out = jax.lax.map(lambda a: jax.vmap(fn)(*a), args)
    return jax.tree_util.tree_map(lambda y: y.reshape(chunks * size, *y.shape[2:])[:axis_size], out)

  return run


def seed_chunked(fn: Callable, chunk_bytes: int) -> Callable:
  """fn, except that under jax.vmap on a CPU it runs chunks of seeds in turn (chunked_vmap).

  vmapping all seeds at once streams every seed's state through memory at every step; a chunk
  of about chunk_bytes of state stays in cache for its whole run, and XLA's CPU matmuls run
  on one core whatever the batch, so nothing is lost. Each seed's math is unchanged. On other
  backends vmap is left alone. With several devices, vmap inside a shard_map
  (programs.per_seed), so the chunks are cut from each device's own seeds. A custom_vmap traces
  fn twice (its primal, then the batching rule): programs that vmap in one known place call
  chunked_vmap instead (programs.per_seed).
  """
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = jax.tree_util.tree_map(
      lambda x, batched: x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)),
      args,
      tuple(in_batched),
    )
    out = chunked_vmap(fn, chunk_bytes)(*args)
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return wrapped


def make_train(config, dataset: data_lib.Dataset) -> Trainer:
  """Builds pure per-seed training functions; vmap them over keys and Hparams."""
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  mode = config.model.mode
  windows_NxW = jnp.asarray(dataset.windows_NxW)

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
    plan = plan_epoch(
      state.key, state.epoch, windows_NxW, config.train.batch_size, config.train.shuffle
    )

    def step(state, xs):
      windows_BxW, weights_B, index = xs
      inputs_BxT, targets = split_window(windows_BxW, mode)
      batch = Batch(inputs_BxT=inputs_BxT, targets=targets, weights_B=weights_B)
      rng = jax.random.fold_in(plan.dropout_key, index)
      return train_step(state, batch, rng, model=model, tx=tx)

    steps = plan.weights_KxB.shape[0]
    xs = (plan.windows_KxBxW, plan.weights_KxB, jnp.arange(steps))
    state, loss_K = jax.lax.scan(step, state, xs)
    # Keras' epoch loss: minibatch losses weighted by their number of real rows.
    epoch_loss = jnp.sum(loss_K * plan.weights_KxB.sum(axis=1)) / plan.weights_KxB.sum()
    return state.replace(epoch=state.epoch + 1), epoch_loss

  def run_epochs_one(state: TrainState, num_epochs: int):
    state, loss_E = jax.lax.scan(run_epoch, state, None, length=num_epochs)
    return state.replace(diverged=state.diverged | ~params_finite(state.params)), loss_E

  def run_epochs(state: TrainState, num_epochs: int):
    run = seed_chunked(functools.partial(run_epochs_one, num_epochs=num_epochs), CPU_CHUNK_BYTES)
    return run(state)

  def train(key, hparams: Hparams) -> TrainResult:
    state, loss_E = run_epochs(init(key, hparams), config.train.epochs)
    return TrainResult(state=state, loss_E=loss_E)

  return Trainer(init=init, run_epochs=run_epochs, train=train)
