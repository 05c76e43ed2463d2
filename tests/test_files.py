"""Atomic writes: no partial files, the user's umask, strict JSON, one-line write errors."""

import errno
import json
import os

import numpy as np
import pytest

from research import files


def test_writes_round_trip(tmp_path):
  files.write_json(str(tmp_path / "a.json"), dict(x=np.float32(1.5), y=np.arange(2)))
  assert files.read_json(str(tmp_path / "a.json")) == dict(x=1.5, y=[0, 1])
  files.write_npz(str(tmp_path / "a.npz"), dict(z=np.ones(3)))
  with np.load(tmp_path / "a.npz") as z:
    np.testing.assert_array_equal(z["z"], 1.0)


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, dict(old=True))
  with pytest.raises(TypeError):
    files.write_bytes(path, "not bytes")  # Fails inside the temporary file's write.
  assert json.loads(open(path).read()) == dict(old=True)
  assert os.listdir(tmp_path) == ["a.json"]


def test_files_honour_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_text(str(tmp_path / "a.txt"), "x")
    assert oct(os.stat(tmp_path / "a.txt").st_mode & 0o777) == oct(0o644)
    os.umask(0o077)
    files.write_text(str(tmp_path / "b.txt"), "x")
    assert oct(os.stat(tmp_path / "b.txt").st_mode & 0o777) == oct(0o600)
  finally:
    os.umask(old)


def test_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  path = str(tmp_path / "results.json")
  with pytest.raises(files.WriteError, match=f"cannot write {path}: No space left on device"):
    files.write_json(path, dict(a=1))
  assert os.listdir(tmp_path) == []


def test_json_is_strict():
  with pytest.raises(ValueError):
    files.write_json("/nonexistent/never-written.json", dict(rate=float("nan")))
