"""The research note's text: report.md from a finished workdir, with research/plots.py's figures.

python -m research.report --workdir=DIR rewrites DIR/report.md from DIR's results files.
"""

import collections
import math
import os
import sys

import numpy as np
from absl import app, flags

from research import claims, config_lib, data, files, plots, results, workdir
from research.results import Row

EXAMPLES = 3  # Distinct probe continuations shown per row.
# Base-config fields summarised in the setup; cells' own values are in the cells table.
SUMMARY_FIELDS = dict(
  data=("corpus", "tokenization", "context_length"),
  model=("embed_dim", "hidden", "layers", "dropout", "mode", "init", "matmul_precision"),
  train=("optimizer", "learning_rate", "batch_size", "epochs", "shuffle"),
  generate=("prompts", "include_training_contexts", "length", "strategy"),
)


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


def headline_table(rows: list[Row]) -> str:
  header = [
    "scenario", "seeds", "diverged", "collapse [95% CI]", "argmax-const.", "loss (median)",
    "accuracy", "distinct-1", "distinct-2", "seq-rep-4", "top-token share",
    "probe (share of seeds)",
  ]  # fmt: skip
  body = [
    [
      f"`{_md(r.label)}`",
      str(r.seeds),
      str(r.diverged),
      f"**{_f(r.collapse_rate)}** [{_f(r.collapse_low)}, {_f(r.collapse_high)}]",
      _f(r.argmax_constant_rate),
      _f(r.final_loss_median),
      _f(r.accuracy_mean, 2),
      _f(r.distinct_1_mean),
      _f(r.distinct_2_mean),
      _f(r.seq_rep_4_mean),
      _f(r.top_token_share_mean),
      _distribution(r.probe_distribution),
    ]
    for r in rows
  ]
  return _table(header, body, "l" + "r" * 10 + "l")


def format_phases(phases: dict) -> str:
  """A run's phase timings in one line."""
  named = ("startup", "compile", "train", "evaluate", "report", "total")
  parts = [f"{k} {phases[k]:.1f} s" for k in named if k in phases]
  if "programs_compiled" in phases:
    parts.append(
      f"{phases['programs_compiled']} programs compiled, "
      f"{phases.get('compilation_cache_hits', 0)} from the compilation cache"
    )
  if phases.get("workers", 1) > 1:  # run.py --workers: each phase is the slowest worker's.
    parts.append(f"{phases['workers']} worker processes")
  return "; ".join(parts)


# Programs compiling faster than this are summed into one entry (JAX's and the study's helpers).
MINOR_COMPILE_SECONDS = 0.05


def _split_programs(phases: dict) -> tuple[list[dict], list[dict]]:
  """(the programs that took MINOR_COMPILE_SECONDS or more, in compile order; the rest)."""
  records = phases.get("compile_programs") or []
  major = [r for r in records if r["seconds"] >= MINOR_COMPILE_SECONDS]
  return major, [r for r in records if r["seconds"] < MINOR_COMPILE_SECONDS]


def format_compiles(phases: dict) -> str:
  """Compile seconds per program in one line, slowest first, each program's groups summed in
  compile order: "compile per program: evaluate 2.7 + 3.4 s, ..." ("" when not recorded)."""
  major, minor = _split_programs(phases)
  if not major and not minor:
    return ""
  by_name = {}
  for r in major:
    by_name.setdefault(r["program"], []).append(r["seconds"])
  slowest = sorted(by_name.items(), key=lambda item: -sum(item[1]))
  parts = [f"{name} {' + '.join(f'{s:.1f}' for s in secs)} s" for name, secs in slowest]
  if minor:
    parts.append(f"{len(minor)} more {sum(r['seconds'] for r in minor):.1f} s")
  return "compile per program: " + ", ".join(parts)


