"""Atomic writes: a failed write leaves the old file and no temporary file behind."""

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
