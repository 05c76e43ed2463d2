"""Scaling benchmark: whole `python run.py` studies on real corpora of growing size.

  python bench/scale.py                  # the issue's sizes; writes bench/scale.json
  python bench/scale.py --quick          # a smoke test: tiny sizes, about a minute
  python bench/scale.py --runs=chars --sizes=1000,30000 --out=/tmp/s.json

Each run is one child process `python run.py ...` with its workdir in a temporary directory
(removed after the run), so its peak RSS is the whole study's: Python, JAX, the compiled
programs and every host copy. Runs:
  1. chars_<N>: configs/default.py (the blog's scenario 2: lr 1e-3, dropout 0.2) on the
     built-in pydoc_topics corpus cut to N characters, char level, --seeds seeds, 1 epoch;
  2. words_<V>: the same on a synthetic Zipf word corpus with a vocabulary of --word_vocab
     words (pydoc_topics has only ~3.8k), word level, --seeds seeds, 1 epoch;
  3. blog_<S>: configs/blog.py (three scenarios, 100 epochs) at --blog_seeds seeds.
Every run gets --config.study.memory_budget_mb=--memory_budget_mb, so the engine plans its
chunks for the target, and --workers and --save_models as given. Recorded per run: wall
seconds, peak RSS (of the whole process tree: with --workers > 1 the study's worker
processes are grandchildren), whether it finished, was killed or timed out, the memory plan
lines the study logs at start-up, and from each finished cells/*.json its seconds (training
and evaluation of its chunks, compilation included) and sizes. Nothing else is read from the logs.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.machine import machine_info, run_child  # noqa: E402
from research import files  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke test: tiny sizes (see QUICK), about a minute.")
flags.DEFINE_list("runs", ["chars", "words", "blog"], "Which runs: chars, words, blog.")
flags.DEFINE_list("sizes", ["1000", "30000", "300000"], "pydoc_topics characters per chars run.")
flags.DEFINE_integer("seeds", 256, "Seeds of the chars and words runs.")
flags.DEFINE_integer("word_vocab", 20000, "Distinct words of the synthetic word corpus.")
flags.DEFINE_integer("word_tokens", 100000, "Words (tokens) of the synthetic word corpus.")
flags.DEFINE_integer("blog_seeds", 100000, "Seeds per scenario of the configs/blog.py run.")
flags.DEFINE_integer("blog_epochs", 0, "train.epochs of the blog run (0: the config's 100).")
flags.DEFINE_integer("memory_budget_mb", 4096, "study.memory_budget_mb of every run: the target.")
flags.DEFINE_integer("workers", 1, "run.py --workers of every run (0: one per CPU core).")
flags.DEFINE_bool("save_models", True, "study.save_models of every run (100k seeds: ~40 GB).")
flags.DEFINE_float("timeout", 1500.0, "Seconds after which a run is stopped (0: never).")
flags.DEFINE_string("logs_dir", "", "Keep each run's stdout and stderr here (default: dropped).")
flags.DEFINE_string("out", os.path.join(ROOT, "bench", "scale.json"), "Where to write results.")

# --quick: every size tiny, the same runs and code paths.
QUICK = dict(sizes=[1000, 3000], seeds=8, word_vocab=500, word_tokens=2000, blog_seeds=64)
QUICK_BLOG_EPOCHS = 2
# Per-cell timing fields of cells/*.json (research/results.py CellMeta).
TRAIN_FIELD, EVAL_FIELD = "train_seconds", "eval_seconds"


@dataclasses.dataclass(frozen=True)
class Run:
  """One study to run as a child process."""

  name: str
  kind: str  # "chars", "words" or "blog".
  description: str
  config_args: list  # run.py's --config and --config.* flags.
  epochs: int  # train.epochs, for the per-epoch target.
  chars: int = 0  # chars runs: the corpus cut (data.max_chars).


# ----------------------------------------------------------------------------- corpus


def word_list(size: int, rng: np.random.Generator) -> list[str]:
  """`size` distinct lower-case pseudo-words, shortest first; "the" first (the probe prompt)."""
  consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
  words, seen = ["the"], {"the"}
  while len(words) < size:
    syllables = rng.integers(1, 5)
    word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
    if word not in seen:
      seen.add(word)
      words.append(word)
  return ["the"] + sorted(words[1:], key=len)


def zipf_text(vocab: int, tokens: int, seed: int = 0) -> str:
  """A deterministic text of `tokens` words over exactly `vocab` distinct words.

  Word r (1-based rank) is drawn with probability ~ 1/r (Zipf), and every word is placed once
  more at a random position so the vocabulary is the whole list (a Zipf sample of 100k words
  alone covers only ~13k of 20k).
  """
  if tokens < vocab:
    raise ValueError(f"word_tokens={tokens} is fewer than word_vocab={vocab}")
  rng = np.random.default_rng(seed)
  words = word_list(vocab, rng)
  p = 1.0 / np.arange(1, vocab + 1)
  ids = np.concatenate([rng.choice(vocab, size=tokens - vocab, p=p / p.sum()), np.arange(vocab)])
  rng.shuffle(ids)
  lines = [" ".join(words[i] for i in ids[a : a + 16]) for a in range(0, tokens, 16)]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- runs


def plan_runs(settings: dict, corpus_file: str) -> list[Run]:
  one_epoch = ["--config.train.epochs=1", "--config.study.epochs_per_call=1"]
  seeds = f"--config.study.seeds={settings['seeds']}"
  runs = []
  if "chars" in settings["runs"]:
    for size in settings["sizes"]:
      runs.append(
        Run(
          name=f"chars_{size}",
          kind="chars",
          description=f"pydoc_topics, first {size} chars, char level, {settings['seeds']} "
          "seeds, 1 epoch",
          config_args=[
            "--config=configs/default.py",
            "--config.data.corpus=pydoc_topics",
            f"--config.data.max_chars={size}",
            *one_epoch,
            seeds,
          ],
          epochs=1,
          chars=size,
        )
      )
  if "words" in settings["runs"]:
    runs.append(
      Run(
        name=f"words_{settings['word_vocab']}",
        kind="words",
        description=f"synthetic Zipf corpus, {settings['word_tokens']} words, V="
        f"{settings['word_vocab']}, word level, {settings['seeds']} seeds, 1 epoch",
        config_args=[
          "--config=configs/default.py",
          f"--config.data.corpus_file={corpus_file}",
          "--config.data.tokenization=word",
          *one_epoch,
          seeds,
        ],
        epochs=1,
      )
    )
  if "blog" in settings["runs"]:
    epochs = settings["blog_epochs"]
    runs.append(
      Run(
        name=f"blog_{settings['blog_seeds']}",
        kind="blog",
        description=f"configs/blog.py, 3 scenarios x {settings['blog_seeds']} seeds, "
        f"{epochs or 100} epochs",
        config_args=[
          "--config=configs/blog.py",
          f"--config.study.seeds={settings['blog_seeds']}",
          *([f"--config.train.epochs={epochs}"] if epochs else []),
        ],
        epochs=epochs or 100,
      )
    )
  return runs


def memory_plan(stderr_path: str) -> list[str]:
  """The study's start-up memory plan lines ("... memory budget ..."), log prefix dropped."""
  with open(stderr_path, errors="replace") as f:
    return [line.split("] ", 1)[-1].strip() for line in f if "memory budget" in line]


