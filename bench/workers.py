"""A whole study with one process against `run.py --workers`, warm, runs alternating.

  python bench/workers.py                           # configs/blog.py, --workers 1 and 2, 3 rounds
  python bench/workers.py --workers=1,2,4 --rounds=2 --out=/tmp/workers.json
  python bench/workers.py --quick                   # smoke test: configs/tiny.py, 1 round

Each round runs `python run.py --config=<config> --workdir=<new> --workers=W` once for every W,
in turn, so every W sees the same load; a first untimed round fills JAX's compilation cache
(each W compiles its own shapes). Reported per run: the wall time of the command, and the
phases `run.py` records in results.json (with --workers, each phase is the slowest worker's).
The speed-up of a run is the wall time of the same round's first W over its own. Every run's
per-seed arrays are compared with the first W's: bitwise, and the largest difference. Runs on
the CPU backend (JAX_PLATFORMS=cpu): --workers splits CPU studies.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/blog.py", "The study's config file.")
flags.DEFINE_list("workers", ["1", "2"], "--workers values, run in turn in every round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds (after one untimed round).", lower_bound=1)
flags.DEFINE_bool("quick", False, "Smoke test: configs/tiny.py, one timed round.")
flags.DEFINE_string("out", "", "Also write the results as JSON here.")


def run_study(workdir: str, workers: str) -> dict:
  """run.py on a new workdir: wall seconds, results.json's phases, and the per-seed arrays."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "run.py", f"--config={FLAGS.config}", f"--workdir={workdir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  proc = subprocess.run(
    [*cmd, f"--workers={workers}"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f"error: {' '.join(cmd)} --workers={workers} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    phases = json.load(f)["phases"]
  with np.load(os.path.join(workdir, "per_seed.npz")) as z:
    arrays = dict(z)
  return dict(wall_s=wall, phases=phases, arrays=arrays)


def compare(reference: dict, arrays: dict) -> dict:
  """Whether every per-seed array is bitwise equal to the reference's, and the largest
  absolute difference (a worker may cut other chunk sizes: float rounding, README)."""
  assert sorted(arrays) == sorted(reference), "the runs wrote different arrays"
  diffs = [
    float(np.nanmax(np.abs(arrays[k].astype(float) - reference[k].astype(float)), initial=0.0))
    for k in reference
  ]
  return dict(
    bitwise_equal=all(np.array_equal(arrays[k], reference[k], equal_nan=True) for k in reference),
    max_abs_diff=max(diffs, default=0.0),
  )


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.config, FLAGS.rounds = "configs/tiny.py", 1
  from bench.machine import machine_info  # noqa: PLC0415  # Imports JAX: after the flags.

  scratch = tempfile.mkdtemp(prefix="collapse-workers-bench-")
  try:
    for w in FLAGS.workers:  # Untimed: fills the compilation cache for every shape.
      run_study(os.path.join(scratch, f"warmup_{w}"), w)
    runs = []
    for round_ in range(FLAGS.rounds):
      first = None
      for w in FLAGS.workers:
        r = run_study(os.path.join(scratch, f"w{w}"), w)
        first = first or r
        runs.append(
          dict(
            round=round_,
            workers=int(w),
            wall_s=r["wall_s"],
            speedup=first["wall_s"] / r["wall_s"],
            **compare(first["arrays"], r["arrays"]),
            phases=r["phases"],
          )
        )
        print(
          f"round {round_} workers={w}: wall {r['wall_s']:.1f} s, "
          f"speed-up {runs[-1]['speedup']:.2f}x, bitwise equal {runs[-1]['bitwise_equal']} "
          f"(max |diff| {runs[-1]['max_abs_diff']:.2g}); "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items() if isinstance(v, float)),
          flush=True,
        )
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  result = dict(config=FLAGS.config, machine=machine_info(), runs=runs)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
