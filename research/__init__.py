"""collapse-study: many-seed studies of repetition collapse in small generative LSTMs.

Shape suffixes (nanodo style: `logits_BxV` is a batch x vocabulary array), one letter each:
  S seeds                 N training windows        W window width (T + 1)
  B minibatch rows        K minibatch steps/epoch   E epochs
  T context tokens        P prompts                 L generated tokens per prompt
  C distinct contexts     V vocabulary              D embedding width
  H LSTM width (4H gates) I a layer's input width   R results rows
  A tail periods (0 none) G n-grams (of order n)    Dr, Lr dropout, learning-rate grid values
  Q evaluation points (epochs 0, k, 2k, ..., E)
  Hp, Bp, Vp  H, B and V padded to powers of 2 (research/pallas_lstm.py's GPU kernels)
"""

from research import platform as _platform

# Runs before any submodule imports jax, so the flag is set before a backend exists.
_platform.configure_xla_flags()
