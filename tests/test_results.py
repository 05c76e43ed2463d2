"""Typed rows from hand-made per-seed arrays: rates, intervals, exclusions, files' formats."""

import csv
import io
import json
import math

import numpy as np
import pytest

from research import results, stats


def meta(**kw):
  fields = dict(
    name="s[lr=0.1]",
    scenario="s",
    scenario_index=0,
    axes={"train.learning_rate": 0.1},
    config=dict(
      data=dict(corpus="blog_varied", corpus_file="", tokenization="char"),
      train=dict(learning_rate=0.1, epochs=3),
      model=dict(dropout=0.0),
    ),
    decodings=["greedy"],
    labels={"greedy": "s[lr=0.1]"},
    vocab=["<pad>", "t", " ", "h"],
    num_windows=10,
    prompts=5,
    contexts=9,
    contexts_used=4,
    mode_token=2,
    eval_epochs=[0, 2, 3],
    seconds=1.5,
    train_seconds=1.0,
    eval_seconds=0.5,
    fingerprint="0123",
  )
  fields.update(kw)
  return results.CellMeta(**fields)


def arrays(collapsed, diverged, probe, collapse_token):
  n = len(collapsed)
  return results.SeedArrays(
    train=dict(
      loss_curve=np.ones((n, 3)),
      final_loss=np.arange(n, dtype=np.float32),
      accuracy=np.full(n, 0.5),
      entropy=np.full(n, 1.0),
      argmax_constant=np.asarray(collapsed, bool),
      unigram_kl=np.full(n, 0.25),
      probe=np.asarray(probe),
      diverged=np.asarray(diverged, bool),
      # Collapsed at the last evaluation point exactly when collapsed at the end.
      curve_collapsed=np.stack(
        [np.zeros(n, bool), np.ones(n, bool), np.asarray(collapsed, bool)], 1
      ),
    ),
    decodings=dict(
      greedy=dict(
        seed_collapsed=np.asarray(collapsed, bool),
        collapsed_fraction=np.asarray(collapsed, float),
        collapse_token=np.asarray(collapse_token),
        tail_period_P=np.ones((n, 2), int),
        distinct_1=np.full(n, 0.1),
        distinct_2=np.linspace(0.1, 0.3, n),
        seq_rep_4=np.full(n, 0.9),
        top_token_share=np.full(n, 0.8),
        probe_continuation_L=np.ones((n, 8), int),
        distinct_cycles=np.ones(n),
        largest_basin_share=np.full(n, 0.5),
        largest_is_fixed_point=np.asarray(collapsed, float),
        unresolved_share=np.zeros(n),
      )
    ),
  )


def test_seed_arrays_concatenate_blocks_of_seeds_in_order():
  first = arrays([True, False], [False, False], [1, 2], [3, 3])
  second = arrays([False], [True], [2], [1])
  whole = results.SeedArrays.concatenate([first, second])
  assert list(whole.train) == list(first.train)
  assert list(whole.decodings["greedy"]) == list(first.decodings["greedy"])
  assert whole.train["final_loss"].tolist() == [0, 1, 0]  # Each part's own values, in order.
  assert whole.train["diverged"].tolist() == [False, False, True]
  assert whole.train["curve_collapsed"].shape == (3, 3)
  assert whole.decodings["greedy"]["collapse_token"].tolist() == [3, 3, 1]
  assert whole.decodings["greedy"]["tail_period_P"].shape == (3, 2)


