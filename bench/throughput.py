"""Training throughput of the blog's scenario 2: vmapped seeds vs a Python loop vs the roofline.

  python bench/throughput.py          # 1, 64, 256, 1024 seeds; writes bench/results.json
  python bench/throughput.py --seeds=256,1024 --repeats=5
  python bench/throughput.py --quick  # a smoke test: 2 epochs, 1 and 4 seeds
  python bench/throughput.py --unrolls=0,1 --seeds=256  # only: model.unroll side by side

Measures, in one process on one machine:
  1. vmapped training with the study's own programs (research/programs.py: jit(vmap(init)),
     then jit(vmap(run_epochs), donate) every study.epochs_per_call epochs): compile time,
     steady-state seeds/s (compile excluded; median of --repeats), peak memory; the same at
     --impl_seeds seeds with model.impl="flax" (nn.RNN), for the fused kernel's own gain;
  2. the loop a user would write: for each seed, for each step, a jitted train.train_step;
  3. the FLOP roofline: analytic model FLOPs per seed and a float32 matmul probe's FLOP/s.
With --unrolls, only: the study's programs at each model.unroll (the fused recurrence as a
Python loop or a lax.scan), compiled, then timed in turn (round robin) at each --seeds.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import research  # noqa: E402, F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import contextlib  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import scenario  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from configs import blog  # noqa: E402
from research import config_lib, files, programs  # noqa: E402
from research import data as data_lib  # noqa: E402
from research import model as model_lib  # noqa: E402
from research import train as train_lib  # noqa: E402

IMPLS = ("fused", "flax")  # Compared here; "pallas" (GPU kernels) in bench/profile.py.
FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["1", "64", "256", "1024"], "Seed counts to time the vmapped run at.")
flags.DEFINE_bool("quick", False, "Smoke test: 2 epochs, 1 and 4 seeds, 1 repeat, small probes.")
flags.DEFINE_integer("repeats", 3, "Timed runs per seed count (the median is reported).")
flags.DEFINE_integer("loop_seeds", 10, "Seeds timed for the Python-loop baseline (+1 warm-up).")
flags.DEFINE_integer("impl_seeds", 256, "Seeds for the fused-vs-flax LSTM comparison.")
flags.DEFINE_list("unrolls", [], "Only compare these model.unroll values (see the docstring).")
flags.DEFINE_integer("context_length", 0, "Override data.context_length (0: the scenario's 3).")
flags.DEFINE_integer("epochs", 0, "Override train.epochs (0: the scenario's 100).")
flags.DEFINE_string("out", os.path.join(ROOT, "bench", "results.json"), "Where to write results.")


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:  # Not Linux: the high-water mark is the best there is.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_memory():
  """Samples resident memory every 5 ms while the body runs: {'rss_before', 'rss_peak'} bytes."""
  out = dict(rss_before=_rss_bytes())
  out["rss_peak"] = out["rss_before"]
  stop = threading.Event()

  def sample():
    while not stop.wait(0.005):
      out["rss_peak"] = max(out["rss_peak"], _rss_bytes())

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    yield out
  finally:
    stop.set()
    thread.join()
    out["rss_peak"] = max(out["rss_peak"], _rss_bytes())


def device_peak_bytes():
  """Peak device memory where the backend reports it (GPU, TPU); None on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------- setup


def scenario_cell(epochs: int, impl: str = "fused", unroll: int = 0) -> config_lib.Cell:
  """configs/blog.py's scenario 2 (bench/scenario.py) at this implementation and length."""
  config = blog.get_config()
  config.model.impl = impl
  config.model.unroll = unroll
  if FLAGS.context_length:
    config.data.context_length = FLAGS.context_length
  if epochs:
    config.train.epochs = epochs
  return scenario.cell(config)


def shape_summary(config, dataset) -> dict:
  num_windows = int(dataset.windows_NxW.shape[0])
  batch = min(config.train.batch_size, num_windows)
  return dict(
    scenario=scenario.NAME,
    corpus=config.data.corpus,
    vocab_size=dataset.vocab_size,
    context_length=dataset.context_length,
    num_windows=num_windows,
    batch_size=batch,
    steps_per_epoch=math.ceil(num_windows / batch),
    epochs=config.train.epochs,
    epochs_per_call=config.study.epochs_per_call,
    embed_dim=config.model.embed_dim,
    hidden=config.model.hidden,
    learning_rate=config.train.learning_rate,
    dropout=config.model.dropout,
  )


