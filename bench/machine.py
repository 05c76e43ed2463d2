"""The machine a benchmark ran on, for its results file (bench/throughput.py, bench/scale.py)."""

import os
import platform

from research import workdir


def machine_info() -> dict:
  cpuinfo = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:  # The first processor's fields.
        key, _, value = line.partition(":")
        cpuinfo.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  simd = sorted(f for f in cpuinfo.get("flags", "").split() if f.startswith(("avx", "fma", "amx")))
  return dict(
    cpu_model=cpuinfo.get("model name") or platform.processor(),
    cpu_mhz=float(cpuinfo["cpu MHz"]) if "cpu MHz" in cpuinfo else None,
    cpu_simd=simd,
    cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    memory_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    **workdir.device_summary(),  # The study's own: backend, device_kind, device_count, ...
    **workdir.versions(),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
  )
