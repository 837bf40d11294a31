"""Tests for imagenet.py: tfds imagenet2012 via `tfds.testing.mock_data`,
TFRecord shards (the committed testdata/imagenet_tfrecord), and the on-disk
checks (CPU, offline)."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from official_conadv.data import imagenet
from official_conadv.data import input_pipeline as ip
from official_conadv.testing import testdata

# testdata/imagenet_tfrecord: 1-based labels, as in the ImageNet shards.
FIXTURE_LABELS = {"train": [1, 2, 3, 4, 5, 6, 7, 1000],
                  "validation": [1, 2, 3, 1000]}


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


def test_fixture_shards_parse_with_the_standard_label_offset():
  d = testdata.imagenet_tfrecord()
  for split, want in FIXTURE_LABELS.items():
    files = imagenet.tfrecord_files(d, split)
    assert [os.path.basename(f) for f in files] == [f"{split}-00000-of-00001"]
    labels = []
    for record in tf.data.TFRecordDataset(files):
      image_bytes, label = imagenet.parse_example(record)
      image = tf.io.decode_jpeg(image_bytes)
      assert image.shape == (16, 24, 3) and image.dtype == tf.uint8
      labels.append(int(label))
      example = tf.train.Example.FromString(record.numpy())
      feature = example.features.feature
      assert feature["image/format"].bytes_list.value == [b"JPEG"]
      assert feature["image/height"].int64_list.value == [16]
      assert feature["image/width"].int64_list.value == [24]
      assert feature["image/class/label"].int64_list.value == [
          labels[-1] + 1]
    assert labels == [y - 1 for y in want]  # label_offset=1: 0-based.
  ip.check_data("imagenet_tfrecord", d)


def test_fixture_eval_pipeline_scores_each_record_once():
  ds = ip.build_dataset("imagenet_tfrecord", "validation",
                        data_dir=testdata.imagenet_tfrecord(), image_size=16,
                        global_batch_size=3, is_training=False,
                        num_examples=4)
  batches = list(ds)
  assert len(batches) == 2  # 4 records + 2 padding slots.
  weights = np.concatenate([w.numpy() for _, _, w in batches])
  np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0])
  labels = np.concatenate([y.numpy() for _, y, _ in batches])
  assert labels[:4].tolist() == [0, 1, 2, 999]
  images = np.concatenate([x.numpy() for x, _, _ in batches])
  assert images.shape == (6, 16, 16, 3)
  assert (images[:4].reshape(4, -1).max(-1) > 0).all()


def test_fixture_with_label_offset_0_fails_on_label_1000():
  # 1-based shards read as 0-based: label 1000 is out of [0, 1000).
  ds = ip.build_dataset("imagenet_tfrecord", "validation",
                        data_dir=testdata.imagenet_tfrecord(), image_size=8,
                        global_batch_size=1, is_training=False,
                        num_examples=4, label_offset=0)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"Label out of range \[0, 1000\)"):
    list(ds)


def test_data_dir_that_is_a_file_is_named(tmp_path):
  shard = os.path.join(testdata.imagenet_tfrecord(), "train-00000-of-00001")
  with pytest.raises(ValueError, match=f"data_dir {shard} is a file, not a "
                     "directory; imagenet_tfrecord needs the directory"):
    ip.check_data("imagenet_tfrecord", shard)
  with pytest.raises(ValueError, match=f"data_dir {shard} is a file, not a "
                     "directory; imagenet_tfds needs a tfds data_dir"):
    ip.check_data("imagenet_tfds", shard)
  with pytest.raises(ValueError, match=f"manual_dir {shard} is a file"):
    imagenet.prepare_tfds(str(tmp_path), manual_dir=shard)
