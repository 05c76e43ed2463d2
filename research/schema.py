"""The config schema: allowed values and validation, below every stage that they configure.

Stages import their allowed-value lists from here, so the config layer never imports a stage.
"""

import math

import ml_collections

# Built-in corpora (texts in research/data.py), tokenizers, model and decoding choices.
# pydoc_topics: CPython's bundled help texts, a real English corpus needing no download.
CORPORA = ("blog_repetitive", "blog_varied", "nursery", "pydoc_topics")
TOKENIZATIONS = ("char", "word")
MODES = ("last", "all")  # "last": predict from the last state; "all": at every position.
# LSTM recurrence: the custom-VJP kernel, nn.RNN(OptimizedLSTMCell), or the fused kernel's
# training recurrence as Pallas GPU kernels (research/pallas_lstm.py).
IMPLS = ("fused", "flax", "pallas")
INITS = ("keras", "flax")
# Matmul precision (jax.default_matmul_precision's names). float32 is exact float32 on every
# backend; GPUs would otherwise use tensorfloat32 and TPUs bfloat16 passes for float32 inputs.
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
STRATEGIES = ("greedy", "temperature", "top_k", "top_p")
CLAIM_SETS = ("", "blog")  # "" checks none; "blog": research/claims.py on scenarios 1-3.


class ConfigError(ValueError):
  """An invalid config value, with a one-line message naming the field."""


def _check(ok: bool, field: str, rule: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{field} must be {rule}, got {value!r}")


def _one_of(field: str, value, allowed) -> None:
  _check(value in allowed, field, f"one of {list(allowed)}", value)


MAX_INT = 2**31 - 1  # Counts and sizes travel as int32 arrays.
SEED_LIMIT = 2**32  # PRNG seeds are uint32: seed_offset + seeds must stay below it.


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(node, group: str, field: str, low: int, rule: str = "") -> None:
  value = node[field]
  ok = is_int(value) and low <= value <= MAX_INT
  _check(ok, f"{group}.{field}", rule or f"an int in [{low}, {MAX_INT}]", value)


def check_vocabulary(gen_cfg, vocab_size: int) -> None:
  """Checks that need the corpus: top_k cannot exceed the vocabulary (id 0 included)."""
  if gen_cfg.strategy == "top_k":
    _check(
      gen_cfg.top_k <= vocab_size,
      "generate.top_k",
      f"<= the vocabulary size ({vocab_size} tokens, id 0 included)",
      gen_cfg.top_k,
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field."""
  d, m, t, g, s = config.data, config.model, config.train, config.generate, config.study
  _one_of("data.tokenization", d.tokenization, TOKENIZATIONS)
  if not d.corpus_file:
    _one_of("data.corpus", d.corpus, CORPORA)
  _int_at_least(d, "data", "context_length", 1)
  _int_at_least(d, "data", "max_chars", 0, "an int >= 0 (0 = the whole text)")
  for field in ("embed_dim", "hidden", "layers"):
    _int_at_least(m, "model", field, 1)
  _check(_finite(m.dropout) and 0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)", m.dropout)
  _one_of("model.mode", m.mode, MODES)
  _one_of("model.impl", m.impl, IMPLS)
  _int_at_least(m, "model", "unroll", 0, "an int >= 0 (0 = a Python loop over the T steps)")
  _one_of("model.init", m.init, INITS)
  _one_of("model.matmul_precision", m.get("matmul_precision", "float32"), PRECISIONS)
  _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
  _check(_finite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate", "> 0",
         t.learning_rate)  # fmt: skip
  _check(_finite(t.adam_eps) and t.adam_eps > 0, "train.adam_eps", "> 0", t.adam_eps)
  _check(
    _finite(t.divergence_factor) and t.divergence_factor > 1,
    "train.divergence_factor",
    "> 1",
    t.divergence_factor,
  )
  _int_at_least(t, "train", "batch_size", 1)
  _int_at_least(t, "train", "epochs", 1)
  _int_at_least(g, "generate", "length", 8)
  _one_of("generate.strategy", g.strategy, STRATEGIES)
  _check(_finite(g.temperature) and g.temperature > 0, "generate.temperature", "> 0",
         g.temperature)  # fmt: skip
  _int_at_least(g, "generate", "top_k", 1)
  _int_at_least(g, "generate", "max_prompts", 1)
  _check(_finite(g.top_p) and 0.0 < g.top_p <= 1.0, "generate.top_p", "in (0, 1]", g.top_p)
  _check(
    len(g.prompts) >= 1 or g.include_training_contexts,
    "generate.prompts",
    "non-empty (or include_training_contexts set)",
    g.prompts,
  )
  _one_of("study.claims", s.claims, CLAIM_SETS)
  _int_at_least(s, "study", "seeds", 1)
  _check(
    is_int(s.seed_offset) and 0 <= s.seed_offset <= SEED_LIMIT - s.seeds,
    "study.seed_offset",
    f"an int in [0, 2**32 - study.seeds] (seeds are uint32 PRNG keys; {s.seeds} seeds)",
    s.seed_offset,
  )
  _int_at_least(s, "study", "max_parallel_seeds", 0, "an int >= 0 (0 = all seeds at once)")
  _int_at_least(s, "study", "epochs_per_call", 1)
  _int_at_least(s, "study", "eval_every", 0, "an int >= 0 (epochs; 0 = epochs 0, E/2 and E)")
  _int_at_least(s, "study", "memory_budget_mb", 0, "an int >= 0 (MiB; 0 = a safe share)")
  _check(isinstance(s.save_models, bool), "study.save_models", "True or False", s.save_models)
  _check(
    _finite(s.checkpoint_seconds) and s.checkpoint_seconds >= 0,
    "study.checkpoint_seconds",
    ">= 0",
    s.checkpoint_seconds,
  )
