"""Runs a collapse study: python run.py --config=configs/blog.py --workdir=runs/blog.

Exit codes: 0 done; 2 a usage or config error (bad flag, config file or value, corpus, prompt);
1 a runtime failure (workdir refused or locked, a file that cannot be written, another process
of a --distributed study lost); 130 interrupted (finished cells are kept; the same command
resumes).
"""

import time

STARTED = time.time()  # For the start-up phase: imports and JAX's start count.

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from research import (  # noqa: E402
  config_lib,
  data,
  files,
  hosts,
  results,
  study,
  workdir,
  workers,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory for results; re-running resumes.")
flags.DEFINE_bool("overwrite", False, "Recompute everything, deleting earlier results.")
flags.DEFINE_bool(
  "reevaluate",
  False,
  "Evaluate a finished workdir's saved models again with this config's decodings "
  "(generate.*, study.decodings), without training.",
)
flags.DEFINE_integer(
  "workers",
  1,
  "Split the seeds over this many local processes, each pinned to its own CPU cores. XLA:CPU "
  "runs a program on about one core, so this is how a CPU study uses more; the results are "
  "one process's; --reevaluate splits them the same way. 0: one per core on a CPU (at most "
  "one per GiB of the memory budget), one process on an accelerator or with --distributed.",
  lower_bound=0,
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Run as one process of a multi-process study (jax.distributed): seeds are sharded over every "
  "process's devices and process 0 writes the workdir. Without the three flags below JAX reads "
  "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or detects the cluster (SLURM, "
  "Open MPI, TPU pods).",
)
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer(
  "num_processes", None, "--distributed: how many processes in all.", lower_bound=1
)
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.", lower_bound=0)
flags.DEFINE_integer(
  "distributed_timeout",
  120,
  "--distributed: seconds to wait for every process to join, and for a silent process to be "
  "declared dead (a process that exits is noticed at once).",
  lower_bound=1,
)
CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
  os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "collapse-study", "jax"
)
flags.DEFINE_string(
  "compilation_cache",
  CACHE,
  "JAX's persistent compilation cache: a second run of a config compiles nothing. '' = off.",
)
flags.mark_flags_as_required(["config", "workdir"])
jax.config.config_with_absl()  # Exposes --jax_enable_x64 and other JAX flags.


def unknown_config_field(argv) -> str:
  """The first --config.<field> override that names no field of the config schema."""
  from configs import default

  schema = default.get_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0]
    node = schema
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"unknown config field {path!r} (from {arg!r}); known here: {known}"
      node = node[part]
  return ""


USAGE, RUNTIME, INTERRUPTED = 2, 1, 130


def fail(message: str, code: int):
  """Prints one error line and exits (the only place errors are printed)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  if FLAGS.is_parsed() and FLAGS.distributed:
    # jax.distributed's exit handler waits for every process at a shutdown barrier, and
    # aborts the process with pages of logs when one is gone: leave without it.
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


def start_distributed() -> None:
  """Joins the processes of a --distributed study (one-line errors when that fails)."""
  given = [FLAGS[n].present for n in ("coordinator_address", "num_processes", "process_id")]
  if any(given) and not FLAGS.distributed:
    fail("--coordinator_address, --num_processes and --process_id need --distributed", USAGE)
  if not FLAGS.distributed:
    return
  if not os.environ.get(hosts.SUPERVISED):
    # Run the study in a child that this process watches, so a process that JAX's runtime
    # stops when another dies ends with one line (see hosts.supervise).
    process = "?" if FLAGS.process_id is None else str(FLAGS.process_id)
    sys.exit(hosts.supervise([sys.executable, *sys.argv], process))
  hosts.die_with_parent()
  if FLAGS.process_id is not None and FLAGS.num_processes is not None:
    if FLAGS.process_id >= FLAGS.num_processes:
      fail(
        f"--process_id={FLAGS.process_id} must be below --num_processes={FLAGS.num_processes}",
        USAGE,
      )
  try:
    hosts.initialize(
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
      initialization_timeout=FLAGS.distributed_timeout,
      heartbeat_timeout=FLAGS.distributed_timeout,
    )
  except (RuntimeError, ValueError) as e:
    fail(f"--distributed: cannot join the other processes: {one_line(e)}", RUNTIME)
  if not hosts.is_writer():
    logging.set_verbosity(logging.WARNING)  # Process 0 logs the study's progress.


def check_workers() -> None:
  """--workers: refused where it cannot help, in one line."""
  if FLAGS.distributed:
    fail(f"--workers={FLAGS.workers} cannot be combined with --distributed", USAGE)
  if jax.default_backend() != "cpu":
    fail(
      f"--workers splits a study over CPU processes, but JAX runs on {jax.default_backend()} "
      "here: leave --workers at 1 (each device already runs its own block of seeds)",
      USAGE,
    )


def one_line(e: BaseException) -> str:
  """An exception's first line (XLA's runtime errors run over many)."""
  lines = str(e).strip().splitlines()
  return lines[0].strip() if lines else type(e).__name__


def config_load_error(e: BaseException) -> str:
  """A broken config file's error in one line: file:line for syntax errors."""
  if isinstance(e, SyntaxError):
    return f"{e.filename}:{e.lineno}: {e.msg}"
  return str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__


