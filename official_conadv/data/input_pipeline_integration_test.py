"""Heavier input-pipeline tests: Keras fit and exact weighted evaluation
under MirroredStrategy, AutoAugment v0 at 224 px and AutoAugment pairs
(kept apart so every test file stays short)."""

import types

import numpy as np
import pytest
import tensorflow as tf

from official_conadv import distribute_utils
from official_conadv.data import input_pipeline as ip
from official_conadv.data import mnist
from official_conadv.data import preprocessing
from official_conadv.data import synthetic


def test_keras_fit_with_validation_under_mirrored():
  # Two epochs of fit with validation_steps on a distributed eval dataset:
  # Keras 3.15 peeks a batch from the kept validation iterator before each
  # evaluation, which ends a one-pass dataset (see distributed_dataset).
  import keras  # pylint: disable=g-import-not-at-top
  strategy = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
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


def test_weighted_evaluate_scores_every_digit_once_under_mirrored():
  # 1,000 digits, global batch 300 on 2 replicas: 4 steps, 200 padding
  # slots. Keras weighs `weighted_metrics` (not `metrics`) by the third
  # element, so that accuracy is the 1,000 digits', each once; the
  # unweighted one counts the padding (zeros images, label 0).
  import keras  # pylint: disable=g-import-not-at-top
  strategy = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(name="mnist", data_dir=None, image_size=28)
  steps = ip.num_eval_steps(1000, 300, ip.num_input_pipelines(strategy))
  assert steps == 4
  val = ip.distributed_dataset(strategy, data, split="eval",
                               is_training=False, global_batch_size=300)
  with strategy.scope():
    model = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Flatten(),
        keras.layers.Dense(10, kernel_initializer=keras.initializers.
                           RandomNormal(seed=1))])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="plain")],
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
            name="weighted")])
  result = model.evaluate(val, steps=steps, verbose=0, return_dict=True)
  images, labels, _ = mnist.load("eval")
  logits = model.predict(images.astype(np.float32) / 255.0, verbose=0)
  correct = int(np.sum(np.argmax(logits, -1) == labels))
  assert 20 < correct < 980
  assert abs(result["weighted"] - correct / 1000) < 1e-6
  # A zeros image gives logits = bias = 0: class 0, the padding's label.
  assert abs(result["plain"] - (correct + 200) / 1200) < 1e-6


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


@pytest.mark.parametrize("name,data", [("imagenet_tfrecord", "tfrecord"),
                                       ("mnist", None)])
def test_augment_pair_is_the_augmenter_applied_to_the_plain_image(
    tmp_path, name, data):
  # AutoAugment's one-sub-policy "test" policy (fast to trace); v0 goes
  # through the same code.
  d = None
  if data:
    d = str(tmp_path)
    synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=2,
                                       per_file=3, size=(40, 52))
  common = dict(data_dir=d, image_size=32, global_batch_size=6,
                is_training=True, seed=5, start_step=2, num_steps=2)
  if d:
    common["num_examples"] = 6

  def run(**kwargs):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in
            ip.build_dataset(name, "train", **common, **kwargs)]

  pairs = run(augment="test", augment_pair=True)
  plain = run(augment=None)
  only_augmented = run(augment="test")
  augmenter = preprocessing.make_augmenter("test")
  key = tf.constant([5, 0], tf.int64)
  changed = 0
  for step, ((features, labels), (image, plain_labels),
             (augmented, _)) in enumerate(zip(pairs, plain, only_augmented)):
    assert set(features) == {"image", "augmented"}
    assert features["image"].shape == features["augmented"].shape
    assert features["image"].dtype == np.float32
    np.testing.assert_array_equal(features["image"], image)
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_array_equal(features["augmented"], augmented)
    # Element k = (2 + step) * 6 + j, augment seed = split(fold_in(key, k))[2],
    # applied in a tf.data map as the pipeline does.
    ks = (2 + step) * 6 + np.arange(6)
    expected = tf.data.Dataset.from_tensor_slices(
        (features["image"], ks)).map(
            lambda im, k: preprocessing.augment_image(
                augmenter, im, preprocessing.split_seed(
                    tf.random.experimental.stateless_fold_in(key, k), 3)[2]))
    expected = np.stack(list(expected.as_numpy_iterator()))
    np.testing.assert_array_equal(features["augmented"], expected)
    # Training images lie on the 1/255 grid (what AutoAugment sees).
    levels = features["image"] * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    changed += int((features["augmented"] != features["image"]).any(
        axis=(1, 2, 3)).sum())
  assert changed > 0
