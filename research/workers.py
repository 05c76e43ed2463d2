"""A study's seeds split over local processes (run.py --workers), each on its own CPU cores.

XLA:CPU runs a program on about one core (README, Speed, "Using a CPU's cores"), so on a CPU a
study uses the other cores by running copies of itself: worker k is run.py on the same config
and a block of consecutive seeds (study.seed_offset, study.seeds), in its own workdir under
workers/. When every worker is done, their cells and saved models are merged into the workdir
and the results written from there as usual. A seed's keys come from its number alone, so the
merged arrays are the one-process study's (tests/test_workers.py). A kill stops every worker;
the same command resumes each where it stopped.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import logging

from research import config_lib, hosts, results, study, workdir

WORKER = "COLLAPSE_STUDY_WORKER"  # A worker's environment holds its Block, as JSON.
# --workers=0 gives each worker at least this much of the memory budget: a worker's JAX
# runtime and programs alone take ~0.6 GiB (resident, blog study, 2-core Intel Xeon VM).
WORKER_MB = 1024


class WorkerFailed(RuntimeError):
  """A worker process failed: its exit code, and a message unless it printed its own."""

  def __init__(self, code: int, message: str = ""):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Block:
  """One worker's share: seeds first..last of the study (before study.seed_offset), on cpus."""

  index: int
  first: int
  last: int
  cpus: tuple[int, ...]
  skip: tuple[str, ...] = ()  # Cells the parent holds finished: the worker does not train them.

  @property
  def seeds(self) -> int:
    return self.last - self.first + 1


def _where(blocks: list[Block]) -> str:
  """The blocks as the start-up log line names them."""
  return ", ".join(f"seeds {b.first}-{b.last} on CPUs {list(b.cpus)}" for b in blocks)


def cpus() -> list[int]:
  """The CPUs this process may run on."""
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


