"""The last stage of a study at many seeds, without training: its results files and report.

  python run.py --config=configs/blog.py --workdir=runs/blog          # the source: 256 seeds
  python bench/report_scale.py --source=runs/blog --seeds=10000,100000
  python bench/report_scale.py --source=runs/blog --quick             # smoke test: 512 seeds

A finished workdir's cells are tiled along the seed axis to each --seeds count (row i is the
source's row i mod n), with its config.json. Then a child process runs what a study does once
its cells are done: workdir.write_results (results.json, results.csv, per_seed.npz) and
report.write_report (report.md and its plots). Recorded per size: the child's seconds for
each of the two, and its peak RSS. Tiled rows keep every rate and mean of the source; the
intervals narrow. Training and evaluation at that many seeds: bench/scale.py.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import dataclasses  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.machine import machine_info, run_child  # noqa: E402
from research import config_lib, files, workdir  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "A finished study's workdir, tiled to each size.")
flags.DEFINE_list("seeds", ["10000", "100000"], "Seed counts to tile the source to.")
flags.DEFINE_bool("quick", False, "Smoke test: --seeds=512.")
flags.DEFINE_float("timeout", 1800.0, "Seconds after which a size is stopped (0: never).")
flags.DEFINE_string("out", os.path.join(ROOT, "bench", "report_scale.json"), "Results file.")
flags.DEFINE_string("child", None, "Internal: write the results and report of this workdir.")


def tile(source: str, target: str, seeds: int) -> None:
  """target: source's cells tiled to `seeds` rows, and its config.json at that seed count."""
  os.makedirs(os.path.join(target, "cells"))
  for name in sorted(os.listdir(os.path.join(source, "cells"))):
    path = os.path.join(source, "cells", name)
    if name.endswith(".npz"):
      with np.load(path) as cell:
        tiled = {k: np.resize(v, (seeds, *v.shape[1:])) for k, v in cell.items()}
      files.write_npz(os.path.join(target, "cells", name), tiled)
    elif name.endswith(".json"):
      files.write_json(os.path.join(target, "cells", name), files.read_json(path))
  run = files.read_json(os.path.join(source, workdir.CONFIG))
  run["config"]["study"]["seeds"] = seeds
  files.write_json(os.path.join(target, workdir.CONFIG), run)


def finish(directory: str) -> dict:
  """What run.py does after the last cell (the child's work); its seconds."""
  from research import report

  run = files.read_json(os.path.join(directory, workdir.CONFIG))
  config = ml_collections.ConfigDict(run["config"])
  cells = config_lib.expand_cells(config)
  start = time.perf_counter()
  workdir.write_results(directory, cells, config.study.seeds, 0.0, {})
  written = time.perf_counter()
  report.write_report(directory)
  return dict(write_results_s=written - start, report_s=time.perf_counter() - written)


def measure(source: str, seeds: int, scratch: str, timeout: float) -> dict:
  target = os.path.join(scratch, f"seeds_{seeds}")
  tile(source, target, seeds)
  out, err = os.path.join(scratch, f"{seeds}.out"), os.path.join(scratch, f"{seeds}.err")
  argv = [sys.executable, os.path.abspath(__file__), f"--child={target}"]
  child = run_child(argv, out, err, timeout)
  with open(out) as f:
    lines = f.read().splitlines()
  timing = json.loads(lines[-1]) if child.returncode == 0 and lines else {}
  with open(err) as f:
    error = "" if child.returncode == 0 else f.read()[-2000:]
  return dict(
    seeds=seeds, finished=child.returncode == 0, **dataclasses.asdict(child), error=error, **timing
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.child:
    print(json.dumps(finish(FLAGS.child)), flush=True)
    return
  if not FLAGS.source or not os.path.exists(os.path.join(FLAGS.source, "cells")):
    raise app.UsageError(f"--source: {FLAGS.source!r} is not a finished study's workdir")
  sizes = [512] if FLAGS.quick else [int(s) for s in FLAGS.seeds]
  results = dict(
    machine=machine_info(),
    command=shlex.join(["python", "bench/report_scale.py", *sys.argv[1:]]),
    source=os.path.abspath(FLAGS.source),
    runs=[],
  )
  print("seeds | write_results s | report s | wall s | peak RSS MB | status")
  with tempfile.TemporaryDirectory(prefix="collapse-report-") as scratch:
    for seeds in sizes:
      r = measure(FLAGS.source, seeds, scratch, FLAGS.timeout)
      results["runs"].append(r)
      status = "finished" if r["finished"] else f"NOT finished (exit {r['returncode']})"
      print(
        f"{seeds} | {r.get('write_results_s', float('nan')):.1f} | "
        f"{r.get('report_s', float('nan')):.1f} | {r['wall_s']:.1f} | "
        f"{r['peak_rss_mb']:.0f} | {status}",
        flush=True,
      )
      if r["error"]:
        print(r["error"], file=sys.stderr)
  files.write_json(FLAGS.out, results)
  print(f"results in {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