def compile_table(phases: dict) -> str:
  """The last run's compilation per program: tracing, lowering, XLA (or a cache load)."""
  major, minor = _split_programs(phases)
  header = ["cells", "program", "trace s", "lower s", "XLA compile s", "from the cache"]
  body = [
    [
      f"`{_md(r['cells'])}`" if r["cells"] else "-",
      f"`{_md(r['program'])}`",
      f"{r['trace']:.2f}",
      f"{r['lower']:.2f}",
      f"{r['backend']:.2f}",
      "yes" if r["cache_hit"] else "no",
    ]
    for r in major
  ]
  if minor:
    total = [sum(r[k] for r in minor) for k in ("trace", "lower", "backend")]
    hits = sum(r["cache_hit"] for r in minor)
    body.append(
      ["-", f"{len(minor)} more", *(f"{t:.2f}" for t in total), f"{hits} of {len(minor)}"]
    )
  return _table(header, body, "llrrrl")


def _phases(phases: dict) -> str:
  return format_phases(phases) or "phases not recorded"


def _setting(section: dict, keys) -> str:
  return ", ".join(f"{k}={section[k]!r}" for k in keys if k in section)


def setup_section(directory: str, study: workdir.Finished) -> list[str]:
  run_info = study.run
  config = run_info.get("config", {})
  devices = run_info.get("devices") or study.devices
  versions = run_info.get("versions", {})
  study_cfg = config.get("study", {})
  grid = list(config_lib.flatten(study_cfg.get("grid", {})))
  compute = sum(meta.seconds for meta in study.cells.values())
  offset = study_cfg.get("seed_offset", 0)
  lines = [
    "## Setup",
    "",
    f"- Workdir `{_md(os.path.abspath(directory))}`, config fingerprint "
    f"`{run_info.get('fingerprint', '?')}`.",
    f"- Seeds per cell: **{study.seeds}** (PRNG keys {offset}…"
    f"{offset + study.seeds - 1}, the same keys in every cell).",
    f"- Wall time of the last run: {study.wall_seconds:.1f} s ({_phases(study.phases)}); "
    f"training and evaluation summed over cells (including earlier, resumed runs): "
    f"{compute:.1f} s.",
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
  lines += [
    "- Prompts: `generate.prompts`, then the distinct training contexts, at most "
    "`generate.max_prompts` in all; when capped, evenly spaced contexts over the corpus "
    "(the cells table gives how many were continued).",
    "",
    "Cells:",
    "",
    cells_table(study),
    "",
  ]
  if study.phases.get("compile_programs"):
    lines += [
      "Compilation in the last run, per program (its first call's tracing and lowering by "
      "JAX, then XLA's compile, or its load from the persistent compilation cache):",
      "",
      compile_table(study.phases),
      "",
    ]
  return lines


def cells_table(study: workdir.Finished) -> str:
  header = [
    "cell", "corpus", "tokenization", "context", "lr", "dropout", "epochs", "tokens", "windows",
    "prompts (contexts used / distinct)", "seconds",
  ]  # fmt: skip
  body = []
  for meta in study.cells.values():
    d, t, m = meta.config["data"], meta.config["train"], meta.config["model"]
    body.append(
      [
        f"`{_md(meta.name)}`",
        _md(d["corpus_file"] or d["corpus"]),
        d["tokenization"],
        str(d["context_length"]),
        f"{t['learning_rate']:g}",
        f"{m['dropout']:g}",
        str(t["epochs"]),
        str(len(meta.vocab) - 1),  # Distinct tokens; the reserved id 0 is not one.
        str(meta.num_windows),
        f"{meta.prompts} ({meta.contexts_used} / {meta.contexts})",
        f"{meta.seconds:.1f}",
      ]
    )
  return _table(header, body, "lllrrrrrrrr")


def examples_section(study: workdir.Finished) -> list[str]:
  """The most common probe continuations of each row, decoded to text."""
  lines = [
    "## Example continuations",
    "",
    f"The {EXAMPLES} most common continuations of the probe prompt per row (share of "
    "non-diverged seeds), decoded to text.",
    "",
    "```",
  ]
  for row in study.rows:
    meta = study.cells[row.cell]
    gen = meta.config["generate"]
    prompt = gen["prompts"][0] if gen["prompts"] else "(first training context)"
    tokenization = meta.config["data"]["tokenization"]
    sep = "" if tokenization == "char" else " "
    arrays = study.of(row)
    conts = arrays["probe_continuation_L"][results.ok_seeds(arrays)]
    # Distinct continuations first (in order of first appearance, as a Counter of every seed's
    # would list ties): at 100 000 seeds, detokenizing each seed's took 2 s a row.
    unique_UxL, first_U, count_U = np.unique(conts, axis=0, return_index=True, return_counts=True)
    texts = collections.Counter()
    for u in np.argsort(first_U, kind="stable"):
      texts[data.detokenize(unique_UxL[u], meta.vocab, tokenization)] += int(count_U[u])
    lines.append(row.label + ("" if len(conts) else "  (every seed diverged)"))
    for text, count in texts.most_common(EXAMPLES):
      lines.append(f"  {count / max(len(conts), 1):5.2f}  {prompt!r} + {sep + text!r}")
    if len(texts) > EXAMPLES:
      lines.append(f"         … {len(texts) - EXAMPLES} more distinct continuations")
  lines += ["```", ""]
  return lines


def _range(median: float, low: float, high: float) -> str:
  if math.isnan(median):
    return "–"
  return f"{median:g} [{low:g}, {high:g}]"


def _points(epochs: list) -> str:
  """Evaluation epochs, shortened when many: "0, 10, …, 1000 (101)"."""
  if len(epochs) <= 6:
    return ", ".join(str(e) for e in epochs)
  return f"{epochs[0]}, {epochs[1]}, …, {epochs[-1]} ({len(epochs)})"


def dynamics_section(study: workdir.Finished) -> list[str]:
  """Collapse over training, its mechanism, and the rules' findings per cell."""
  rows = list({r.cell: r for r in reversed(study.rows)}.values())[::-1]  # One per cell.
  lines = [
    "## Collapse over training",
    "",
    "Evaluated at epochs 0, k, 2k, … (`study.eval_every`) with greedy decoding of the final "
    "prompts. *Onset*: first collapsed evaluation; *escape*: first evaluation from which a "
    "seed stays uncollapsed; median [25th, 75th percentile] over the seeds concerned. "
    "*KL*: final KL(model ‖ unigram prior) in nats; *onto mode*: share of collapsed seeds "
    "whose collapse token is the corpus' most frequent next token.",
    "",
  ]
  header = ["cell", "evaluated at", "never", "escaped", "at end", "onset", "escape", "KL",
            "onto mode"]  # fmt: skip
  body = [
    [
      f"`{_md(r.cell)}`",
      _md(_points(study.cells[r.cell].eval_epochs)),
      _f(r.never_collapsed_share, 2),
      _f(r.escaped_share, 2),
      _f(r.collapsed_at_end_share, 2),
      _range(r.onset_median, r.onset_q25, r.onset_q75),
      _range(r.escape_median, r.escape_q25, r.escape_q75),
      _f(r.unigram_kl_mean),
      _f(r.collapse_token_is_mode, 2),
    ]
    for r in rows
  ]
  lines += [_table(header, body, "llrrrllrr"), ""]
  census = [r for r in study.rows if not math.isnan(r.cycles_mean)]
  if census:
    lines += [
      "Attractor census (greedy decoding is a map on context windows, so every continuation "
      "ends in a cycle): distinct cycles reached over the prompts (mean over seeds), the most "
      "common cycle's share of prompts (median), seeds whose most common cycle is one token "
      "repeated, and prompts with no repeated window within the generated tokens.",
      "",
      _table(
        ["row", "cycles", "largest basin", "fixed point", "unresolved"],
        [
          [
            f"`{_md(r.label)}`",
            _f(r.cycles_mean, 2),
            _f(r.largest_basin_median, 2),
            _f(r.fixed_point_share, 2),
            _f(r.unresolved_mean, 2),
          ]
          for r in census
        ],
      ),
      "",
    ]
  lines += ["Findings, by the rules below (`research/claims.py`):", ""]
  body = []
  for r in rows:
    for check in (
      claims.escape(r),
      claims.unigram_stage(study.of(r), study.cells[r.cell].mode_token),
    ):
      body.append([f"`{_md(r.cell)}`", _md(check.claim), _md(check.measured),
                   f"**{check.verdict}**", _md(check.reason)])  # fmt: skip
  lines += [_table(["cell", "statement", "measured", "verdict", "why"], body, "lllll"), ""]
  lines += ["Rules:", ""] + [f"- {rule}" for rule in claims.DYNAMICS_RULES] + [""]
  return lines


def pairs_section(study: workdir.Finished) -> list[str]:
  """Decodings compared on the same seeds."""
  if not study.pairs:
    return []
  header = ["cell", "a vs b", "collapse a / b", "a only / b only", "McNemar p",
            "P(a's seq-rep-4 < b's) [95% CI]"]  # fmt: skip
  body = [
    [
      f"`{_md(p.cell)}`",
      f"{_md(p.a)} vs {_md(p.b)}",
      f"{_f(p.a_collapse_rate)} / {_f(p.b_collapse_rate)}",
      f"{p.a_only} / {p.b_only}",
      f"{p.mcnemar_p:.3g}",
      f"{_f(p.a_lower_seq_rep)} [{_f(p.a_lower_seq_rep_low)}, {_f(p.a_lower_seq_rep_high)}]",
    ]
    for p in study.pairs
  ]
  return [
    "## Decodings compared on the same seeds",
    "",
    "Each pair of decodings continues the same prompts from the same trained seeds. McNemar's "
    "exact test on per-seed collapse uses the seeds that collapse under one decoding only; the "
    "last column is the share of seeds whose seq-rep-4 is lower under a (ties count half).",
    "",
    _table(header, body, "llrrrr"),
    "",
  ]


def claims_section(rows: list[Row], claim_set: str) -> list[str]:
  lines = ["## Claims checked", ""]
  if claim_set not in claims.CLAIM_SETS:
    return lines + [f"Unknown config.study.claims {claim_set!r}; known: {claims.CLAIM_SETS}.", ""]
  checked = claims.check_blog(rows)
  if not checked:
    return lines + ["No blog scenarios (the first three of study.scenarios) in the results.", ""]
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


# ----------------------------------------------------------------------------- note


def render(directory: str, study: workdir.Finished, captions: dict) -> str:
  """report.md's text; captions: {plot name: caption} of the figures written beside it."""
  claim_set = study.run.get("config", {}).get("study", {}).get("claims", "")
  lines = [f"# Collapse study: `{_md(os.path.basename(os.path.abspath(directory)))}`", ""]
  lines += setup_section(directory, study)
  lines += [
    "## Results",
    "",
    "A seed *collapses* when every prompt's continuation ends in one token repeated, the same "
    "token for all prompts. Rates are over non-diverged seeds with 95% Wilson intervals; other "
    "columns are means over those seeds; *loss* is the final training loss (no dropout). "
    "*argmax-const.*: the argmax prediction is the same for "
    "every training context. *probe*: argmax next token after the first prompt.",
    "",
    headline_table(study.rows),
    "",
  ]
  for name, caption in captions.items():
    lines += [f"![{name}]({name}.png)", "", f"*{caption}*", ""]
  lines += dynamics_section(study)
  lines += pairs_section(study)
  lines += examples_section(study)
  if claim_set:
    lines += claims_section(study.rows, claim_set)
  return "\n".join(lines)


def write_report(directory: str) -> str:
  """Writes DIR/report.md and its plots; returns the report's path."""
  study = workdir.load(directory)
  figures = plots.figures(study)
  pngs = {name: plots.png(fig) for name, (fig, _) in figures.items()}
  captions = {name: caption for name, (_, caption) in figures.items()}
  return workdir.write_note(directory, render(directory, study, captions), pngs, plots.PLOTS)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    print(write_report(flags.FLAGS.workdir))
  except (workdir.WorkdirError, files.WriteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # Defined only when run as a script: run.py, which imports this module, has its own --workdir.
  flags.DEFINE_string("workdir", None, "A finished study's workdir (holds results.json).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