def flops_per_seed(shape: dict) -> dict:
  """Analytic model FLOPs of one seed's whole run: 3x the forward matmuls (fwd + bwd).

  Per step: input projection B*T*E*4H, recurrence B*T*H*4H (all T steps, although step 0's is
  a product with the zero state), dense head B*H*V, each 2 FLOPs per multiply-add, on the
  padded minibatch. Gate nonlinearities, the embedding lookup, softmax and Adam are left out.
  """
  b, t = shape["batch_size"], shape["context_length"]
  e, h, v = shape["embed_dim"], shape["hidden"], shape["vocab_size"]
  forward = 2 * b * (t * e * 4 * h + t * h * 4 * h + h * v)
  steps = shape["steps_per_epoch"] * shape["epochs"]
  return dict(forward_per_step=forward, train_per_step=3 * forward, per_seed=3 * forward * steps)


# ----------------------------------------------------------------------------- vmapped


def time_vmapped(cell: config_lib.Cell, num_seeds: int, repeats: int) -> dict:
  """Compile the study's programs once, then time whole training runs (init + epoch calls)."""
  run, compile_s = scenario.compile_vmapped(cell, num_seeds)
  seconds, mem = [], None
  loss_SxE = None
  for _ in range(repeats):
    with peak_memory() as m:
      t0 = time.perf_counter()
      state, losses = run()
      seconds.append(time.perf_counter() - t0)
    mem = m if mem is None or m["rss_peak"] > mem["rss_peak"] else mem
    loss_SxE = np.concatenate([np.asarray(x) for x in losses], axis=1)
    del state, losses
  median = float(np.median(seconds))
  return dict(
    seeds=num_seeds,
    compile_s=compile_s,
    run_s=seconds,
    run_s_median=median,
    seeds_per_s=num_seeds / median,
    seeds_per_s_best=num_seeds / min(seconds),
    peak_rss_mb=mem["rss_peak"] / 2**20,
    peak_rss_delta_mb=(mem["rss_peak"] - mem["rss_before"]) / 2**20,
    device_peak_mb=(lambda b: None if b is None else b / 2**20)(device_peak_bytes()),
    final_loss_seed0=float(loss_SxE[0, -1]),
    _loss_curve_seed0=loss_SxE[0],
  )


def compare_unrolls(epochs: int, num_seeds: int, unrolls: list[int], repeats: int) -> dict:
  """Each model.unroll's programs compiled, then whole runs timed in turn (round robin, so
  load changes hit every variant alike); losses and parameters compared with the first's."""
  runs, compile_s, seconds, outputs = {}, {}, {u: [] for u in unrolls}, {}
  for u in unrolls:
    runs[u], compile_s[u] = scenario.compile_vmapped(scenario_cell(epochs, unroll=u), num_seeds)
  for _ in range(repeats):
    for u in unrolls:
      t0 = time.perf_counter()
      state, losses = runs[u]()
      seconds[u].append(time.perf_counter() - t0)
      outputs[u] = jax.device_get((state.params, losses))
  base = unrolls[0]
  rows = {}
  for u in unrolls:
    leaves = jax.tree_util.tree_leaves
    pairs = list(zip(leaves(outputs[base]), leaves(outputs[u]), strict=True))
    rows[str(u)] = dict(
      compile_s=compile_s[u],
      run_s=seconds[u],
      run_s_median=float(np.median(seconds[u])),
      seeds_per_s=num_seeds / float(np.median(seconds[u])),
      speed_vs_first=float(np.median(seconds[base]) / np.median(seconds[u])),
      bitwise_equal_to_first=all(np.array_equal(a, b) for a, b in pairs),
      max_abs_diff_vs_first=max(float(np.max(np.abs(a - b))) for a, b in pairs),
    )
  return dict(seeds=num_seeds, repeats=repeats, unroll=rows)


# ----------------------------------------------------------------------------- loop


