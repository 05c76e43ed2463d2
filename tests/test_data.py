"""Corpora, tokenizers and windows."""

import numpy as np
import pytest

from research import data


def test_char_vocab_is_keras_order_with_id0_reserved():
  ds = data.make_dataset(data.BLOG_REPETITIVE, "char", 3)
  # t appears 10 times, space 9, then h e c a 5 times each in first-appearance order.
  assert ds.vocab == (data.PAD, "t", " ", "h", "e", "c", "a")
  assert ds.decode(ds.tokens) == data.BLOG_REPETITIVE


def test_windows_match_the_blog_loop():
  text = data.BLOG_VARIED
  ds = data.make_dataset(text, "char", 3, drop_last_window=True)
  expected = [text[i : i + 4] for i in range(0, len(text) - 4)]  # The blog's own loop.
  assert [ds.decode(w) for w in ds.windows_NxW] == expected
  full = data.make_dataset(text, "char", 3)
  assert full.windows_NxW.shape[0] == len(expected) + 1


def test_word_tokens():
  ds = data.make_dataset("The cat, the DOG. the cat", "word", 2)
  assert ds.vocab == (data.PAD, "the", "cat", "dog")
  assert ds.decode(ds.windows_NxW[0]) == "the cat the"


def test_distinct_contexts_in_first_appearance_order():
  ds = data.make_dataset("abab", "char", 1)
  assert [ds.decode(c) for c in ds.distinct_contexts_CxT] == ["a", "b"]


def test_encode_rejects_unknown_tokens_by_name():
  ds = data.make_dataset(data.BLOG_REPETITIVE, "char", 3)
  with pytest.raises(data.DataError, match=r"\['x', 'z'\]"):
    ds.encode("zax")


@pytest.mark.parametrize(
  "text, match",
  [("", "empty"), ("   ", "empty"), ("abc", "too few for one training window")],
)
def test_bad_corpora(text, match):
  with pytest.raises(data.DataError, match=match):
    data.make_dataset(text, "char" if text != "   " else "word", 3)


def test_corpus_files(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("héllo wörld", encoding="utf-8")
  assert data.load_text("ignored", str(good)) == "héllo wörld"
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"abc\xff\xfe")
  with pytest.raises(data.DataError, match="not valid UTF-8"):
    data.load_text("", str(bad))
  with pytest.raises(data.DataError, match="no such file"):
    data.load_text("", str(tmp_path / "missing.txt"))
  with pytest.raises(data.DataError, match="data.corpus must be one of"):
    data.load_text("shakespeare")


def test_single_token_corpus_is_allowed():
  ds = data.make_dataset("aaaaaa", "char", 3)
  assert ds.vocab_size == 2
  np.testing.assert_array_equal(ds.windows_NxW, np.ones((3, 4)))
