"""Per-image preprocessing: ImageNet crops, CIFAR/MNIST shifts, AutoAugment.

Everything here is pure TF, runs inside `tf.data` map functions, and draws
its randomness from stateless ops seeded by an explicit `seed` (an int32/int64
tensor of shape [2]): the input pipeline derives one seed per element from a
base seed and the element's index, so a fixed base seed gives the same images
in the same batches on every run.

Outputs are float32 in [0, 1]. There is no mean/std normalisation: the model
normalises inside (docs/design.md section 1: the adversary works in [0, 1] pixels).

ImageNet follows the reference TF ResNet preprocessing
(tensorflow/tpu models/official/resnet/resnet_preprocessing.py):
  train: `sample_distorted_bounding_box` on the encoded JPEG's shape
    (whole-image box, min_object_covered 0.1, aspect (3/4, 4/3), area
    (0.08, 1), 10 attempts), `decode_and_crop_jpeg` of that window only; when
    sampling fails (the window is the whole image) the eval center crop is
    used instead; bicubic resize to image_size; random left-right flip;
    rounded to uint8 levels (so the image is exactly what AutoAugment
    sees); optional AutoAugment (policy v0) / RandAugment on that uint8
    image (`augment_image`, applied by the input pipeline after the rest).
  eval: center crop of side image_size / (image_size + 32) * min(H, W),
    bicubic resize to image_size.
"""

import contextlib
import threading
from typing import Optional, Sequence, Tuple

import tensorflow as tf

CROP_PADDING = 32
Seed = tf.Tensor  # int32/int64, shape [2].


# ------------------------------------------------------------------ seeds
def split_seed(seed: Seed, num: int) -> Sequence[tf.Tensor]:
  """`num` independent [2]-shaped int64 seeds derived from `seed`."""
  seed = tf.cast(seed, tf.int64)
  return [tf.random.experimental.stateless_fold_in(seed, i) for i in range(num)]


# ------------------------------------------------------------ decoding
def _decode_with_window(image_bytes: tf.Tensor, window_fn,
                        channels: int) -> tf.Tensor:
  """Decodes the crop `window_fn(shape)` of an encoded image.

  JPEG: only the window is decoded (`decode_and_crop_jpeg`, the fast path);
  PNG/GIF/BMP: the whole image is decoded, then sliced.

  Args:
    image_bytes: scalar string, an encoded image.
    window_fn: int32 [3] (H, W, C) -> int32 [4] (y, x, h, w) crop window.
    channels: channels of the output.

  Returns:
    uint8 [h, w, channels].
  """

  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, window,
                                         channels=channels)

  def other():
    image = tf.io.decode_image(image_bytes, channels=channels,
                               expand_animations=False)
    window = window_fn(tf.shape(image))
    return tf.slice(image, tf.stack([window[0], window[1], 0]),
                    tf.stack([window[2], window[3], channels]))

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, channels])
  return image


