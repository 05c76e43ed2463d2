"""Corpora, tokenizers and sliding windows."""

import collections
import dataclasses
import functools
import hashlib
import os
import re
import sys
import unicodedata

import numpy as np

from research import schema

# The blog's two training texts, verbatim (../shared/reference/blog-post.md).
BLOG_REPETITIVE = "the cat the cat the cat the cat the cat"
BLOG_VARIED = (
  "the cat sat on the mat the dog ran in the park a bird flew in the sky "
  "the fox jumped over the fence"
)
# Longer, public-domain nursery rhymes: more varied than the blog's texts, still tiny.
NURSERY = (
  "mary had a little lamb its fleece was white as snow and everywhere that mary went "
  "the lamb was sure to go it followed her to school one day which was against the rule "
  "it made the children laugh and play to see a lamb at school "
  "twinkle twinkle little star how i wonder what you are up above the world so high "
  "like a diamond in the sky "
  "jack and jill went up the hill to fetch a pail of water jack fell down and broke his "
  "crown and jill came tumbling after "
  "humpty dumpty sat on a wall humpty dumpty had a great fall all the king's horses and "
  "all the king's men couldn't put humpty together again"
)
# A decorative rule line: only - = * ~ ^ + | and blanks, with a run of three of - = * ~ ^
# (reST heading underlines, table borders). Dropped: long runs of one character would be
# ready-made repetition attractors that say nothing about English.
_RULE_LINE = re.compile(r"(?=.*([-=*~^])\1\1)[-=*~^+| \t]*")
# Typographic punctuation -> its ASCII look-alike, before NFKD drops everything non-ASCII.
_ASCII_PUNCTUATION = str.maketrans(
  {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
   "\u2026": "..."}
)  # fmt: skip


@functools.cache
def pydoc_topics() -> str:
  """CPython's bundled help texts (pydoc_data.topics), normalised to one line of ASCII.

  Steps: the topics' texts joined by newlines in sorted key order; rule lines dropped
  (_RULE_LINE); curly quotes, dashes and ellipses mapped to ASCII, then NFKD and every
  remaining non-ASCII character dropped; runs of whitespace (newlines included) collapsed to
  one space; stripped. Case is kept (the tokenizers lower-case). Read from the standard
  library only, no network, on first use; the text differs between Python versions.
  """
  try:
    from pydoc_data import topics  # Imported here: only this corpus needs the 0.5 MB module.
  except ImportError:
    raise DataError(
      "data.corpus 'pydoc_topics' needs the standard library's pydoc_data package, "
      "which this Python installation lacks"
    ) from None
  text = "\n".join(topics.topics[key] for key in sorted(topics.topics))
  text = "\n".join(line for line in text.split("\n") if not _RULE_LINE.fullmatch(line))
  text = unicodedata.normalize("NFKD", text.translate(_ASCII_PUNCTUATION))
  text = text.encode("ascii", "ignore").decode("ascii")
  return re.sub(r"\s+", " ", text).strip()


# Built-in corpora by name, each a function returning its text, so large ones load on use.
CORPORA = {
  "blog_repetitive": lambda: BLOG_REPETITIVE,
  "blog_varied": lambda: BLOG_VARIED,
  "nursery": lambda: NURSERY,
  "pydoc_topics": pydoc_topics,
}
assert tuple(CORPORA) == schema.CORPORA
TOKENIZATIONS = schema.TOKENIZATIONS
PAD = "<pad>"  # id 0 is reserved, as in the blog's Keras Tokenizer; it is never a target.


