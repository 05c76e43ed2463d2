"""The research note: report.md with PNG plots, from a finished workdir.

python -m research.report --workdir=DIR rewrites DIR/report.md from DIR's results files.
"""

import collections
import glob
import io
import math
import os

import matplotlib
import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from research import claims, config_lib, data, files, stats

PLOTS = ("loss_curves", "collapse_vs_lr", "collapse_heatmap", "tail_periods", "top_token_share")
MAX_PANELS = 12  # More rows than this: tail periods as one image instead of small multiples.
EXAMPLES = 3  # Distinct probe continuations shown per row.
# Matplotlib 3.10 replaced boxplot's vert=False by orientation="horizontal".
HORIZONTAL = (
  dict(orientation="horizontal")
  if tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) >= (3, 10)
  else dict(vert=False)
)
LR_DROPOUT = ("train.learning_rate", "model.dropout")
# Base-config fields summarised in the setup; cells' own values are in the cells table.
SUMMARY_FIELDS = dict(
  data=("corpus", "tokenization", "context_length"),
  model=("embed_dim", "hidden", "layers", "dropout", "mode", "init"),
  train=("optimizer", "learning_rate", "batch_size", "epochs", "shuffle"),
  generate=("prompts", "include_training_contexts", "length", "strategy"),
)


class ReportError(RuntimeError):
  """A workdir the note cannot be written from, with a message meant for the user."""


# ----------------------------------------------------------------------------- loading


def load_workdir(workdir: str) -> dict:
  """results.json rows, config.json, per-seed arrays and cell metadata (by cell name)."""
  results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(results_path):
    raise ReportError(f"no results.json in {workdir!r}: run the study first")
  results = files.read_json(results_path)
  config_path = os.path.join(workdir, "config.json")
  run_info = files.read_json(config_path) if os.path.exists(config_path) else {}
  with np.load(os.path.join(workdir, "per_seed.npz")) as z:
    per_seed = dict(z)
  cells = {}
  for path in sorted(glob.glob(os.path.join(workdir, "cells", "*.json"))):
    meta = files.read_json(path)
    cells[meta["name"]] = meta
  names = {row["cell"] for row in results["rows"]}
  return dict(results=results, run=run_info, per_seed=per_seed, cells=cells, names=names)


def decoding_name(row) -> str:
  """The study.decodings name of a row ("<cell>@<name>"), or "" without study.decodings."""
  return row["scenario"].rsplit("@", 1)[1] if "@" in row["scenario"] else ""


def decode_prefix(row) -> str:
  """per_seed.npz key prefix of a row's decoding metrics (training metrics: "<cell>/")."""
  name = decoding_name(row)
  return f"{row['cell']}/{name}/" if name else f"{row['cell']}/"


def ok_seeds(row, per_seed) -> np.ndarray:
  """Mask of the row's seeds that did not diverge."""
  return ~per_seed[f"{row['cell']}/diverged"].astype(bool)


def enrich(rows: list[dict], cells: dict, per_seed: dict) -> list[dict]:
  """Rows plus most_frequent_token and a bootstrap interval of mean distinct-2 (for claims)."""
  out = []
  for row in rows:
    vocab = cells[row["cell"]]["vocab"]
    d2 = per_seed[decode_prefix(row) + "distinct_2"][ok_seeds(row, per_seed)]
    ci = stats.bootstrap_mean(d2)
    out.append(
      dict(
        row,
        most_frequent_token=vocab[1] if len(vocab) > 1 else "",
        distinct_2_low=ci.low,
        distinct_2_high=ci.high,
      )
    )
  return out


# ----------------------------------------------------------------------------- formatting


