"""The note's figures: matplotlib Figures from a finished study (research/workdir.Finished)."""

import collections
import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from research import config_lib, metrics, results, stats, workdir
from research.results import Row

# Every plot the note can have; a workdir's stale ones are removed when the note is rewritten.
PLOTS = (
  "loss_curves",
  "collapse_over_training",
  "onset_escape",
  "unigram_kl",
  "collapse_vs_lr",
  "collapse_heatmap",
  "tail_periods",
  "top_token_share",
)
MAX_PANELS = 12  # More rows than this: tail periods as one image instead of small multiples.
# Matplotlib 3.10 replaced boxplot's vert=False by orientation="horizontal".
HORIZONTAL = (
  dict(orientation="horizontal")
  if tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) >= (3, 10)
  else dict(vert=False)
)
LR_DROPOUT = ("train.learning_rate", "model.dropout")


def png(fig: Figure) -> bytes:
  """Renders a figure with Agg into PNG bytes."""
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  return buffer.getvalue()


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


def _median_band(ax, x, values_SxX, i: int, label: str, **plot) -> tuple[float, float]:
  """The median over seeds as a line and the 10-90% band around it; returns the band's range."""
  low, mid, high = np.nanpercentile(values_SxX, [10, 50, 90], axis=0)
  ax.plot(x, mid, label=label, **plot, **_style(i))
  ax.fill_between(x, low, high, color=_style(i)["color"], alpha=0.15, linewidth=0)
  return float(np.nanmin(low)), float(np.nanmax(high))


def plot_loss_curves(rows: list[Row], study: workdir.Finished) -> Figure:
  """Median and 10-90% band of the training loss across seeds, one line per cell."""
  fig = Figure(figsize=(8, 4.5))
  ax = fig.add_subplot()
  cells = _cell_rows(rows)
  ranges = []
  for i, row in enumerate(cells):
    arrays = study.of(row)
    loss_SxE = arrays["loss_curve"][results.ok_seeds(arrays)]
    if loss_SxE.size:
      epochs_E = np.arange(1, loss_SxE.shape[1] + 1)
      ranges.append(_median_band(ax, epochs_E, loss_SxE, i, row.cell))
  lows, highs = zip(*ranges, strict=True) if ranges else ((), ())
  if lows and min(lows) > 0 and max(highs) / min(lows) > 20:  # Log only when it spans decades.
    ax.set_yscale("log")
  ax.set(xlabel="epoch", ylabel="training loss (nats)", title="Loss: median, 10–90% of seeds")
  _legend(ax, len(cells))
  return fig


def _cell_rows(rows: list[Row]) -> list[Row]:
  """One row per cell (its first decoding): curves are the same for every decoding."""
  return list({r.cell: r for r in reversed(rows)}.values())[::-1]


def _curves(rows: list[Row], study: workdir.Finished, field: str):
  """(index, row, values seeds x points, epochs_Q) of each cell's curve over its valid seeds."""
  for i, row in enumerate(_cell_rows(rows)):
    arrays = study.of(row)
    values_SxQ = arrays[field][results.ok_seeds(arrays)]
    if values_SxQ.size:
      yield i, row, values_SxQ, np.asarray(study.cells[row.cell].eval_epochs)


def _epoch_axis(ax) -> None:
  # Log-scaled epochs, with epoch 0 kept on a linear stretch below 1.
  ax.set_xscale("symlog", linthresh=1.0)
  ax.set_xlabel("epoch (log scale above 1)")


def plot_collapse_over_training(rows: list[Row], study: workdir.Finished) -> Figure:
  """Collapse rate at each evaluation point, one line per cell, 95% Wilson bands."""
  fig = Figure(figsize=(8, 4.5))
  ax = fig.add_subplot()
  for i, row, curve_SxQ, epochs_Q in _curves(rows, study, "curve_collapsed"):
    cis = [stats.wilson(int(k), curve_SxQ.shape[0]) for k in curve_SxQ.sum(axis=0)]
    rate = np.asarray([c.estimate for c in cis])
    ax.plot(epochs_Q, rate, marker="o", markersize=3, label=row.cell, **_style(i))
    low, high = [c.low for c in cis], [c.high for c in cis]
    ax.fill_between(epochs_Q, low, high, color=_style(i)["color"], alpha=0.15, linewidth=0)
  _epoch_axis(ax)
  ax.set_ylim(-0.03, 1.03)
  ax.set(ylabel="collapse rate (greedy)", title="Collapse over training (95% Wilson bands)")
  _legend(ax, len(_cell_rows(rows)))
  return fig


