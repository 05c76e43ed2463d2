"""Per-seed arrays -> typed results rows: one Row per cell x decoding, built in one place."""

import collections
import csv
import dataclasses
import io
import json
import math

import numpy as np

from research import metrics, stats


@dataclasses.dataclass(frozen=True)
class SeedArrays:
  """One cell's per-seed arrays, seed axis first: training-set ones and each decoding's."""

  train: dict  # Field -> array: loss_curve (seeds x epochs), final_loss, ..., diverged.
  decodings: dict  # Decoding name -> {field -> array}: seed_collapsed, tail_period_P, ...

  def of(self, decoding: str) -> dict:
    """The arrays one (cell, decoding) row is computed from."""
    return {**self.train, **self.decodings[decoding]}

  @classmethod
  def concatenate(cls, parts: list["SeedArrays"]) -> "SeedArrays":
    """One cell's arrays from parts holding consecutive blocks of its seeds, in seed order."""
    return cls(
      train={k: np.concatenate([p.train[k] for p in parts]) for k in parts[0].train},
      decodings={
        name: {k: np.concatenate([p.decodings[name][k] for p in parts]) for k in fields}
        for name, fields in parts[0].decodings.items()
      },
    )


@dataclasses.dataclass(frozen=True)
class CellMeta:
  """What a finished cell records besides its arrays (its cells/<slug>.json)."""

  name: str
  scenario: str
  scenario_index: int
  axes: dict  # Grid axis (dotted field) -> value.
  config: dict  # The cell's full config.
  decodings: list  # Decoding names, in config order.
  labels: dict  # Decoding name -> row label ("<cell>" or "<cell>@<decoding>").
  vocab: list
  num_windows: int
  prompts: int  # Prompts continued: config.generate.prompts + the chosen training contexts.
  contexts: int  # Distinct training contexts in the corpus...
  contexts_used: int  # ...of which continued (generate.max_prompts caps them).
  mode_token: int  # The corpus' most frequent next token (argmax of the unigram prior).
  eval_epochs: list  # Epochs of the evaluation points (the curve_* arrays' second axis).
  seconds: float  # In all: training, evaluation, saving.
  train_seconds: float  # In compiled training calls (the first one compiles).
  eval_seconds: float  # Evaluating: during training and at the end.
  fingerprint: str  # config_lib.cell_fingerprint of the config that made it.


@dataclasses.dataclass(frozen=True)
class Row:
  """One results row: a cell under one decoding, over its non-diverged seeds."""

  label: str  # The row's name in tables: the cell, or "<cell>@<decoding>".
  scenario: str
  scenario_index: int
  cell: str
  decoding: str
  axes: dict  # Grid axis (dotted field) -> value; {} outside a grid.
  corpus: str
  tokenization: str
  learning_rate: float
  dropout: float
  epochs: int
  vocab_size: int
  trivial_vocab: bool  # One distinct token: collapse is the only possible output.
  most_frequent_token: str
  seeds: int
  diverged: int
  collapse_rate: float
  collapse_low: float
  collapse_high: float
  argmax_constant_rate: float
  argmax_constant_low: float
  argmax_constant_high: float
  collapsed_prompt_fraction: float
  final_loss_mean: float
  final_loss_median: float
  accuracy_mean: float
  entropy_mean: float
  distinct_1_mean: float
  distinct_2_mean: float
  distinct_2_low: float  # 95% bootstrap interval of the mean over seeds.
  distinct_2_high: float
  seq_rep_4_mean: float
  top_token_share_mean: float
  probe_top: str
  probe_top_share: float
  probe_distribution: dict  # Token -> share of seeds whose probe it is.
  collapse_tokens: dict  # Token -> share of collapsed seeds collapsing onto it.
  collapse_token_is_mode: float  # Share of collapsed seeds collapsing onto the corpus' mode.
  unigram_kl_mean: float  # Final KL(model || unigram prior), nats; 0 = predicts the prior.
  # Collapse over training (greedy, at the evaluation points; research/metrics.py):
  never_collapsed_share: float
  escaped_share: float  # Collapsed at some evaluation point, not at the last.
  collapsed_at_end_share: float
  onset_median: float  # Epoch of first collapse, over the seeds that ever collapsed.
  onset_q25: float
  onset_q75: float
  escape_median: float  # Epoch of escape, over the seeds that escaped.
  escape_q25: float
  escape_q75: float
  # The attractor census (greedy decodings; NaN for sampling ones):
  cycles_mean: float  # Distinct cycles reached over the prompts.
  largest_basin_median: float  # Share of prompts on the most common cycle.
  fixed_point_share: float  # Seeds whose most common cycle is one token repeated.
  unresolved_mean: float  # Share of prompts whose continuation never repeats a window.
  seconds: float  # Training and evaluation time of the cell.