def time_loop(config, dataset, num_seeds: int) -> dict:
  """The baseline: a Python loop over seeds and steps around a jitted train.train_step.

  Same model, data order, dropout keys and steps as the vmapped run (so seed 0 must agree
  with it). Host work per step is kept small, as a careful user would: each epoch's shuffled
  minibatches and step keys come from one jitted call and are indexed as NumPy arrays.
  """
  model = model_lib.model_from_config(config.model, dataset.vocab_size)
  trainer = train_lib.make_train(config, dataset)
  tx = train_lib.make_optimizer(config.train, config.train.learning_rate)

  def step_one(state, batch, key_data):
    rng = jax.random.wrap_key_data(key_data)
    return train_lib.train_step(state, batch, rng, model=model, tx=tx)

  step = jax.jit(programs.at_precision(step_one, programs.matmul_precision(config)))

  init = jax.jit(trainer.init)
  windows_NxW = jnp.asarray(dataset.windows_NxW)
  num_windows = windows_NxW.shape[0]
  steps = math.ceil(num_windows / min(config.train.batch_size, num_windows))

  @jax.jit
  def epoch_batches(key, epoch):
    """Shuffled, padded minibatches and per-step dropout keys, exactly as make_train's."""
    plan = train_lib.plan_epoch(
      key, epoch, windows_NxW, config.train.batch_size, config.train.shuffle
    )
    rngs = jax.vmap(lambda i: jax.random.fold_in(plan.dropout_key, i))(jnp.arange(steps))
    return plan.windows_KxBxW, plan.weights_KxB, jax.random.key_data(rngs)

  hparams = train_lib.Hparams(
    learning_rate=jnp.float32(config.train.learning_rate), dropout=jnp.float32(config.model.dropout)
  )

  def train_one(seed: int):
    key = jax.random.key(seed)
    state = init(key, hparams)
    loss_E = []
    for epoch in range(config.train.epochs):
      windows_KxBxW, weights_KxB, key_data_Kx2 = jax.device_get(epoch_batches(key, epoch))
      counts_S = weights_KxB.sum(axis=1)
      losses = []
      for s in range(steps):
        inputs_BxT, targets = train_lib.split_window(windows_KxBxW[s], config.model.mode)
        batch = train_lib.Batch(inputs_BxT=inputs_BxT, targets=targets, weights_B=weights_KxB[s])
        state, loss = step(state, batch, key_data_Kx2[s])
        losses.append(loss)
      loss_E.append(float(np.dot(jax.device_get(losses), counts_S)) / num_windows)
    jax.block_until_ready(state)
    return np.asarray(loss_E)

  t0 = time.perf_counter()
  curve0 = train_one(0)  # Warm-up: compiles init, epoch_batches and the step.
  first_s = time.perf_counter() - t0
  seconds = []
  for seed in range(1, num_seeds + 1):
    t0 = time.perf_counter()
    train_one(seed)
    seconds.append(time.perf_counter() - t0)
  per_seed = float(np.median(seconds))
  return dict(
    seeds_timed=num_seeds,
    first_seed_s=first_s,
    compile_s=max(first_s - per_seed, 0.0),
    per_seed_s=seconds,
    seeds_per_s=1.0 / per_seed,
    steps_per_seed=steps * config.train.epochs,
    us_per_step=per_seed / (steps * config.train.epochs) * 1e6,
    final_loss_seed0=float(curve0[-1]),
    _loss_curve_seed0=curve0,
  )


# ----------------------------------------------------------------------------- roofline


def median_seconds(f, args, repeats: int) -> float:
  """Median wall time of f(*args) after one warm-up (compile) call."""
  f(*args).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_probe(sizes, repeats: int) -> dict:
  """float32 n x n matmul FLOP/s (median of repeats) at each size; the best is the peak."""
  results = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(functools.partial(jnp.matmul, precision="float32"))  # As the study's.
    results[str(n)] = 2 * n**3 / median_seconds(matmul, (a, b), repeats)
  return dict(flops_by_size=results, peak_flops=max(results.values()))


