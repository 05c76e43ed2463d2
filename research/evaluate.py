"""Per-seed evaluation of a state: training-set metrics, each decoding's metrics, dynamics.

Pure and per seed, like training: make_evaluate(...) -> Evaluators(final, dynamics), functions
of one TrainState; the study vmaps them. `final` runs once after training; `dynamics`, a cheaper
subset (greedy only), at every evaluation point during training.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
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
  unigram_kl: jax.Array  # Mean KL(model || corpus unigram) over distinct training contexts.
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
  # The attractor census (metrics.attractor_census); NaN for sampling decodings.
  distinct_cycles: jax.Array
  largest_basin_share: jax.Array
  largest_is_fixed_point: jax.Array
  unresolved_share: jax.Array


@struct.dataclass
class Evaluation:
  """One seed's evaluation: training-set metrics, and DecodeMetrics by decoding name."""

  train: EvalMetrics
  decodings: dict


@struct.dataclass
class Dynamics:
  """What is measured at each evaluation point during training (greedy decoding)."""

  collapsed: jax.Array  # The headline definition, on the final evaluation's prompts.
  argmax_constant: jax.Array
  loss: jax.Array  # Training-set loss without dropout.
  unigram_kl: jax.Array
  top_token_share: jax.Array
  collapse_token: jax.Array  # Last token of the probe continuation.


@dataclasses.dataclass(frozen=True)
class Evaluators:
  """Per-seed functions of a TrainState."""

  final: callable  # -> Evaluation
  dynamics: callable  # -> Dynamics


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


def decode_metrics(x_PxL, vocab_size: int, greedy: bool, context_length: int) -> DecodeMetrics:
  """Collapse, diversity and (greedy only) attractors of one seed's continuations."""
  if greedy:
    census = metrics.attractor_census(x_PxL, context_length)
    cycles = census.distinct_cycles.astype(jnp.float32)
    basin = census.largest_basin_share.astype(jnp.float32)
    fixed = census.largest_is_fixed_point.astype(jnp.float32)
    unresolved = census.unresolved_share.astype(jnp.float32)
  else:  # Sampling is no deterministic map on windows: there is no attractor to name.
    cycles = basin = fixed = unresolved = jnp.float32(jnp.nan)
  return DecodeMetrics(
    seed_collapsed=metrics.seed_collapsed(x_PxL),
    collapsed_fraction=jnp.mean(metrics.collapsed(x_PxL)),
    collapse_token=x_PxL[0, -1],
    tail_period_P=metrics.tail_period(x_PxL),
    distinct_1=metrics.distinct_n(x_PxL, 1, vocab_size),
    distinct_2=metrics.distinct_n(x_PxL, 2, vocab_size),
    seq_rep_4=metrics.seq_rep_n(x_PxL, 4, vocab_size),
    top_token_share=metrics.top_token_share(x_PxL, vocab_size),
    probe_continuation_L=x_PxL[0],
    distinct_cycles=cycles,
    largest_basin_share=basin,
    largest_is_fixed_point=fixed,
    unresolved_share=unresolved,
  )


