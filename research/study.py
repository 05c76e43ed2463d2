"""Scheduling: cells -> programs, seed chunks, sharding, progress; each cell written when done."""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research import config_lib, files, hosts, programs, results, schema, workdir
from research import data as data_lib
from research import evaluate as evaluate_lib

# ----------------------------------------------------------------------------- devices


def _to_global(x: np.ndarray, sharding: NamedSharding):
  """Host array (identical on every process) -> global array sharded along its first axis."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(tree):
  """Global arrays -> host arrays, whole on every process (per-seed metrics, never states)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


@functools.cache
def _block_rows(size: int):
  """jit: (tree, lo) -> rows lo..lo+size of every device's block of the seed axis.

  A shard_map, so each device slices its own rows: no train state crosses devices or hosts.
  """

  def local(tree, lo):
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, lo, size), tree)

  mapped = jax.shard_map(
    local, mesh=programs.mesh(), in_specs=(P("seeds"), P()), out_specs=P("seeds")
  )
  return jax.jit(mapped)


@functools.cache
def _slice_rows(size: int, sharded: bool):
  """jit: (tree, start) -> rows start..start+size of every leaf (one program for the whole
  tree: sliced eagerly, each leaf's shape would compile a program of its own)."""

  def rows(tree, start):
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), tree)

  if not sharded:
    return jax.jit(rows)
  # Sharded over the seed axis again, so each process then saves its own shards.
  return jax.jit(rows, out_shardings=NamedSharding(programs.mesh(), P("seeds")))


def _rows(tree, start: int, stop: int):
  """Rows start:stop of a state (what a save writes)."""
  return _slice_rows(stop - start, jax.process_count() > 1)(tree, start)


# ----------------------------------------------------------------------------- groups


@dataclasses.dataclass
class Group:
  """Cells sharing one program key (they differ only in traced hyperparameters)."""

  cells: list
  dataset: data_lib.Dataset
  programs: programs.Programs

  @classmethod
  def build(cls, cells: list[config_lib.Cell]) -> "Group":
    config = cells[0].config
    dataset = data_lib.dataset_from_config(config.data)
    for decoding in cells[0].decodings:  # Checks that need the corpus, still before training.
      try:
        schema.check_vocabulary(decoding.generate, dataset.vocab_size)
      except schema.ConfigError as e:
        raise schema.ConfigError(f"{cells[0].name}@{decoding.name}: {e}") from None
    return cls(cells, dataset, programs.build(config, dataset, cells[0].decodings))

  @property
  def config(self):
    return self.cells[0].config

  @property
  def label(self) -> str:
    """The group's cells, shortly: its first cell's name, and how many more."""
    more = len(self.cells) - 1
    return self.cells[0].name + (f" (+{more} more)" if more else "")

  @property
  def greedy(self) -> str | None:
    """The name of the cells' first greedy decoding, if any (it gives the last curve point)."""
    names = [d.name for d in self.cells[0].decodings if d.generate.strategy == "greedy"]
    return names[0] if names else None


def group_cells(cells: list[config_lib.Cell]) -> list[Group]:
  """One Group per program key, in first-appearance order; datasets and prompts built now."""
  groups = collections.OrderedDict()
  for cell in cells:
    groups.setdefault(config_lib.program_key(cell), []).append(cell)
  return [Group.build(group) for group in groups.values()]


TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class ProgramCompile:
  """One program's compilation: JAX's tracing and lowering, then XLA's compile or a load of
  the compiled program from the persistent compilation cache."""

  program: str  # The jitted function's name: init, train, evaluate, dynamics, ...
  cells: str = ""  # The cells whose group compiled it ("" outside a group: helpers).
  trace: float = 0.0  # Seconds.
  lower: float = 0.0
  backend: float = 0.0  # XLA's compile, or the cache load when cache_hit.
  cache_hit: bool = False

  @property
  def seconds(self) -> float:
    return self.trace + self.lower + self.backend

  def as_dict(self) -> dict:
    fields = dataclasses.asdict(self)
    times = {k: round(fields[k], 4) for k in ("trace", "lower", "backend")}
    return dict(fields, **times, seconds=round(self.seconds, 4))


def _program_name(fun_name: str) -> str:
  """jit(f) -> f: JAX names a program's lowering and compile events after the jit."""
  match = re.fullmatch(r"jit\((.*)\)", fun_name)
  return match.group(1) if match else fun_name or "?"


class _ThreadState(threading.local):
  """A thread's compiles in progress, whether the cache served its current one, its group."""

  def __init__(self):
    self.open, self.hit, self.cells = {}, False, ""


