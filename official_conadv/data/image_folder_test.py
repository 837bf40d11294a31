"""Tests for image_folder.py on the committed fixture testdata/image_folder
(3 classes; JPEGs, a PNG and a non-image file) and folders made from it."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from official_conadv.data import image_folder
from official_conadv.data import input_pipeline as ip
from official_conadv.data import synthetic
from official_conadv.testing import testdata

# Sorted class names = class ids; each class has its own dominant colour
# channel (ant red, moth green, zebra blue).
CLASSES = ["ant", "moth", "zebra"]


@pytest.fixture(scope="module")
def folder():
  """testdata/image_folder: train 3 JPEGs per class plus img_3.png and
  notes.txt in ant; validation 2 JPEGs per class; 16x16."""
  return testdata.image_folder()


def _copy(folder, tmp_path):
  d = str(tmp_path / "folder")
  shutil.copytree(folder, d)
  return d


def test_listing_and_class_ids(folder):
  assert image_folder.class_names(folder) == CLASSES
  paths, labels = image_folder.list_images(folder, "train")
  # 3 JPEGs per class and ant's PNG; notes.txt is skipped.
  assert len(paths) == 10 and paths == sorted(paths)
  assert [os.path.relpath(p, folder) for p in paths if "/ant/" in p] == [
      os.path.join("train", "ant", f) for f in
      ("img_0.jpg", "img_1.jpg", "img_2.jpg", "img_3.png")]
  for p, y in zip(paths, labels):
    assert os.path.basename(os.path.dirname(p)) == CLASSES[y]
  assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert ip.num_examples("image_folder", "train", folder) == 10
  assert ip.num_examples("image_folder", "eval", folder) == 6
  assert ip.num_classes("image_folder", folder) == 3
  ip.check_data("image_folder", folder)


def test_eval_pipeline(folder):
  ds = ip.build_dataset("image_folder", "validation", data_dir=folder,
                        image_size=24, global_batch_size=3, is_training=False)
  labels = []
  for images, y, w in ds:
    assert images.shape == (3, 24, 24, 3) and images.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 1
    assert w.numpy().tolist() == [1.0] * 3  # 6 images: no padding.
    # Each image reaches the model with its own label: its class's colour.
    dominant = np.argmax(images.numpy().mean(axis=(1, 2)), axis=-1)
    np.testing.assert_array_equal(dominant, y.numpy())
    labels.extend(y.numpy())
  assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_train_pipeline(folder):
  ds = ip.build_dataset("image_folder", "train", data_dir=folder,
                        image_size=16, global_batch_size=4, is_training=True,
                        seed=0, one_hot=3)
  seen = 0
  for images, labels in ds.take(4):
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4, 3)
    np.testing.assert_array_equal(labels.numpy().sum(-1), [1.0] * 4)
    dominant = np.argmax(images.numpy().mean(axis=(1, 2)), axis=-1)
    np.testing.assert_array_equal(dominant, np.argmax(labels.numpy(), -1))
    seen += 4
  assert seen == 16


def test_unreadable_image_is_reported(folder, tmp_path):
  d = _copy(folder, tmp_path)
  bad = os.path.join(d, "validation", "moth", "img_1.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff broken JPEG")
  ds = ip.build_dataset("image_folder", "eval", data_dir=d, image_size=8,
                        global_batch_size=1, is_training=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match=f"file {bad}"):
    list(ds)
  counter = ip.CorruptRecordCounter()
  ds = ip.build_dataset("image_folder", "eval", data_dir=d, image_size=8,
                        global_batch_size=1, is_training=False,
                        skip_corrupt=True, corrupt_counter=counter)
  # 6 slots: 5 images, then one zero-weight slot for the skipped one.
  assert [float(w[0]) for _, _, w in ds] == [1.0] * 5 + [0.0]
  assert counter.locations == [(bad, 0)]


def test_png_only_folder(tmp_path):
  d = str(tmp_path)
  synthetic.write_image_folder(d, ["b", "a"], per_class=2, size=(20, 28),
                               fmt="png")
  assert image_folder.class_names(d) == ["a", "b"]
  ds = ip.build_dataset("image_folder", "eval", data_dir=d, image_size=8,
                        global_batch_size=2, is_training=False)
  assert sorted(int(v) for _, y, _ in ds for v in y) == [0, 0, 1, 1]


def test_missing_and_empty(tmp_path):
  with pytest.raises(ValueError, match="No directory .*/train: put one "
                     "sub-folder per class"):
    ip.check_data("image_folder", str(tmp_path / "nope"))
  (tmp_path / "train").mkdir()
  with pytest.raises(ValueError, match="No class sub-folders"):
    ip.check_data("image_folder", str(tmp_path))
  (tmp_path / "train" / "cat").mkdir()
  with pytest.raises(ValueError, match="No .jpg/.jpeg/.png images"):
    image_folder.list_images(str(tmp_path), "train")
  with pytest.raises(ValueError, match="needs data_dir"):
    image_folder.list_images(None, "train")


def test_data_dir_that_is_a_file_is_named(folder, tmp_path):
  not_a_dir = tmp_path / "data.tar"
  not_a_dir.write_bytes(b"")
  for data_dir in (str(not_a_dir), str(not_a_dir / "sub")):
    with pytest.raises(ValueError) as e:
      ip.check_data("image_folder", data_dir)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert f"{not_a_dir} is a file, not a directory" in message
    assert "train/<class>/" in message
  with pytest.raises(ValueError, match="is a file, not a directory"):
    ip.num_examples("image_folder", "train",
                    os.path.join(folder, "train", "ant", "img_0.jpg"))


def test_validation_class_must_exist_in_train(folder, tmp_path):
  d = _copy(folder, tmp_path)
  shutil.copytree(os.path.join(d, "validation", "ant"),
                  os.path.join(d, "validation", "bee"))
  with pytest.raises(ValueError, match="'bee'.*not among the 3 train "
                     "classes"):
    image_folder.list_images(d, "eval")
