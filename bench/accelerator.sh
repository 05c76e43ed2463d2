#!/usr/bin/env bash
# One command for a GPU (or TPU) machine: the blog study cold and warm, the throughput bench at
# 1k/8k/32k seeds, the Pallas LSTM kernels (model.impl="pallas") against the fused recurrence
# (the train step at 32k seeds, then the blog study), the blog study twice more with XLA's
# deterministic GPU ops (comparing the per-seed arrays of each pair), cold with all of JAX's
# XLA caches, cold with JAX's threefry GPU kernel and cold without XLA's autotuning (three ways
# to compile faster), the fast test tier, the train step's profile at 32k seeds, the slow test
# tier, and the full-size runs of bench/scale.py that a 2-core CPU cannot finish (the word run
# at V = 20 001 and the blog study at 100 000 seeds), in that order; prints one table and
# writes bench/accelerator/.
#
#   bash bench/accelerator.sh            # from the repository root, with the package installed
#   (pip install -e '.[cuda,test]'; the machine needs ml-collections and orbax-checkpoint too)
#
# Environment: PYTHON (default python3); OUT_DIR (default bench/accelerator); PYTEST_ARGS, e.g.
# "-n 8" with pytest-xdist (GPU memory is then allocated on demand, not preallocated per
# process); TIME_BUDGET, seconds for all the steps together (default 3600): each step gets
# what is left, and a step that ran out shows exit 124 in the table; STEPS, the steps to run, in
# the order they always run in (default: all of blog_cold blog_warm bench pallas blog_pallas
# blog_det1 blog_det2 blog_xla_caches blog_threefry blog_autotune0 tests_fast profile tests_slow
# scale), so a short lease gets the headline figures first.
# Timings name the device; compare figures only within one run of this script.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT_DIR:-bench/accelerator}
deadline=$((SECONDS + ${TIME_BUDGET:-3600}))
mkdir -p "$out"
export XDG_CACHE_HOME="$out/cache"  # A fresh compilation cache: the first blog run is cold.
rm -rf "$XDG_CACHE_HOME" "$out"/cache_* "$out"/blog_*
device=$($py -c "import jax; d = jax.devices()[0]; print(jax.default_backend(), d.device_kind)")

timed() {  # timed NAME COMMAND...: wall seconds and exit code of COMMAND, its log in $out/NAME.log
  local name=$1; shift
  [[ " $steps " == *" $name "* ]] || return 0
  local start=$SECONDS left=$((deadline - SECONDS))
  if ((left < 10)); then echo "$name 0 skipped" >>"$out/times.txt"; return; fi
  timeout "$left" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name $((SECONDS - start)) $rc" >>"$out/times.txt"
}
: >"$out/times.txt"
all_steps="blog_cold blog_warm bench pallas blog_pallas blog_det1 blog_det2 blog_xla_caches"
all_steps+=" blog_threefry blog_autotune0 tests_fast profile tests_slow scale"
steps=${STEPS:-$all_steps}
blog() {  # blog NAME [VAR=VALUE...]: the blog study in $out/NAME (the table reads it there)
  local name=$1; shift
  timed "$name" env "$@" $py run.py --config=configs/blog.py --workdir="$out/$name"
}
blog blog_cold
blog blog_warm
timed bench $py bench/throughput.py --seeds=1024,8192,32768 --repeats=3 --loop_seeds=3 \
  --impl_seeds=8192 --out="$out/throughput.json"
# The Pallas kernels (research/pallas_lstm.py): the train step at 32k seeds, timed and profiled
# beside the fused recurrence (their losses compared), then the blog study with them, its
# per-seed arrays compared with blog_cold's (warm cache but for the new train programs).
timed pallas $py bench/profile.py --seeds=32768 \
  --variants=fused,pallas,pallas:x3,pallas:gates,pallas:warps8,pallas:tf32 \
  --out="$out/pallas.json"
timed blog_pallas $py run.py --config=configs/blog.py --workdir="$out/blog_pallas" \
  --config.model.impl=pallas
# Is a GPU run repeatable? The embedding gradient's scatter-add uses float atomics. The same
# study twice with XLA's deterministic ops (cold, as the flag changes the cache key, then warm);
# the table compares both pairs' per-seed arrays and the flag's results against the default's.
det_flags="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
blog blog_det1 XLA_FLAGS="$det_flags"
blog blog_det2 XLA_FLAGS="$det_flags"
# Does JAX's full set of XLA caches cut the cold compile? By default the persistent cache adds
# only XLA's per-fusion autotuning results; "all" adds its kernel cache and compiles LLVM
# modules in parallel. Cold, in a cache of its own; compared with blog_cold's arrays.
blog blog_xla_caches XDG_CACHE_HOME="$out/cache_all" JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=all
# And JAX's threefry kernel: the random bits from one CUDA kernel rather than inlined HLO (a
# third of the init program on the CPU); JAX says it compiles faster. Same bits by design.
blog blog_threefry XDG_CACHE_HOME="$out/cache_threefry" JAX_THREEFRY_GPU_KERNEL_LOWERING=true
# And XLA's GPU autotuning off (cuBLAS's and the emitters' default choices): on the H200 the
# deterministic-ops run, which autotunes less, compiled 13 s faster. Cold, in a cache of its own.
blog blog_autotune0 XDG_CACHE_HOME="$out/cache_autotune0" XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments.
timed tests_fast env XLA_PYTHON_CLIENT_PREALLOCATE=false $py -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-}
timed profile $py bench/profile.py --seeds=32768 --variants=fused,fused:tf32 --out="$out/profile.json"
# shellcheck disable=SC2086
timed tests_slow env XLA_PYTHON_CLIENT_PREALLOCATE=false $py -m pytest -q -p no:cacheprovider -m slow \
  ${PYTEST_ARGS:-}