class _CompileClock:
  """JAX's compile events (tracing, lowering, XLA compile), summed and per program."""

  def __init__(self):
    self.seconds = 0.0  # Every compile event's, a program's tracing without a compile too.
    self.programs: list[ProgramCompile] = []  # In compile order.
    self._lock = threading.Lock()
    self._thread = _ThreadState()

  @contextlib.contextmanager
  def group(self, cells: str):
    """Records programs compiled inside as the group of `cells`'s."""
    local = self._thread
    before, local.cells = local.cells, cells
    try:
      yield
    finally:
      local.cells = before

  def on_duration(self, name: str, seconds: float, fun_name: str = "", **_) -> None:
    if not name.startswith("/jax/core/compile/"):
      return
    local = self._thread
    program = _program_name(fun_name)
    with self._lock:
      self.seconds += seconds
      record = local.open.setdefault(program, ProgramCompile(program))
      if name == TRACE_EVENT:
        record.trace += seconds
      elif name == LOWER_EVENT:
        record.lower += seconds
      elif name == BACKEND_EVENT:  # The last event of a compile: the record is complete.
        record.backend += seconds
        record.cache_hit, local.hit = local.hit, False
        record.cells = local.cells
        self.programs.append(local.open.pop(program))

  def on_event(self, name: str, **_) -> None:
    if name == CACHE_HIT_EVENT:  # Raised inside the backend compile it served.
      self._thread.hit = True

  def mark(self) -> tuple[float, int]:
    """Where a run's compile phase starts (tracing without a compile so far is dropped)."""
    self._thread.open.clear()
    return self.seconds, len(self.programs)

  def since(self, mark: tuple[float, int]) -> dict:
    """The compile phase's entries of a run's phases, from the events after `mark`."""
    seconds, first = mark
    records = self.programs[first:]
    return dict(
      compile=self.seconds - seconds,
      programs_compiled=len(records),
      compilation_cache_hits=sum(p.cache_hit for p in records),
      compile_programs=[p.as_dict() for p in records],
    )


_CLOCK = _CompileClock()
jax.monitoring.register_event_duration_secs_listener(_CLOCK.on_duration)
jax.monitoring.register_event_listener(_CLOCK.on_event)


def corpora(cells: list[config_lib.Cell]) -> dict:
  """Cell name -> the text it trains on: name, characters, sha256 (config.json records it)."""
  return {c.name: data_lib.corpus_info(c.config.data).as_dict() for c in cells}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Seeds per compiled call, chosen so a group's programs stay under the memory budget."""

  budget: int  # Bytes.
  train_seeds: int  # Rows (cell x seed) trained at once.
  eval_seeds: int  # Rows evaluated at once.


def plan(group: Group, total_rows: int, budget: int) -> Plan:
  """The largest chunks under the budget (and study.max_parallel_seeds); refuses if none fit.

  budget is per process (host): its local devices share it, each holding its block of a
  chunk's rows, so a study over more hosts trains more seeds per call.
  """
  ndev = jax.device_count()
  fp = group.programs.footprint
  per_device = budget // jax.local_device_count()
  fits_train, fits_eval = per_device // fp.train, per_device // fp.evaluate
  if min(fits_train, fits_eval) < 1:
    raise workdir.WorkdirError(
      f"study.memory_budget_mb={budget >> 20} is too small for {group.cells[0].name}: one seed "
      f"needs ~{fp.train / 2**20:.1f} MiB to train and ~{fp.evaluate / 2**20:.1f} MiB to "
      f"evaluate ({fp.prompts} prompts, vocabulary {group.dataset.vocab_size}, "
      f"{jax.local_device_count()} device(s) per process); raise it, or lower generate.max_prompts"
    )
  cap = group.config.study.max_parallel_seeds or total_rows
  train = min(cap, total_rows, fits_train * ndev)
  train = math.ceil(total_rows / math.ceil(total_rows / train))  # Balanced: 2 x 128, not 220 + 36.
  train = math.ceil(train / ndev) * ndev  # Padding rows are dropped after the call.
  evaluate = min(train, fits_eval * ndev)
  return Plan(budget=budget, train_seeds=train, eval_seeds=evaluate)


def check_processes(config) -> None:
  """Across processes, a cell's seeds must split evenly over all devices (each saved chunk of
  models is then sharded like the training state, and written by the processes holding it)."""
  ndev = jax.device_count()
  if jax.process_count() > 1 and config.study.seeds % ndev:
    raise schema.ConfigError(
      f"config.study.seeds={config.study.seeds} must be a multiple of the {ndev} devices of the "
      f"{jax.process_count()} processes"
    )


def check_backend(cells: list[config_lib.Cell]) -> None:
  """model.impl="pallas" here: its kernels are float32 (refused under --jax_enable_x64), and
  off a GPU they run in Pallas' interpreter, which gives the same results, slowly (a warning)."""
  if not any(c.config.model.impl == "pallas" for c in cells):
    return
  if jax.config.jax_enable_x64:
    raise schema.ConfigError(
      "config.model.impl must be 'fused' or 'flax' with --jax_enable_x64 (the Pallas kernels "
      "are float32), got 'pallas'"
    )
  if jax.default_backend() != "gpu":
    logging.warning(
      "model.impl='pallas' on %s: its kernels run in Pallas' interpreter, several times "
      "slower than 'fused'",
      jax.default_backend(),
    )


def _cell_meta(cell: config_lib.Cell, dataset: data_lib.Dataset, timing, epochs_Q: list):
  prompts = evaluate_lib.choose_prompts(cell.config, dataset)
  next_N = dataset.windows_NxW[:, -1]
  return results.CellMeta(
    name=cell.name,
    scenario=cell.scenario,
    scenario_index=cell.scenario_index,
    axes=cell.axes,
    config=cell.config.to_dict(),
    decodings=[d.name for d in cell.decodings],
    labels={d.name: cell.label(d.name) for d in cell.decodings},
    vocab=list(dataset.vocab),
    num_windows=int(dataset.windows_NxW.shape[0]),
    prompts=len(prompts.ids),
    contexts=prompts.contexts,
    contexts_used=prompts.contexts_used,
    mode_token=int(np.bincount(next_N[next_N > 0], minlength=2).argmax()),
    eval_epochs=list(epochs_Q),
    seconds=timing.total,
    train_seconds=timing.train,
    eval_seconds=timing.evaluate,
    fingerprint=config_lib.cell_fingerprint(cell),
  )