def parse_flags(argv):
  """absl flag parsing, with one-line errors instead of tracebacks for config overrides."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f"{' '.join(str(e).split())} (--helpshort lists the flags)", USAGE)
  except SyntaxError as e:
    fail(f"cannot load the --config file: {config_load_error(e)}", USAGE)
  except (AttributeError, KeyError, TypeError, ValueError, ImportError, OSError) as e:
    fail(unknown_config_field(argv) or config_load_error(e), USAGE)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  hosts.reliable_interrupts()
  try:
    config = FLAGS.config  # Loaded lazily: a missing or broken file fails here.
    config.to_dict()
  except (OSError, AttributeError, SyntaxError, ImportError) as e:
    fail(f"cannot load --config={FLAGS['config'].config_filename}: {config_load_error(e)}", USAGE)
  worker = workers.this_worker()
  count = FLAGS.workers
  if worker is not None:
    workers.start_worker(worker)
  elif count == 0:
    count = 1 if FLAGS.distributed else workers.auto_count(config, jax.default_backend())
  elif count != 1:
    check_workers()
  start_distributed()
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  phases = {}

  def note() -> None:
    """The note, and its seconds in the phases: written before the study lets go of the lock."""
    # Imported here: matplotlib is half of run.py's imports, and --workers' workers never
    # write the note.
    from research import report  # noqa: PLC0415

    phases.update(workdir.load(FLAGS.workdir).phases)
    t = time.time()
    report.write_report(FLAGS.workdir)
    phases.update(report=time.time() - t, total=time.time() - STARTED)
    workdir.record_phases(FLAGS.workdir, phases)

  try:
    if FLAGS.reevaluate and worker is not None:
      rows = study.reevaluate_study(config, FLAGS.workdir, (worker.first, worker.last))
    elif FLAGS.reevaluate and count > 1:
      rows = workers.reevaluate_study(config, FLAGS.workdir, count, sys.argv, STARTED, note)
    elif FLAGS.reevaluate:
      rows = study.reevaluate_study(config, FLAGS.workdir, note=note)
    elif count > 1:
      rows = workers.run_study(
        config, FLAGS.workdir, FLAGS.overwrite, count, sys.argv, STARTED, note
      )
    elif worker is not None:  # Worker k starts at group k (different programs); no note.
      rows = study.run_study(
        config,
        FLAGS.workdir,
        FLAGS.overwrite,
        started=STARTED,
        first_group=worker.index,
        skip=worker.skip,
      )
    else:
      rows = study.run_study(config, FLAGS.workdir, FLAGS.overwrite, started=STARTED, note=note)
    if worker is not None:
      return  # The parent merges and reports.
    if not hosts.is_writer():
      print(f"process {jax.process_index()}: done; process 0 writes the results in {FLAGS.workdir}")
      return
  except (config_lib.ConfigError, data.DataError) as e:
    fail(str(e), USAGE)
  except (workdir.WorkdirError, files.WriteError) as e:
    fail(str(e), RUNTIME)
  except OSError as e:  # A file the tool could not read, move or delete (a shared workdir).
    fail(f"{type(e).__name__}: {e}", RUNTIME)
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    if not (FLAGS.distributed and hosts.is_peer_failure(e)):
      raise
    fail(
      f"process {jax.process_index()}: lost contact with another process of the study "
      f"({one_line(e)}); its log says why. Finished cells are kept in {FLAGS.workdir}: start "
      "every process again to resume",
      RUNTIME,
    )
  except workers.WorkerFailed as e:
    if str(e):
      fail(str(e), e.code)
    sys.exit(e.code)  # The worker printed its own error line.
  except KeyboardInterrupt:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # No second one (hosts.reliable_interrupts).
    if worker is not None:
      os._exit(INTERRUPTED)  # The parent says it, once.
    print(
      f"interrupted: finished cells are kept in {FLAGS.workdir}; run the same command to resume",
      file=sys.stderr,
      flush=True,
    )
    sys.stdout.flush()
    # Not sys.exit: finalising the interpreter while XLA's threads still run a compilation or
    # a computation crashed it (exit 139). Every file is already written atomically.
    os._exit(INTERRUPTED)
  from research import report  # noqa: PLC0415  # Loaded by note() already.

  print(results.format_table(rows))
  print(f"phases: {report.format_phases(phases)}")
  compiles = report.format_compiles(phases)
  if compiles:
    print(compiles)
  print(f"results in {FLAGS.workdir}: results.csv, results.json, per_seed.npz, report.md")
  if count == 1 and not FLAGS.distributed:  # Last, after a run that worked.
    hint = workers.one_process_hint(config, jax.default_backend())
    if hint:
      logging.info(hint)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
