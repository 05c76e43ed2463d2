"""The machine a benchmark ran on (for its results file); a child process measured (wall time,
the peak RSS of its process tree)."""

import dataclasses
import os
import platform
import signal
import subprocess
import time

import numpy as np

from research import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Children run from here.


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


POLL_S = 0.5  # Child status, timeout and memory are checked this often.
GRACE_S = 10.0  # After SIGTERM, seconds before SIGKILL.


@dataclasses.dataclass
class Child:
  """What one finished (or stopped) child process measured."""

  returncode: int
  wall_s: float
  peak_rss_mb: float
  timed_out: bool
  load_average: dict  # 1-minute load average sampled during the run: min, mean, max.


def run_child(argv: list, stdout_path: str, stderr_path: str, timeout: float) -> Child:
  """Runs argv to the end (or stops it after `timeout` s) and measures it.

  Peak RSS: the largest sum of VmRSS over the child's process tree, polled every POLL_S, or
  the child's own ru_maxrss from wait4 where that is larger (a peak between polls, or no
  /proc). RUSAGE_CHILDREN would give the largest single process so far, not a sum.
  """
  loads = []
  with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err)
  tree_mb, timed_out, kill_at, last_load = 0.0, False, None, 0.0
  try:
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      now = time.perf_counter()
      if pid:
        break
      tree_mb = max(tree_mb, tree_rss_mb(proc.pid))
      if now - last_load >= 5.0:
        loads.append(os.getloadavg()[0])
        last_load = now
      if not timed_out and timeout and now - start > timeout:
        timed_out, kill_at = True, now + GRACE_S
        proc.send_signal(signal.SIGTERM)
      elif kill_at and now > kill_at:
        proc.kill()
      time.sleep(POLL_S)
  except BaseException:  # Interrupted bench: take the child down with it.
    proc.kill()
    proc.wait()
    raise
  proc.returncode = os.waitstatus_to_exitcode(status)  # Reaped here, not by Popen.
  loads.append(os.getloadavg()[0])
  return Child(
    returncode=proc.returncode,
    wall_s=now - start,
    peak_rss_mb=max(usage.ru_maxrss / 1024, tree_mb),  # ru_maxrss is in KiB on Linux.
    timed_out=timed_out,
    load_average=dict(min=min(loads), mean=float(np.mean(loads)), max=max(loads)),
  )
