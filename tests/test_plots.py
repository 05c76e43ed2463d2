"""The note's figures: panels of a learning-rate grid, and valid PNGs from real studies."""

import dataclasses
import io

import matplotlib.image
import ml_collections
from conftest import tiny_config
from test_claims import BASE

from research import plots, study, workdir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(payload: bytes) -> None:
  assert payload[:8] == PNG_SIGNATURE
  pixels = matplotlib.image.imread(io.BytesIO(payload), format="png")
  assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50


def test_lr_panels_split_by_scenario_other_axes_and_decoding():
  rows = []
  for axes in (
    {"model.dropout": 0.0, "train.learning_rate": 0.1},
    {"train.learning_rate": 0.1, "train.epochs": 3},
    {},
  ):
    for decoding in ("greedy", "T1"):
      rows.append(dataclasses.replace(BASE, scenario="a", axes=axes, decoding=decoding))
  panels = plots.lr_panels(rows)
  assert sorted(panels) == ["a@T1", "a@greedy", "a[epochs=3]@T1", "a[epochs=3]@greedy"]
  one_decoding = [r for r in rows if r.decoding == "greedy"]
  assert sorted(plots.lr_panels(one_decoding)) == ["a", "a[epochs=3]"]


def test_blog_study_figures_render(blog_workdir):
  figures = plots.figures(workdir.load(blog_workdir[0]))
  assert sorted(figures) == [
    "collapse_over_training", "loss_curves", "onset_escape", "tail_periods", "top_token_share",
    "unigram_kl",
  ]  # fmt: skip
  for figure, caption in figures.values():
    assert caption
    assert_valid_png(plots.png(figure))


def test_grid_study_plots_collapse_against_learning_rate(tmp_path):
  config = tiny_config(seeds=2)
  config.study.grid = ml_collections.ConfigDict(
    {"train": {"learning_rate": (1e-3, 1e-1)}, "model": {"dropout": (0.0, 0.5)}}
  )
  study.run_study(config, str(tmp_path))
  figures = plots.figures(workdir.load(str(tmp_path)))
  assert {"collapse_vs_lr", "collapse_heatmap"} <= set(figures)
  for name in ("collapse_vs_lr", "collapse_heatmap"):
    assert_valid_png(plots.png(figures[name][0]))