def cell_records(directory: str) -> dict:
  """Finished cells: name -> seconds (with the train/eval split where recorded) and sizes."""
  cells = {}
  for path in sorted(glob.glob(os.path.join(directory, "cells", "*.json"))):
    with open(path) as f:
      meta = json.load(f)
    cells[meta["name"]] = dict(
      seconds=meta["seconds"],
      train_s=meta.get(TRAIN_FIELD),
      eval_s=meta.get(EVAL_FIELD),
      vocab_size=len(meta["vocab"]),
      num_windows=meta["num_windows"],
      prompts=meta["prompts"],
      contexts=meta["contexts"],
      contexts_used=meta["contexts_used"],
    )
  return cells


def _total(cells: dict, key: str):
  """Sum of a per-cell field, or None if any finished cell lacks it."""
  values = [c[key] for c in cells.values()]
  return float(sum(values)) if values and None not in values else None


def _disk_mb(directory: str) -> float:
  total = 0
  for root, _, names in os.walk(directory):
    for name in names:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except OSError:
        pass
  return total / 2**20


def measure(run: Run, scratch: str, settings: dict) -> dict:
  """Runs one study in a fresh workdir under `scratch`, removed afterwards."""
  directory = os.path.join(scratch, run.name)
  argv = [
    sys.executable,
    "run.py",
    *run.config_args,
    f"--config.study.memory_budget_mb={settings['memory_budget_mb']}",
    f"--config.study.save_models={settings['save_models']}",
    f"--workers={settings['workers']}",
    f"--workdir={directory}",
  ]
  logs = settings["logs_dir"] or scratch
  os.makedirs(logs, exist_ok=True)
  stdout_path, stderr_path = (os.path.join(logs, f"{run.name}.{s}") for s in ("out", "err"))
  try:
    child = run_child(argv, stdout_path, stderr_path, settings["timeout"])
    cells = cell_records(directory)
    try:
      study_wall_s = files.read_json(os.path.join(directory, "results.json"))["wall_seconds"]
    except (OSError, ValueError, KeyError):
      study_wall_s = None
    workdir_mb = _disk_mb(directory)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  finished = child.returncode == 0 and not child.timed_out
  with open(stderr_path, errors="replace") as f:
    stderr_tail = "" if finished else f.read()[-3000:]
  train_s, eval_s = _total(cells, "train_s"), _total(cells, "eval_s")
  return dict(
    name=run.name,
    kind=run.kind,
    description=run.description,
    command=shlex.join(["python", *argv[1:]]),
    epochs=run.epochs,
    chars=run.chars,
    finished=finished,
    returncode=child.returncode,
    killed=child.returncode < 0,  # Ended by a signal: our timeout, or the OOM killer.
    timed_out=child.timed_out,
    wall_s=child.wall_s,
    study_wall_s=study_wall_s,
    cell_seconds=_total(cells, "seconds"),
    train_s=train_s,
    eval_s=eval_s,
    train_s_per_epoch=None if train_s is None else train_s / run.epochs,
    peak_rss_mb=child.peak_rss_mb,
    memory_plan=memory_plan(stderr_path),
    load_average=child.load_average,
    workdir_mb=workdir_mb,
    cells=cells,
    stderr_tail=stderr_tail,
  )