def plot_onset_escape(rows: list[Row], study: workdir.Finished) -> Figure:
  """Histograms over seeds of the onset and the escape epochs, one step line per cell."""
  fig = Figure(figsize=(10, 3.8), layout="constrained")
  onset_ax, escape_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for i, row, curve_SxQ, epochs_Q in _curves(rows, study, "curve_collapsed"):
    edges = np.concatenate([epochs_Q, [epochs_Q[-1] + 1]]) - 0.5
    timing = metrics.collapse_timing(curve_SxQ, epochs_Q)
    for ax, values in ((onset_ax, timing.onset_S), (escape_ax, timing.escape_S)):
      values = values[values >= 0]
      if values.size:
        counts, _ = np.histogram(values, bins=edges)
        ax.step(epochs_Q, counts / curve_SxQ.shape[0], where="mid", label=row.cell, **_style(i))
  titles = ((onset_ax, "onset: first collapsed"), (escape_ax, "escape: out of collapse for good"))
  for ax, what in titles:
    _epoch_axis(ax)
    ax.set(ylabel="share of seeds", title=what)
    ax.title.set_fontsize("small")
  _legend(escape_ax, len(_cell_rows(rows)))
  return fig


def plot_unigram_kl(rows: list[Row], study: workdir.Finished) -> Figure:
  """Median and 10-90% band of the unigram KL at each evaluation point, one line per cell."""
  fig = Figure(figsize=(8, 4.5))
  ax = fig.add_subplot()
  for i, row, kl_SxQ, epochs_Q in _curves(rows, study, "curve_unigram_kl"):
    _median_band(ax, epochs_Q, kl_SxQ, i, row.cell, marker="o", markersize=3)
  _epoch_axis(ax)
  ax.set(
    ylabel="KL(model || unigram prior), nats",
    title="Distance from the unigram prior (0 = predicts the corpus frequencies everywhere)",
  )
  ax.title.set_fontsize("small")
  _legend(ax, len(_cell_rows(rows)))
  return fig


def lr_panels(rows: list[Row]) -> dict:
  """Rows of a learning-rate grid by panel: all but learning rate and dropout equal in one.

  A panel is named by the scenario, the other grid axes, and the decoding where rows hold
  several.
  """
  show_decoding = len({r.decoding for r in rows}) > 1
  panels = {}
  for row in rows:
    if "train.learning_rate" not in row.axes:
      continue
    others = [
      f"{k.split('.')[-1]}={config_lib.format_value(v)}"
      for k, v in row.axes.items()
      if k not in LR_DROPOUT
    ]
    label = row.scenario + (f"[{','.join(others)}]" if others else "")
    panels.setdefault(label + (f"@{row.decoding}" if show_decoding else ""), []).append(row)
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
      by_dropout[r.dropout].append(r)
    for i, (dropout, rs) in enumerate(sorted(by_dropout.items())):
      rs = sorted(rs, key=lambda r: r.learning_rate)
      # A small multiplicative shift per dropout keeps equal rates' error bars apart.
      lr = np.asarray([r.learning_rate for r in rs]) * 1.04 ** (i - len(by_dropout) / 2)
      rate = np.asarray([r.collapse_rate for r in rs])
      err = np.abs(np.asarray([[r.collapse_low, r.collapse_high] for r in rs]).T - rate)
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
    lrs = sorted({r.learning_rate for r in rows})
    dropouts = sorted({r.dropout for r in rows})
    rate_DrxLr = np.full((len(dropouts), len(lrs)), np.nan)
    for r in rows:
      rate_DrxLr[dropouts.index(r.dropout), lrs.index(r.learning_rate)] = r.collapse_rate
    image = ax.imshow(rate_DrxLr, vmin=0, vmax=1, cmap="magma", origin="lower", aspect="auto")
    for (d, c), value in np.ndenumerate(rate_DrxLr):
      if np.isfinite(value):
        color = "white" if value < 0.6 else "black"  # Legible on the dark and light ends.
        ax.text(c, d, f"{value:.2f}", ha="center", va="center", fontsize="x-small", color=color)
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
    ax.set_yticks(range(len(dropouts)), [f"{v:g}" for v in dropouts])
    ax.set(xlabel="learning rate", ylabel="dropout", title=label)
    ax.title.set_fontsize("small")
    fig.colorbar(image, ax=ax, label="collapse rate")
  return fig