def auto_count(config, backend: str) -> int:
  """--workers=0 on JAX's backend: on a CPU one worker per core, each with at least WORKER_MB
  of the budget; elsewhere one process (each accelerator already runs its own seeds)."""
  if backend != "cpu":
    return 1
  budget_mb = study.budget_bytes(config) >> 20
  return max(1, min(len(cpus()), budget_mb // WORKER_MB, config.study.seeds))


def one_process_hint(config, backend: str) -> str:
  """For a one-process run: what --workers=0 would run instead on this CPU ("" if the same)."""
  count = auto_count(config, backend)
  if count <= 1:
    return ""
  return (
    f"this was one process on {len(cpus())} CPU cores: --workers=0 would split the seeds over "
    f"{count} worker processes pinned to their cores (the blog study: 1.7-1.8x as fast on 2 "
    "cores; README, Several processes on one machine)"
  )


def plan_blocks(seeds: int, workers: int, cpus: list[int]) -> list[Block]:
  """Near-equal blocks of consecutive seeds, one per worker (never more than seeds), each
  pinned to its own share of the CPUs (shared when too few)."""
  count = min(workers, seeds)
  seed_blocks = np.array_split(np.arange(seeds), count)
  if count <= len(cpus):
    cpu_blocks = [tuple(int(c) for c in b) for b in np.array_split(np.asarray(cpus), count)]
  else:
    cpu_blocks = [(cpus[k % len(cpus)],) for k in range(count)]
  return [
    Block(index=k, first=int(b[0]), last=int(b[-1]), cpus=c)
    for k, (b, c) in enumerate(zip(seed_blocks, cpu_blocks, strict=True))
  ]


def this_worker() -> Block | None:
  """The Block this process runs as a worker, or None when it is no worker."""
  spec = os.environ.get(WORKER)
  if not spec:
    return None
  fields = json.loads(spec)
  return Block(**dict(fields, cpus=tuple(fields["cpus"]), skip=tuple(fields.get("skip", ()))))


def start_worker(block: Block) -> None:
  """Pins this worker to its CPUs (before JAX starts its thread pools) and ties its life to
  the parent's."""
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, block.cpus)
  hosts.die_with_parent()


def _argv(argv: list[str], block: Block, config, directory: str, share_mb: int) -> list[str]:
  """run.py's own command line, then this worker's overrides (absl: the last value wins)."""
  return [
    sys.executable,
    *argv,
    f"--workdir={directory}",
    f"--config.study.seeds={block.seeds}",
    f"--config.study.seed_offset={config.study.seed_offset + block.first}",
    f"--config.study.memory_budget_mb={share_mb}",
    "--nooverwrite",
    "--workers=1",
  ]


def _last_error(log_path: str) -> str:
  """The worker's one-line error, else its last line."""
  try:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  errors = [line for line in lines if line.startswith("error: ")]
  return (errors or lines or [""])[-1].removeprefix("error: ")


def _run_workers(commands: list[list[str]], blocks: list[Block], directories: list[str]) -> None:
  """Runs every worker to its end; the first to fail stops the others (WorkerFailed).

  Worker 0 writes to this terminal (its progress stands for all: blocks are near-equal);
  the others to workers/<block>.log.
  """
  procs, logs = [], []
  try:
    for command, block, directory in zip(commands, blocks, directories, strict=True):
      env = dict(
        os.environ,
        **{WORKER: json.dumps(dataclasses.asdict(block)), hosts.SUPERVISED: str(os.getpid())},
      )
      log = None if block.index == 0 else open(directory + ".log", "w")  # noqa: SIM115
      logs.append(log)
      procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    while True:
      codes = [p.poll() for p in procs]
      failed = [k for k, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        k = failed[0]
        block, log_path = blocks[k], directories[k] + ".log"
        if codes[k] < 0:  # Killed by a signal (the OOM killer, say): a runtime failure.
          where = "its log is above" if k == 0 else f"its log: {log_path}"
          raise WorkerFailed(
            1,
            f"worker {k} (seeds {block.first}-{block.last}) was killed by signal {-codes[k]}; "
            f"{where}. Finished cells are kept: run the same command to resume",
          )
        if k == 0:  # Its error line is already on the terminal.
          raise WorkerFailed(codes[k])
        raise WorkerFailed(
          codes[k],
          f"worker {k} (seeds {block.first}-{block.last}) failed with exit code {codes[k]}: "
          f"{_last_error(log_path)} (its log: {log_path})",
        )
      if all(code == 0 for code in codes):
        return
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for log in logs:
      if log is not None:
        log.close()


def _merge_cell(directory: str, cell: config_lib.Cell, sources: list[str], models=True) -> None:
  """A cell's per-seed arrays (concatenated in seed order) and models from the workers."""
  metas, parts = zip(*(workdir.read_cell(source, cell.name) for source in sources), strict=True)
  arrays = results.SeedArrays.concatenate(parts)
  meta = dataclasses.replace(
    metas[0],
    config=cell.config.to_dict(),
    fingerprint=config_lib.cell_fingerprint(cell),
    seconds=max(m.seconds for m in metas),  # The workers ran at once: wall time is the max.
    train_seconds=max(m.train_seconds for m in metas),
    eval_seconds=max(m.eval_seconds for m in metas),
  )
  if models and cell.config.study.save_models:
    for source in sources:
      workdir.copy_models(directory, cell.name, source)
  workdir.write_cell(directory, cell, meta, arrays)  # Last: it marks the cell finished.


def _phases(worker_phases: list[dict], before_workers: float, total: float) -> dict:
  """The run's phases: start-up until the workers started plus theirs, the longest worker's
  compile (and its programs'), training and evaluation, and the programs every worker
  compiled."""

  def longest(key):
    return max(p.get(key, 0.0) for p in worker_phases)

  slowest = max(worker_phases, key=lambda p: p.get("compile", 0.0))
  return dict(
    startup=before_workers + longest("startup"),
    compile=longest("compile"),
    programs_compiled=sum(p.get("programs_compiled", 0) for p in worker_phases),
    compilation_cache_hits=sum(p.get("compilation_cache_hits", 0) for p in worker_phases),
    compile_programs=slowest.get("compile_programs", []),  # The worker that compiled longest.
    train=longest("train"),
    evaluate=longest("evaluate"),
    workers=len(worker_phases),
    total=total,
  )


def _plan(config, cells, workers: int, one_cell_at_a_time: bool) -> tuple[list[Block], int]:
  """The workers' blocks and each one's share of the memory budget (MiB). Bad data or prompts
  fail here, once, before any worker; so does a share in which one seed cannot fit (the
  largest block's): training plans a group's cells' seeds at once, evaluation one cell's."""
  groups = study.group_cells(cells)
  blocks = plan_blocks(config.study.seeds, workers, cpus())
  # Each worker plans its chunks for its share (0 would mean the default: at least 1 MiB).
  budget_mb = study.budget_bytes(config) >> 20
  share_mb = max(1, budget_mb // len(blocks))
  for group in groups:
    try:
      cells_at_once = 1 if one_cell_at_a_time else len(group.cells)
      study.plan(group, cells_at_once * blocks[0].seeds, share_mb << 20)
    except workdir.WorkdirError as e:
      raise workdir.WorkdirError(
        f"{len(blocks)} workers, each with {share_mb} MiB of the {budget_mb} MiB budget: {e}"
      ) from None
  return blocks, share_mb


def run_study(
  config,
  directory: str,
  overwrite: bool,
  workers: int,
  argv: list[str],
  started: float,
  note=None,
) -> list[results.Row]:
  """Runs the study's unfinished cells on worker processes, merges them; returns the rows.

  argv: run.py's command line (sys.argv), which each worker runs with its own overrides.
  note: called once the results are written, the workdir still locked (study.run_study's).
  """
  cells = config_lib.expand_cells(config)
  blocks, share_mb = _plan(config, cells, workers, one_cell_at_a_time=False)
  with workdir.open_for_study(directory, config, overwrite, study.corpora(cells)):
    pending = [c for c in cells if not workdir.cell_done(directory, c)]
    held = tuple(c.name for c in cells if c.name not in {p.name for p in pending})
    blocks = [dataclasses.replace(b, skip=held) for b in blocks]  # Not trained again.
    sources = [workdir.worker_dir(directory, b.first, b.last) for b in blocks]
    workdir.remove_workers(directory, keep=sources)  # Those of another split: not resumable.
    phases = dict(startup=time.time() - started, workers=len(blocks))
    if pending:
      for cell in pending:
        workdir.remove_models(directory, cell.name)  # Stale: the workers hold the new ones.
      logging.info(
        "%d worker processes: %s; worker 0 logs here, the others in %s",
        len(blocks),
        _where(blocks),
        os.path.join(directory, workdir.WORKERS_DIR),
      )
      before = time.time() - started
      commands = [_argv(argv, b, config, s, share_mb) for b, s in zip(blocks, sources, strict=True)]
      _run_workers(commands, blocks, sources)
      for cell in pending:
        _merge_cell(directory, cell, sources)
      worker_phases = [workdir.load(source).phases for source in sources]
      phases = _phases(worker_phases, before, time.time() - started)
    workdir.remove_workers(directory)
    phases["total"] = time.time() - started
    rows = workdir.write_results(directory, cells, config.study.seeds, phases["total"], phases)
    if note is not None:
      note()
    return rows


def reevaluate_study(
  config, directory: str, workers: int, argv: list[str], started: float, note=None
) -> list[results.Row]:
  """run.py --reevaluate on worker processes: each decodes its block of seeds' saved models
  again (study.reevaluate_study), the parent merges their cells; returns the rows.

  argv: run.py's command line (sys.argv), which each worker runs with its own budget share.
  note: as run_study's.
  """
  cells = config_lib.expand_cells(config)
  blocks, share_mb = _plan(config, cells, workers, one_cell_at_a_time=True)
  with workdir.open_for_reevaluation(directory, config, study.corpora(cells)):
    workdir.remove_workers(directory)  # An interrupted re-evaluation's: it starts over.
    sources = [workdir.worker_dir(directory, b.first, b.last) for b in blocks]
    logging.info(
      "%d worker processes re-evaluate: %s",
      len(blocks),
      _where(blocks),
    )
    before = time.time() - started
    command = [sys.executable, *argv, f"--config.study.memory_budget_mb={share_mb}", "--workers=1"]
    _run_workers([command] * len(blocks), blocks, sources)
    for cell in cells:
      _merge_cell(directory, cell, sources, models=False)  # The models stay where they are.
    workdir.remove_workers(directory)
    total = time.time() - started
    phases = dict(startup=before, evaluate=total - before, workers=len(blocks), total=total)
    rows = workdir.write_results(directory, cells, config.study.seeds, total, phases)
    if note is not None:
      note()
    return rows
