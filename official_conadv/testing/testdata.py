"""Paths of the committed fixtures in the repo's testdata/ (its README.md).

Found from this file's location, so tests work from any working directory
(and in Bazel's runfiles tree, where BUILD lists testdata/ as data of this
module).
"""

import os

ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), "testdata")


def path(*parts: str) -> str:
  """testdata/<parts...>; FileNotFoundError naming the generator when it is
  missing."""
  result = os.path.join(ROOT, *parts)
  if not os.path.exists(result):
    raise FileNotFoundError(
        f"No fixture {result}: run `python testdata/make_testdata.py`.")
  return result


def image_folder() -> str:
  """The image_folder fixture: {train,validation}/{ant,moth,zebra}/."""
  return path("image_folder")


def imagenet_tfrecord() -> str:
  """The imagenet_tfrecord fixture: train-00000-of-00001 (8 records) and
  validation-00000-of-00001 (4), 1-based labels."""
  return path("imagenet_tfrecord")


def compat(*parts: str) -> str:
  """testdata/compat/<parts...>: checkpoints of an older commit that
  compat_test.py restores (written by testdata/make_compat_fixtures.py)."""
  result = os.path.join(ROOT, "compat", *parts)
  if not os.path.exists(result):
    raise FileNotFoundError(
        f"No fixture {result}: see testdata/compat/README.md (written by "
        "testdata/make_compat_fixtures.py from a pinned commit).")
  return result
