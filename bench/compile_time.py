"""Compile time of the study's programs: configs/blog.py's groups, at T and multiples of T.

  python bench/compile_time.py                       # blog groups, 256 seeds, T x1 and x2
  python bench/compile_time.py --t_factors=1,2,4,8 --programs=epochs
  python bench/compile_time.py --unrolls=0,1,2 --t_factors=1,4 --repeats=3  # model.unroll
  python bench/compile_time.py --quick               # a smoke test: tiny sizes, one group

For each program key of configs/blog.py (its scenarios 2 and 3 share one: they differ only in
traced hyperparameters), builds the programs with research/programs.build, exactly as the study
does, and times each program's three compile stages separately, in this process, with JAX's
persistent compilation cache off (every compile is cold):
  trace    jit(...).trace(args): Python tracing to a jaxpr;
  lower    .lower(): the jaxpr to StableHLO;
  compile  .compile(): XLA's optimisation passes and code generation.
Programs: init (jit(vmap(init))), epochs (jit(vmap(run_epochs)) of study.epochs_per_call
epochs, the train program), evaluate (the final evaluation) and dynamics (the evaluation at
points during training). Op counts: StableHLO ops after lowering and HLO instructions after
XLA's optimisation (what code generation works on).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from configs import blog  # noqa: E402
from research import config_lib, files, programs  # noqa: E402
from research import data as data_lib  # noqa: E402

PROGRAMS = ("init", "epochs", "evaluate", "dynamics")
FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 256, "Seeds the programs are compiled for (the blog's 256).")
flags.DEFINE_list("t_factors", ["1", "2"], "Context lengths to compile at, as multiples of T.")
flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile, of {PROGRAMS}.")
flags.DEFINE_list("unrolls", [], "model.unroll values to compile side by side (default: config's).")
flags.DEFINE_integer("repeats", 1, "Compiles of each variant, round robin; the fastest is shown.")
flags.DEFINE_bool("quick", False, "Smoke test: 4 seeds, one group, T x1, init and epochs only.")
flags.DEFINE_string("out", "", "Also write the results as JSON here.")

_OP = re.compile(r"^\s*(?:%\S+|\S+)\s*=\s*")  # "%x = op(...)" / "x.1 = f32[...] op(...)".


def count_ops(text: str) -> int:
  """Lines of an HLO / StableHLO module that define a value (one per instruction)."""
  return sum(1 for line in text.splitlines() if _OP.match(line))


def group_configs(config) -> list[tuple[str, object]]:
  """(scenario names, config) per program key, in configs/blog.py's order."""
  groups = {}
  for cell in config_lib.expand_cells(config):
    groups.setdefault(config_lib.program_key(cell), []).append(cell)
  return [("+".join(c.name.split("_")[0] for c in cells), cells) for cells in groups.values()]


def time_compile(fn, args) -> dict:
  """Seconds of trace, lower and compile of a jitted fn at args (shapes), and its op counts."""
  t0 = time.perf_counter()
  traced = fn.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return dict(
    trace_s=t1 - t0,
    lower_s=t2 - t1,
    compile_s=t3 - t2,
    total_s=t3 - t0,
    stablehlo_ops=count_ops(lowered.as_text()),
    hlo_ops=count_ops(compiled.as_text()),
  )


