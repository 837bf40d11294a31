"""Tests for image_folder.py on generated PNG/JPEG folders."""

import os

import pytest
import tensorflow as tf

from official_conadv.data import image_folder
from official_conadv.data import input_pipeline as ip
from official_conadv.data import synthetic

CLASSES = ["zebra", "ant", "moth"]  # Sorted: ant=0, moth=1, zebra=2.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("folder"))
  synthetic.write_image_folder(d, CLASSES, per_class=3, fmt="png")
  # A JPEG too, and a non-image file that must be ignored.
  synthetic.write_image_folder(d, ["ant"], per_class=1, fmt="jpeg",
                               splits=("train",))
  with open(os.path.join(d, "train", "ant", "notes.txt"), "w") as f:
    f.write("not an image")
  return d


def test_listing_and_class_ids(folder):
  assert image_folder.class_names(folder) == ["ant", "moth", "zebra"]
  paths, labels = image_folder.list_images(folder, "train")
  assert len(paths) == 10 and paths == sorted(paths)
  for p, y in zip(paths, labels):
    assert os.path.basename(os.path.dirname(p)) == ["ant", "moth",
                                                    "zebra"][y]
  assert ip.num_examples("image_folder", "train", folder) == 10
  assert ip.num_examples("image_folder", "eval", folder) == 9
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
    assert w.numpy().tolist() == [1.0] * 3  # 9 images: no padding.
    labels.extend(y.numpy())
  assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_train_pipeline(folder):
  ds = ip.build_dataset("image_folder", "train", data_dir=folder,
                        image_size=16, global_batch_size=4, is_training=True,
                        seed=0, one_hot=3)
  for images, labels in ds.take(4):
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4, 3)


def test_unreadable_image_is_reported(tmp_path):
  d = str(tmp_path)
  synthetic.write_image_folder(d, ["a", "b"], per_class=2)
  bad = os.path.join(d, "validation", "b", "img_1.png")
  with open(bad, "wb") as f:
    f.write(b"\x89PNG broken")
  ds = ip.build_dataset("image_folder", "eval", data_dir=d, image_size=8,
                        global_batch_size=1, is_training=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match=f"file {bad}"):
    list(ds)
  counter = ip.CorruptRecordCounter()
  ds = ip.build_dataset("image_folder", "eval", data_dir=d, image_size=8,
                        global_batch_size=1, is_training=False,
                        skip_corrupt=True, corrupt_counter=counter)
  # 4 slots: 3 images, then one zero-weight slot for the skipped one.
  assert [float(w[0]) for _, _, w in ds] == [1.0, 1.0, 1.0, 0.0]
  assert counter.locations == [(bad, 0)]


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


def test_validation_class_must_exist_in_train(tmp_path):
  d = str(tmp_path)
  synthetic.write_image_folder(d, ["a"], per_class=1, splits=("train",))
  synthetic.write_image_folder(d, ["a", "b"], per_class=1,
                               splits=("validation",))
  with pytest.raises(ValueError, match="'b'.*not among the 1 train classes"):
    image_folder.list_images(d, "eval")