@dataclasses.dataclass
class _Timing:
  """Seconds a cell took: in all, training calls, evaluation (final and dynamics)."""

  total: float = 0.0
  train: float = 0.0
  evaluate: float = 0.0

  def __add__(self, other: "_Timing") -> "_Timing":
    return _Timing(*(a + b for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


class _CellBuffer:
  """Per-seed rows of one cell, gathered chunk by chunk until all its seeds are in."""

  def __init__(self, seeds: int):
    self.remaining = seeds
    self.parts = []  # One results.SeedArrays per chunk (chunks read back: process 0 only).
    self.timing = _Timing()  # The cell's: its chunks read back included (the cell's record).
    self.computed = _Timing()  # This run's chunks only (the run's phases).

  def add_part(
    self, part: results.SeedArrays | None, num_seeds: int, timing: _Timing, read_back=False
  ) -> None:
    if part is not None:
      self.parts.append(part)
    self.timing += timing
    if not read_back:
      self.computed += timing
    self.remaining -= num_seeds

  def arrays(self) -> results.SeedArrays:
    return results.SeedArrays.concatenate(self.parts)


def _seed_arrays(mine: np.ndarray, trained, evaluation) -> results.SeedArrays:
  """One cell's rows (mine) of a chunk's training and final evaluation."""
  train = {"loss_curve": trained.loss_SxE[mine]}
  train.update((field, value[mine]) for field, value in trained.curves.items())
  train.update((field, np.asarray(v)[mine]) for field, v in vars(evaluation.train).items())
  decodings = {
    name: {field: np.asarray(value)[mine] for field, value in vars(decoded).items()}
    for name, decoded in evaluation.decodings.items()
  }
  return results.SeedArrays(train=train, decodings=decodings)


def _signature(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _in_parts(program, state, rows: int, eval_seeds: int):
  """program(state) on the first `rows` rows, at most eval_seeds rows per call, brought to host.

  Each call takes the same rows of every device's block of the seed axis, so states stay
  where they are; every call has the same shape (the last overlaps the one before it), so one
  compiled program serves. Needs the state's rows and eval_seeds to split over the devices.
  """
  size = jax.tree_util.tree_leaves(state)[0].shape[0]
  if eval_seeds >= size:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:rows], _to_host(program(state)))
  ndev = jax.device_count()
  block, per_device = size // ndev, eval_seeds // ndev
  row_of_DxB = np.arange(size).reshape(ndev, block)
  parts, index = [], []
  for lo in range(0, block, per_device):
    lo = min(lo, block - per_device)
    parts.append(_to_host(program(_block_rows(per_device)(state, lo))))
    index.append(row_of_DxB[:, lo : lo + per_device].reshape(-1))
  index = np.concatenate(index)

  def place(*xs):
    joined = np.concatenate([np.asarray(x) for x in xs])
    out = np.empty((size, *joined.shape[1:]), joined.dtype)
    out[index] = joined  # Overlapping rows are written twice with the same values.
    return out[:rows]

  return jax.tree_util.tree_map(place, *parts)


def eval_epochs(config) -> list[int]:
  """Evaluation points: epochs 0, k, 2k, ..., E with k = study.eval_every.

  eval_every 0 picks k = E / 2: epochs 0, E/2 and E, which keeps the cost of following
  training within a quarter of the blog study's time (each point decodes every prompt).
  Results never depend on study.epochs_per_call; a k that is a multiple of it adds no
  compiled program.
  """
  epochs = config.train.epochs
  every = config.study.eval_every or max(1, epochs // 2)
  return sorted(set(range(0, epochs, every)) | {epochs})


def epoch_bounds(config) -> list[int]:
  """The epochs at which a chunk's compiled training calls end: every study.epochs_per_call
  epochs, at the evaluation points, and at the end."""
  epochs, per_call = config.train.epochs, config.study.epochs_per_call
  return sorted(set(range(0, epochs, per_call)) | set(eval_epochs(config)) | {epochs})


AHEAD_THREAD = "compile-ahead"
# Below this many cores the compile threads and the main thread mostly take turns: on the
# 2-core VM one thread won 5-10% of a one-process blog study cold, but slowed the cold tests.
AHEAD_MIN_CORES = 4
# At most this many programs compile at once: each XLA compile holds its own memory.
AHEAD_MAX_THREADS = 8


def _cores() -> int:
  """The cores this process may run on (a --workers worker is pinned to its share)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class _AheadCompiles:
  """The compile-ahead threads' jobs. A job compiles one program and returns the jobs that
  follow it (a later group's init: that group's other programs, which need init's output
  shardings). A group's event is set once none of its jobs is left; the main thread waits for
  it rather than compile the same program at the same time (twice the work)."""

  def __init__(self, labels: list[str]):
    self._cv = threading.Condition()
    self._queue = collections.deque()  # (group label, job), in the order the study calls them.
    self._left = dict.fromkeys(labels, 0)
    self._running = 0
    self._stopped = False
    self.ready = {label: threading.Event() for label in labels}

  def add(self, label: str, jobs: list) -> None:
    with self._cv:
      self._add(label, jobs, done=0)

  def _add(self, label: str, jobs: list, done: int) -> None:
    """Queues a group's new jobs and counts `done` of its jobs finished (under the lock)."""
    if not self._stopped:
      self._queue.extend((label, job) for job in jobs)
      self._left[label] += len(jobs)
    self._left[label] -= done
    if self._left[label] <= 0:
      self.ready[label].set()
    self._cv.notify_all()

  def stop(self) -> None:
    """Drops the jobs not started (the study ended or failed); the running ones finish."""
    with self._cv:
      self._stopped = True
      self._queue.clear()
      for event in self.ready.values():
        event.set()
      self._cv.notify_all()

  def work(self) -> None:
    """A thread's loop: jobs until none is queued and none running can add more."""
    while True:
      with self._cv:
        while not self._queue and self._running:
          self._cv.wait()
        if not self._queue:
          return
        label, job = self._queue.popleft()
        self._running += 1
      follow = []
      try:
        with _CLOCK.group(f"{label}, ahead"):
          follow = job()
      except Exception as e:  # noqa: BLE001  # Only time is lost: the calls compile it.
        logging.info("compiling ahead: %s failed (%s: %s)", label, type(e).__name__, e)
      with self._cv:
        self._running -= 1
        self._add(label, follow, done=1)  # Sets the group's event once nothing is left.


_AHEAD: list[_AheadCompiles] = []  # The running study's, while its threads work.


def _wait_ahead(group: "Group") -> None:
  """Waits until the compile-ahead threads, if they have the group's programs, are done."""
  for ahead in _AHEAD:
    ready = ahead.ready.get(group.label)
    if ready is not None:
      ready.wait()


def _cold(group: Group, since: int) -> bool:
  """Whether XLA compiled the group's init program (not loaded it from the cache) after the
  clock's first `since` records."""
  records = _CLOCK.programs[since:]
  return any(r.program == "init" and r.cells == group.label and not r.cache_hit for r in records)


def _compile_ahead(
  group: Group, state, eval_seeds: int, later: list[Group], budget: int, since: int
) -> None:
  """Compiles, in background threads, the group's training calls and final evaluation while
  the main thread compiles and runs the dynamics at epoch 0, and every program of the later
  groups while this one trains: one program a thread, up to cores - 1 threads
  (AHEAD_MAX_THREADS). XLA's compile releases Python's lock, so the compiles overlap each
  other and the main thread's work; its calls then find the programs compiled in memory.
  Where it gets to a group's programs first (its first training call; a later group's start),
  the main thread waits for them (_wait_ahead). Only when the init program was compiled, not
  loaded from the cache (a warm run would only trace and lower every program twice), for one
  process with AHEAD_MIN_CORES cores or more. since: the compile clock's records before
  init's call."""
  if not _cold(group, since) or jax.process_count() > 1 or _ahead_threads():
    return  # Warm; several processes; or threads already compile ahead.
  if _cores() < AHEAD_MIN_CORES:
    return
  # Not the arrays: training donates them while a thread still lowers.
  abstract = jax.tree_util.tree_map(lambda x: _abstract(x, x.sharding), state)
  float_dtype = jnp.zeros(()).dtype  # Read here: x64 is a thread-local setting too.
  ahead = _AheadCompiles([g.label for g in (group, *later)])
  ahead.add(group.label, _group_jobs(group, abstract, eval_seeds, with_dynamics=False))
  for next_group in later:
    ahead.add(next_group.label, [functools.partial(_init_job, next_group, budget, float_dtype)])
  _AHEAD.append(ahead)
  for _ in range(max(1, min(_cores() - 1, AHEAD_MAX_THREADS))):
    threading.Thread(target=ahead.work, daemon=True, name=AHEAD_THREAD).start()


def _abstract(x, sharding):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _init_job(group: Group, budget: int, float_dtype) -> list:
  """Compiles the init program of a group that has not started, for its first chunk's shapes;
  returns the jobs of its other programs."""
  the_plan = plan(group, len(group.cells) * group.config.study.seeds, budget)
  sharding = NamedSharding(programs.mesh(), P("seeds"))
  chunk = the_plan.train_seeds
  inputs = [
    jax.ShapeDtypeStruct((chunk,), dtype, sharding=sharding)
    for dtype in (np.uint32, float_dtype, float_dtype)  # _run_group's seeds, lr, dropout.
  ]
  init = group.programs.init.lower(*inputs).compile()
  shapes = jax.eval_shape(group.programs.init, *inputs)
  state = jax.tree_util.tree_map(_abstract, shapes, init.output_shardings)
  return _group_jobs(group, state, the_plan.eval_seeds, with_dynamics=True)


def _group_jobs(group: Group, state, eval_seeds: int, with_dynamics: bool) -> list:
  """A job per program a chunk of `state`'s shape calls, in the order it calls them."""
  bounds = epoch_bounds(group.config)
  calls = list(dict.fromkeys(b - a for a, b in itertools.pairwise(bounds)))
  size = jax.tree_util.tree_leaves(state)[0].shape[0]
  whole = eval_seeds >= size  # Else evaluation runs on parts of the state, shaped otherwise.
  jobs = [group.programs.dynamics] if with_dynamics and whole else []
  jobs += [group.programs.epochs_program(n) for n in calls]  # Made here, once: one jit each.
  jobs += [group.programs.evaluate] if whole else []

  def compile_one(program):
    program.lower(state).compile()
    return []

  return [functools.partial(compile_one, program) for program in jobs]


@dataclasses.dataclass
class _Trained:
  """One chunk after training: the state, its losses and its curves (host arrays)."""

  state: object
  loss_SxE: np.ndarray
  curves: dict  # "curve_<evaluate.Dynamics field>" -> rows x evaluation points.
  train_seconds: float
  eval_seconds: float


def _stacked(points: dict) -> dict:
  """{field: [rows] per evaluation point} -> {field: rows x points}."""
  return {k: np.stack(v, axis=1) for k, v in points.items()}


def _train_chunk(group: Group, state, rows: int, resume, save, eval_seeds: int, progress):
  """Runs a chunk's epochs in compiled calls, evaluating the dynamics at evaluation points.

  resume: (state, loss_SxE, curves) of a checkpoint of this very chunk, or None.
  save(epoch, state, loss_SxE, curves) writes a checkpoint; it is called between calls,
  every study.checkpoint_seconds.
  """
  config = group.config
  epochs = config.train.epochs
  points = eval_epochs(config)
  bounds = epoch_bounds(config)
  t0 = last_save = time.time()
  losses, epoch, train_s, eval_s = [], 0, 0.0, 0.0
  curves = {f.name: [] for f in dataclasses.fields(evaluate_lib.Dynamics)}
  if resume is not None:
    state, loss_SxE, saved = resume
    losses, epoch = [loss_SxE], loss_SxE.shape[1]
    curves = {k: list(v.T) for k, v in saved.items()}
  for bound in bounds:
    if bound > epoch:
      _wait_ahead(group)  # Its training calls may be compiling ahead (a cold run).
      t = time.time()
      state, loss_SxE = group.programs.run_epochs(state, bound - epoch)
      jax.block_until_ready(loss_SxE)
      losses.append(np.asarray(_to_host(loss_SxE))[:rows])
      train_s, epoch = train_s + time.time() - t, bound
      progress.epochs(rows, epoch, epochs, t0)
    reused = bound == epochs and group.greedy is not None  # From the final evaluation.
    if epoch == bound and bound in points[len(curves["loss"]) :] and not reused:
      t = time.time()
      dynamics = _in_parts(group.programs.dynamics, state, rows, eval_seeds)
      for k, v in vars(dynamics).items():
        curves[k].append(v)
      eval_s += time.time() - t
    # Process 0's clock decides: every process must join the same (collective) saves.
    due = 0 < epoch < epochs and time.time() - last_save >= config.study.checkpoint_seconds
    if 0 < epoch < epochs and hosts.share(due):
      losses = [np.concatenate(losses, axis=1)]
      save(epoch, state, losses[0], _stacked(curves))
      last_save = time.time()
  curves = {f"curve_{k}": v for k, v in _stacked(curves).items()}
  return _Trained(state, np.concatenate(losses, axis=1), curves, train_s, eval_s)


def budget_bytes(config) -> int:
  """Bytes each process plans for: study.memory_budget_mb, or a safe share when it is 0 (the
  smallest host's, as every process must cut the same chunks)."""
  mib = config.study.memory_budget_mb or programs.default_budget() >> 20
  return hosts.smallest(mib) << 20  # In MiB: JAX's collectives carry 32-bit integers here.


def _last_point(evaluation, greedy: str) -> dict:
  """The dynamics at the last epoch, read from the final evaluation (the same quantities)."""
  decoded = evaluation.decodings[greedy]
  return dict(
    collapsed=decoded.seed_collapsed,
    argmax_constant=evaluation.train.argmax_constant,
    loss=evaluation.train.final_loss,
    unigram_kl=evaluation.train.unigram_kl,
    top_token_share=decoded.top_token_share,
    collapse_token=decoded.collapse_token,
  )


def _run_group(
  group: Group, done: set, directory: str, budget: int, progress, later: list[Group] = ()
) -> None:
  """Trains and evaluates the group's unfinished cells, writing each cell when its seeds are in.

  Rows are (cell, seed) over all the group's cells, so chunk boundaries, and with them the
  mid-cell checkpoints, do not depend on which cells an earlier run finished; a chunk whose
  cells are all finished is skipped.
  """
  _wait_ahead(group)  # A later group's programs may be compiling ahead (a cold run).
  config, cells = group.config, group.cells
  seeds = config.study.seeds
  float_dtype = jnp.zeros(()).dtype
  cell_of = np.repeat(np.arange(len(cells)), seeds)
  seed_of = np.tile(np.arange(seeds, dtype=np.uint32) + config.study.seed_offset, len(cells))
  lr_of = np.asarray([c.config.train.learning_rate for c in cells], float_dtype)[cell_of]
  dropout_of = np.asarray([c.config.model.dropout for c in cells], float_dtype)[cell_of]
  total = len(cell_of)
  the_plan = plan(group, total, budget)
  fingerprints = [config_lib.cell_fingerprint(c) for c in cells]
  group_sig = _signature(config_lib.program_key(cells[0]), fingerprints)
  record = hosts.share(
    workdir.latest_checkpoint(directory, group_sig) if hosts.is_writer() else None
  )
  chunk = the_plan.train_seeds
  ndev = jax.device_count()
  if record and record.get("group") == group_sig and record["chunk"] <= chunk:
    if record["chunk"] % ndev == 0:  # Else it was made with other devices: not resumable.
      chunk = record["chunk"]  # Resume with the chunks the checkpoint was made with.
  fp = group.programs.footprint
  logging.info(
    "%s: %d cells x %d seeds; memory budget %d MiB -> %d seeds per training call "
    "(~%.2f MiB each), %d per evaluation call (~%.2f MiB each); evaluated at epochs %s",
    cells[0].name, len(cells), seeds, budget >> 20, chunk, fp.train / 2**20,
    the_plan.eval_seeds, fp.evaluate / 2**20, eval_epochs(config),
  )  # fmt: skip
  buffers = {i: _CellBuffer(seeds) for i, c in enumerate(cells) if c.name not in done}
  starts = range(0, total, chunk)

  def chunk_rows(start):
    return np.arange(start, min(start + chunk, total))

  def parts_of(rows):
    """The unfinished cells' rows of a chunk: (cell index, mask over rows, seed range)."""
    out = []
    for i in np.unique(cell_of[rows]):
      if i in buffers:
        mine = cell_of[rows] == i
        seeds_mine = seed_of[rows][mine]
        out.append((i, mine, (int(seeds_mine[0]), int(seeds_mine[-1]))))
    return out

  # Chunks an interrupted run finished (their per-seed arrays are on disk): not trained again.
  kept = {}  # Chunk start -> {cell index: (arrays, timing)} (the writer's; {} elsewhere).
  if hosts.is_writer():
    for start in starts:
      sig = _signature(group_sig, chunk, start)
      found = {
        i: workdir.chunk_part(directory, group_sig, sig, cells[i].name)
        for i, _, _ in parts_of(chunk_rows(start))
      }
      if found and all(found.values()):
        kept[start] = found
  kept_starts = set(hosts.share(sorted(kept)))
  if hosts.is_writer():
    keep = {i: set() for i in buffers}  # Cell index -> seed ranges of its kept chunks' models.
    for start in kept_starts:
      for i, _, seed_range in parts_of(chunk_rows(start)):
        keep[i].add(seed_range)
    for i in buffers:  # Recomputed: no stale chunks of it remain, but kept ones.
      workdir.remove_models(directory, cells[i].name, keep[i])
  hosts.sync("stale models removed")
  sharding = NamedSharding(programs.mesh(), P("seeds"))

  def add(i, mine, part, timing: _Timing, read_back: bool = False) -> None:
    """One chunk's rows of cell i are in; writes the cell once all its seeds are."""
    buffers[i].add_part(part, int(mine.sum()), timing, read_back)
    if buffers[i].remaining == 0:
      meta = _cell_meta(cells[i], group.dataset, buffers[i].timing, eval_epochs(config))
      progress.cell_done(cells[i].name, buffers[i].computed)
      buffer = buffers.pop(i)
      if hosts.is_writer():
        workdir.write_cell(directory, cells[i], meta, buffer.arrays())

  ahead_decided = False  # Whether to compile ahead: once the first chunk's state exists.
  for start in starts:
    rows = chunk_rows(start)
    if not any(i in buffers for i in np.unique(cell_of[rows])):
      continue
    sig = _signature(group_sig, chunk, start)
    if start in kept_starts:
      logging.info("rows %d-%d: finished by an earlier run, read back", start, rows[-1])
      for i, mine, _ in parts_of(rows):
        part, timing = kept.get(start, {}).get(i) or (None, {})
        progress.skip(int(mine.sum()) * config.train.epochs)
        add(i, mine, part, _Timing(**timing), read_back=True)
      continue
    padded = np.concatenate([rows, np.full(chunk - len(rows), rows[-1])])
    t0 = time.time()
    before_init = len(_CLOCK.programs)
    state = group.programs.init(
      _to_global(seed_of[padded], sharding),
      _to_global(lr_of[padded], sharding),
      _to_global(dropout_of[padded], sharding),
    )
    if not ahead_decided:
      _compile_ahead(group, state, the_plan.eval_seeds, later, budget, before_init)
      ahead_decided = True
    resume = None
    if record and record["signature"] == sig:
      resume = workdir.restore_checkpoint(directory, record, state, len(rows), sharding)
      logging.info(
        "resuming rows %d-%d from their checkpoint at epoch %d", start, rows[-1], record["epoch"]
      )

    def save(epoch, state, loss_SxE, curves, start=start, sig=sig):
      checkpoint = workdir.Checkpoint(group_sig, sig, chunk, start, epoch, loss_SxE, curves)
      workdir.save_checkpoint(directory, group_sig, checkpoint, state)

    trained = _train_chunk(group, state, len(rows), resume, save, the_plan.eval_seeds, progress)
    t = time.time()
    evaluation = _in_parts(group.programs.evaluate, trained.state, len(rows), the_plan.eval_seeds)
    eval_seconds = trained.eval_seconds + time.time() - t
    if group.greedy is not None:
      last = _last_point(evaluation, group.greedy)
      trained.curves = {
        k: np.concatenate([v, np.asarray(last[k.removeprefix("curve_")])[:, None]], axis=1)
        for k, v in trained.curves.items()
      }
    seconds = time.time() - t0
    for i, mine, _ in parts_of(rows):
      if config.study.save_models:
        first, last = np.flatnonzero(mine)[[0, -1]]
        states = _rows(trained.state, first, last + 1)
        workdir.save_models(directory, cells[i].name, seed_of[rows][mine], states)
      share = mine.sum() / len(rows)
      timing = _Timing(seconds * share, trained.train_seconds * share, eval_seconds * share)
      part = _seed_arrays(mine, trained, evaluation)
      if hosts.is_writer() and buffers[i].remaining > mine.sum():  # Else the cell is written.
        workdir.save_chunk_part(
          directory, group_sig, sig, cells[i].name, part, dataclasses.asdict(timing)
        )
      add(i, mine, part, timing)
  if hosts.is_writer():
    workdir.clear_checkpoints(directory, group_sig)


def _ahead_threads() -> list[threading.Thread]:
  return [t for t in threading.enumerate() if t.name == AHEAD_THREAD and t.is_alive()]


@contextlib.contextmanager
def _joins_compiles_ahead():
  """Stops the compile-ahead threads when the study ends or stops on an error, and waits for
  the compiles they run: Python exiting while XLA compiles in another thread can crash the
  interpreter (on Ctrl-C run.py leaves at once, without finalising)."""
  interrupted = False
  try:
    yield
  except KeyboardInterrupt:
    interrupted = True
    raise
  finally:
    for ahead in _AHEAD:
      ahead.stop()
    _AHEAD.clear()
    for thread in [] if interrupted else _ahead_threads():
      thread.join()


class _Progress:
  """Logs cells done / total, seeds per second and an ETA for the whole study."""

  def __init__(self, total_cells: int, seed_epochs: int):
    self.total_cells, self.cells_done = total_cells, 0
    self.seed_epochs_total, self.seed_epochs_done = seed_epochs, 0
    self.start = time.time()
    self.last = 0.0
    self.timing = _Timing()  # Of the cells computed in this run.

  def epochs(self, num_seeds: int, epochs_done: int, epochs: int, chunk_start: float) -> None:
    """Called after each jitted call of `epochs_done` of `epochs` epochs on num_seeds seeds."""
    now = time.time()
    seed_epochs = self.seed_epochs_done + num_seeds * epochs_done
    if epochs_done == epochs:
      self.seed_epochs_done = seed_epochs
    if now - self.last < 2.0 and epochs_done != epochs:
      return
    self.last = now
    rate = seed_epochs / max(now - self.start, 1e-9)  # Compile time included: an honest ETA.
    eta = (self.seed_epochs_total - seed_epochs) / max(rate, 1e-9)
    chunk_rate = num_seeds * epochs_done / epochs / max(now - chunk_start, 1e-9)
    logging.info(
      "cells %d/%d | epoch %d/%d of %d seeds | %s seeds/s | ETA %.0fs",
      self.cells_done, self.total_cells, epochs_done, epochs, num_seeds,
      f"{chunk_rate:.1f}" if chunk_rate >= 0.1 else f"{chunk_rate:.2g}",  # Not 0.0 when slow.
      eta,
    )  # fmt: skip

  def skip(self, seed_epochs: int) -> None:
    """Seed-epochs an earlier run finished and this one reads back: out of the ETA."""
    self.seed_epochs_total -= seed_epochs

  def cell_done(self, name: str, timing: "_Timing | None" = None) -> None:
    """A cell finished (timing: when computed in this run, not skipped)."""
    self.timing += timing or _Timing()
    self.cells_done += 1
    elapsed = time.time() - self.start
    logging.info(
      "finished %s (%d/%d cells, %.0fs elapsed)", name, self.cells_done, self.total_cells, elapsed
    )


def run_study(
  config,
  directory: str,
  overwrite: bool = False,
  started: float | None = None,
  first_group: int = 0,
  note=None,
  skip: tuple[str, ...] = (),
) -> list[results.Row]:
  """Runs every unfinished cell of `config` into `directory`; returns the results rows.

  The workdir is locked while the study runs. started: when the process began (time.time()),
  for the start-up phase; default now. first_group: the group to run first, then the others
  in turn: run.py --workers' worker k starts at group k, so that with an empty compilation
  cache the workers compile different programs first and then load each other's from the
  cache, rather than all compile the same ones at once. note: called once the results are
  written, the workdir still locked, on the process that writes (run.py writes the note).
  skip: cells a --workers worker leaves out (its parent holds them finished); its results
  are the other cells'.
  """
  start = started or time.time()
  cells = config_lib.expand_cells(config)
  check_processes(config)
  check_backend(cells)
  groups = group_cells(cells)  # Datasets and prompts now: bad data fails before any training.
  turn = first_group % len(groups)
  groups = groups[turn:] + groups[:turn]
  opened = hosts.on_writer(
    lambda: workdir.open_for_study(directory, config, overwrite, corpora(cells)), _REFUSALS
  )
  with opened or contextlib.nullcontext():
    rows = _run(config, cells, groups, directory, start, skip)
    if hosts.is_writer():  # An interrupted --workers run's folders: every cell is in now.
      workdir.remove_workers(directory)
    _note(note)
    return rows


def _note(note) -> None:
  """Calls run.py's note writer, if any, on the process that writes (inside the lock)."""
  if note is not None and hosts.is_writer():
    note()


# What opening a workdir may raise on process 0, passed on to every process.
_REFUSALS = (workdir.WorkdirError, files.WriteError, schema.ConfigError)


def _run(config, cells, groups, directory: str, start: float, skip=()) -> list[results.Row]:
  compile_before = _CLOCK.mark()
  startup = time.time() - start
  logging.info(
    "%d cells x %d seeds in %d compiled program(s) on %s",
    len(cells), config.study.seeds, len(groups), workdir.device_summary(),
  )  # fmt: skip
  writer = hosts.is_writer()
  done = set(
    hosts.share([c.name for c in cells if workdir.cell_done(directory, c)] if writer else None)
  )
  done |= set(skip)
  pending = [c for c in cells if c.name not in done]
  seed_epochs = sum(c.config.train.epochs for c in pending) * config.study.seeds
  progress = _Progress(len(cells), seed_epochs)
  budget = budget_bytes(config)
  pending_groups = [g for g in groups if any(c.name not in done for c in g.cells)]
  with _joins_compiles_ahead():
    for group in groups:
      for cell in group.cells:
        if cell.name in skip:
          logging.info("skipping %s: its parent process holds it finished", cell.name)
          progress.cell_done(cell.name)
        elif cell.name in done:
          logging.info("skipping %s: already finished in %s", cell.name, directory)
          progress.cell_done(cell.name)
      if group in pending_groups:
        later = pending_groups[pending_groups.index(group) + 1 :]  # Compiled ahead when cold.
        with _CLOCK.group(group.label):
          _run_group(group, done, directory, budget, progress, later)
  if not writer:
    return []  # Process 0 writes the results.
  return workdir.write_results(
    directory, [c for c in cells if c.name not in skip], config.study.seeds,
    time.time() - start, _phases(progress.timing, startup, compile_before, time.time() - start),
  )  # fmt: skip


def _phases(timing: "_Timing", startup: float, compile_before, total: float) -> dict:
  """Seconds per phase of this run: start-up (process start to the first cell), compilation
  (JAX's tracing, lowering and XLA compile events, also per program; part of training's and
  evaluation's first calls), training and evaluation of the cells computed in this run, and
  the whole."""
  return dict(
    startup=startup,
    **_CLOCK.since(compile_before),
    train=timing.train,
    evaluate=timing.evaluate,
    total=total,
  )


def reevaluate_study(config, directory: str, block: tuple[int, int] | None = None, note=None):
  """Evaluates a finished study's saved models again with config's decodings: no training.

  Only generate.* and study.decodings may differ from the config that trained them; loss
  curves are kept, every other per-seed metric is recomputed by today's code. block: a
  --workers worker's seeds (first, last, before study.seed_offset); it decodes only those and
  writes its cells to its worker folder (workdir.reevaluation_out), for the parent to merge: the
  parent holds the workdir's lock and checked the config. Returns the rows (none for a block).
  note: as run_study's.
  """
  start, compile_before = time.time(), _CLOCK.mark()
  cells = config_lib.expand_cells(config)
  check_processes(config)
  groups = group_cells(cells)
  if block is None:
    first, last, out = 0, config.study.seeds - 1, directory
    opened = hosts.on_writer(
      lambda: workdir.open_for_reevaluation(directory, config, corpora(cells)), _REFUSALS
    )
  else:
    (first, last), opened = block, None
    out = workdir.reevaluation_out(directory, first, last)
  offset, seeds = config.study.seed_offset, last - first + 1
  sharding = NamedSharding(programs.mesh(), P("seeds"))
  with opened or contextlib.nullcontext():
    budget = budget_bytes(config)
    for group in groups:
      with _CLOCK.group(group.label):
        eval_seeds = plan(group, seeds, budget).eval_seeds
        for cell in group.cells:
          t0 = time.time()
          old_meta, old = workdir.read_cell(directory, cell.name)
          chunks = workdir.models_of(directory, cell.name)
          if sum(hi - lo + 1 for lo, hi, _ in chunks) != config.study.seeds:
            raise workdir.WorkdirError(
              f"cell {cell.name!r} in {directory!r} has no saved models of all its seeds "
              "(was it run with study.save_models=False?)"
            )
          buffer = _CellBuffer(seeds)
          for chunk_first, chunk_last, path in chunks:  # In seed order.
            lo, hi = max(chunk_first, offset + first), min(chunk_last, offset + last)
            if lo > hi:
              continue  # Another worker's seeds.
            num, row = hi - lo + 1, lo - offset  # row: the first one's in the cell's arrays.
            rows = (lo - chunk_first, hi - chunk_first)
            state = _load_sharded(
              group.programs.trainer, chunk_first, chunk_last, path, sharding, rows
            )
            evaluation = _in_parts(group.programs.evaluate, state, num, eval_seeds)
            kept = {k: v[row : row + num] for k, v in old.train.items() if k.startswith("curve_")}
            trained = _Trained(state, old.train["loss_curve"][row : row + num], kept, 0.0, 0.0)
            mine = np.ones(num, bool)
            buffer.add_part(_seed_arrays(mine, trained, evaluation), num, _Timing())
          t = time.time() - t0
          timing = _Timing(old_meta.seconds + t, old_meta.train_seconds, old_meta.eval_seconds + t)
          meta = _cell_meta(cell, group.dataset, timing, old_meta.eval_epochs)
          arrays = buffer.arrays()
          if hosts.is_writer():
            workdir.write_cell(out, cell, meta, arrays)
          logging.info("re-evaluated %s (%d seeds)", cell.name, seeds - buffer.remaining)
    if block is not None or not hosts.is_writer():
      return []
    total = time.time() - start
    phases = dict(evaluate=total, **_CLOCK.since(compile_before), total=total)
    rows = workdir.write_results(directory, cells, config.study.seeds, total, phases)
    _note(note)
    return rows


def _load_sharded(trainer, first: int, last: int, path: str, sharding, rows=None):
  """Rows (lo, hi) of a saved chunk of states (default: all of seeds first..last), sharded
  over the seed axis (padded by the last row to split over the devices: padding rows are
  evaluated and dropped)."""
  lo, hi = rows if rows is not None else (0, last - first)
  num, ndev = hi - lo + 1, jax.device_count()
  if num == last - first + 1 and num % ndev == 0:
    return workdir.load_states(trainer, first, last, path, sharding)
  if jax.process_count() > 1:
    raise workdir.WorkdirError(
      f"{path} holds {num} seeds, which do not split over {ndev} devices: re-evaluate it with "
      "a number of devices that divides it (one process, for instance)"
    )
  state = workdir.load_states(trainer, first, last, path)
  index = np.minimum(lo + np.arange(math.ceil(num / ndev) * ndev), hi)
  return jax.device_put(jax.tree_util.tree_map(lambda x: x[index], state), sharding)
