"""The bench scripts (throughput.py, scale.py, report_scale.py, compile_time.py, profile.py,
cores.py, workers.py) run end to end (--quick) and write complete results."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

from bench import machine


def run_quick(script: str, tmp_path, timeout: int, prints: str = "", args=()) -> dict:
  """bench/<script> --quick [args], as a user runs it from the repository root: its results file.

  prints: text its printed table must hold.
  """
  out = tmp_path / "results.json"
  env = subprocess_env()
  paths = env["PYTHONPATH"].split(os.pathsep)  # The script must find the repo on its own.
  env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p and os.path.abspath(p) != ROOT)
  proc = subprocess.run(
    [sys.executable, os.path.join("bench", script), "--quick", f"--out={out}", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert prints in proc.stdout, proc.stdout[-3000:]
  return json.loads(out.read_text())


def test_tree_rss_counts_grandchildren():
  """scale.py's peak RSS includes run.py --workers' processes, grandchildren of the bench."""
  hold = "x = bytearray(300 << 20); print('ready', flush=True); import time; time.sleep(60)"
  # The trailing `; true` keeps the shell as the parent instead of exec'ing python.
  shell = subprocess.Popen(
    ["sh", "-c", f'{sys.executable} -c "{hold}"; true'], stdout=subprocess.PIPE, text=True
  )
  try:
    assert shell.stdout.readline().strip() == "ready"
    tree_mb = machine.tree_rss_mb(shell.pid)
    assert tree_mb >= 300, tree_mb
    assert machine.tree_rss_mb(shell.pid) - machine._rss_mb(shell.pid) >= 300
  finally:
    for pid in machine._children().get(shell.pid, []):
      os.kill(pid, 9)
    shell.wait(timeout=30)
  assert machine.tree_rss_mb(shell.pid) == 0.0  # Gone and reaped: nothing is counted.


@pytest.mark.slow
def test_quick_bench_writes_results(tmp_path):
  results = run_quick("throughput.py", tmp_path, timeout=120, prints="seeds/s")

  machine = results["machine"]
  for key in ("cpu_model", "cpu_count", "jax", "backend", "device_kind"):
    assert machine[key], key
  assert results["quick"] is True
  assert results["shape"]["scenario"] == "2_varied_lr1e-3_do0.2"
  impl = results["impl"]
  assert impl["fused"]["seeds_per_s"] > 0 and impl["flax"]["seeds_per_s"] > 0
  assert impl["fused_speedup"] > 0
  # The same seed trained with either recurrence: the same model up to float rounding.
  assert impl["final_loss_seed0_abs_diff"] < 1e-4

  roofline = results["roofline"]
  for key in ("flops_per_seed", "peak_flops", "seeds_per_s"):
    assert roofline[key] > 0, key

  assert [r["seeds"] for r in results["vmapped"]] == [1, 4]
  for r in results["vmapped"]:
    for key in ("compile_s", "run_s_median", "seeds_per_s", "peak_rss_mb", "speedup_vs_loop"):
      assert r[key] > 0, (r["seeds"], key)
    assert 0 < r["roofline_fraction"]
    # Same seed, same steps: the vmapped run and the loop baseline train the same model.
    assert r["loss_curve_max_abs_diff_vs_loop"] < 1e-4

  loop = results["loop"]
  for key in ("seeds_per_s", "us_per_step", "roofline_fraction"):
    assert loop[key] > 0, key


@pytest.mark.slow
def test_quick_scale_bench_writes_results(tmp_path):
  results = run_quick("scale.py", tmp_path, timeout=400, prints="peak RSS MB")

  for key in ("cpu_model", "cpus_usable", "jax", "backend"):
    assert results["machine"][key], key
  assert results["settings"]["quick"] is True
  runs = {r["name"]: r for r in results["runs"]}
  assert sorted(runs) == ["blog_64", "chars_1000", "chars_3000", "words_500"]
  for name, r in runs.items():
    assert r["finished"] and not r["killed"] and not r["timed_out"], (name, r["stderr_tail"])
    assert r["wall_s"] > 0 and r["peak_rss_mb"] > 0, name
    assert r["memory_plan"] and all("memory budget 4096 MiB" in p for p in r["memory_plan"]), name
    assert r["cells"] and all(c["seconds"] > 0 for c in r["cells"].values()), name
  assert len(runs["blog_64"]["cells"]) == 3
  assert runs["words_500"]["cells"]["default"]["vocab_size"] == 501  # 500 words + padding.
  assert results["targets"]["nothing_killed"]["passed"] is True


@pytest.mark.slow
def test_quick_report_scale_bench_times_the_last_stage_of_a_tiled_study(tmp_path, blog_workdir):
  source, _ = blog_workdir
  results = run_quick(
    "report_scale.py", tmp_path, timeout=300, prints="| finished", args=[f"--source={source}"]
  )
  (run,) = results["runs"]
  assert run["seeds"] == 512 and run["finished"], run
  assert run["write_results_s"] > 0 and run["report_s"] > 0 and run["peak_rss_mb"] > 100


@pytest.mark.slow
def test_quick_compile_time_bench_times_each_stage(tmp_path):
  results = run_quick("compile_time.py", tmp_path, timeout=120, prints="HLO ops")
  assert results["machine"]["jax"]
  assert [r["program"] for r in results["rows"]] == ["init", "epochs"]
  for r in results["rows"]:
    assert r["context_length"] == 3
    for key in ("trace_s", "lower_s", "compile_s"):
      assert r[key] >= 0, key
    assert r["total_s"] > 0 and r["stablehlo_ops"] > 0 and r["hlo_ops"] > 0


@pytest.mark.slow
def test_quick_profile_sums_kernel_time_by_source_line(tmp_path):
  # "nope" fails (no such model.impl): recorded with its error, the other variants measured.
  variants = ["fused", "nope", "fused:tf32", "pallas:warps8:gates"]
  results = run_quick("profile.py", tmp_path, 180, args=[f"--variants={','.join(variants)}"])
  assert [r["variant"] for r in results["results"]] == variants
  failed = results["results"].pop(1)
  assert "error" in failed and "model.impl must be one of" in failed["error"]
  pallas = results["results"][2]  # Interpreted here: its kernels' ops are pallas_lstm.py's.
  assert pallas["loss_max_abs_diff_vs_first"] < 1e-5
  assert any(r["source"].startswith("pallas_lstm.py") for r in pallas["profile"]["top"])
  for row in results["results"]:
    assert row["seeds"] == 8 and row["seeds_per_s_100_epochs"] > 0
    profile = row["profile"]
    assert profile["total_ms"] > 0 and profile["kernels_per_step"] > 0
    # Kernels are traced back to the model's source: the LSTM's lines are among the top.
    assert any(r["source"].startswith(("lstm.py", "model.py")) for r in profile["top"])
    assert sum(profile["by_source"].values()) <= profile["total_ms"] + 1e-6


@pytest.mark.slow
def test_quick_cores_bench_times_each_way_of_using_the_cores(tmp_path):
  results = run_quick("cores.py", tmp_path, timeout=180, prints="speed-up")
  processes = min(2, results["machine"]["cpus_usable"])
  runs = {r["name"]: r for r in results["runs"]}
  assert list(runs) == ["all_cores", "one_core", "per_core"]
  assert runs["per_core"]["processes"] == len(runs["per_core"]["child_s"]) == processes
  assert runs["per_core"]["seeds_each"] == 4 and results["seeds"] == 4 * processes
  for r in runs.values():
    assert r["wall_s"] == max(r["child_s"]) > 0
  assert runs["all_cores"]["speedup"] == 1.0


@pytest.mark.slow
def test_quick_workers_bench_times_a_study_with_and_without_workers(tmp_path):
  results = run_quick("workers.py", tmp_path, timeout=300, prints="speed-up")
  assert results["config"] == "configs/tiny.py"
  runs = results["runs"]
  assert [(r["round"], r["workers"]) for r in runs] == [(0, 1), (0, 2)]
  assert runs[0]["speedup"] == 1.0 and runs[1]["speedup"] > 0
  assert runs[0]["bitwise_equal"] and runs[0]["max_abs_diff"] == 0.0  # The reference itself.
  assert runs[1]["max_abs_diff"] < 1e-4  # 2 x 2 seeds against 4: float rounding at most.
  assert runs[1]["phases"]["workers"] == 2 and "workers" not in runs[0]["phases"]
  assert all(r["wall_s"] >= r["phases"]["total"] > 0 for r in runs)
