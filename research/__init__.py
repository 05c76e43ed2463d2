"""collapse-study: many-seed studies of repetition collapse in small generative LSTMs."""

from research import platform as _platform

# Runs before any submodule imports jax, so the flag is set before a backend exists.
_platform.configure_xla_flags()
