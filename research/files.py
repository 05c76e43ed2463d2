"""Atomic file writes: an interrupted run never leaves a partial or corrupt file."""

import contextlib
import io
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def _atomic(path: str):
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_bytes(path: str, payload: bytes) -> None:
  with _atomic(path) as f:
    f.write(payload)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_npz(path: str, arrays: dict) -> None:
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _jsonable(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return str(obj)