def test_summarize_counts_non_diverged_seeds_only():
  a = arrays(
    collapsed=[1, 1, 0, 1, 1],
    diverged=[0, 0, 0, 0, 1],  # The last seed diverged: excluded everywhere.
    probe=[2, 2, 1, 2, 3],
    collapse_token=[1, 1, 2, 2, 3],
  )
  row = results.summarize(meta(), a, "greedy")
  assert (row.seeds, row.diverged) == (5, 1)
  ci = stats.wilson(3, 4)
  assert (row.collapse_rate, row.collapse_low, row.collapse_high) == (ci.estimate, ci.low, ci.high)
  assert row.final_loss_mean == pytest.approx(1.5) and row.final_loss_median == pytest.approx(1.5)
  assert row.probe_distribution == {" ": 0.75, "t": 0.25}
  assert (row.probe_top, row.probe_top_share) == (" ", 0.75)
  assert row.collapse_tokens == {"t": 2 / 3, " ": 1 / 3}
  assert row.most_frequent_token == "t" and not row.trivial_vocab
  assert row.distinct_2_low <= row.distinct_2_mean <= row.distinct_2_high
  assert (row.label, row.scenario, row.decoding) == ("s[lr=0.1]", "s", "greedy")
  assert row.axes == {"train.learning_rate": 0.1} and row.learning_rate == 0.1
  # Mode token 2 (' '): one of the three collapsed seeds collapsed onto it.
  assert row.collapse_token_is_mode == pytest.approx(1 / 3)
  assert row.unigram_kl_mean == 0.25 and row.fixed_point_share == 0.75
  # Every seed collapsed at epoch 2; the one not collapsed at the end escaped at epoch 3.
  assert (row.never_collapsed_share, row.escaped_share) == (0.0, 0.25)
  assert row.collapsed_at_end_share == 0.75
  assert (row.onset_median, row.onset_q25, row.onset_q75) == (2.0, 2.0, 2.0)
  assert row.escape_median == 3.0


def test_all_diverged_row_is_strict_json_with_nulls():
  a = arrays(collapsed=[1, 1], diverged=[1, 1], probe=[1, 1], collapse_token=[1, 1])
  row = results.summarize(meta(), a, "greedy")
  assert math.isnan(row.collapse_rate) and math.isnan(row.final_loss_mean)
  text = json.dumps(results.to_jsonable(row), allow_nan=False)  # Raises on a bare NaN.
  loaded = json.loads(text)
  assert loaded["collapse_rate"] is None
  back = results.from_jsonable(loaded)
  assert math.isnan(back.collapse_rate) and back.seeds == 2
  assert "all seeds diverged" in results.format_table([row])


def test_csv_has_one_line_per_row_and_json_dicts():
  a = arrays(collapsed=[1, 0], diverged=[0, 0], probe=[1, 2], collapse_token=[1, 1])
  row = results.summarize(meta(), a, "greedy")
  parsed = list(csv.DictReader(io.StringIO(results.to_csv([row, row]))))
  assert len(parsed) == 2
  assert parsed[0]["label"] == "s[lr=0.1]" and float(parsed[0]["collapse_rate"]) == 0.5
  assert json.loads(parsed[0]["axes"]) == {"train.learning_rate": 0.1}


def test_table_names_rows_by_label_and_flags_trivial_corpora():
  a = arrays(collapsed=[1, 1], diverged=[0, 0], probe=[1, 1], collapse_token=[1, 1])
  trivial = meta(vocab=["<pad>", "a"], labels={"greedy": "one"})
  table = results.format_table([results.summarize(trivial, a, "greedy")])
  assert table.splitlines()[2].startswith("one ")
  assert "note: one: one distinct token in the corpus, collapse is trivial" in table


def test_pairs_compare_decodings_seed_by_seed():
  a = arrays(collapsed=[1, 1, 0, 1, 0, 0], diverged=[0] * 6, probe=[1] * 6, collapse_token=[1] * 6)
  hot = dict(a.decodings["greedy"])
  hot["seed_collapsed"] = np.asarray([0, 0, 0, 1, 1, 0], bool)
  hot["seq_rep_4"] = np.full(6, 0.5)  # Below greedy's 0.9 for every seed.
  two = results.SeedArrays(a.train, dict(greedy=a.decodings["greedy"], hot=hot))
  (pair,) = results.pairs(meta(decodings=["greedy", "hot"]), two)
  assert (pair.a, pair.b, pair.seeds) == ("greedy", "hot", 6)
  assert (pair.a_only, pair.b_only) == (2, 1)
  assert pair.mcnemar_p == stats.mcnemar_exact(
    np.asarray([1, 1, 0, 1, 0, 0], bool), hot["seed_collapsed"]
  )
  assert pair.a_lower_seq_rep == 0.0 and pair.a_lower_seq_rep_high == 0.0