def _distribution(tokens: np.ndarray, vocab) -> dict:
  counts = collections.Counter(vocab[int(t)] for t in tokens)
  return {tok: n / max(len(tokens), 1) for tok, n in counts.most_common()}


def _interval(prefix: str, successes, trials) -> dict:
  ci = stats.wilson(int(successes), int(trials))
  return {f"{prefix}_rate": ci.estimate, f"{prefix}_low": ci.low, f"{prefix}_high": ci.high}


def _mean(values, ok) -> float:
  values = np.asarray(values, np.float64)[ok]
  return float(values.mean()) if values.size else math.nan


def _median(values, ok) -> float:
  values = np.asarray(values, np.float64)[ok]
  return float(np.median(values)) if values.size else math.nan


@dataclasses.dataclass(frozen=True)
class Pair:
  """Two decodings of the same trained seeds of one cell, compared seed by seed."""

  cell: str
  a: str
  b: str
  seeds: int  # Non-diverged seeds compared.
  a_collapse_rate: float
  b_collapse_rate: float
  a_only: int  # Seeds collapsed under a, not b (McNemar's discordant pairs)...
  b_only: int  # ...and under b, not a.
  mcnemar_p: float  # Exact two-sided McNemar test of equal collapse rates.
  a_lower_seq_rep: float  # P(a's seq-rep-4 < b's) over seeds, ties half, with a
  a_lower_seq_rep_low: float  # 95% bootstrap interval.
  a_lower_seq_rep_high: float


def pairs(meta: CellMeta, arrays: SeedArrays) -> list[Pair]:
  """Every pair of the cell's decodings (in config order), on its non-diverged seeds."""
  ok = ~arrays.train["diverged"].astype(bool)
  out = []
  for i, a in enumerate(meta.decodings):
    for b in meta.decodings[i + 1 :]:
      ca = arrays.decodings[a]["seed_collapsed"].astype(bool)[ok]
      cb = arrays.decodings[b]["seed_collapsed"].astype(bool)[ok]
      sa = arrays.decodings[a]["seq_rep_4"][ok]
      sb = arrays.decodings[b]["seq_rep_4"][ok]
      better = stats.probability_of_improvement(sa, sb)
      out.append(
        Pair(
          cell=meta.name,
          a=a,
          b=b,
          seeds=int(ok.sum()),
          a_collapse_rate=float(ca.mean()) if ca.size else math.nan,
          b_collapse_rate=float(cb.mean()) if cb.size else math.nan,
          a_only=int((ca & ~cb).sum()),
          b_only=int((~ca & cb).sum()),
          mcnemar_p=stats.mcnemar_exact(ca, cb),
          a_lower_seq_rep=better.estimate,
          a_lower_seq_rep_low=better.low,
          a_lower_seq_rep_high=better.high,
        )
      )
  return out


def _quartiles(values) -> tuple[float, float, float]:
  values = np.asarray(values, np.float64)
  if not values.size:
    return math.nan, math.nan, math.nan
  q25, q50, q75 = np.percentile(values, [25, 50, 75])
  return float(q50), float(q25), float(q75)


def _share(mask, ok) -> float:
  return float(mask[ok].mean()) if ok.any() else math.nan


def dynamics_fields(meta: CellMeta, a: dict, ok: np.ndarray) -> dict:
  """Onset, escape and collapse classes from the curve_collapsed evaluation points."""
  curve_SxQ = a["curve_collapsed"].astype(bool)
  epochs_Q = np.asarray(meta.eval_epochs)
  timing = metrics.collapse_timing(curve_SxQ, epochs_Q)
  classes, onset, escape = timing.class_S, timing.onset_S, timing.escape_S
  onset_m, onset_lo, onset_hi = _quartiles(onset[ok & (onset >= 0)])
  escape_m, escape_lo, escape_hi = _quartiles(escape[ok & (escape >= 0)])
  return dict(
    never_collapsed_share=_share(classes == metrics.NEVER_COLLAPSED, ok),
    escaped_share=_share(classes == metrics.ESCAPED, ok),
    collapsed_at_end_share=_share(classes == metrics.COLLAPSED_AT_END, ok),
    onset_median=onset_m,
    onset_q25=onset_lo,
    onset_q75=onset_hi,
    escape_median=escape_m,
    escape_q25=escape_lo,
    escape_q75=escape_hi,
  )


