#!/usr/bin/env bash
# One command for a GPU (or TPU) machine: the blog study cold and warm, the throughput bench at
# 1k/8k/32k seeds, and the whole test suite; prints one table and writes bench/accelerator/.
#
#   bash bench/accelerator.sh            # from the repository root, with the package installed
#   (pip install -e '.[cuda,test]'; the machine needs ml-collections and orbax-checkpoint too)
#
# Timings name the device; compare figures only within one run of this script.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-bench/accelerator}
mkdir -p "$out"
export XDG_CACHE_HOME="$out/cache"  # A fresh compilation cache: the first blog run is cold.
rm -rf "$XDG_CACHE_HOME" "$out/blog_cold" "$out/blog_warm"
device=$(python -c "import jax; d = jax.devices()[0]; print(jax.default_backend(), d.device_kind)")

timed() {  # timed NAME COMMAND...: wall seconds and exit code of COMMAND, its log in $out/NAME.log
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name $((SECONDS - start)) $rc" >>"$out/times.txt"
}
: >"$out/times.txt"
timed blog_cold python run.py --config=configs/blog.py --workdir="$out/blog_cold"
timed blog_warm python run.py --config=configs/blog.py --workdir="$out/blog_warm"
timed bench python bench/throughput.py --seeds=1024,8192,32768 --repeats=3 --loop_seeds=3 \
  --impl_seeds=8192 --out="$out/throughput.json"
timed tests_fast python -m pytest -q -p no:cacheprovider
timed tests_slow python -m pytest -q -p no:cacheprovider -m slow

python - "$out" "$device" <<'PY'
import json, os, sys
out, device = sys.argv[1], sys.argv[2]
times = {n: (int(s), int(rc)) for n, s, rc in (l.split() for l in open(f"{out}/times.txt"))}
print(f"device: {device}")
print(f"{'step':<12} {'wall s':>7} {'exit':>5}  detail")
for name, (seconds, rc) in times.items():
  detail = ""
  if name.startswith("blog"):
    path = f"{out}/{name}/results.json"
    if os.path.exists(path):
      phases = json.load(open(path)).get("phases", {})
      detail = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in phases.items())
  if name == "bench" and os.path.exists(f"{out}/throughput.json"):
    r = json.load(open(f"{out}/throughput.json"))
    detail = "; ".join(f"{v['seeds']} seeds {v['seeds_per_s']:.0f}/s" for v in r["vmapped"])
    detail += f"; fused vs flax x{r['impl']['fused_speedup']:.2f}"
  if name.startswith("tests"):
    lines = open(f"{out}/{name}.log").read().strip().splitlines()
    detail = lines[-1] if lines else ""
  print(f"{name:<12} {seconds:>7} {rc:>5}  {detail}")
PY