timed scale $py bench/scale.py --runs=words,blog --save_models=false --timeout=0 \
  --logs_dir="$out/scale_logs" --out="$out/scale.json"

$py - "$out" "$device" <<'PY'
import json, os, sys
import numpy as np
from research import report
out, device = sys.argv[1], sys.argv[2]
times = {}
for line in open(f"{out}/times.txt"):
  name, seconds, rc = line.split()
  times[name] = (seconds, rc)
print(f"device: {device}")
print(f"{'step':<16} {'wall s':>7} {'exit':>7}  detail")
for name, (seconds, rc) in times.items():
  detail = ""
  if name.startswith("blog"):
    path = f"{out}/{name}/results.json"
    if os.path.exists(path):
      phases = json.load(open(path)).get("phases", {})
      detail = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in phases.items() if isinstance(v, (int, float)))
      detail += "\n" + " " * 34 + report.format_compiles(phases)
  if name == "bench" and os.path.exists(f"{out}/throughput.json"):
    r = json.load(open(f"{out}/throughput.json"))
    detail = "; ".join(f"{v['seeds']} seeds {v['seeds_per_s']:.0f}/s" for v in r["vmapped"])
    detail += f"; fused vs flax x{r['impl']['fused_speedup']:.2f}"
  if name in ("profile", "pallas") and os.path.exists(f"{out}/{name}.json"):
    r = json.load(open(f"{out}/{name}.json"))
    detail = "; ".join(f"{v['variant']} failed: {v['error']}" if "error" in v else
                       f"{v['variant']} {v['seeds_per_s_100_epochs']:.0f} seeds/s "
                       f"(loss diff {v['loss_max_abs_diff_vs_first']:.1e})" for v in r["results"])
  if name == "scale" and os.path.exists(f"{out}/scale.json"):
    r = json.load(open(f"{out}/scale.json"))
    detail = "; ".join(
      f"{v['name']} {'ok' if v['finished'] else 'NOT finished'} {v['wall_s']:.0f} s "
      f"(train {v['train_s'] or 0:.0f}, eval {v['eval_s'] or 0:.0f}), "
      f"peak RSS {v['peak_rss_mb']:.0f} MB" for v in r["runs"])
  if name.startswith("tests") and rc != "skipped":
    lines = open(f"{out}/{name}.log").read().strip().splitlines()
    detail = lines[-1] if lines else ""
  print(f"{name:<16} {seconds:>7} {rc:>7}  {detail}")


def same(a, b):
  """How two blog runs' per-seed arrays compare: bitwise equal, or how far apart."""
  paths = [f"{out}/{name}/per_seed.npz" for name in (a, b)]
  if not all(os.path.exists(p) for p in paths):
    return "not compared (a run did not finish)"
  x, y = (np.load(p) for p in paths)
  differ = [k for k in x.files if not np.array_equal(x[k], y[k], equal_nan=True)]
  if not differ:
    return f"all {len(x.files)} arrays bitwise equal"
  rel = 0.0  # Largest |x - y| / max(|x|, |y|) over the float arrays that differ.
  for k in differ:
    if x[k].dtype.kind == "f":
      scale = np.maximum(np.maximum(np.abs(x[k]), np.abs(y[k])), 1e-30)
      rel = max(rel, float(np.nanmax(np.abs(x[k] - y[k]) / scale)))
  discrete = [k for k in differ if x[k].dtype.kind != "f"] or ["none"]
  return (f"{len(differ)} of {len(x.files)} arrays differ; float max rel. diff {rel:.1e}; "
          f"discrete arrays that differ: {', '.join(discrete)}")


for a, b, what in [("blog_cold", "blog_warm", "default flags, run twice"),
                   ("blog_cold", "blog_pallas", "Pallas kernels against fused"),
                   ("blog_det1", "blog_det2", "deterministic ops, run twice"),
                   ("blog_warm", "blog_det1", "deterministic ops against default"),
                   ("blog_cold", "blog_xla_caches", "all XLA caches against default"),
                   ("blog_cold", "blog_threefry", "threefry kernel against default"),
                   ("blog_cold", "blog_autotune0", "autotuning off against default")]:
  print(f"{'compare':<16} {'':>7} {'':>7}  {what}: {same(a, b)}")
PY
