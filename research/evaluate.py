"""Per-seed evaluation of a trained state: training-set metrics and each decoding's metrics.

Pure and per seed, like training: make_evaluate(...) -> evaluate(state); the study vmaps it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from research import config_lib, metrics
from research import data as data_lib
from research import generate as generate_lib
from research import model as model_lib
from research import train as train_lib

WINDOW_CHUNK = 4096  # Training windows evaluated at once (the memory planner may pick fewer).


@struct.dataclass
class EvalMetrics:
  """Decoding-independent per-seed metrics, on every training window (no dropout)."""

  final_loss: jax.Array
  accuracy: jax.Array
  entropy: jax.Array
  argmax_constant: jax.Array
  probe: jax.Array  # Argmax next token right after the first prompt (the blog's "the").
  diverged: jax.Array


@struct.dataclass
class DecodeMetrics:
  """Per-seed metrics of one decoding of every prompt."""

  seed_collapsed: jax.Array
  collapsed_fraction: jax.Array  # Share of prompts whose continuation collapsed.
  collapse_token: jax.Array  # Last token of the probe continuation.
  tail_period_P: jax.Array
  distinct_1: jax.Array
  distinct_2: jax.Array
  seq_rep_4: jax.Array
  top_token_share: jax.Array
  probe_continuation_L: jax.Array


@struct.dataclass
class Evaluation:
  """One seed's evaluation: training-set metrics, and DecodeMetrics by decoding name."""

  train: EvalMetrics
  decodings: dict


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The prompts one evaluation continues, and how many training contexts there were."""

  ids: list  # Encoded prompts: config.generate.prompts, then the chosen training contexts.
  contexts: int  # Distinct training contexts in the corpus.
  contexts_used: int  # Of those, continued (generate.max_prompts caps them).


def choose_prompts(config, dataset: data_lib.Dataset) -> Prompts:
  """config.generate.prompts, then distinct training contexts, at most generate.max_prompts.

  When the contexts do not all fit, an evenly spaced subset in first-appearance order is taken:
  deterministic, and spread over the whole corpus.
  """
  gen = config.generate
  ids = [dataset.encode(p) for p in gen.prompts]
  for prompt, encoded in zip(gen.prompts, ids, strict=True):
    if len(encoded) == 0:
      raise data_lib.DataError(f"generate.prompts: prompt {prompt!r} has no tokens")
  contexts_CxT = dataset.distinct_contexts_CxT if gen.include_training_contexts else []
  room = max(gen.max_prompts - len(ids), 0)
  chosen = np.arange(len(contexts_CxT))
  if len(chosen) > room:
    chosen = np.unique(np.linspace(0, len(chosen) - 1, room).round().astype(int)) if room else []
  ids.extend(contexts_CxT[i] for i in chosen)
  return Prompts(ids=ids, contexts=len(dataset.distinct_contexts_CxT), contexts_used=len(chosen))


def decode_metrics(x_PxL, vocab_size: int) -> DecodeMetrics:
  """Collapse and diversity of one seed's continuations (prompts x generated tokens)."""
  return DecodeMetrics(
    seed_collapsed=metrics.seed_collapsed(x_PxL),
    collapsed_fraction=jnp.mean(metrics.collapsed(x_PxL)),
    collapse_token=x_PxL[0, -1],
    tail_period_P=metrics.tail_period(x_PxL),
    distinct_1=metrics.distinct_n(x_PxL, 1),
    distinct_2=metrics.distinct_n(x_PxL, 2),
    seq_rep_4=metrics.seq_rep_n(x_PxL, 4),
    top_token_share=metrics.top_token_share(x_PxL, vocab_size),
    probe_continuation_L=x_PxL[0],
  )


@struct.dataclass
class _WindowSums:
  """Running sums of the training-set metrics over chunks of windows."""

  loss: jax.Array
  correct: jax.Array
  entropy: jax.Array
  first_pred: jax.Array
  constant: jax.Array


