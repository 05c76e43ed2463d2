"""Atomic file writes: an interrupted run never leaves a partial or corrupt file."""

import contextlib
import io
import json
import os
import tempfile

import numpy as np


class WriteError(OSError):
  """A file could not be written (full disk, permissions), with the path in the message."""


def _umask() -> int:
  """The process's umask, read without setting it where /proc says it (Linux): setting it,
  the only portable way to read it, opens a moment in which files other threads create (JAX's
  compilation cache, from the compile-ahead threads) get mode 0666."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0)
  os.umask(mask)
  return mask


def check_writable(directory: str) -> None:
  """Makes directory if needed, then writes and deletes a file in it: the OSError (its
  strerror kept) of a place that cannot be written, before any real file is."""
  os.makedirs(directory, exist_ok=True)
  probe = os.path.join(directory, ".write-test")
  with open(probe, "w") as f:
    f.write("ok")
  os.unlink(probe)


@contextlib.contextmanager
def _atomic(path: str):
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    # mkstemp makes 0600 files; results are for collaborators too, so honour the umask.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def write_bytes(path: str, payload: bytes) -> None:
  with _atomic(path) as f:
    f.write(payload)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
  """Strict JSON: a NaN or infinity is an error (write None for a missing number)."""
  text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
  write_text(path, text + "\n")


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