def batched_probe(num_seeds: int, shape: dict, repeats: int) -> float:
  """FLOP/s of the model's own matmul shape, seed-batched: (S, B, H) @ (S, H, 4H)."""
  b, h = shape["batch_size"], shape["hidden"]
  x = jax.random.normal(jax.random.key(0), (num_seeds, b, h), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (num_seeds, h, 4 * h), jnp.float32)
  matmul = jax.vmap(functools.partial(jnp.matmul, precision="float32"))
  seconds = median_seconds(jax.jit(matmul), (x, w), repeats)
  return 2 * num_seeds * b * h * 4 * h / seconds


# ----------------------------------------------------------------------------- report


def format_table(results: dict) -> str:
  m, s, roof, loop = results["machine"], results["shape"], results["roofline"], results["loop"]
  lines = [
    f"{m['cpu_model']} | {m['cpu_count']} cores | {m['backend']} ({m['device_kind']}) | "
    f"jax {m['jax']} | load avg {m['load_average'][0] if m['load_average'] else '?'}",
    f"scenario {s['scenario']}: {s['epochs']} epochs x {s['steps_per_epoch']} steps of batch "
    f"{s['batch_size']} (T={s['context_length']}, E={s['embed_dim']}, H={s['hidden']}, "
    f"V={s['vocab_size']})",
    f"roofline: {roof['flops_per_seed'] / 1e9:.2f} GFLOP/seed at a measured "
    f"{roof['peak_flops'] / 1e9:.0f} GFLOP/s float32 matmul peak = "
    f"{roof['seeds_per_s']:.0f} seeds/s",
    "",
    f"{'run':<28} {'compile s':>9} {'train s':>8} {'seeds/s':>8} {'vs loop':>8} "
    f"{'% roofline':>10} {'peak RSS MB':>11}",
  ]
  lines.append("-" * len(lines[-1]))
  lines.append(
    f"{'python loop (per-step jit)':<28} {loop['compile_s']:>9.1f} {1 / loop['seeds_per_s']:>8.2f} "
    f"{loop['seeds_per_s']:>8.1f} {1.0:>7.1f}x {100 * loop['roofline_fraction']:>9.1f}% {'':>11}"
  )
  for r in results["vmapped"]:
    lines.append(
      f"{'vmapped, ' + str(r['seeds']) + ' seeds':<28} {r['compile_s']:>9.1f} "
      f"{r['run_s_median']:>8.2f} {r['seeds_per_s']:>8.1f} {r['speedup_vs_loop']:>7.1f}x "
      f"{100 * r['roofline_fraction']:>9.1f}% {r['peak_rss_mb']:>11.0f}"
    )
  impl = results["impl"]
  for name in IMPLS:
    r = impl[name]
    lines.append(
      f"{name + ' LSTM, ' + str(impl['seeds']) + ' seeds':<28} {r['compile_s']:>9.1f} "
      f"{r['run_s_median']:>8.2f} {r['seeds_per_s']:>8.1f}"
    )
  lines.append(f"fused kernel's own gain over flax nn.RNN: {impl['fused_speedup']:.2f}x")
  return "\n".join(lines)


