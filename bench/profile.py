"""Where a training step's device time goes: the study's train program, traced and summed.

  python bench/profile.py --seeds=32768              # on a GPU: the 25 costliest kernels
  python bench/profile.py --quick                    # smoke test (CPU too): 8 seeds, 1 epoch
  python bench/profile.py --variants=fused,fused:tf32,fused:unroll1,flax

For each variant of configs/blog.py's scenario 2 (model.impl, model.unroll, matmul_precision),
compiles the study's own train program (research/programs.py) for --epochs epochs at --seeds
seeds, times --repeats calls (seeds/s for the scenario's 100 epochs), then runs one more call
under jax.profiler and sums the device's kernel time by XLA instruction, mapped to the source
line that instruction came from (the optimised HLO's metadata). Every variant starts from the
same initial state; their losses are compared with the first variant's.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# XLA:GPU replays a step's kernels as one command buffer (a CUDA graph), which the profiler
# sees as a single event: off here, so each kernel is timed on its own.
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
  flags_ = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags_} --xla_gpu_enable_command_buffer=".strip()

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import scenario  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from configs import blog  # noqa: E402
from research import data as data_lib  # noqa: E402
from research import pallas_lstm, programs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 32768, "Seeds trained in parallel.")
flags.DEFINE_integer("epochs", 10, "Epochs per timed call (the study's epochs_per_call).")
flags.DEFINE_integer("repeats", 3, "Timed calls per variant (the median is reported).")
flags.DEFINE_list(
  "variants",
  ["fused", "fused:tf32"],
  "impl[:tf32|:bf16][:unrollK][:warpsN][:x3][:gates]: model.impl, model.matmul_precision "
  "(float32 unless named), model.unroll, and for impl pallas the kernels' Triton warps, float32 "
  "dots as three tf32 passes, and gates kept for the backward.",
)
flags.DEFINE_integer("top", 25, "Rows of the per-instruction table.")
flags.DEFINE_bool("trace", True, "Profile one call per variant (else only time them).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_bool("quick", False, "Smoke test: 8 seeds, 1 epoch, 1 repeat.")

PRECISIONS = {"tf32": "tensorfloat32", "bf16": "bfloat16"}  # model.matmul_precision values.


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  impl: str
  unroll: int
  precision: str  # model.matmul_precision.
  warps: int = 0  # "pallas" only: pallas_lstm.NUM_WARPS while compiling (0: its default).
  x3: bool = False  # "pallas" only: its float32 dots as three tf32 passes (FLOAT32_DOT).
  gates: bool = False  # "pallas" only: the forward keeps the gates (STORE_GATES).


def parse_variant(text: str) -> Variant:
  impl, *opts = text.split(":")
  unroll, precision, warps, x3, gates = 0, "float32", 0, False, False
  for opt in opts:
    if opt.startswith("unroll"):
      unroll = int(opt[len("unroll") :])
    elif opt.startswith("warps") and impl == "pallas":
      warps = int(opt[len("warps") :])
    elif opt == "x3" and impl == "pallas":
      x3 = True
    elif opt == "gates" and impl == "pallas":
      gates = True
    elif opt in PRECISIONS:
      precision = PRECISIONS[opt]
    else:
      raise app.UsageError(f"unknown variant option {opt!r} in {text!r}")
  return Variant(text, impl, unroll, precision, warps, x3, gates)


@contextlib.contextmanager
def kernel_options(variant: Variant):
  """The Pallas kernels traced with the variant's Triton warps, float32 dot algorithm and
  gate storage."""
  saved = pallas_lstm.NUM_WARPS, pallas_lstm.FLOAT32_DOT, pallas_lstm.STORE_GATES
  pallas_lstm.NUM_WARPS = variant.warps or saved[0]
  if variant.x3:
    pallas_lstm.FLOAT32_DOT = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  pallas_lstm.STORE_GATES = variant.gates or saved[2]
  try:
    yield
  finally:
    pallas_lstm.NUM_WARPS, pallas_lstm.FLOAT32_DOT, pallas_lstm.STORE_GATES = saved


def scenario_config(variant: Variant, epochs: int):
  config = blog.get_config()
  config.model.impl = variant.impl
  config.model.unroll = variant.unroll
  config.model.matmul_precision = variant.precision
  config.study.epochs_per_call = epochs
  return scenario.cell(config)


def _stack_frames(hlo_text: str) -> dict[str, list[str]]:
  """Stack frame id -> ["file:line", ... outward] from the HLO text's frame tables."""
  tables, section = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    if not line.strip() or line.startswith(("%", "HloModule", "ENTRY")):
      section = None
      continue
    if section:
      key, _, value = line.partition(" ")
      tables[section][key] = value
  files_ = {k: v.strip('"') for k, v in tables["FileNames"].items()}
  locations = {}
  for k, v in tables["FileLocations"].items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    locations[k] = (
      f"{os.path.basename(files_.get(fields.get('file_name_id'), '?'))}:{fields.get('line')}"
    )
  frames = {}
  for k, v in tables["StackFrames"].items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (locations.get(fields.get("file_location_id"), "?"), fields.get("parent_frame_id"))

  def chain(frame_id):
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      where, parent = frames[frame_id]
      out.append(where)
      frame_id = parent
    return out

  return {k: chain(k) for k in frames}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an XLA instruction came from."""

  where: str  # "innermost file:line", then "<nearest research/ file:line" if that differs.
  op: str  # The last two parts of its op_name (the JAX name stack).

  def __str__(self):
    return f"{self.where} {self.op}"


@dataclasses.dataclass(frozen=True)
class Event:
  """One kernel (or, on CPU, thunk) execution in the trace."""

  line: str  # The trace line (a GPU stream, or "host").
  kernel: str
  hlo_op: str  # The XLA instruction it ran.
  ns: float


@dataclasses.dataclass
class OpTime:
  """An XLA instruction's kernels, summed over the trace."""

  ns: float = 0.0
  calls: int = 0
  kernels: set = dataclasses.field(default_factory=set)


