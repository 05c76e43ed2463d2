"""The processes of a study: JAX's multi-process runtime, one writer (process 0), barriers.

A study across hosts runs one process per host (or per accelerator group) under
jax.distributed; seeds are sharded over every process's devices. Process 0 alone writes the
workdir: each step that only it does (opening and locking the workdir, deciding which cells are
done) shares its outcome with the others, so an error there stops every process with the same
message. With one process every function here is a no-op or the identity.
"""

import _thread
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  initialization_timeout: int = 300,
  heartbeat_timeout: int = 100,
) -> None:
  """jax.distributed.initialize, with CPU collectives (gloo) so CPU processes can all-gather.

  Arguments left None are read by JAX from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, or detected on clusters it knows (SLURM, Open MPI, TPU pods, ...).
  """
  # Without it, CPU processes have no cross-process collectives at all. Harmless on GPU/TPU
  # (it only concerns the CPU client) and must be set before a backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=initialization_timeout,
    heartbeat_timeout_seconds=heartbeat_timeout,
  )


def is_writer() -> bool:
  """Whether this process writes the workdir (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process got here (a collective: a dead process fails it at once)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def share(value):
  """Process 0's JSON-able value, on every process."""
  if jax.process_count() == 1:
    return value
  data = (
    np.frombuffer(json.dumps(value).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
  )
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
  buffer = np.zeros(size, np.uint8)
  buffer[: len(data)] = data
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
  return json.loads(received.tobytes().decode())


def smallest(value: int) -> int:
  """The smallest of every process's value, below 2**31 (JAX's collectives carry it as int32
  unless x64 is on)."""
  if not 0 <= value < 2**31:
    raise ValueError(f"hosts.smallest takes values in [0, 2**31), got {value}")
  if jax.process_count() == 1:
    return value
  return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int32))))


def on_writer(fn, errors: tuple[type[BaseException], ...]):
  """fn() on process 0 only (None elsewhere); an error of `errors` it raises reaches all.

  Every process then raises the same kind of error with process 0's message, so a refusal
  (a locked workdir, another config's results) stops the whole study with one line.
  """
  value, outcome, error = None, None, None
  if is_writer():
    try:
      value = fn()
    except errors as e:
      error, outcome = e, dict(kind=type(e).__name__, message=str(e))
  outcome = share(outcome)
  if error is not None:
    raise error
  if outcome is not None:
    kind = {cls.__name__: cls for cls in errors}[outcome["kind"]]
    raise kind(f"{outcome['message']} (reported by process 0)")
  return value


def is_peer_failure(error: BaseException) -> bool:
  """Whether an error comes from a cross-process collective that lost a peer (gloo on CPU;
  JAX raises it as a runtime error or, from some helpers, a ValueError)."""
  text = str(error)
  return isinstance(error, (jax.errors.JaxRuntimeError, ValueError)) and any(
    marker in text for marker in ("Gloo", "Connection closed", "Connection reset")
  )


# ----------------------------------------------------------------------------- supervision

SUPERVISED = "COLLAPSE_STUDY_SUPERVISED"
# The first line of JAX's distributed-runtime abort: a glog error or fatal line from its
# coordination client; what follows is a C++ stack trace.
_ABORT_START = re.compile(r"^[EF]\d{4} .*(coordination_service_agent|client\.h)")
_ABORT_MARK = "JAX distributed service detected fatal errors"


def supervise(argv: list[str], process: str) -> int:
  """Runs argv (this very command) as a child and returns its exit code.

  When another process dies, a process that is not inside a collective at that moment is
  aborted by JAX's coordination client (it runs in C++ threads: Python cannot catch it) with
  pages of logs; the supervisor prints one line instead. Everything else passes through.
  """
  env = dict(os.environ, **{SUPERVISED: str(os.getpid())})  # The child knows its supervisor.
  child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
  # Ctrl-C reaches the child too (same process group) and it saves and exits; a scheduler's
  # SIGTERM is passed on.
  handlers = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
  held = []
  try:
    for line in child.stderr:
      if held or _ABORT_START.match(line):
        held.append(line)
      else:
        sys.stderr.write(line)
        sys.stderr.flush()
    code = child.wait()
  finally:
    signal.signal(signal.SIGINT, handlers[0])
    signal.signal(signal.SIGTERM, handlers[1])
  if _ABORT_MARK in "".join(held) and code != 0:
    print(
      f"error: process {process}: lost contact with another process of the study (JAX's "
      "distributed runtime stopped it); the other processes' logs say why. Finished cells "
      "are kept: start every process again to resume",
      file=sys.stderr, flush=True,
    )  # fmt: skip
    return 1
  sys.stderr.write("".join(held))
  return code if code >= 0 else 128 - code


REINTERRUPT_SECONDS = 0.5


def reliable_interrupts() -> None:
  """Makes Ctrl-C, and SIGTERM (a scheduler's time limit, `timeout`), stop the run cleanly,
  even where JAX swallows its KeyboardInterrupt.

  Both raise KeyboardInterrupt: the workdir's lock is let go and run.py says how to resume
  (exit 130), where SIGTERM's default would end the process without a word. Python raises it
  in whatever Python code runs next, and where that is JAX's garbage-collection callback
  (jax/_src/lib/__init__.py, run from gc.callbacks, where Python prints an exception and
  ignores it) or one of its bare `except:` clauses, the interrupt is lost and the run goes on:
  seen here when Ctrl-C came during compilation. So after the signal, KeyboardInterrupt is
  raised again every REINTERRUPT_SECONDS until the process exits. A signal that is ignored
  (SIGINT in a shell's background job) or handled by another is left alone.
  """
  interrupted = False
  print_unraisable = sys.unraisablehook

  def again(signum: int) -> None:
    while True:
      time.sleep(REINTERRUPT_SECONDS)
      _thread.interrupt_main(signum)

  def handler(signum, frame):
    nonlocal interrupted
    if not interrupted:
      interrupted = True
      threading.Thread(target=again, args=(signum,), daemon=True, name="reinterrupt").start()
    raise KeyboardInterrupt

  def unraisable(report) -> None:  # The swallowed one is raised again: no "Exception ignored".
    if not issubclass(report.exc_type, KeyboardInterrupt):
      print_unraisable(report)

  defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
  for signum, default in defaults.items():
    if signal.getsignal(signum) is default:
      signal.signal(signum, handler)
      sys.unraisablehook = unraisable


def die_with_parent() -> None:
  """A supervised process is killed when its supervisor is (Linux), so killing the command a
  user started stops the study process too."""
  if os.environ.get(SUPERVISED) and sys.platform.startswith("linux"):
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG.
    if str(os.getppid()) != os.environ[SUPERVISED]:  # The supervisor died before prctl.
      os._exit(1)
