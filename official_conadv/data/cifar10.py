"""CIFAR-10 from tfds `cifar10` (downloaded and prepared on first use).

On disk: a tfds data_dir (default ~/tensorflow_datasets) that holds
`cifar10/3.0.2/`, or network access once so tfds can download it (about
160 MB). 50,000 train / 10,000 test images, 32x32x3, 10 classes.

Train: pad 4 + random 32x32 crop + random flip (AutoAugment, when asked,
is applied by the input pipeline on the result);
eval: the image as is. Resized when image_size != 32.
"""

from typing import Optional

from absl import logging
import tensorflow as tf

from official_conadv.data import preprocessing
from official_conadv.data import source as source_lib

NUM_CLASSES = 10
NUM_EXAMPLES = {source_lib.TRAIN: 50_000, source_lib.EVAL: 10_000}
IMAGE_SIZE = 32
TFDS_NAME = "cifar10"
_TFDS_SPLITS = {source_lib.TRAIN: "train", source_lib.EVAL: "test"}


def prepare(data_dir: Optional[str] = None):
  """The tfds builder, prepared (downloads on first use). ValueError with
  one line when it is not prepared and cannot be downloaded."""
  source_lib.check_data_dir(
      data_dir, f"cifar10 needs a tfds data_dir (a directory holding "
      f"{TFDS_NAME}/, or where tfds may download it)")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  logging.info("Downloading and preparing tfds %s into %s.", TFDS_NAME,
               builder.data_dir)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(
        f"CIFAR-10 (tfds {TFDS_NAME}) is not prepared in "
        f"{data_dir or '~/tensorflow_datasets'} and the download failed "
        f"({first_line}): run once with network access, or point data_dir "
        f"at a tfds data_dir holding {TFDS_NAME}/.") from None
  return builder


def source(split: str, *, data_dir: Optional[str], image_size: int = 32,
           is_training: bool, pad: int = 4,
           num_examples: Optional[int] = None) -> source_lib.Source:
  """CIFAR-10 (module docstring)."""
  split = source_lib.canonical_split(split)
  builder = prepare(data_dir)
  records = source_lib.tfds_records(builder, _TFDS_SPLITS[split], is_training)

  def decode(payload, seed):
    del seed
    image = tf.io.decode_png(payload["image"], channels=3)
    image = tf.ensure_shape(image, [IMAGE_SIZE, IMAGE_SIZE, 3])
    return image, tf.cast(payload["label"], tf.int32)

  def finish(image, seed):
    if is_training:
      return preprocessing.preprocess_small_train(
          image, seed, image_size, pad=pad, flip=True)
    return preprocessing.preprocess_small_eval(image, image_size)

  return source_lib.Source(
      name="cifar10", split=split, records=records, decode=decode,
      finish=finish,
      image_spec=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8),
      output_shape=(image_size, image_size, 3), fallible=True,
      num_examples=num_examples or NUM_EXAMPLES[split],
      num_classes=NUM_CLASSES)
