"""Corpora, tokenizers and windows."""

import hashlib
import os
import platform
import re
import socket
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from conftest import ROOT

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


def data_config(**fields):
  """The default data config with some fields changed."""
  from configs import default

  config = default.get_config().data
  for key, value in fields.items():
    config[key] = value
  return config


def test_research_data_imports_no_pydoc_corpus_until_asked():
  code = "import sys, research.data; assert 'pydoc_data.topics' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_pydoc_topics_is_read_offline_from_the_standard_library(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("pydoc_topics opened a socket")

  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  data.pydoc_topics.cache_clear()
  text = data.load_text("pydoc_topics")
  assert text == data.pydoc_topics()
  topics_file = sys.modules["pydoc_data.topics"].__file__
  assert os.path.realpath(topics_file).startswith(os.path.realpath(sysconfig.get_path("stdlib")))


def test_pydoc_topics_is_large_normalised_english():
  text = data.pydoc_topics()
  assert len(text) > 100_000
  assert text.isascii() and text == text.strip()
  assert "\n" not in text and "  " not in text
  # Heading underlines and table borders (hundreds of them) are gone; a few runs are content.
  assert len(re.findall(r"([-=*~^])\1{9,}", text)) < 20
  assert " the " in text and "statement" in text
  chars = data.make_dataset(text, "char", 3)
  words = data.make_dataset(text, "word", 3)
  assert len(words.tokens) > 10_000
  assert 40 <= chars.vocab_size <= 100  # Lower-case letters, digits, punctuation, space.
  assert 1_000 <= words.vocab_size <= 20_000
  assert words.vocab[1] == "the"


def test_pydoc_topics_is_deterministic():
  first = data.corpus_info(data_config(corpus="pydoc_topics"))
  data.pydoc_topics.cache_clear()  # Normalise again from the module, not from the cache.
  assert data.corpus_info(data_config(corpus="pydoc_topics")) == first


def test_max_chars_cuts_before_tokenization(tmp_path):
  full = data.dataset_from_config(data_config(corpus="pydoc_topics"))
  cut = data.dataset_from_config(data_config(corpus="pydoc_topics", max_chars=1000))
  assert len(cut.tokens) == 1000 < len(full.tokens)
  assert cut.decode(cut.tokens) == data.pydoc_topics()[:1000].lower()
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the cat sat on the mat", encoding="utf-8")
  words = data_config(corpus_file=str(corpus), tokenization="word", context_length=1)
  words.max_chars = 9  # "the cat s": a character count, so the last word is cut.
  cut_words = data.dataset_from_config(words)
  assert cut_words.decode(cut_words.tokens) == "the cat s"
  words.max_chars = 10_000  # Longer than the text: all of it.
  assert len(data.dataset_from_config(words).tokens) == 6


def test_corpus_info(tmp_path):
  info = data.corpus_info(data_config(corpus="pydoc_topics", max_chars=500))
  text = data.pydoc_topics()[:500]
  assert info == data.CorpusInfo(
    name="pydoc_topics",
    chars=500,
    sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    python_version=platform.python_version(),
  )
  assert info.as_dict() == {
    "name": "pydoc_topics",
    "chars": 500,
    "sha256": info.sha256,
    "python_version": platform.python_version(),
  }
  assert len(info.sha256) == 64
  assert data.corpus_info(data_config(corpus="pydoc_topics")).chars == len(data.pydoc_topics())
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("héllo wörld", encoding="utf-8")
  info = data.corpus_info(data_config(corpus_file=str(corpus), max_chars=4))
  expected = hashlib.sha256("héll".encode()).hexdigest()
  assert info.as_dict() == dict(name=str(corpus), chars=4, sha256=expected, python_version=None)
  blog = data.corpus_info(data_config(corpus="blog_varied"))
  assert (blog.name, blog.chars, blog.python_version) == ("blog_varied", 99, None)
