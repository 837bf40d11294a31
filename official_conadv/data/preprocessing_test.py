"""Tests for preprocessing.py (CPU, offline, small images)."""

import numpy as np
import pytest
import tensorflow as tf

from official_conadv.data import preprocessing
from official_conadv.data import synthetic

_STATEFUL_RANDOM_OPS = {
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal",
    "RandomShuffle", "RandomGamma", "RandomGammaGrad",
    "ParameterizedTruncatedNormal",
    "TruncatedNormal", "Multinomial", "RandomPoisson", "RandomPoissonV2",
    "StatefulUniform", "StatefulUniformInt", "StatefulStandardNormalV2",
}


def _image(h, w, c=3, seed=0):
  return synthetic.random_image(np.random.RandomState(seed), h, w, c)


def _seed(a, b=0):
  return tf.constant([a, b], tf.int64)


def test_eval_center_crop_matches_hand_computation():
  # 64x80 image, image_size 32, crop_padding 32: side = 32/64 * 64 = 32,
  # offsets ((64-32+1)//2, (80-32+1)//2) = (16, 24); resizing 32 -> 32 is
  # the identity, PNG is lossless, so the output is exactly the slice / 255.
  image = _image(64, 80)
  out = preprocessing.preprocess_imagenet(
      tf.constant(synthetic.encode(image, "png")), None, 32,
      is_training=False)
  expected = image[16:48, 24:56].astype(np.float32) / 255.0
  assert out.shape == (32, 32, 3) and out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_center_crop_window_odd_sizes():
  # side = int(224 / 256 * 375) = 328; offsets ((375-328+1)//2,
  # (500-328+1)//2) = (24, 86), as in the reference ResNet.
  window = preprocessing.center_crop_window(tf.constant([375, 500, 3]), 224)
  assert window.numpy().tolist() == [24, 86, 328, 328]


def test_jpeg_crop_decodes_only_the_window():
  image = _image(64, 80)
  data = tf.constant(synthetic.encode(image, "jpeg", quality=95))
  crop = preprocessing.decode_crop(data, None, 32, is_training=False)
  full = tf.io.decode_jpeg(data, channels=3)
  assert crop.shape == (32, 32, 3) and crop.dtype == tf.uint8
  diff = np.abs(crop.numpy().astype(int) - full.numpy()[16:48, 24:56]
                .astype(int))
  assert diff.mean() < 2.0


def test_random_crop_is_seeded():
  data = tf.constant(synthetic.encode(_image(60, 90)))
  outs = [preprocessing.preprocess_imagenet(data, _seed(s), 24, True).numpy()
          for s in (1, 1, 2)]
  assert outs[0].shape == (24, 24, 3)
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])
  for o in outs:
    assert o.min() >= 0.0 and o.max() <= 1.0


def test_random_crop_window_respects_area_and_aspect():
  shape = tf.constant([300, 400, 3])
  for s in range(40):
    y, x, h, w = preprocessing.random_crop_window(
        shape, _seed(s), 224).numpy().tolist()
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    if (h, w) == (262, 262):  # The center-crop fallback.
      continue
    area = h * w / (300 * 400)
    assert 0.08 - 0.01 <= area <= 1.0
    assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_random_crop_falls_back_to_center_crop():
  # A 20x2000 strip: no 3/4..4/3 window covers >= 8% of it, so sampling
  # fails and the eval center crop is used.
  shape = tf.constant([20, 2000, 3])
  center = preprocessing.center_crop_window(shape, 224).numpy().tolist()
  for s in range(5):
    window = preprocessing.random_crop_window(shape, _seed(s), 224)
    assert window.numpy().tolist() == center


def test_decode_crop_png_train_path():
  data = tf.constant(synthetic.encode(_image(40, 50), "png"))
  out = preprocessing.preprocess_imagenet(data, _seed(3), 16, True)
  assert out.shape == (16, 16, 3)


def test_corrupt_bytes_raise():
  with pytest.raises(tf.errors.InvalidArgumentError):
    preprocessing.decode_crop(tf.constant(b"garbage"), None, 32, False)


def _stateful_random_ops(concrete_fn):
  graph_def = concrete_fn.graph.as_graph_def()
  ops = {n.op for n in graph_def.node}
  for f in graph_def.library.function:
    ops.update(n.op for n in f.node_def)
  return ops & _STATEFUL_RANDOM_OPS


