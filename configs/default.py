"""Base config: the blog's model and training setup (its example 2), one cell, 256 seeds."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "blog_varied"  # blog_repetitive, blog_varied, nursery or pydoc_topics.
  config.data.corpus_file = ""  # Path to a UTF-8 text file; overrides data.corpus when set.
  config.data.max_chars = 0  # Train on the text's first max_chars characters; 0 = all of it.
  config.data.tokenization = "char"  # "char" or "word" (vocab by frequency, id 0 reserved).
  config.data.context_length = 3  # Tokens of context per training window (blog: 3 chars).
  config.data.drop_last_window = True  # Blog's range(len - seq_length) skips the last window.

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 10  # Embedding width (blog: 10).
  config.model.hidden = 50  # LSTM units (blog: 50).
  config.model.layers = 1  # Stacked LSTM layers.
  config.model.dropout = 0.2  # Dropout rate on the LSTM output, in [0, 1).
  config.model.mode = "last"  # "last": predict from the last state (blog); "all": every step.
  config.model.init = "keras"  # "keras": Keras defaults as in the blog; "flax": flax defaults.
  # LSTM: "fused" (custom-VJP kernel, fast on CPU), "flax" (nn.RNN), or "pallas" ("fused" with
  # its training recurrence as GPU kernels; off a GPU they run interpreted, slowly).
  config.model.impl = "fused"
  config.model.unroll = 0  # Fused LSTM's T steps: 0 = Python loop; k >= 1 = lax.scan, k a trip.
  # Every matmul's precision: "float32" (exact, on every backend), or explicitly reduced:
  # "tensorfloat32" (GPU tensor cores, ~1e-3 relative error) or "bfloat16" (TPU: one pass).
  config.model.matmul_precision = "float32"

  config.train = ml_collections.ConfigDict()
  config.train.optimizer = "adam"  # "adam", "sgd" or "rmsprop".
  config.train.learning_rate = 1e-3  # Step size, > 0.
  config.train.adam_eps = 1e-7  # Adam epsilon (Keras default 1e-7).
  config.train.batch_size = 32  # Minibatch size (Keras default 32); last batch may be partial.
  config.train.epochs = 100  # Passes over the training windows.
  config.train.shuffle = True  # Reshuffle windows every epoch (Keras default).
  config.train.divergence_factor = 10.0  # Diverged: non-finite, or final loss > this x log(V).

  config.generate = ml_collections.ConfigDict()
  config.generate.prompts = ("the",)  # Prompts to continue; the first is the blog's probe.
  config.generate.include_training_contexts = True  # Also continue every distinct context...
  config.generate.max_prompts = 1024  # ...up to this many prompts (evenly spaced contexts).
  config.generate.length = 64  # Generated tokens per prompt (L), >= 8.
  config.generate.strategy = "greedy"  # "greedy", "temperature", "top_k" or "top_p".
  config.generate.temperature = 1.0  # Softmax temperature for sampling strategies, > 0.
  config.generate.top_k = 5  # Tokens kept by "top_k", >= 1.
  config.generate.top_p = 0.9  # Probability mass kept by "top_p", in (0, 1].

  config.study = ml_collections.ConfigDict()
  config.study.seeds = 256  # Seeds per scenario, each its own init, shuffling and dropout.
  config.study.seed_offset = 0  # Seed i uses PRNG key seed_offset + i.
  config.study.scenarios = []  # Named overrides of this config; empty = one "default" cell.
  config.study.grid = ml_collections.ConfigDict()  # Axes, e.g. grid.train.learning_rate=(...).
  config.study.max_parallel_seeds = 0  # Seeds per compiled call at most; 0 = no cap but memory.
  # Memory each process (host) plans chunks for, shared by its devices; 0 = a safe share: half
  # of the available host memory, or 70% of the accelerators' memory.
  config.study.memory_budget_mb = 0
  config.study.save_models = True  # Keep every trained state (orbax, models/<cell>/).
  config.study.checkpoint_seconds = 60.0  # Mid-cell train-state checkpoint interval; 0 = always.
  config.study.epochs_per_call = 10  # Epochs per jitted call, so progress shows while training.
  config.study.eval_every = 0  # Dynamics every k epochs and at 0 (0: epochs 0, E/2 and E).
  config.study.decodings = []  # Named generate overrides but prompts, on the same trained seeds.
  config.study.claims = ""  # Claims the report checks: "" (none) or "blog" (research/claims.py).
  return config
