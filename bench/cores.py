"""How much of a CPU's cores the training program uses: one process on every core, one process
on one core, and one process per core with the seeds split between them.

  python bench/cores.py                        # scenario 2, 256 seeds, 100 epochs
  python bench/cores.py --seeds=512 --out=/tmp/cores.json
  python bench/cores.py --quick                # smoke test: 2 epochs, 2 processes x 4 seeds

Each run is a child process (`--child`) that compiles the study's own programs
(research/programs.py, configs/blog.py's scenario 2 via bench/scenario.py), trains once untimed,
then waits until every child of the run is ready and times init plus all the epoch calls,
so compilation and start-up are left out and the children of a run train at the same time.
Children are pinned to cores with os.sched_setaffinity. Runs:
  all_cores     one process, every core, all --seeds seeds (what `python run.py` does);
  one_core      one process pinned to core 0, all seeds;
  per_core      one process per core (--processes of them), each pinned to its own core and
                training seeds/processes seeds.
The speed-up is all_cores' wall time over the run's (per_core: the slowest child's). Children
run on the CPU backend (JAX_PLATFORMS=cpu) whatever accelerator the machine has.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 256, "Seeds trained in all, split between processes in per_core.")
flags.DEFINE_integer("epochs", 0, "Override train.epochs (0: the scenario's 100).")
flags.DEFINE_integer("processes", 0, "per_core's processes (0: one per usable core).")
flags.DEFINE_bool("quick", False, "Smoke test: 2 epochs, 2 processes of 4 seeds.")
flags.DEFINE_string("out", "", "Also write the results as JSON here.")
flags.DEFINE_bool("child", False, "Internal: train and time one share of the seeds.")
flags.DEFINE_string("cpus", "", "Internal (--child): comma-separated cores to pin to; '' = all.")


@dataclasses.dataclass
class Run:
  name: str
  processes: int
  seeds_each: int
  wall_s: float  # The slowest child's timed training.
  child_s: list


def child() -> None:
  """Compiles, warms up, prints 'ready', waits for a line on stdin, prints the timing as JSON."""
  if FLAGS.cpus:
    os.sched_setaffinity(0, {int(c) for c in FLAGS.cpus.split(",")})
  from bench import scenario
  from configs import blog

  config = blog.get_config()
  if FLAGS.epochs:
    config.train.epochs = FLAGS.epochs
  train, _ = scenario.compile_vmapped(scenario.cell(config), FLAGS.seeds)
  train()  # Once untimed: buffers allocated, caches warm.
  print("ready", flush=True)
  sys.stdin.readline()
  t0 = time.perf_counter()
  train()
  print(json.dumps(dict(seconds=time.perf_counter() - t0)), flush=True)


def run(name: str, cpus_each: list[str], seeds_each: int) -> Run:
  """Starts one child per entry of cpus_each, releases them together, returns their timing."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--seeds={seeds_each}"]
  if FLAGS.epochs:
    cmd.append(f"--epochs={FLAGS.epochs}")
  children = [
    subprocess.Popen(
      cmd + [f"--cpus={c}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    for c in cpus_each
  ]
  try:
    for p in children:
      if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{name}: a child failed before training (exit {p.wait()})")
    for p in children:
      p.stdin.write("go\n")
      p.stdin.flush()
    seconds = []
    for p in children:
      out, _ = p.communicate()
      if p.returncode:
        raise RuntimeError(f"{name}: a child failed (exit {p.returncode})")
      seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
  finally:
    for p in children:  # None left waiting for "go" if another one failed.
      if p.poll() is None:
        p.kill()
        p.wait()
  return Run(name, len(children), seeds_each, max(seconds), seconds)


def main(argv):
  del argv
  # Cores are what is measured, on any machine: this process (machine_info) and its children
  # run on the CPU backend. JAX is not imported yet.
  os.environ["JAX_PLATFORMS"] = "cpu"
  if FLAGS.child:
    return child()
  from bench.machine import machine_info

  cores = sorted(os.sched_getaffinity(0))
  if FLAGS.quick:
    FLAGS.epochs, FLAGS.processes = 2, min(2, len(cores))
    FLAGS.seeds = 4 * FLAGS.processes
  processes = FLAGS.processes or len(cores)
  if processes > len(cores):
    raise app.UsageError(f"--processes={processes}: only {len(cores)} cores are usable")
  if FLAGS.seeds % processes:
    raise app.UsageError(f"--seeds={FLAGS.seeds} must split evenly over {processes} processes")
  info = machine_info()
  print(json.dumps(info), flush=True)
  runs = [
    run("all_cores", [""], FLAGS.seeds),
    run("one_core", [str(cores[0])], FLAGS.seeds),
    run("per_core", [str(c) for c in cores[:processes]], FLAGS.seeds // processes),
  ]
  base = runs[0].wall_s
  head = f"{'run':<10} {'processes':>9} {'seeds each':>10} {'wall s':>7} {'seeds/s':>8}"
  print(f"\n{head} {'speed-up':>8}")
  for r in runs:
    print(
      f"{r.name:<10} {r.processes:>9} {r.seeds_each:>10} {r.wall_s:>7.2f} "
      f"{FLAGS.seeds / r.wall_s:>8.1f} {base / r.wall_s:>7.2f}x"
    )
  if FLAGS.out:
    rows = [dict(dataclasses.asdict(r), speedup=base / r.wall_s) for r in runs]
    with open(FLAGS.out, "w") as f:
      json.dump(dict(machine=info, seeds=FLAGS.seeds, epochs=FLAGS.epochs, runs=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
