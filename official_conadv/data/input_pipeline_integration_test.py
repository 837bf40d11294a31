"""Heavier input-pipeline tests: Keras fit under MirroredStrategy, and
AutoAugment v0 at 224 px (kept apart so every test file stays short)."""

import types

import numpy as np
import tensorflow as tf

from official_conadv.data import input_pipeline as ip
from official_conadv.data import synthetic


def test_keras_fit_with_validation_under_mirrored():
  # Two epochs of fit with validation_steps on a distributed eval dataset:
  # Keras 3.15 peeks a batch from the kept validation iterator before each
  # evaluation, which ends a one-pass dataset (see distributed_dataset).
  import keras  # pylint: disable=g-import-not-at-top
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(name="mnist", data_dir=None, image_size=28,
                               label_smoothing=0.1, shuffle_buffer=1000)
  train = ip.distributed_dataset(strategy, data, split="train",
                                 is_training=True, global_batch_size=64,
                                 num_classes=10, seed=0)
  val = ip.distributed_dataset(strategy, data, split="eval",
                               is_training=False, global_batch_size=500,
                               num_classes=10)
  with strategy.scope():
    model = keras.Sequential([keras.Input((28, 28, 1)),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(optimizer="sgd",
                  loss=keras.losses.CategoricalCrossentropy(
                      from_logits=True, label_smoothing=0.1))
  history = model.fit(train, epochs=2, steps_per_epoch=3,
                      validation_data=val, validation_steps=2, verbose=0)
  assert len(history.history["val_loss"]) == 2
  again = model.evaluate(val, steps=2, verbose=0)
  assert abs(again - history.history["val_loss"][-1]) < 1e-4


def test_autoaugment_v0_in_the_pipeline_changes_pixels(tmp_path):
  d = str(tmp_path)
  synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=1,
                                     per_file=4, size=(256, 320))

  def batch(augment):
    ds = ip.build_dataset("imagenet_tfrecord", "train", data_dir=d,
                          image_size=224, global_batch_size=4,
                          is_training=True, augment=augment,
                          deterministic=True, seed=1)
    return next(iter(ds))

  plain, labels = batch(None)
  augmented, labels_aa = batch("v0")
  assert augmented.shape == (4, 224, 224, 3)
  assert 0.0 <= float(tf.reduce_min(augmented))
  assert float(tf.reduce_max(augmented)) <= 1.0
  np.testing.assert_array_equal(labels, labels_aa)
  # Same crops and flips (same seeds); only AutoAugment (and uint8
  # rounding, < 1/255) differs.
  diff = np.abs(augmented.numpy() - plain.numpy()).reshape(4, -1).max(-1)
  assert (diff > 2 / 255).any()