# ----------------------------------------------------------------------------- targets


def check_targets(runs: list[dict], settings: dict) -> dict:
  """The issue's targets: peak RSS <= the budget, evaluation <= one training epoch at the
  largest char size, nothing killed. Each: passed (True, False, or None = not measurable)."""
  budget = settings["memory_budget_mb"]
  over = [r["name"] for r in runs if r["peak_rss_mb"] > budget]
  stopped = [r["name"] for r in runs if not r["finished"]]
  largest = max((r for r in runs if r["kind"] == "chars"), key=lambda r: r["chars"], default=None)
  if largest is None:
    eval_target = dict(passed=None, detail="no chars run")
  elif largest["eval_s"] is None:
    eval_target = dict(
      passed=None,
      run=largest["name"],
      detail=f"not measurable: cells/*.json has no {TRAIN_FIELD}/{EVAL_FIELD} split "
      f"(cells' seconds {_fmt(largest['cell_seconds'])} = training + evaluation)",
    )
  else:
    ratio = largest["eval_s"] / largest["train_s_per_epoch"]
    eval_target = dict(
      passed=ratio <= 1.0, run=largest["name"], eval_per_epoch=ratio, detail=f"{ratio:.2f}x"
    )
  return dict(
    peak_rss=dict(
      passed=not over, limit_mb=budget, over=over, detail=f"over: {over}" if over else "all"
    ),
    eval_vs_epoch=eval_target,
    nothing_killed=dict(
      passed=not stopped, not_finished=stopped, detail=f"not finished: {stopped}" if stopped else ""
    ),
  )


def _fmt(x, spec: str = ".1f") -> str:
  return "-" if x is None else format(x, spec)


def _mark(passed) -> str:
  return {True: "met", False: "MISSED", None: "n/a"}[passed]


def _status(r: dict) -> str:
  if r["finished"]:
    return "ok"
  if r["timed_out"]:
    return f"timeout, {len(r['cells'])} cells done"
  return "killed" if r["killed"] else f"exit {r['returncode']}"