def hlo_sources(hlo_text: str) -> dict[str, Source]:
  """Instruction name -> its Source, from the optimised HLO's metadata."""
  frames = _stack_frames(hlo_text)
  ours = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "research", "*.py"))}
  out = {}
  pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", re.M)
  for name, meta in pattern.findall(hlo_text):
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    chain = frames.get(frame.group(1), []) if frame else []
    where = chain[0] if chain else "?"
    mine = next((c for c in chain if c.split(":")[0] in ours), None)
    if mine and mine != where:
      where = f"{where}<{mine}"
    op = re.search(r'op_name="([^"]*)"', meta)
    out[name] = Source(where, "/".join(op.group(1).split("/")[-2:]) if op else "")
  return out


def device_events(log_dir: str) -> list[Event]:
  """Every device event in the trace (on CPU, every thunk that ran an XLA instruction)."""
  from jax.profiler import ProfileData

  paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return []
  device, host = [], []
  for plane in ProfileData.from_file(paths[-1]).planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if on_device:
          device.append(Event(line.name, e.name, str(stats.get("hlo_op", e.name)), e.duration_ns))
        elif "hlo_op" in stats:  # The CPU backend's thunks run on host threads.
          host.append(Event("host", e.name, str(stats["hlo_op"]), e.duration_ns))
  return device or host


def summarise(events: list[Event], sources: dict[str, Source], steps: int, top: int) -> dict:
  """Kernel time by device line, and by XLA instruction (with its source) on the busiest line."""
  by_line = collections.Counter()
  counts = collections.Counter()
  for e in events:
    by_line[e.line] += e.ns
    counts[e.line] += 1
  lines = {k: dict(ms=v / 1e6, events=counts[k]) for k, v in by_line.items()}
  # GPU traces list each kernel on a stream line and again on an "XLA Ops" line; use one.
  ops_line = next((k for k in by_line if "XLA Ops" in k), None)
  busiest = ops_line or (max(by_line, key=by_line.get) if by_line else None)
  per_op = collections.defaultdict(OpTime)
  for e in events:
    if e.line == busiest:
      per_op[e.hlo_op].ns += e.ns
      per_op[e.hlo_op].calls += 1
      per_op[e.hlo_op].kernels.add(e.kernel[:60])
  total = sum(t.ns for t in per_op.values()) or 1.0
  rows = sorted(per_op.items(), key=lambda kv: -kv[1].ns)
  by_source = collections.Counter()
  for op, t in rows:
    by_source[sources[op].where if op in sources else "?"] += t.ns / 1e6
  table = [
    dict(
      op=op,
      ms=t.ns / 1e6,
      share=t.ns / total,
      calls_per_step=t.calls / steps,
      kernels=sorted(t.kernels)[:2],
      source=str(sources[op]) if op in sources else "?",
    )
    for op, t in rows
  ]
  return dict(
    line=busiest,
    lines=lines,
    total_ms=total / 1e6,
    kernels_per_step=sum(t.calls for t in per_op.values()) / steps,
    top=table[:top],
    by_source=dict(by_source.most_common(top)),
  )


