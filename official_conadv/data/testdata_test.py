"""The committed fixtures in testdata/ are what testdata/make_testdata.py
writes, byte for byte, and stay small."""

import os
import subprocess
import sys

from official_conadv.testing import testdata
from testdata import make_testdata

REPO = os.path.dirname(testdata.ROOT)


def _tree(root):
  """{path relative to root, "/"-separated: bytes} of the managed fixture
  directories under root."""
  files = {}
  for sub in make_testdata.MANAGED:
    for dirpath, _, names in os.walk(os.path.join(root, sub)):
      for name in names:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          files[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
  return files


def test_committed_fixtures_equal_a_fresh_run(tmp_path):
  written = make_testdata.write_all(str(tmp_path))
  fresh, committed = _tree(str(tmp_path)), _tree(testdata.ROOT)
  assert sorted(fresh) == written
  assert sorted(committed) == sorted(fresh), (
      "testdata/ differs from make_testdata.py's files: run "
      "`python testdata/make_testdata.py` and commit the result")
  differ = [p for p in fresh if fresh[p] != committed[p]]
  assert not differ, (f"{differ} differ from a fresh run: run "
                      "`python testdata/make_testdata.py` and commit them")


def test_the_script_removes_stale_files_and_rewrites_the_same_bytes(
    tmp_path):
  out = str(tmp_path)
  stale = os.path.join(out, "image_folder", "train", "ant", "old.jpg")
  os.makedirs(os.path.dirname(stale))
  with open(stale, "wb") as f:
    f.write(b"stale")
  outside = os.path.join(out, "keep.txt")  # Not in a managed directory.
  with open(outside, "wb") as f:
    f.write(b"mine")
  result = subprocess.run(
      [sys.executable, os.path.join("testdata", "make_testdata.py"),
       f"--output_dir={out}"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"),
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("Wrote 19 files, ")
  assert not os.path.exists(stale)
  with open(outside, "rb") as f:
    assert f.read() == b"mine"
  assert _tree(out) == _tree(testdata.ROOT)


def test_fixtures_are_small_and_laid_out_as_documented():
  files = _tree(testdata.ROOT)
  assert sum(len(v) for v in files.values()) < 100_000
  folder = sorted(p for p in files if p.startswith("image_folder/"))
  assert len(folder) == 3 * 3 + 2 + 3 * 2  # JPEGs, the PNG and notes.txt.
  assert "image_folder/train/ant/img_3.png" in folder
  assert sorted(p for p in files if p.startswith("imagenet_tfrecord/")) == [
      "imagenet_tfrecord/train-00000-of-00001",
      "imagenet_tfrecord/validation-00000-of-00001"]
  for p in folder:
    if p.endswith(".jpg"):
      assert files[p][:3] == b"\xff\xd8\xff"  # JPEG magic.
  assert testdata.path("image_folder") == testdata.image_folder()
