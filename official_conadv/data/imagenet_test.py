"""Tests for imagenet.py: tfds imagenet2012 via `tfds.testing.mock_data`,
and the on-disk checks (CPU, offline)."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from official_conadv.data import imagenet
from official_conadv.data import input_pipeline as ip


def _fake_tars(directory):
  os.makedirs(directory, exist_ok=True)
  for name in (imagenet.TRAIN_TAR, imagenet.VAL_TAR):
    open(os.path.join(directory, name), "wb").close()


@pytest.mark.parametrize("is_training,split", [(True, "train"),
                                               (False, "validation")])
def test_tfds_mock_batches(tmp_path, is_training, split):
  _fake_tars(str(tmp_path))
  with tfds.testing.mock_data(num_examples=12):
    ds = ip.build_dataset("imagenet_tfds", split, data_dir=str(tmp_path),
                          image_size=64, global_batch_size=4,
                          is_training=is_training, seed=0)
    batches = list(ds.take(3))
  assert len(batches) == 3
  for images, labels, *weights in batches:
    assert len(weights) == (0 if is_training else 1)
    assert images.shape == (4, 64, 64, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 1.0
    assert labels.dtype == tf.int32
    assert np.all((labels.numpy() >= 0) & (labels.numpy() < 1000))


def test_tfds_mock_two_pipelines_and_one_hot(tmp_path, monkeypatch):
  _fake_tars(str(tmp_path / "downloads" / "manual"))
  with tfds.testing.mock_data(num_examples=8):
    builder_cls = type(tfds.builder("imagenet2012"))
    original = builder_cls.as_dataset
    splits = []

    def as_dataset(self, split=None, **kwargs):
      splits.append(split)
      return original(self, split=split, **kwargs)

    monkeypatch.setattr(builder_cls, "as_dataset", as_dataset)
    # The mock ignores the slice (8 records in each pipeline): room for 8.
    fn = ip.make_dataset_fn("imagenet_tfds", "eval", data_dir=str(tmp_path),
                            image_size=32, global_batch_size=4,
                            is_training=False, one_hot=1000, eval_steps=4,
                            num_examples=8)
    for pipeline in range(2):
      ds = fn(tf.distribute.InputContext(2, pipeline, 2))
      batches = list(ds)
      assert len(batches) == 4
      for images, labels, weights in batches:
        assert images.shape == (2, 32, 32, 3) and labels.shape == (2, 1000)
        assert weights.numpy().tolist() == [1.0, 1.0]
  # The mock has no shard count, so each pipeline reads its half of the
  # split (the mock itself ignores the slice).
  assert [(s.split, s.index, s.count) for s in splits] == [
      ("validation", 0, 2), ("validation", 1, 2)]


def test_tfds_prepares_from_tars_once(tmp_path, monkeypatch):
  _fake_tars(str(tmp_path))
  calls = []
  with tfds.testing.mock_data(num_examples=4):
    builder_cls = type(tfds.builder("imagenet2012"))
    monkeypatch.setattr(
        builder_cls, "download_and_prepare",
        lambda self, download_config=None: calls.append(
            download_config.manual_dir))
    imagenet.prepare_tfds(str(tmp_path))
  assert [str(c) for c in calls] == [str(tmp_path)]


def test_tfds_without_tars_says_what_to_put_where(tmp_path):
  with pytest.raises(ValueError) as e:
    ip.check_data("imagenet_tfds", str(tmp_path))
  message = str(e.value)
  assert len(message.splitlines()) == 1
  assert imagenet.TRAIN_TAR in message and imagenet.VAL_TAR in message
  assert str(tmp_path) in message
  with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar"):
    ip.make_dataset_fn("imagenet_tfds", "train", data_dir=str(tmp_path),
                       image_size=224, global_batch_size=8, is_training=True)


def test_tfrecord_files_are_sorted_and_patterned(tmp_path):
  for name in ("train-00001-of-00002", "train-00000-of-00002",
               "validation-00000-of-00001", "README"):
    (tmp_path / name).write_bytes(b"")
  train = imagenet.tfrecord_files(str(tmp_path), "train")
  assert [os.path.basename(f) for f in train] == ["train-00000-of-00002",
                                                  "train-00001-of-00002"]
  assert len(imagenet.tfrecord_files(str(tmp_path), "eval")) == 1
  custom = imagenet.tfrecord_files(str(tmp_path), "eval", "README")
  assert len(custom) == 1
