"""The machine a benchmark ran on (for its results file), and a process tree's memory."""

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


def _children() -> dict:
  """Parent pid -> child pids, from /proc/<pid>/stat (every process of this machine)."""
  children = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # The name may hold spaces.
    except (OSError, IndexError, ValueError):
      continue
    children.setdefault(ppid, []).append(int(entry))
  return children


def _rss_mb(pid: int) -> float:
  """A live process's resident memory (VmRSS), or 0 once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def tree_rss_mb(pid: int) -> float:
  """Resident memory of pid and all its descendants now (0 where /proc is missing).

  run.py --workers starts one process per block of seeds: the study's memory is their sum.
  """
  if not os.path.isdir("/proc"):
    return 0.0
  children, todo, total = _children(), [pid], 0.0
  while todo:
    p = todo.pop()
    total += _rss_mb(p)
    todo += children.get(p, [])
  return total
