"""Per-seed evaluation of a trained state: training-set metrics and each decoding's metrics.

Pure and per seed, like training: make_evaluate(...) -> evaluate(state); the study vmaps it.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from research import config_lib, metrics
from research import data as data_lib
from research import generate as generate_lib
from research import model as model_lib
from research import train as train_lib


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


def prompt_ids(config, dataset: data_lib.Dataset) -> list[np.ndarray]:
  """Encoded prompts: config.generate.prompts, then every distinct training context."""
  ids = [dataset.encode(p) for p in config.generate.prompts]
  for prompt, encoded in zip(config.generate.prompts, ids, strict=True):
    if len(encoded) == 0:
      raise data_lib.DataError(f"generate.prompts: prompt {prompt!r} has no tokens")
  if config.generate.include_training_contexts:
    ids.extend(dataset.distinct_contexts_CxT)
  return ids


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


def make_evaluate(config, dataset: data_lib.Dataset, decodings: tuple[config_lib.Decoding, ...]):
  """evaluate(state) -> Evaluation, for one trained seed."""
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  inputs_NxT, targets = train_lib.split_window(jnp.asarray(dataset.windows_NxW), config.model.mode)
  prompts_PxT, lengths_P = generate_lib.prepare_prompts(
    prompt_ids(config, dataset), dataset.context_length
  )
  generators = [(d.name, generate_lib.make_generate(model, d.generate)) for d in decodings]
  vocab_size = dataset.vocab_size

  def evaluate(state: train_lib.TrainState) -> Evaluation:
    logits = model.apply({"params": state.params}, inputs_NxT)
    ones_N = jnp.ones(inputs_NxT.shape[0])
    logits_NxV = logits if logits.ndim == 2 else logits[:, -1]  # "all": the last position.
    targets_N = targets if targets.ndim == 1 else targets[:, -1]
    decoded = {}
    for index, (name, generate) in enumerate(generators):
      key = jax.random.fold_in(jax.random.fold_in(state.key, 2), index)
      gen = generate(state.params, prompts_PxT, lengths_P, key)
      if index == 0:  # The probe's next-token logits are the same under every decoding.
        probe = jnp.argmax(gen.first_logits_PxV[0])
      decoded[name] = decode_metrics(gen.tokens_PxL, vocab_size)
    final_loss = train_lib.cross_entropy(logits, targets, ones_N)
    # LSTM gates saturate, so even absurd step sizes rarely overflow: a loss far above the
    # untrained log(V) counts as diverged too.
    exploded = ~(final_loss <= config.train.divergence_factor * jnp.log(vocab_size))
    evals = EvalMetrics(
      final_loss=final_loss,
      accuracy=jnp.mean(jnp.argmax(logits_NxV, -1) == targets_N),
      entropy=metrics.mean_entropy(logits_NxV),
      argmax_constant=metrics.argmax_constant(logits_NxV),
      probe=probe,
      diverged=state.diverged | exploded,
    )
    return Evaluation(train=evals, decodings=decoded)

  return evaluate