def _valid(study: workdir.Finished, row: Row, field: str) -> np.ndarray:
  """A row's per-seed array over its non-diverged seeds."""
  arrays = study.of(row)
  return arrays[field][results.ok_seeds(arrays)]


def tail_period_shares(rows: list[Row], study: workdir.Finished) -> tuple[np.ndarray, np.ndarray]:
  """(periods_A, share_RxA): share of each row's continuations per tail period (0 = none)."""
  counts = [np.bincount(_valid(study, r, "tail_period_P").ravel()) for r in rows]
  # Periods run up to L/4: show them all, so panels share one axis.
  max_periods = [study.cells[r.cell].config["generate"]["length"] // 4 for r in rows]
  width = max(*(len(c) for c in counts), *(p + 1 for p in max_periods), 2)
  share_RxA = np.zeros((len(rows), width))
  for i, c in enumerate(counts):
    share_RxA[i, : len(c)] = c / max(c.sum(), 1)
  return np.arange(width), share_RxA


def plot_tail_periods(rows: list[Row], study: workdir.Finished) -> Figure:
  """Histogram of tail periods over seeds x prompts, per row (an image when rows are many)."""
  periods_A, share_RxA = tail_period_shares(rows, study)
  labels_A = ["none" if p == 0 else str(p) for p in periods_A]
  if len(rows) > MAX_PANELS:
    fig = Figure(figsize=(8, 1.5 + 0.25 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share_RxA, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(periods_A)), labels_A)
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize="x-small")
    ax.set(xlabel="tail period", title="Share of continuations by tail period")
    fig.colorbar(image, ax=ax, label="share")
    return fig
  fig, axs = _grid(len(rows), 4.2, 2.8)
  for ax, row, share_A in zip(axs, rows, share_RxA, strict=True):
    ax.bar(periods_A, share_A, color=["0.6"] + ["C3"] + ["C0"] * (len(periods_A) - 2))
    ax.set_xticks(periods_A, labels_A, fontsize="x-small")
    ax.set_ylim(0, 1)
    ax.set(xlabel="tail period (1 = collapsed)", ylabel="share of continuations")
    ax.set_title(row.label, fontsize="small")
  return fig


def plot_top_token_share(rows: list[Row], study: workdir.Finished) -> Figure:
  """Distribution over seeds of the share of generated tokens taken by the top token."""
  fig = Figure(figsize=(8, 1.2 + 0.4 * len(rows)), layout="constrained")
  ax = fig.add_subplot()
  data = [_valid(study, r, "top_token_share") for r in rows]
  positions = np.arange(len(rows))[::-1]
  ax.boxplot(data, positions=positions, widths=0.6, flierprops=dict(markersize=3), **HORIZONTAL)
  ax.set_yticks(positions, [r.label for r in rows], fontsize="small")
  ax.set_xlim(0, 1.02)
  ax.set(xlabel="top-token share of the generated tokens (per seed)", title="Top-token share")
  return fig


def figures(study: workdir.Finished) -> dict:
  """Every plot that applies to the study: {name: (Figure, caption)}."""
  rows = study.rows
  out = {
    "loss_curves": (plot_loss_curves(rows, study), "Training loss per epoch."),
    "collapse_over_training": (
      plot_collapse_over_training(rows, study),
      "Share of seeds collapsed (greedy decoding of the final prompts) at each evaluation "
      "point, with 95% Wilson bands.",
    ),
    "onset_escape": (
      plot_onset_escape(rows, study),
      "When seeds first collapse (onset) and when they leave collapse for good (escape), as "
      "shares of seeds per evaluation point.",
    ),
    "unigram_kl": (
      plot_unigram_kl(rows, study),
      "KL divergence of the model's next-token distribution from the corpus unigram prior, "
      "mean over distinct contexts; median and 10–90% of seeds.",
    ),
    "tail_periods": (
      plot_tail_periods(rows, study),
      "Tail period of every continuation (seeds × prompts); 1 = collapsed onto one token.",
    ),
    "top_token_share": (
      plot_top_token_share(rows, study),
      "Share of the generated tokens taken by the most frequent one, per seed.",
    ),
  }
  panels = lr_panels(rows)
  if panels:
    out["collapse_vs_lr"] = (
      plot_collapse_vs_lr(panels),
      "Collapse rate (95% Wilson interval) against learning rate, per dropout.",
    )
    if any("model.dropout" in r.axes for r in rows):
      out["collapse_heatmap"] = (
        plot_collapse_heatmap(panels),
        "Collapse rate over the learning rate × dropout grid.",
      )
  return out