def _window_metrics(apply, inputs_NxT, targets, chunk: int):
  """(final_loss, accuracy, entropy, argmax_constant) over every training window.

  In chunks of `chunk` windows when there are more, so memory does not grow with the corpus
  (logits are chunk x V at a time); with fewer windows the whole set in one pass.
  """
  num = inputs_NxT.shape[0]
  if num <= chunk:
    logits = apply(inputs_NxT)
    logits_NxV = logits if logits.ndim == 2 else logits[:, -1]  # "all": the last position.
    targets_N = targets if targets.ndim == 1 else targets[:, -1]
    return (
      train_lib.cross_entropy(logits, targets, jnp.ones(num)),
      jnp.mean(jnp.argmax(logits_NxV, -1) == targets_N),
      metrics.mean_entropy(logits_NxV),
      metrics.argmax_constant(logits_NxV),
    )
  steps = -(-num // chunk)
  pad = steps * chunk - num
  inputs = jnp.pad(inputs_NxT, ((0, pad), (0, 0))).reshape(steps, chunk, -1)
  targets = jnp.pad(targets, ((0, pad),) + ((0, 0),) * (targets.ndim - 1))
  targets = targets.reshape(steps, chunk, *targets.shape[1:])
  valid = (jnp.arange(steps * chunk) < num).reshape(steps, chunk)

  def step(sums: _WindowSums, xs):
    inputs_BxT, targets_B, valid_B = xs
    logits = apply(inputs_BxT)
    logits_BxV = logits if logits.ndim == 2 else logits[:, -1]
    last_B = targets_B if targets_B.ndim == 1 else targets_B[:, -1]
    weights_B = valid_B.astype(logits.dtype)
    is_label = targets_B[..., None] == jnp.arange(logits.shape[-1])
    ce = jax.nn.logsumexp(logits, -1) - jnp.sum(jnp.where(is_label, logits, 0.0), -1)
    ce_B = ce if ce.ndim == 1 else ce.mean(-1)
    logp_BxV = jax.nn.log_softmax(logits_BxV, -1)
    pred_B = jnp.argmax(logits_BxV, -1)
    first = jnp.where(sums.first_pred < 0, pred_B[0], sums.first_pred)
    return _WindowSums(
      loss=sums.loss + jnp.sum(ce_B * weights_B),
      correct=sums.correct + jnp.sum((pred_B == last_B) * weights_B),
      entropy=sums.entropy + jnp.sum(-jnp.sum(jnp.exp(logp_BxV) * logp_BxV, -1) * weights_B),
      first_pred=first,
      constant=sums.constant & jnp.all((pred_B == first) | ~valid_B),
    ), None

  zero = jnp.zeros((), jnp.zeros(()).dtype)
  start = _WindowSums(zero, zero, zero, jnp.asarray(-1), jnp.asarray(True))
  sums, _ = jax.lax.scan(step, start, (inputs, targets, valid))
  return sums.loss / num, sums.correct / num, sums.entropy / num, sums.constant


def make_evaluate(
  config,
  dataset: data_lib.Dataset,
  decodings: tuple[config_lib.Decoding, ...],
  window_chunk: int = WINDOW_CHUNK,
):
  """evaluate(state) -> Evaluation, for one trained seed; windows in chunks of window_chunk."""
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  inputs_NxT, targets = train_lib.split_window(jnp.asarray(dataset.windows_NxW), config.model.mode)
  prompts_PxT, lengths_P = generate_lib.prepare_prompts(
    choose_prompts(config, dataset).ids, dataset.context_length
  )
  generators = [(d.name, generate_lib.make_generate(model, d.generate)) for d in decodings]
  vocab_size = dataset.vocab_size

  def evaluate(state: train_lib.TrainState) -> Evaluation:
    def apply(inputs_BxT):
      return model.apply({"params": state.params}, inputs_BxT)

    final_loss, accuracy, entropy, constant = _window_metrics(
      apply, inputs_NxT, targets, window_chunk
    )
    decoded = {}
    for index, (name, generate) in enumerate(generators):
      key = jax.random.fold_in(jax.random.fold_in(state.key, 2), index)
      gen = generate(state.params, prompts_PxT, lengths_P, key)
      if index == 0:  # The probe's next-token logits are the same under every decoding.
        probe = jnp.argmax(gen.first_logits_PxV[0])
      decoded[name] = decode_metrics(gen.tokens_PxL, vocab_size)
    # LSTM gates saturate, so even absurd step sizes rarely overflow: a loss far above the
    # untrained log(V) counts as diverged too.
    exploded = ~(final_loss <= config.train.divergence_factor * jnp.log(vocab_size))
    evals = EvalMetrics(
      final_loss=final_loss,
      accuracy=accuracy,
      entropy=entropy,
      argmax_constant=constant,
      probe=probe,
      diverged=state.diverged | exploded,
    )
    return Evaluation(train=evals, decodings=decoded)

  return evaluate
