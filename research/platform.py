"""XLA settings that must be in place before JAX initialises a backend."""

import os

# jaxlib 0.10.x on CPU parks every thread forever when a vmapped training program over
# >=32-64 seeds runs under the concurrency-optimised scheduler; turning it off fixes the hang
# (and was faster here). XLA reads XLA_FLAGS once, when the first backend starts.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def configure_xla_flags(environ=os.environ) -> str:
  """Appends the CPU hang workaround to XLA_FLAGS unless the user already chose a value."""
  flags = environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    flags = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    environ["XLA_FLAGS"] = flags
  return flags