@pytest.mark.parametrize("name", ["v0", "randaugment"])
def test_augmenter_is_stateless_and_seeded(name):
  augmenter = preprocessing.make_augmenter(name)
  image = tf.constant(_image(64, 64))

  @tf.function
  def run(seed):
    return preprocessing.distort(augmenter, image, seed)

  concrete = run.get_concrete_function(tf.TensorSpec([2], tf.int64))
  assert not _stateful_random_ops(concrete)
  outs = [run(_seed(s)).numpy() for s in (5, 5)]
  np.testing.assert_array_equal(outs[0], outs[1])
  changed = [not np.array_equal(run(_seed(s)).numpy(), image.numpy())
             for s in range(8)]
  assert any(changed)
  assert outs[0].dtype == np.uint8 and outs[0].shape == (64, 64, 3)
  # Upstream's `tf` module is restored after tracing.
  from official.vision.ops import augment  # pylint: disable=g-import-not-at-top
  assert augment.tf is tf


def test_upstream_autoaugment_alone_is_stateful():
  # Why `distort` exists: called directly, official.vision draws with
  # stateful ops (this also checks that the op scan above sees them). The
  # one-sub-policy "test" policy draws the same way as v0 and traces fast.
  augmenter = preprocessing.make_augmenter("test")
  image = tf.constant(_image(32, 32))
  concrete = tf.function(
      lambda: augmenter.distort(image)).get_concrete_function()
  assert _stateful_random_ops(concrete)


def test_autoaugment_gray_images_stay_one_channel():
  augmenter = preprocessing.make_augmenter("test")
  image = tf.constant(_image(28, 28, 1))
  out = preprocessing.distort(augmenter, image, _seed(1))
  assert out.shape == (28, 28, 1) and out.dtype == tf.uint8


def test_unknown_augmenter():
  with pytest.raises(ValueError, match="Unknown augmentation"):
    preprocessing.make_augmenter("v9")
  assert preprocessing.make_augmenter(None) is None


def test_small_train_shift_and_pad():
  image = tf.constant(_image(28, 28, 1))
  out = preprocessing.preprocess_small_train(image, _seed(0), 28, pad=2,
                                             flip=False)
  assert out.shape == (28, 28, 1) and out.dtype == tf.float32
  padded = preprocessing.preprocess_small_eval(image, 32).numpy()
  assert padded.shape == (32, 32, 1)
  np.testing.assert_array_equal(padded[2:30, 2:30],
                                image.numpy().astype(np.float32) / 255.0)
  assert padded[:2].max() == 0 and padded[:, 30:].max() == 0
  resized = preprocessing.preprocess_small_eval(image, 20)
  assert resized.shape == (20, 20, 1)


def test_cifar_style_train_is_a_shift_or_flip_of_the_input():
  image = _image(32, 32)
  out = preprocessing.preprocess_small_train(tf.constant(image), _seed(4), 32,
                                             pad=4, flip=True).numpy()
  # Every output is the input shifted by <= 4 pixels (zero border), maybe
  # mirrored.
  ref = image.astype(np.float32) / 255.0
  found = False
  padded = np.pad(ref, [(4, 4), (4, 4), (0, 0)])
  for dy in range(9):
    for dx in range(9):
      win = padded[dy:dy + 32, dx:dx + 32]
      if np.allclose(win, out) or np.allclose(win[:, ::-1], out):
        found = True
  assert found


def test_training_images_lie_on_the_uint8_grid():
  # What AutoAugment sees (uint8 levels) is exactly the plain image.
  data = tf.constant(synthetic.encode(_image(60, 90)))
  big = preprocessing.preprocess_imagenet(data, _seed(2), 40, True).numpy()
  small = preprocessing.preprocess_small_train(
      tf.constant(_image(28, 28, 1)), _seed(2), 36, pad=2, flip=False).numpy()
  for out in (big, small):
    levels = out * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    np.testing.assert_array_equal(
        preprocessing.to_uint8(tf.constant(levels)).numpy(),
        np.round(levels).astype(np.uint8))
  assert small.shape == (36, 36, 1)  # 28 -> 36 is a resize (odd margin).


def test_augment_image_is_distort_of_the_uint8_levels():
  augmenter = preprocessing.make_augmenter("test")
  image = _image(32, 32)
  unit = tf.constant(image.astype(np.float32) / 255.0)
  out = preprocessing.augment_image(augmenter, unit, _seed(7))
  ref = preprocessing.distort(augmenter, tf.constant(image), _seed(7))
  assert out.dtype == tf.float32 and out.shape == (32, 32, 3)
  np.testing.assert_array_equal(
      out.numpy(), ref.numpy().astype(np.float32) / 255.0)


def test_preprocess_imagenet_applies_the_augmenter_last():
  augmenter = preprocessing.make_augmenter("test")
  data = tf.constant(synthetic.encode(_image(60, 90)))
  seed = _seed(4)
  plain = preprocessing.preprocess_imagenet(data, seed, 24, True)
  out = preprocessing.preprocess_imagenet(data, seed, 24, True, augmenter)
  aug_seed = preprocessing.split_seed(seed, 3)[2]
  np.testing.assert_array_equal(
      out.numpy(),
      preprocessing.augment_image(augmenter, plain, aug_seed).numpy())