def _f(x, digits: int = 3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _md(text) -> str:
  """Text safe inside a Markdown table cell."""
  return str(text).replace("|", "\\|").replace("\n", " ")


def _tok(token: str) -> str:
  return _md(repr(token))


def _distribution(dist: dict, top: int = 3) -> str:
  items = list(dist.items())
  shown = ", ".join(f"{_tok(t)} {s:.2f}" for t, s in items[:top])
  return shown + (", …" if len(items) > top else "") if items else "–"


def _table(header: list[str], body: list[list[str]], align: str = "") -> str:
  align = align or "l" + "r" * (len(header) - 1)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = [header, rule, *body]
  return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def headline_table(rows: list[dict]) -> str:
  header = [
    "scenario", "seeds", "diverged", "collapse [95% CI]", "argmax-const.", "loss (median)",
    "accuracy", "distinct-1", "distinct-2", "seq-rep-4", "top-token share",
    "probe (share of seeds)",
  ]  # fmt: skip
  body = [
    [
      f"`{_md(r['scenario'])}`",
      str(r["seeds"]),
      str(r["diverged"]),
      f"**{_f(r['collapse_rate'])}** [{_f(r['collapse_low'])}, {_f(r['collapse_high'])}]",
      _f(r["argmax_constant_rate"]),
      _f(r["final_loss_median"]),
      _f(r["accuracy_mean"], 2),
      _f(r["distinct_1_mean"]),
      _f(r["distinct_2_mean"]),
      _f(r["seq_rep_4_mean"]),
      _f(r["top_token_share_mean"]),
      _distribution(r["probe_distribution"]),
    ]
    for r in rows
  ]
  return _table(header, body, "l" + "r" * 10 + "l")


def _setting(section: dict, keys) -> str:
  return ", ".join(f"{k}={section[k]!r}" for k in keys if k in section)


def setup_section(workdir: str, loaded: dict) -> list[str]:
  results, run_info, cells = loaded["results"], loaded["run"], loaded["cells"]
  config = run_info.get("config", {})
  devices = run_info.get("devices") or results.get("devices", {})
  versions = run_info.get("versions", {})
  study_cfg = config.get("study", {})
  grid = list(config_lib.flatten(study_cfg.get("grid", {})))
  compute = sum(cells[n]["seconds"] for n in loaded["names"] if n in cells)
  lines = [
    "## Setup",
    "",
    f"- Workdir `{_md(os.path.abspath(workdir))}`, config fingerprint "
    f"`{run_info.get('fingerprint', '?')}`.",
    f"- Seeds per cell: **{results['seeds']}** (PRNG keys {study_cfg.get('seed_offset', 0)}…"
    f"{study_cfg.get('seed_offset', 0) + results['seeds'] - 1}, the same keys in every cell).",
    f"- Wall time of the last run: {results['wall_seconds']:.1f} s; training and evaluation "
    f"summed over cells (including earlier, resumed runs): {compute:.1f} s.",
    f"- Device: {devices.get('device_count', '?')} × {devices.get('device_kind', '?')} "
    f"({devices.get('backend', '?')}), {devices.get('process_count', '?')} process(es), "
    f"{devices.get('cpu_count', '?')} CPU cores on `{devices.get('host', '?')}`; "
    f"x64 {run_info.get('x64', '?')}; XLA_FLAGS `{run_info.get('xla_flags', '') or '-'}`.",
    "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
  ]
  if config:
    summary = "; ".join(f"{g}: {_setting(config[g], keys)}" for g, keys in SUMMARY_FIELDS.items())
    decodings = [d.get("name", "?") for d in study_cfg.get("decodings", [])]
    lines += [
      f"- Base config (cells override parts of it; see the cells table): {summary}.",
      f"- Scenarios: {len(study_cfg.get('scenarios', [])) or 'one (default)'}; grid axes: "
      f"{', '.join(f'`{k}`' for k in grid) or 'none'}; decodings: "
      f"{', '.join(decodings) or 'the base config'}.",
    ]
  lines += ["", "Cells:", "", cells_table(loaded), ""]
  return lines


def cells_table(loaded: dict) -> str:
  header = [
    "cell", "corpus", "tokenization", "context", "lr", "dropout", "epochs", "tokens", "windows",
    "seconds",
  ]  # fmt: skip
  body = []
  for name in dict.fromkeys(r["cell"] for r in loaded["results"]["rows"]):
    meta = loaded["cells"].get(name)
    if meta is None:
      continue
    c = meta["config"]
    body.append(
      [
        f"`{_md(name)}`",
        _md(c["data"]["corpus_file"] or c["data"]["corpus"]),
        c["data"]["tokenization"],
        str(c["data"]["context_length"]),
        f"{c['train']['learning_rate']:g}",
        f"{c['model']['dropout']:g}",
        str(c["train"]["epochs"]),
        str(len(meta["vocab"]) - 1),  # Distinct tokens; the reserved id 0 is not one.
        str(meta["num_windows"]),
        f"{meta['seconds']:.1f}",
      ]
    )
  return _table(header, body, "lllrrrrrrr")


def examples_section(rows: list[dict], loaded: dict) -> list[str]:
  """The most common probe continuations of each row, decoded to text."""
  lines = [
    "## Example continuations",
    "",
    f"The {EXAMPLES} most common continuations of the probe prompt per row (share of "
    "non-diverged seeds), decoded to text.",
    "",
    "```",
  ]
  per_seed = loaded["per_seed"]
  for row in rows:
    meta = loaded["cells"][row["cell"]]
    gen = meta["config"]["generate"]
    prompt = gen["prompts"][0] if gen["prompts"] else "(first training context)"
    sep = "" if meta["config"]["data"]["tokenization"] == "char" else " "
    conts = per_seed[decode_prefix(row) + "probe_continuation_L"][ok_seeds(row, per_seed)]
    texts = collections.Counter(
      data.detokenize(c, meta["vocab"], meta["config"]["data"]["tokenization"]) for c in conts
    )
    lines.append(f"{row['scenario']}" + ("" if len(conts) else "  (every seed diverged)"))
    for text, count in texts.most_common(EXAMPLES):
      lines.append(f"  {count / max(len(conts), 1):5.2f}  {prompt!r} + {sep + text!r}")
    if len(texts) > EXAMPLES:
      lines.append(f"         … {len(texts) - EXAMPLES} more distinct continuations")
  lines += ["```", ""]
  return lines


def claims_section(rows: list[dict], claim_set: str) -> list[str]:
  lines = ["## Claims checked", ""]
  if claim_set not in claims.CLAIM_SETS:
    return lines + [f"Unknown config.study.claims {claim_set!r}; known: {claims.CLAIM_SETS}.", ""]
  checked = claims.check_blog(rows)
  if not checked:
    return lines + ["No blog scenarios (cells named `1_…`, `2_…`, `3_…`) in the results.", ""]
  lines += [
    "Each claim of the blog post (`shared/reference/blog-post.md`), the numbers from this study "
    "that test it, and the verdict those numbers give under the rules below "
    "(`research/claims.py`).",
    "",
  ]
  for label, checks in checked:
    if label or len(checked) > 1:
      lines += [f"### `{_md(label) or 'base'}`", ""]
    body = [
      [str(i), _md(c.claim), _md(c.measured), f"**{c.verdict}**", _md(c.reason)]
      for i, c in enumerate(checks, 1)
    ]
    lines += [_table(["#", "claim", "measured", "verdict", "why"], body, "rllll"), ""]
  lines += ["Verdict rules:", ""] + [f"- {rule}" for rule in claims.RULES] + [""]
  return lines


# ----------------------------------------------------------------------------- plots


def save_figure(fig: Figure, path: str) -> None:
  """Renders with Agg into memory, then writes atomically."""
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  files.write_bytes(path, buffer.getvalue())


def _legend(ax, count: int) -> None:
  if count <= 6:
    ax.legend(fontsize="small")
  else:  # Outside the axes, where it hides no line.
    ax.legend(
      fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + count // 25
    )


def _style(i: int) -> dict:
  """Ten colours, then a new dash pattern: up to 40 distinguishable lines."""
  return dict(color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[(i // 10) % 4])


def plot_loss_curves(rows: list[dict], per_seed: dict) -> Figure:
  """Median and 10-90% band of the training loss across seeds, one line per cell."""
  fig = Figure(figsize=(8, 4.5))
  ax = fig.add_subplot()
  cells = list(dict.fromkeys(r["cell"] for r in rows))
  first = {r["cell"]: r for r in reversed(rows)}
  lows, highs = [], []
  for i, cell in enumerate(cells):
    loss_SxE = per_seed[f"{cell}/loss_curve"][ok_seeds(first[cell], per_seed)]
    if loss_SxE.size == 0:
      continue
    low_E, mid_E, high_E = np.nanpercentile(loss_SxE, [10, 50, 90], axis=0)
    epochs_E = np.arange(1, loss_SxE.shape[1] + 1)
    ax.plot(epochs_E, mid_E, label=cell, **_style(i))
    ax.fill_between(epochs_E, low_E, high_E, color=_style(i)["color"], alpha=0.15, linewidth=0)
    lows.append(np.nanmin(low_E))
    highs.append(np.nanmax(high_E))
  if lows and min(lows) > 0 and max(highs) / min(lows) > 20:  # Log only when it spans decades.
    ax.set_yscale("log")
  ax.set(xlabel="epoch", ylabel="training loss (nats)", title="Loss: median, 10–90% of seeds")
  _legend(ax, len(cells))
  return fig


def lr_panels(rows: list[dict], axes_by_cell: dict) -> dict:
  """Rows of a learning-rate grid by panel: all but learning rate and dropout equal in one."""
  panels = {}
  for row in rows:
    axes = axes_by_cell.get(row["cell"], {})
    if "train.learning_rate" not in axes:
      continue
    others = [
      f"{k.split('.')[-1]}={config_lib.format_value(v)}"
      for k, v in axes.items()
      if k not in LR_DROPOUT
    ]
    label = row["cell"].split("[", 1)[0] + (f"[{','.join(others)}]" if others else "")
    name = decoding_name(row)
    panels.setdefault(label + (f"@{name}" if name else ""), []).append(row)
  return panels


def _grid(count: int, width: float, height: float) -> tuple[Figure, list]:
  cols = min(count, 3)
  nrows = math.ceil(count / cols)
  fig = Figure(figsize=(width * cols, height * nrows), layout="constrained")
  return fig, [fig.add_subplot(nrows, cols, i + 1) for i in range(count)]


def plot_collapse_vs_lr(panels: dict) -> Figure:
  """Collapse rate (95% CI) against learning rate, one line per dropout, one panel per group."""
  fig, axs = _grid(len(panels), 4.8, 3.6)
  for ax, (label, rows) in zip(axs, panels.items(), strict=True):
    by_dropout = collections.defaultdict(list)
    for r in rows:
      by_dropout[r["dropout"]].append(r)
    for i, (dropout, rs) in enumerate(sorted(by_dropout.items())):
      rs = sorted(rs, key=lambda r: r["learning_rate"])
      # A small multiplicative shift per dropout keeps equal rates' error bars apart.
      lr = np.asarray([r["learning_rate"] for r in rs]) * 1.04 ** (i - len(by_dropout) / 2)
      rate = np.asarray([r["collapse_rate"] for r in rs])
      err = np.abs(np.asarray([[r["collapse_low"], r["collapse_high"]] for r in rs]).T - rate)
      ax.errorbar(
        lr, rate, yerr=err, marker="o", capsize=3, label=f"dropout {dropout:g}", **_style(i)
      )
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set(xlabel="learning rate", ylabel="collapse rate", title=label)
    ax.title.set_fontsize("small")
    ax.legend(fontsize="x-small")
  return fig


def plot_collapse_heatmap(panels: dict) -> Figure:
  """Collapse rate over the learning rate x dropout grid, one panel per group."""
  fig, axs = _grid(len(panels), 4.8, 3.8)
  for ax, (label, rows) in zip(axs, panels.items(), strict=True):
    lrs = sorted({r["learning_rate"] for r in rows})
    dropouts = sorted({r["dropout"] for r in rows})
    rate_DxR = np.full((len(dropouts), len(lrs)), np.nan)
    for r in rows:
      rate_DxR[dropouts.index(r["dropout"]), lrs.index(r["learning_rate"])] = r["collapse_rate"]
    image = ax.imshow(rate_DxR, vmin=0, vmax=1, cmap="magma", origin="lower", aspect="auto")
    for (d, c), value in np.ndenumerate(rate_DxR):
      if np.isfinite(value):
        color = "white" if value < 0.6 else "black"  # Legible on the dark and light ends.
        ax.text(c, d, f"{value:.2f}", ha="center", va="center", fontsize="x-small", color=color)
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
    ax.set_yticks(range(len(dropouts)), [f"{v:g}" for v in dropouts])
    ax.set(xlabel="learning rate", ylabel="dropout", title=label)
    ax.title.set_fontsize("small")
    fig.colorbar(image, ax=ax, label="collapse rate")
  return fig


def tail_period_shares(rows: list[dict], loaded: dict) -> tuple[np.ndarray, np.ndarray]:
  """(periods_K, share_RxK): share of each row's continuations per tail period (0 = none)."""
  per_seed = loaded["per_seed"]
  counts = [
    np.bincount(per_seed[decode_prefix(r) + "tail_period_P"][ok_seeds(r, per_seed)].ravel())
    for r in rows
  ]
  # Periods run up to L/4: show them all, so panels share one axis.
  max_periods = [loaded["cells"][r["cell"]]["config"]["generate"]["length"] // 4 for r in rows]
  width = max(*(len(c) for c in counts), *(p + 1 for p in max_periods), 2)
  share_RxK = np.zeros((len(rows), width))
  for i, c in enumerate(counts):
    share_RxK[i, : len(c)] = c / max(c.sum(), 1)
  return np.arange(width), share_RxK


def plot_tail_periods(rows: list[dict], loaded: dict) -> Figure:
  """Histogram of tail periods over seeds x prompts, per row (an image when rows are many)."""
  periods_K, share_RxK = tail_period_shares(rows, loaded)
  labels_K = ["none" if p == 0 else str(p) for p in periods_K]
  if len(rows) > MAX_PANELS:
    fig = Figure(figsize=(8, 1.5 + 0.25 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share_RxK, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(periods_K)), labels_K)
    ax.set_yticks(range(len(rows)), [r["scenario"] for r in rows], fontsize="x-small")
    ax.set(xlabel="tail period", title="Share of continuations by tail period")
    fig.colorbar(image, ax=ax, label="share")
    return fig
  fig, axs = _grid(len(rows), 4.2, 2.8)
  for ax, row, share_K in zip(axs, rows, share_RxK, strict=True):
    ax.bar(periods_K, share_K, color=["0.6"] + ["C3"] + ["C0"] * (len(periods_K) - 2))
    ax.set_xticks(periods_K, labels_K, fontsize="x-small")
    ax.set_ylim(0, 1)
    ax.set(xlabel="tail period (1 = collapsed)", ylabel="share of continuations")
    ax.set_title(row["scenario"], fontsize="small")
  return fig


def plot_top_token_share(rows: list[dict], per_seed: dict) -> Figure:
  """Distribution over seeds of the share of generated tokens taken by the top token."""
  fig = Figure(figsize=(8, 1.2 + 0.4 * len(rows)), layout="constrained")
  ax = fig.add_subplot()
  data = [per_seed[decode_prefix(r) + "top_token_share"][ok_seeds(r, per_seed)] for r in rows]
  positions = np.arange(len(rows))[::-1]
  ax.boxplot(data, positions=positions, widths=0.6, flierprops=dict(markersize=3), **HORIZONTAL)
  ax.set_yticks(positions, [r["scenario"] for r in rows], fontsize="small")
  ax.set_xlim(0, 1.02)
  ax.set(xlabel="top-token share of the generated tokens (per seed)", title="Top-token share")
  return fig


def write_plots(workdir: str, rows: list[dict], loaded: dict) -> dict:
  """Writes every plot that applies; returns {plot name: caption}. Stale plots are removed."""
  per_seed = loaded["per_seed"]
  axes_by_cell = {name: meta["axes"] for name, meta in loaded["cells"].items()}
  figures = {
    "loss_curves": (plot_loss_curves(rows, per_seed), "Training loss per epoch."),
    "tail_periods": (
      plot_tail_periods(rows, loaded),
      "Tail period of every continuation (seeds × prompts); 1 = collapsed onto one token.",
    ),
    "top_token_share": (
      plot_top_token_share(rows, per_seed),
      "Share of the generated tokens taken by the most frequent one, per seed.",
    ),
  }
  panels = lr_panels(rows, axes_by_cell)
  if panels:
    figures["collapse_vs_lr"] = (
      plot_collapse_vs_lr(panels),
      "Collapse rate (95% Wilson interval) against learning rate, per dropout.",
    )
    grid_axes = {k for a in axes_by_cell.values() for k in a}
    if "model.dropout" in grid_axes:
      figures["collapse_heatmap"] = (
        plot_collapse_heatmap(panels),
        "Collapse rate over the learning rate × dropout grid.",
      )
  for name in PLOTS:
    path = os.path.join(workdir, f"{name}.png")
    if name in figures:
      save_figure(figures[name][0], path)
    elif os.path.exists(path):
      os.unlink(path)  # A plot of an earlier, different study.
  return {name: caption for name, (_, caption) in figures.items()}


# ----------------------------------------------------------------------------- note


def render(workdir: str, loaded: dict, plots: dict) -> str:
  rows = enrich(loaded["results"]["rows"], loaded["cells"], loaded["per_seed"])
  claim_set = loaded["run"].get("config", {}).get("study", {}).get("claims", "")
  lines = [f"# Collapse study: `{_md(os.path.basename(os.path.abspath(workdir)))}`", ""]
  lines += setup_section(workdir, loaded)
  lines += [
    "## Results",
    "",
    "A seed *collapses* when every prompt's continuation ends in one token repeated, the same "
    "token for all prompts. Rates are over non-diverged seeds with 95% Wilson intervals; other "
    "columns are means over those seeds; *loss* is the final training loss (no dropout). "
    "*argmax-const.*: the argmax prediction is the same for "
    "every training context. *probe*: argmax next token after the first prompt.",
    "",
    headline_table(rows),
    "",
  ]
  for name, caption in plots.items():
    lines += [f"![{name}]({name}.png)", "", f"*{caption}*", ""]
  lines += examples_section(rows, loaded)
  if claim_set:
    lines += claims_section(rows, claim_set)
  return "\n".join(lines)


def write_report(workdir: str) -> str:
  """Writes DIR/report.md and its plots; returns the report's path."""
  loaded = load_workdir(workdir)
  plots = write_plots(workdir, loaded["results"]["rows"], loaded)
  path = os.path.join(workdir, "report.md")
  files.write_text(path, render(workdir, loaded, plots))
  return path


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    print(write_report(flags.FLAGS.workdir))
  except ReportError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  # Defined only when run as a script: run.py, which imports this module, has its own --workdir.
  flags.DEFINE_string("workdir", None, "A finished study's workdir (holds results.json).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