def unroll_main(seed_counts, unrolls, repeats, epochs):
  machine = machine_info()
  config = scenario_cell(epochs).config
  results = dict(machine=machine, context_length=config.data.context_length, compared=[])
  print(
    f"{machine['cpu_model']} | {machine['cpus_usable']} cores | jax {machine['jax']} | "
    f"load avg {machine['load_average'][0]:.2f} | scenario {scenario.NAME}, "
    f"T={config.data.context_length}, {config.train.epochs} epochs"
  )
  print(f"{'seeds':>5} {'unroll':>6} {'compile s':>9} {'train s':>8} {'seeds/s':>8} "
        f"{'vs first':>8} {'bitwise':>7} {'max |diff|':>10}")  # fmt: skip
  for num_seeds in seed_counts:
    r = compare_unrolls(epochs, num_seeds, unrolls, repeats)
    results["compared"].append(r)
    for u, row in r["unroll"].items():
      print(
        f"{num_seeds:>5} {u:>6} {row['compile_s']:>9.1f} {row['run_s_median']:>8.2f} "
        f"{row['seeds_per_s']:>8.1f} {row['speed_vs_first']:>7.3f}x "
        f"{str(row['bitwise_equal_to_first']):>7} {row['max_abs_diff_vs_first']:>10.2e}",
        flush=True,
      )
  results["load_average_end"] = list(os.getloadavg())
  print(f"load avg at the end {results['load_average_end'][0]:.2f}")
  results["command"] = " ".join(["python", "bench/throughput.py", *sys.argv[1:]])
  files.write_json(FLAGS.out, results)
  print(f"results in {FLAGS.out}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quick = FLAGS.quick
  seed_counts = [1, 4] if quick else [int(s) for s in FLAGS.seeds]
  repeats = 1 if quick else FLAGS.repeats
  epochs = FLAGS.epochs or (2 if quick else 0)
  if FLAGS.unrolls:
    unroll_main(seed_counts, [int(u) for u in FLAGS.unrolls], repeats, epochs)
    return
  cell = scenario_cell(epochs)
  config = cell.config
  dataset = data_lib.dataset_from_config(config.data)
  shape = shape_summary(config, dataset)
  flops = flops_per_seed(shape)
  start = time.perf_counter()

  probe = matmul_probe([256] if quick else [512, 1024, 2048], 3 if quick else 10)
  probe["batched_model_matmul_flops"] = batched_probe(64, shape, 3 if quick else 20)
  roofline = dict(
    flops_per_seed=flops["per_seed"],
    flops_per_train_step=flops["train_per_step"],
    peak_flops=probe["peak_flops"],
    seeds_per_s=probe["peak_flops"] / flops["per_seed"],
    convention="3 x forward matmul FLOPs (2 per multiply-add), all T recurrent steps, padded "
    "minibatches; nonlinearities, lookup, softmax and Adam not counted",
    probe=probe,
  )

  vmapped = []
  for num_seeds in sorted(seed_counts):
    r = time_vmapped(cell, num_seeds, repeats)
    print(f"  vmapped {num_seeds:>5} seeds: {r['seeds_per_s']:.1f} seeds/s", flush=True)
    vmapped.append(r)
  impl_seeds = 4 if quick else FLAGS.impl_seeds
  impls = {impl: time_vmapped(scenario_cell(epochs, impl), impl_seeds, repeats) for impl in IMPLS}
  for r in impls.values():
    r.pop("_loss_curve_seed0")
  impl = dict(
    seeds=impl_seeds,
    fused=impls["fused"],
    flax=impls["flax"],
    fused_speedup=impls["fused"]["seeds_per_s"] / impls["flax"]["seeds_per_s"],
    final_loss_seed0_abs_diff=abs(
      impls["fused"]["final_loss_seed0"] - impls["flax"]["final_loss_seed0"]
    ),
  )
  print(f"  fused LSTM vs flax nn.RNN at {impl_seeds} seeds: {impl['fused_speedup']:.2f}x")
  loop = time_loop(config, dataset, 1 if quick else FLAGS.loop_seeds)
  print(f"  python loop: {loop['seeds_per_s']:.2f} seeds/s", flush=True)

  loop["roofline_fraction"] = loop["seeds_per_s"] / roofline["seeds_per_s"]
  loop["achieved_flops"] = loop["seeds_per_s"] * flops["per_seed"]
  curve = loop.pop("_loss_curve_seed0")
  for r in vmapped:
    r["speedup_vs_loop"] = r["seeds_per_s"] / loop["seeds_per_s"]
    r["roofline_fraction"] = r["seeds_per_s"] / roofline["seeds_per_s"]
    r["achieved_flops"] = r["seeds_per_s"] * flops["per_seed"]
    # Same seed, same math: the loop and the vmapped run agree up to float rounding.
    r["loss_curve_max_abs_diff_vs_loop"] = float(np.max(np.abs(r.pop("_loss_curve_seed0") - curve)))

  results = dict(
    machine=machine_info(),
    shape=shape,
    quick=quick,
    roofline=roofline,
    vmapped=vmapped,
    impl=impl,
    loop=loop,
    bench_seconds=time.perf_counter() - start,
    command=" ".join(["python", "bench/throughput.py", *sys.argv[1:]]),
  )
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  files.write_json(FLAGS.out, results)
  print(format_table(results))
  print(f"results in {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