class DataError(ValueError):
  """A corpus, tokenizer or prompt problem, with a message meant for the user."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenized corpus cut into sliding windows of context_length + 1 tokens."""

  tokenization: str
  vocab: tuple[str, ...]  # vocab[i] is the token with id i; vocab[0] == PAD.
  tokens: np.ndarray  # (num_tokens,) int32, the whole corpus.
  windows_NxW: np.ndarray  # (N, context_length + 1) int32: context then next token.

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def context_length(self) -> int:
    return self.windows_NxW.shape[1] - 1

  @property
  def contexts_NxT(self) -> np.ndarray:
    return self.windows_NxW[:, :-1]

  @property
  def first_windows_C(self) -> np.ndarray:
    """Index of the first window of each distinct context, in order of first appearance."""
    _, first = np.unique(self.contexts_NxT, axis=0, return_index=True)
    return np.sort(first)

  @property
  def distinct_contexts_CxT(self) -> np.ndarray:
    """Distinct training contexts, in order of first appearance."""
    return self.contexts_NxT[self.first_windows_C]

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`; a token outside the vocabulary is an error naming it."""
    pieces = split(text, self.tokenization)
    index = {tok: i for i, tok in enumerate(self.vocab)}
    unknown = sorted({p for p in pieces if p not in index or p == PAD})
    if unknown:
      raise DataError(
        f"prompt {text!r} has tokens not in the training vocabulary: {unknown}; "
        f"known tokens: {list(self.vocab[1:])}"
      )
    return np.asarray([index[p] for p in pieces], np.int32)

  def decode(self, ids) -> str:
    return detokenize(ids, self.vocab, self.tokenization)


def detokenize(ids, vocab, tokenization: str) -> str:
  """Text of token ids: chars joined as they are, words with spaces."""
  sep = "" if tokenization == "char" else " "
  return sep.join(vocab[int(i)] for i in ids)


def split(text: str, tokenization: str) -> list[str]:
  """Splits lower-cased text into char or word tokens."""
  text = text.lower()
  if tokenization == "char":
    return list(text)
  if tokenization == "word":
    return re.findall(r"[\w']+", text)
  raise DataError(f"data.tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")


def build_vocab(pieces: list[str]) -> tuple[str, ...]:
  """Vocabulary by descending frequency, ties by first appearance (Keras Tokenizer order)."""
  counts = collections.Counter(pieces)  # Counter keeps first-appearance order for ties.
  ordered = sorted(counts, key=lambda tok: -counts[tok])  # sorted() is stable.
  return (PAD, *ordered)


def load_text(corpus: str, corpus_file: str = "") -> str:
  """The text of a built-in corpus, or of a UTF-8 file when corpus_file is set."""
  if corpus_file:
    if not os.path.isfile(corpus_file):
      raise DataError(f"data.corpus_file: no such file: {corpus_file!r}")
    try:
      with open(corpus_file, encoding="utf-8") as f:
        return f.read()
    except UnicodeDecodeError as e:
      raise DataError(
        f"data.corpus_file: {corpus_file!r} is not valid UTF-8 (byte {e.start}): {e.reason}"
      ) from None
  if corpus not in CORPORA:
    raise DataError(
      f"data.corpus must be one of {sorted(CORPORA)} (or set data.corpus_file), got {corpus!r}"
    )
  return CORPORA[corpus]()


def cut(text: str, max_chars: int) -> str:
  """The first max_chars characters of text (0: all of it).

  A character count, so at word level the last word may be cut short.
  """
  return text[:max_chars] if max_chars else text


def corpus_text(data_cfg) -> str:
  """The text a data config trains on: its corpus or file, cut to data.max_chars."""
  return cut(load_text(data_cfg.corpus, data_cfg.corpus_file), data_cfg.max_chars)


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
  """What text a data config trains on, for the record (config.json)."""

  name: str  # The built-in corpus name, or the corpus file's path.
  chars: int  # Characters after normalisation and the data.max_chars cut.
  sha256: str  # Hex SHA-256 of that text, UTF-8 encoded.
  python_version: str | None  # pydoc_topics only: its text differs between Python versions.

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def corpus_info(data_cfg) -> CorpusInfo:
  """Name, size and hash of the text that data_cfg trains on."""
  text = corpus_text(data_cfg)
  builtin = not data_cfg.corpus_file
  version = sys.version.split()[0]  # e.g. "3.11.7" or "3.13.0rc1": release and pre-release.
  return CorpusInfo(
    name=data_cfg.corpus if builtin else data_cfg.corpus_file,
    chars=len(text),
    sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    python_version=version if builtin and data_cfg.corpus == "pydoc_topics" else None,
  )


def make_dataset(
  text: str, tokenization: str, context_length: int, drop_last_window: bool = False
) -> Dataset:
  """Tokenizes `text` and cuts every window of context_length + 1 consecutive tokens.

  drop_last_window reproduces the blog's `range(0, len(text) - seq_length)`, which never
  uses the final window.
  """
  pieces = split(text, tokenization)
  if not pieces:
    raise DataError("the corpus is empty (no tokens after tokenization)")
  width = context_length + 1
  num_windows = len(pieces) - width + 1 - int(drop_last_window)
  if num_windows < 1:
    raise DataError(
      f"the corpus has {len(pieces)} {tokenization} tokens, too few for one training window "
      f"of data.context_length + 1 = {width} tokens"
      + (" (plus one: data.drop_last_window is set)" if drop_last_window else "")
    )
  vocab = build_vocab(pieces)
  index = {tok: i for i, tok in enumerate(vocab)}
  tokens = np.asarray([index[p] for p in pieces], np.int32)
  starts = np.arange(num_windows)[:, None] + np.arange(width)[None, :]
  return Dataset(tokenization, vocab, tokens, tokens[starts])


def dataset_from_config(data_cfg) -> Dataset:
  text = corpus_text(data_cfg)
  return make_dataset(
    text, data_cfg.tokenization, data_cfg.context_length, data_cfg.drop_last_window
  )