def format_table(results: dict) -> str:
  m, settings, targets = results["machine"], results["settings"], results["targets"]
  budget = settings["memory_budget_mb"]
  timeout = f"{settings['timeout']:.0f} s" if settings["timeout"] else "none"
  lines = [
    f"{m['cpu_model']} | {m['cpus_usable']} cores | {m['memory_gb']} GB | {m['backend']} | "
    f"jax {m['jax']} | budget {budget} MiB | workers {settings['workers']} | "
    f"save_models {settings['save_models']} | timeout {timeout}",
    "",
    f"{'run':<14} {'V':>6} {'windows':>8} {'seeds':>7} {'epochs':>6} {'wall s':>8} "
    f"{'cells s':>8} {'train s':>8} {'eval s':>7} {'peak RSS MB':>11} {'RSS<=budget':>11} "
    f"{'load':>9} {'status':<10}",
  ]
  lines.append("-" * len(lines[-1]))
  for r in results["runs"]:
    cells = list(r["cells"].values())
    vocab = "/".join(str(v) for v in sorted({c["vocab_size"] for c in cells})) or "-"
    windows = "/".join(str(n) for n in sorted({c["num_windows"] for c in cells})) or "-"
    seeds = settings["blog_seeds"] if r["kind"] == "blog" else settings["seeds"]
    status = _status(r)
    load = r["load_average"]
    lines.append(
      f"{r['name']:<14} {vocab:>6} {windows:>8} {seeds:>7} {r['epochs']:>6} "
      f"{r['wall_s']:>8.1f} {_fmt(r['cell_seconds']):>8} {_fmt(r['train_s']):>8} "
      f"{_fmt(r['eval_s']):>7} {r['peak_rss_mb']:>11.0f} "
      f"{'yes' if r['peak_rss_mb'] <= budget else 'NO':>11} "
      f"{load['min']:.1f}-{load['max']:.1f} {status:<10}"
    )
  lines += [
    "",
    f"target peak RSS <= {budget} MiB at every size: {_mark(targets['peak_rss']['passed'])} "
    f"({targets['peak_rss']['detail']})",
    f"target evaluation <= 1 training epoch at the largest corpus: "
    f"{_mark(targets['eval_vs_epoch']['passed'])} ({targets['eval_vs_epoch']['detail']})",
    f"target nothing killed: {_mark(targets['nothing_killed']['passed'])} "
    f"{targets['nothing_killed']['detail']}".rstrip(),
    "",
    "memory plans (logged at start-up):",
  ]
  for r in results["runs"]:
    lines += [f"  {r['name']}: {plan}" for plan in r["memory_plan"]] or [f"  {r['name']}: -"]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = set(FLAGS.runs) - {"chars", "words", "blog"}
  if unknown:
    raise app.UsageError(f"--runs: unknown {sorted(unknown)}; known: chars, words, blog")
  settings = dict(
    quick=FLAGS.quick,
    runs=list(FLAGS.runs),
    sizes=[int(s) for s in FLAGS.sizes],
    seeds=FLAGS.seeds,
    word_vocab=FLAGS.word_vocab,
    word_tokens=FLAGS.word_tokens,
    blog_seeds=FLAGS.blog_seeds,
    blog_epochs=FLAGS.blog_epochs,
    memory_budget_mb=FLAGS.memory_budget_mb,
    workers=FLAGS.workers,
    save_models=FLAGS.save_models,
    timeout=FLAGS.timeout,
    logs_dir=os.path.abspath(FLAGS.logs_dir) if FLAGS.logs_dir else "",
  )
  if FLAGS.quick:
    settings.update(QUICK, blog_epochs=FLAGS.blog_epochs or QUICK_BLOG_EPOCHS)
  # A SIGTERM (`timeout`, bench/accelerator.sh) unwinds like Ctrl-C: run_child kills its run.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  start = time.perf_counter()
  results = dict(
    machine=machine_info(),
    settings=settings,
    command=shlex.join(["python", "bench/scale.py", *sys.argv[1:]]),
    runs=[],
  )
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="collapse-scale-") as scratch:
    corpus_file = os.path.join(scratch, "zipf_words.txt")
    if "words" in settings["runs"]:
      files.write_text(corpus_file, zipf_text(settings["word_vocab"], settings["word_tokens"]))
    for run in plan_runs(settings, corpus_file):
      print(f"  {run.name}: {run.description} ...", flush=True)
      r = measure(run, scratch, settings)
      results["runs"].append(r)
      print(
        f"  {run.name}: {'finished' if r['finished'] else 'NOT finished'} in "
        f"{r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
        flush=True,
      )
      results["bench_seconds"] = time.perf_counter() - start
      results["targets"] = check_targets(results["runs"], settings)
      files.write_json(FLAGS.out, results)  # After every run: a stopped bench keeps its runs.
  print(format_table(results))
  print(f"results in {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