def compile_group(cells, num_seeds: int, t: int, unroll, names) -> dict:
  """Builds one group's programs at context length t and times each one's compile."""
  config = cells[0].config
  with config.unlocked():
    config.data.context_length = t
    if unroll is not None:
      config.model.unroll = unroll
  dataset = data_lib.dataset_from_config(config.data)
  progs = programs.build(config, dataset, cells[0].decodings)
  dtype = jnp.zeros(()).dtype
  args = (
    jax.ShapeDtypeStruct((num_seeds,), jnp.int32),
    jax.ShapeDtypeStruct((num_seeds,), dtype),
    jax.ShapeDtypeStruct((num_seeds,), dtype),
  )
  out = {"init": time_compile(progs.init, args)} if "init" in names else {}
  state = jax.eval_shape(progs.init, *args)  # After init's timing: this traces init too.
  fns = dict(
    epochs=(progs.epochs_program(config.study.epochs_per_call), (state,)),
    evaluate=(progs.evaluate, (state,)),
    dynamics=(progs.dynamics, (state,)),
  )
  return out | {name: time_compile(*fns[name]) for name in names if name != "init"}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.update("jax_compilation_cache_dir", None)  # Cold compiles only.
  jax.config.update("jax_enable_compilation_cache", False)
  quick = FLAGS.quick
  names = ["init", "epochs"] if quick else FLAGS.programs
  unknown = sorted(set(names) - set(PROGRAMS))
  if unknown:
    raise app.UsageError(f"--programs: unknown {unknown}; allowed {PROGRAMS}")
  factors = [1] if quick else [int(f) for f in FLAGS.t_factors]
  unrolls = [int(u) for u in FLAGS.unrolls] or [None]
  seeds = 4 if quick else FLAGS.seeds
  repeats = 1 if quick else FLAGS.repeats
  config = blog.get_config()
  groups = group_configs(config)[:1] if quick else group_configs(config)
  base_t = config.data.context_length
  machine = machine_info()
  print(
    f"{machine['cpu_model']} | {machine['cpus_usable']} cores | {machine['backend']} | "
    f"jax {machine['jax']} | load avg {machine['load_average'][0]:.2f} | {seeds} seeds | "
    f"{repeats} repeats | persistent cache off"
  )
  header = (
    f"{'group':<6} {'T':>3} {'unroll':>6} {'program':<9} {'trace s':>7} {'lower s':>7} "
    f"{'compile s':>9} {'total s':>7} {'(median)':>8} {'StableHLO':>9} {'HLO ops':>7}"
  )
  runs = {}  # (factor, group, unroll) -> one result dict per repeat.
  keys = [(f, label, u) for f in factors for label, _ in groups for u in unrolls]
  for repeat in range(repeats):  # Round robin, so load changes hit every variant alike.
    for factor, label, unroll in keys:
      # Fresh cells each time: compile_group edits the config it is given.
      cells = dict(group_configs(blog.get_config()))[label]
      result = compile_group(cells, seeds, base_t * factor, unroll, names)
      runs.setdefault((factor, label, unroll), []).append(result)
      print(
        f"  repeat {repeat + 1}/{repeats} T={base_t * factor} group {label} unroll "
        f"{'cfg' if unroll is None else unroll}: "
        + ", ".join(f"{n} {r['total_s']:.2f} s" for n, r in result.items())
        + f" (load {os.getloadavg()[0]:.2f})",
        flush=True,
      )
  print(header)
  print("-" * len(header))
  rows = []
  for (factor, label, unroll), results in runs.items():
    t = base_t * factor
    for name in results[0]:
      each = [r[name] for r in results]
      best = min(each, key=lambda r: r["total_s"])  # The least disturbed compile.
      median = float(np.median([r["total_s"] for r in each]))
      rows.append(
        dict(group=label, context_length=t, unroll=unroll, program=name, **best,
             total_s_median=median, total_s_all=[r["total_s"] for r in each])
      )  # fmt: skip
      print(
        f"{label:<6} {t:>3} {'cfg' if unroll is None else unroll:>6} {name:<9} "
        f"{best['trace_s']:>7.2f} {best['lower_s']:>7.2f} {best['compile_s']:>9.2f} "
        f"{best['total_s']:>7.2f} {median:>8.2f} {best['stablehlo_ops']:>9} {best['hlo_ops']:>7}"
      )
  load = os.getloadavg()
  print(f"load avg at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  if FLAGS.out:
    files.write_json(
      FLAGS.out,
      dict(
        machine=machine,
        load_average_end=list(load),
        seeds=seeds,
        repeats=repeats,
        rows=rows,
        command=" ".join(["python", "bench/compile_time.py", *sys.argv[1:]]),
      ),
    )


if __name__ == "__main__":
  app.run(main)