def _map_rows(fn, rows_NxT, chunk: int):
  """fn(rows_BxT) -> per-row outputs, over chunks of `chunk` rows when there are more.

  Memory then does not grow with the corpus: fn's intermediates (logits chunk x V) are one
  chunk's at a time. The last chunk is padded with row 0; its padding is cut off.
  """
  num = rows_NxT.shape[0]
  if num <= chunk:
    return fn(rows_NxT)
  steps = -(-num // chunk)
  padded = jnp.concatenate([rows_NxT, jnp.zeros_like(rows_NxT[: steps * chunk - num])])
  out = jax.lax.map(fn, padded.reshape(steps, chunk, *rows_NxT.shape[1:]))
  return jax.tree_util.tree_map(lambda x: x.reshape(steps * chunk, *x.shape[2:])[:num], out)


@struct.dataclass
class WindowMetrics:
  """Metrics of the model's next-token predictions on the training windows (no dropout)."""

  loss: jax.Array  # Mean cross-entropy over every window (and position, in "all" mode).
  accuracy: jax.Array
  entropy: jax.Array
  argmax_constant: jax.Array
  unigram_kl: jax.Array  # Mean over distinct contexts: each context's first window counts once.


def _window_metrics(apply, inputs_NxT, targets, first_C, unigram_V, chunk: int) -> WindowMetrics:
  """Every training window's metrics, one pass over the windows (in chunks of `chunk`).

  The unigram KL is read from the same logits at each distinct context's first window
  (first_C), rather than from a second pass over the distinct contexts.
  """
  num = inputs_NxT.shape[0]

  def last(x):
    return x if x.ndim == 2 else x[:, -1]  # "all" mode: the prediction at the last position.

  def kl_rows(logits_BxV):
    return jax.vmap(lambda row_V: metrics.unigram_kl(row_V[None], unigram_V))(logits_BxV)

  if num <= chunk:  # One pass: the computation the blog study's numbers come from.
    logits = apply(inputs_NxT)
    logits_NxV, targets_N = last(logits), targets if targets.ndim == 1 else targets[:, -1]
    return WindowMetrics(
      loss=train_lib.cross_entropy(logits, targets, jnp.ones(num)),
      accuracy=jnp.mean(metrics.argmax_last(logits_NxV) == targets_N),
      entropy=metrics.mean_entropy(logits_NxV),
      argmax_constant=metrics.argmax_constant(logits_NxV),
      unigram_kl=jnp.mean(kl_rows(logits_NxV[first_C])),
    )
  index_N = jnp.arange(num)

  def rows(index_B):
    logits, targets_B = apply(inputs_NxT[index_B]), targets[index_B]
    is_label = targets_B[..., None] == jnp.arange(logits.shape[-1])
    ce = jax.nn.logsumexp(logits, -1) - jnp.sum(jnp.where(is_label, logits, 0.0), -1)
    logp_BxV = jax.nn.log_softmax(last(logits), -1)
    last_B = targets_B if targets_B.ndim == 1 else targets_B[:, -1]
    # From the logits, as in the one-pass branch: XLA would recompute logp_BxV for it.
    pred_B = metrics.argmax_last(last(logits))
    # A dot, not jnp.sum(p * logp): XLA:CPU runs that multiply-and-sum over V ~8x slower than
    # a batched dot (25 000 windows at V = 20 001: 3.2 s against 0.4 s); the values agreed.
    entropy_B = -jnp.einsum("bv,bv->b", jnp.exp(logp_BxV), logp_BxV)
    return dict(
      ce=ce if ce.ndim == 1 else ce.mean(-1),
      correct=pred_B == last_B,
      entropy=entropy_B,
      pred=pred_B,
      kl=kl_rows(last(logits)),
    )

  per_window = _map_rows(rows, index_N, chunk)
  pred_N = per_window["pred"]
  return WindowMetrics(
    loss=per_window["ce"].mean(),
    accuracy=per_window["correct"].mean(),
    entropy=per_window["entropy"].mean(),
    argmax_constant=jnp.all(pred_N == pred_N[0]),
    unigram_kl=per_window["kl"][first_C].mean(),
  )


def make_evaluate(
  config,
  dataset: data_lib.Dataset,
  decodings: tuple[config_lib.Decoding, ...],
  window_chunk: int = WINDOW_CHUNK,
) -> Evaluators:
  """The per-seed evaluations of one cell's config; windows in chunks of window_chunk."""
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  # Host arrays sliced on the host: an eager jnp op here would compile a program of its own.
  inputs_NxT, targets = map(
    jnp.asarray, train_lib.split_window(dataset.windows_NxW, config.model.mode)
  )
  first_C = jnp.asarray(dataset.first_windows_C)
  next_N = jnp.asarray(dataset.windows_NxW[:, -1])
  prompts_PxT, lengths_P = generate_lib.prepare_prompts(
    choose_prompts(config, dataset).ids, dataset.context_length
  )
  generators = [(d, generate_lib.make_generate(model, d.generate)) for d in decodings]
  greedy_cfg = ml_collections.ConfigDict(dict(config.generate.to_dict(), strategy="greedy"))
  greedy = generate_lib.make_generate(model, greedy_cfg)
  vocab_size, context = dataset.vocab_size, dataset.context_length

  def window_metrics(state) -> WindowMetrics:
    unigram_V = metrics.unigram_distribution(next_N, vocab_size)  # Traced: constant-folded.

    def apply(inputs_BxT):
      return model.apply({"params": state.params}, inputs_BxT)

    return _window_metrics(apply, inputs_NxT, targets, first_C, unigram_V, window_chunk)

  def final(state: train_lib.TrainState) -> Evaluation:
    windows = window_metrics(state)
    decoded = {}
    for index, (decoding, generate) in enumerate(generators):
      key = jax.random.fold_in(jax.random.fold_in(state.key, 2), index)
      gen = generate(state.params, prompts_PxT, lengths_P, key)
      if index == 0:  # The probe's next-token logits are the same under every decoding.
        probe = jnp.argmax(gen.first_logits_PxV[0])
      is_greedy = decoding.generate.strategy == "greedy"
      decoded[decoding.name] = decode_metrics(gen.tokens_PxL, vocab_size, is_greedy, context)
    # LSTM gates saturate, so even absurd step sizes rarely overflow: a loss far above the
    # untrained log(V) counts as diverged too.
    exploded = ~(windows.loss <= config.train.divergence_factor * jnp.log(vocab_size))
    evals = EvalMetrics(
      final_loss=windows.loss,
      accuracy=windows.accuracy,
      entropy=windows.entropy,
      argmax_constant=windows.argmax_constant,
      unigram_kl=windows.unigram_kl,
      probe=probe,
      diverged=state.diverged | exploded,
    )
    return Evaluation(train=evals, decodings=decoded)

  def dynamics(state: train_lib.TrainState) -> Dynamics:
    windows = window_metrics(state)
    x_PxL = greedy(state.params, prompts_PxT, lengths_P, state.key).tokens_PxL
    return Dynamics(
      collapsed=metrics.seed_collapsed(x_PxL),
      argmax_constant=windows.argmax_constant,
      loss=windows.loss,
      unigram_kl=windows.unigram_kl,
      top_token_share=metrics.top_token_share(x_PxL, vocab_size),
      collapse_token=x_PxL[0, -1],
    )

  return Evaluators(final=final, dynamics=dynamics)