def summarize(meta: CellMeta, arrays: SeedArrays, decoding: str) -> Row:
  """The row of (cell, decoding): rates with Wilson intervals, means over non-diverged seeds."""
  a = arrays.of(decoding)
  vocab = meta.vocab
  ok = ~a["diverged"].astype(bool)
  n_ok = int(ok.sum())
  collapsed = a["seed_collapsed"].astype(bool) & ok
  cfg = meta.config
  probe = _distribution(a["probe"][ok], vocab)
  distinct_2 = stats.bootstrap_mean(a["distinct_2"][ok])
  return Row(
    label=meta.labels[decoding],
    scenario=meta.scenario,
    scenario_index=meta.scenario_index,
    cell=meta.name,
    decoding=decoding,
    axes=dict(meta.axes),
    corpus=cfg["data"]["corpus_file"] or cfg["data"]["corpus"],
    tokenization=cfg["data"]["tokenization"],
    learning_rate=cfg["train"]["learning_rate"],
    dropout=cfg["model"]["dropout"],
    epochs=cfg["train"]["epochs"],
    vocab_size=len(vocab),
    trivial_vocab=len(vocab) <= 2,
    most_frequent_token=vocab[1] if len(vocab) > 1 else "",
    seeds=int(ok.size),
    diverged=int((~ok).sum()),
    **_interval("collapse", collapsed.sum(), n_ok),
    **_interval("argmax_constant", (a["argmax_constant"].astype(bool) & ok).sum(), n_ok),
    collapsed_prompt_fraction=_mean(a["collapsed_fraction"], ok),
    final_loss_mean=_mean(a["final_loss"], ok),
    final_loss_median=float(np.median(a["final_loss"][ok])) if n_ok else math.nan,
    accuracy_mean=_mean(a["accuracy"], ok),
    entropy_mean=_mean(a["entropy"], ok),
    distinct_1_mean=_mean(a["distinct_1"], ok),
    distinct_2_mean=_mean(a["distinct_2"], ok),
    distinct_2_low=distinct_2.low,
    distinct_2_high=distinct_2.high,
    seq_rep_4_mean=_mean(a["seq_rep_4"], ok),
    top_token_share_mean=_mean(a["top_token_share"], ok),
    probe_top=next(iter(probe), ""),
    probe_top_share=next(iter(probe.values()), math.nan),
    probe_distribution=probe,
    collapse_tokens=_distribution(a["collapse_token"][collapsed], vocab),
    collapse_token_is_mode=_share(a["collapse_token"] == meta.mode_token, collapsed),
    unigram_kl_mean=_mean(a["unigram_kl"], ok),
    **dynamics_fields(meta, a, ok),
    cycles_mean=_mean(a["distinct_cycles"], ok),
    largest_basin_median=_median(a["largest_basin_share"], ok),
    fixed_point_share=_mean(a["largest_is_fixed_point"], ok),
    unresolved_mean=_mean(a["unresolved_share"], ok),
    seconds=meta.seconds,
  )


def ok_seeds(arrays: dict) -> np.ndarray:
  """Mask of the seeds that did not diverge."""
  return ~arrays["diverged"].astype(bool)


def to_jsonable(record) -> dict:
  """A Row or Pair as strict JSON values: NaN (no valid seed) becomes None."""
  return {k: _strict(v) for k, v in dataclasses.asdict(record).items()}


def from_jsonable(d: dict, kind=None):
  """A Row (or `kind`) from to_jsonable's output: None becomes NaN again."""
  return (kind or Row)(**{k: (math.nan if v is None else v) for k, v in d.items()})


def _strict(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def to_csv(rows: list[Row]) -> str:
  """One line per row; dict fields (axes, distributions) as JSON strings."""
  columns = [f.name for f in dataclasses.fields(Row)]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow(
      {k: json.dumps(v) if isinstance(v, dict) else v for k, v in dataclasses.asdict(row).items()}
    )
  return buffer.getvalue()


def format_table(rows: list[Row]) -> str:
  """A compact fixed-width table of the headline numbers."""
  w = max([len("scenario"), *(len(r.label) for r in rows)])
  header = (
    f"{'scenario':<{w}} {'seeds':>5} {'div':>4} {'collapse [95% CI]':>22} {'argmax-const':>12} "
    f"{'loss':>6} {'acc':>5} {'dist-2':>6} {'probe':>10}"
  )
  lines = [header, "-" * len(header)]
  for r in rows:
    ci = f"{r.collapse_rate:.3f} [{r.collapse_low:.3f},{r.collapse_high:.3f}]"
    if r.diverged == r.seeds:
      ci = "all seeds diverged"
    probe = f"{r.probe_top!r}:{r.probe_top_share:.2f}" if r.probe_top else "-"
    lines.append(
      f"{r.label:<{w}} {r.seeds:>5} {r.diverged:>4} {ci:>22} "
      f"{r.argmax_constant_rate:>12.3f} {r.final_loss_mean:>6.3f} "
      f"{r.accuracy_mean:>5.2f} {r.distinct_2_mean:>6.3f} {probe:>10}"
    )
  for r in rows:
    if r.trivial_vocab:
      lines.append(f"note: {r.label}: one distinct token in the corpus, collapse is trivial")
  return "\n".join(lines)