def center_crop_window(shape: tf.Tensor, image_size: int,
                       crop_padding: int = CROP_PADDING) -> tf.Tensor:
  """The reference eval crop: a centered square of side
  floor(image_size / (image_size + crop_padding) * min(H, W)).

  Args:
    shape: int32 [>=2], (H, W, ...).
  Returns:
    int32 [4]: (offset_y, offset_x, side, side).
  """
  height, width = shape[0], shape[1]
  side = tf.cast(
      (image_size / (image_size + crop_padding)) *
      tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  offset_y = ((height - side) + 1) // 2
  offset_x = ((width - side) + 1) // 2
  return tf.stack([offset_y, offset_x, side, side])


def random_crop_window(shape: tf.Tensor, seed: Seed, image_size: int, *,
                       area_range: Tuple[float, float] = (0.08, 1.0),
                       aspect_ratio_range: Tuple[float, float] = (3 / 4,
                                                                  4 / 3),
                       max_attempts: int = 10,
                       min_object_covered: float = 0.1,
                       crop_padding: int = CROP_PADDING) -> tf.Tensor:
  """Inception-style random crop window, falling back to the center crop.

  `stateless_sample_distorted_bounding_box` returns the whole image when no
  window within `max_attempts` satisfies the constraints; the reference
  then uses the eval center crop, and so does this.

  Args:
    shape: int32 [3], the image's (H, W, C).
    seed: [2] stateless seed.
  Returns:
    int32 [4]: (offset_y, offset_x, h, w).
  """
  shape = tf.cast(shape, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
      seed=tf.cast(seed, tf.int64),
      min_object_covered=min_object_covered,
      aspect_ratio_range=aspect_ratio_range,
      area_range=area_range,
      max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  failed = tf.logical_and(tf.equal(size[0], shape[0]),
                          tf.equal(size[1], shape[1]))
  return tf.cond(failed,
                 lambda: center_crop_window(shape, image_size, crop_padding),
                 lambda: window)


def resize(image: tf.Tensor, image_size: int,
           method: str = "bicubic") -> tf.Tensor:
  """Resizes to [image_size, image_size] -> float32 in [0, 255] (clipped:
  bicubic overshoots)."""
  image = tf.image.resize(image[tf.newaxis], [image_size, image_size],
                          method=method)[0]
  return tf.clip_by_value(image, 0.0, 255.0)


def decode_crop(image_bytes: tf.Tensor, seed: Optional[Seed], image_size: int,
                is_training: bool, *,
                area_range: Tuple[float, float] = (0.08, 1.0),
                aspect_ratio_range: Tuple[float, float] = (3 / 4, 4 / 3),
                max_attempts: int = 10,
                crop_padding: int = CROP_PADDING,
                channels: int = 3) -> tf.Tensor:
  """Decodes the train (Inception random) or eval (center) crop, unresized.

  This is the part of ImageNet preprocessing that fails on a corrupt record;
  the input pipeline guards it. `seed` is unused for eval.

  Returns:
    uint8 [h, w, channels], the crop at the image's resolution.
  """
  if is_training:
    window_fn = lambda s: random_crop_window(  # pylint: disable=g-long-lambda
        s, seed, image_size, area_range=area_range,
        aspect_ratio_range=aspect_ratio_range, max_attempts=max_attempts,
        crop_padding=crop_padding)
  else:
    window_fn = lambda s: center_crop_window(s, image_size, crop_padding)
  return _decode_with_window(image_bytes, window_fn, channels)


def finish_crop(crop: tf.Tensor, seed: Optional[Seed], image_size: int,
                is_training: bool,
                resize_method: str = "bicubic") -> tf.Tensor:
  """The rest of ImageNet preprocessing after `decode_crop`: resize, and for
  training a random left-right flip and rounding to uint8 levels.

  Args:
    crop: uint8 [h, w, C].
  Returns:
    float32 [image_size, image_size, C] in [0, 1]; for training on the
    1/255 grid (uint8 level / 255).
  """
  image = resize(crop, image_size, resize_method)
  if not is_training:
    return to_unit_float(image)
  image = tf.image.stateless_random_flip_left_right(
      image, split_seed(seed, 1)[0])
  return to_unit_float(to_uint8(image))


def preprocess_imagenet(image_bytes: tf.Tensor, seed: Optional[Seed],
                        image_size: int, is_training: bool, augmenter=None,
                        resize_method: str = "bicubic") -> tf.Tensor:
  """Encoded image (JPEG, or PNG/GIF/BMP) -> float32 [image_size,
  image_size, 3] in [0, 1], the reference ResNet recipe (module docstring).

  Args:
    image_bytes: scalar string.
    seed: [2] stateless seed (training only; None for eval).
    augmenter: from `make_augmenter`, training only: applied last
      (`augment_image`).
  """
  crop_seed = finish_seed = aug_seed = None
  if is_training:
    crop_seed, finish_seed, aug_seed = split_seed(seed, 3)
  crop = decode_crop(image_bytes, crop_seed, image_size, is_training)
  image = finish_crop(crop, finish_seed, image_size, is_training,
                      resize_method)
  if is_training and augmenter is not None:
    image = augment_image(augmenter, image, aug_seed)
  return image


# ------------------------------------------------------- AutoAugment etc.
_AUGMENT_LOCK = threading.RLock()


class _StatelessRandom:
  """Stands in for `tf.random` while an `official.vision` augmenter traces.

  Each draw gets its own seed, `fold_in(seed, k)` for the k-th call during
  tracing, so the traced graph holds only stateless random ops.
  """

  def __init__(self, seed: Seed):
    self._seed = tf.cast(seed, tf.int64)
    self._calls = 0

  def _next(self):
    self._calls += 1
    return tf.random.experimental.stateless_fold_in(self._seed, self._calls)

  def uniform(self, shape, minval=0, maxval=None, dtype=tf.float32, seed=None,
              name=None):
    del seed
    return tf.random.stateless_uniform(shape, self._next(), minval=minval,
                                       maxval=maxval, dtype=dtype, name=name)

  def normal(self, shape, mean=0.0, stddev=1.0, dtype=tf.float32, seed=None,
             name=None):
    del seed
    return tf.random.stateless_normal(shape, self._next(), mean=mean,
                                      stddev=stddev, dtype=dtype, name=name)

  def gamma(self, shape, alpha, beta=None, dtype=tf.float32, seed=None,
            name=None):
    del seed
    return tf.random.stateless_gamma(shape, self._next(), alpha, beta=beta,
                                     dtype=dtype, name=name)

  def shuffle(self, value, seed=None, name=None):
    del seed, name
    keys = tf.random.stateless_uniform(tf.shape(value)[:1], self._next())
    return tf.gather(value, tf.argsort(keys))

  def __getattr__(self, name):
    return getattr(tf.random, name)


class _TfWithStatelessRandom:
  """The `tf` module with `tf.random` replaced by `_StatelessRandom`."""

  def __init__(self, random):
    self.random = random

  def __getattr__(self, name):
    return getattr(tf, name)


@contextlib.contextmanager
def _stateless_random_in(module, seed: Seed):
  with _AUGMENT_LOCK:
    original = module.tf
    module.tf = _TfWithStatelessRandom(_StatelessRandom(seed))
    try:
      yield
    finally:
      module.tf = original


def _official_augment():
  """official.vision.ops.augment, from tf-models-official (the `autoaugment`
  extra of this package): a one-line error naming the install if missing."""
  try:
    from official.vision.ops import augment  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name not in ("official", "official.vision", "official.vision.ops"):
      raise
    raise ModuleNotFoundError(
        "AutoAugment / RandAugment (data.autoaugment) need tf-models-official:"
        " pip install 'official-conadv[autoaugment]' (or pip install -r "
        "requirements.txt in a checkout).", name=e.name) from None
  return augment


def make_augmenter(name: Optional[str], *, randaugment_layers: int = 2,
                   randaugment_magnitude: float = 10.0):
  """An `official.vision.ops.augment` augmenter, or None.

  Args:
    name: None, "v0" / "autoaugment" (AutoAugment policy v0, the paper's
      +AA rows), another AutoAugment policy name known to official.vision
      ("reduced_imagenet", "reduced_cifar10", "svhn", ...), or
      "randaugment".
  """
  if name is None or name == "none":
    return None
  augment = _official_augment()
  if name == "randaugment":
    return augment.RandAugment(num_layers=randaugment_layers,
                               magnitude=randaugment_magnitude)
  policy = "v0" if name == "autoaugment" else name
  try:
    return augment.AutoAugment(augmentation_name=policy)
  except ValueError:
    raise ValueError(f"Unknown augmentation {name!r}: use None, 'v0' "
                     "(AutoAugment), another official.vision AutoAugment "
                     "policy name, or 'randaugment'.") from None


def distort(augmenter, image: tf.Tensor, seed: Seed) -> tf.Tensor:
  """Applies an official.vision augmenter with stateless randomness.

  official.vision's AutoAugment/RandAugment draw with stateful `tf.random`
  ops, which inside a parallel `tf.data` map make results depend on thread
  timing. They are pure TF otherwise, so this traces `augmenter.distort`
  with the module's `tf.random` redirected to stateless ops seeded from
  `seed`: the same seed gives the same augmentation, and the code that runs
  is upstream's.

  Args:
    augmenter: from `make_augmenter` (not None).
    image: uint8 [H, W, 3] (or [H, W, 1]: processed as gray RGB, which every
      AutoAugment op keeps gray).
    seed: [2] stateless seed.

  Returns:
    uint8 image of the input's shape.
  """
  augment = _official_augment()
  channels = image.shape[-1]
  if channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  with _stateless_random_in(augment, seed):
    out = augmenter.distort(image)
  out = tf.ensure_shape(out, image.shape)
  if channels == 1:
    out = out[..., :1]
  return out


def augment_image(augmenter, image: tf.Tensor, seed: Seed) -> tf.Tensor:
  """AutoAugment/RandAugment on a float image: `distort` of its uint8
  levels, back to [0, 1].

  Args:
    augmenter: from `make_augmenter` (not None).
    image: float32 [H, W, C] in [0, 1], C = 1 or 3; exact when it lies on
      the 1/255 grid, as training images do.
    seed: [2] stateless seed.

  Returns:
    float32 [H, W, C] in [0, 1] on the 1/255 grid.
  """
  return to_unit_float(distort(augmenter, to_uint8(image * 255.0), seed))


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float in [0, 255] -> uint8, rounded."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 or float in [0, 255] -> float32 in [0, 1]."""
  image = tf.cast(image, tf.float32)
  return tf.clip_by_value(image / 255.0, 0.0, 1.0)


# ------------------------------------------------------ small images
def pad_and_random_crop(image: tf.Tensor, seed: Seed, pad: int) -> tf.Tensor:
  """Zero-pads `pad` pixels on each side, crops back to the input size at a
  random offset (a random shift of up to +-pad pixels)."""
  shape = image.shape
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, shape, seed)


def fit_size(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Square image of side n -> side image_size: zero-pads symmetrically when
  image_size - n is even and >= 0 (28 -> 32 for MNIST), else resizes
  (bilinear). Returns the input dtype for padding, float32 for resizing."""
  n = image.shape[0]
  if n == image_size:
    return image
  if image_size > n and (image_size - n) % 2 == 0:
    p = (image_size - n) // 2
    return tf.pad(image, [[p, p], [p, p], [0, 0]])
  return tf.image.resize(image, [image_size, image_size], method="bilinear")


def preprocess_small_train(image: tf.Tensor, seed: Seed, image_size: int, *,
                           pad: int, flip: bool) -> tf.Tensor:
  """Small fixed-size images (MNIST, CIFAR): random shift by pad-and-crop,
  optional flip, then `fit_size` (rounded to uint8 levels when it
  resizes). AutoAugment, if any, comes after (`augment_image`).

  Args:
    image: uint8 [n, n, C].
  Returns:
    float32 [image_size, image_size, C] in [0, 1] on the 1/255 grid.
  """
  crop_seed, flip_seed = split_seed(seed, 2)
  if pad:
    image = pad_and_random_crop(image, crop_seed, pad)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = fit_size(image, image_size)
  if image.dtype != tf.uint8:  # Resized.
    image = to_uint8(image)
  return to_unit_float(image)


def preprocess_small_eval(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 [n, n, C] -> float32 [image_size, image_size, C] in [0, 1]."""
  return to_unit_float(fit_size(image, image_size))

