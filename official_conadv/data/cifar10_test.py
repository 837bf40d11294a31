"""Tests for cifar10.py via `tfds.testing.mock_data` (offline)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from official_conadv.data import input_pipeline as ip


@pytest.mark.parametrize("is_training,split", [(True, "train"),
                                               (False, "test")])
def test_batches(tmp_path, is_training, split):
  with tfds.testing.mock_data(num_examples=16):
    ds = ip.build_dataset("cifar10", split, data_dir=str(tmp_path),
                          image_size=32, global_batch_size=8,
                          is_training=is_training, seed=0)
    batches = list(ds.take(2))
  for images, labels, *weights in batches:
    assert len(weights) == (0 if is_training else 1)
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 1.0
    assert np.all((labels.numpy() >= 0) & (labels.numpy() < 10))


def test_augment_and_resize(tmp_path):
  # AutoAugment's "test" policy (v0 is tested at 224 px elsewhere; it takes
  # long to trace).
  with tfds.testing.mock_data(num_examples=8):
    ds = ip.build_dataset("cifar10", "train", data_dir=str(tmp_path),
                          image_size=40, global_batch_size=4,
                          is_training=True, augment="test", one_hot=10)
    images, labels = next(iter(ds))
  assert images.shape == (4, 40, 40, 3) and labels.shape == (4, 10)


def test_download_failure_is_one_line(tmp_path, monkeypatch):
  builder_cls = type(tfds.builder("cifar10", data_dir=str(tmp_path)))

  def offline(self, *args, **kwargs):
    raise OSError("Network is unreachable\nmore detail")

  monkeypatch.setattr(builder_cls, "download_and_prepare", offline)
  with pytest.raises(ValueError) as e:
    ip.check_data("cifar10", str(tmp_path))
  assert len(str(e.value).splitlines()) == 1
  assert "Network is unreachable" in str(e.value)