def matmul_precision_probe() -> dict:
  """Relative error of a float32 matmul at each precision against float64 (tf32: ~3e-4)."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 512, 512))
  ref = a @ b
  out = {}
  for name in ("default", "highest"):
    with jax.default_matmul_precision(None if name == "default" else name):
      got = np.asarray(jnp.dot(jnp.float32(a), jnp.float32(b)), np.float64)
    out[name] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  return out


def main(argv):
  del argv
  variants = [parse_variant(v) for v in FLAGS.variants]
  n, epochs = FLAGS.seeds, FLAGS.epochs
  if FLAGS.quick:
    n, epochs, FLAGS.repeats = 8, 1, 1
  print(json.dumps(machine_info()), flush=True)
  print(json.dumps(dict(matmul_rel_error=matmul_precision_probe())), flush=True)
  first = scenario_config(variants[0], epochs).config
  dataset = data_lib.dataset_from_config(first.data)
  progs0 = programs.build(first, dataset, ())
  state0 = jax.block_until_ready(progs0.init(*scenario.init_args(first, n)))
  steps = epochs * -(-dataset.windows_NxW.shape[0] // first.train.batch_size)
  results, reference = [], None
  for variant in variants:
    try:
      row, loss = measure(variant, dataset, state0, n, epochs, steps, reference)
    except Exception as e:  # noqa: BLE001  # One failing variant (a kernel that does not
      # compile on this machine, say) must not lose the others' figures.
      row, loss = dict(variant=variant.name, seeds=n, error=one_line(e)), None
      print(f"\n== {variant.name}: failed: {row['error']}", flush=True)
    else:
      print_variant(row, steps)
    if reference is None:
      reference = loss
    results.append(row)
    if FLAGS.out:  # After every variant: a run stopped by a timeout keeps what it measured.
      with open(FLAGS.out, "w") as f:
        json.dump(dict(machine=machine_info(), steps_per_call=steps, results=results), f, indent=1)
  print(
    f"\n{'variant':<24} {'compile s':>9} {'call s':>7} {'seeds/s (100 ep)':>17} {'loss diff':>10}"
  )
  for r in results:
    if "error" in r:
      print(f"{r['variant']:<24} failed: {r['error']}")
      continue
    call = float(np.median(r["call_s"]))
    print(
      f"{r['variant']:<24} {r['compile_s']:>9.1f} {call:>7.3f} "
      f"{r['seeds_per_s_100_epochs']:>17.0f} {r['loss_max_abs_diff_vs_first']:>10.2e}"
    )


def one_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def measure(variant: Variant, dataset, state0, n: int, epochs: int, steps: int, reference):
  """One variant's row (compile, timed calls, profile) and its first call's losses.

  reference: the first measured variant's losses (None: this is the first).
  """
  config = scenario_config(variant, epochs).config
  progs = programs.build(config, dataset, ())
  t0 = time.perf_counter()
  with kernel_options(variant):
    compiled = progs.epochs_program(epochs).lower(state0).compile()
  compile_s = time.perf_counter() - t0
  state = jax.tree_util.tree_map(jnp.copy, state0)
  state, loss_SxE = jax.block_until_ready(compiled(state))
  loss = np.asarray(loss_SxE)
  reference = loss if reference is None else reference
  seconds = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state))
    seconds.append(time.perf_counter() - t0)
  call_s = float(np.median(seconds))
  row = dict(
    variant=variant.name,
    seeds=n,
    compile_s=compile_s,
    call_s=seconds,
    seeds_per_s_100_epochs=n / (call_s * 100 / epochs),
    loss_max_abs_diff_vs_first=float(np.max(np.abs(loss - reference))),
  )
  if FLAGS.trace:
    with tempfile.TemporaryDirectory() as log_dir:
      with jax.profiler.trace(log_dir):
        state, _ = jax.block_until_ready(compiled(state))
      events = device_events(log_dir)
    row["profile"] = summarise(events, hlo_sources(compiled.as_text()), steps, FLAGS.top)
  return row, loss


def print_variant(row: dict, steps: int):
  print(f"\n== {row['variant']}: {row['seeds_per_s_100_epochs']:.0f} seeds/s", flush=True)
  prof = row.get("profile")
  if not prof:
    return
  print(f"line {prof['line']!r}: {prof['total_ms']:.1f} ms kernel time over {steps} steps, ")
  print(f"{prof['kernels_per_step']:.1f} kernels a step; lines: {prof['lines']}")
  for r in prof["top"]:
    print(
      f"{r['ms']:8.2f} ms {100 * r['share']:5.1f}% {r['calls_per_step']:5.1f}/step "
      f"{r['op'][:28]:<28} {r['source'][:70]:<70} {r['kernels'][0] if r['kernels'] else ''}"
    )
  print("by source line:", json.dumps({k: round(v, 2) for k, v in prof["by_source"].items()}))


if __name__ == "__main__":
  app.run(main)
