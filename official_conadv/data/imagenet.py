"""ImageNet-1k (ILSVRC2012) sources: TFRecord shards, or tfds `imagenet2012`.

On disk, either

* TFRecord shards (`name="imagenet_tfrecord"`): `data_dir/train-*` and
  `data_dir/validation-*` (e.g. train-00000-of-01024 ... and
  validation-00000-of-00128, as written by the TF ResNet/TPU script
  `imagenet_to_gcs.py`): `tf.train.Example`s with `image/encoded` (JPEG
  bytes) and `image/class/label` (int64 in [1, 1000]; `label_offset=1`
  maps it to [0, 999], use 0 for 0-based shards). Local or gs:// paths.
* the two official tars (`name="imagenet_tfds"`): `ILSVRC2012_img_train.tar`
  and `ILSVRC2012_img_val.tar` from image-net.org in `data_dir` (or in
  `data_dir/downloads/manual`, or `manual_dir`); tfds `imagenet2012`
  converts them once (hours, about 150 GB) into its own shards under
  `data_dir`. A `data_dir` that already holds a prepared `imagenet2012`
  needs no tars.

Preprocessing is the reference ResNet recipe (`preprocessing.py`).
"""

import os
from typing import List, Optional

from absl import logging
import tensorflow as tf

from official_conadv.data import preprocessing
from official_conadv.data import source as source_lib

NUM_CLASSES = 1000
NUM_EXAMPLES = {source_lib.TRAIN: 1_281_167, source_lib.EVAL: 50_000}
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
FILE_PATTERNS = {source_lib.TRAIN: "train-*", source_lib.EVAL: "validation-*"}
TFDS_NAME = "imagenet2012"
_TFDS_SPLITS = {source_lib.TRAIN: "train", source_lib.EVAL: "validation"}


# -------------------------------------------------------- shared recipe
def _inception_fns(image_size: int, is_training: bool, resize_method: str):
  """(decode_bytes, finish) for ImageNet-style preprocessing."""

  def decode_bytes(image_bytes, seed):
    return preprocessing.decode_crop(image_bytes, seed, image_size,
                                     is_training)

  def finish(crop, seed):
    return preprocessing.finish_crop(crop, seed, image_size, is_training,
                                     resize_method)

  return decode_bytes, finish


def inception_source(name: str, split: str, records, decode_payload, *,
                     image_size: int, is_training: bool,
                     resize_method: str = "bicubic",
                     num_examples: Optional[int] = None,
                     num_classes: Optional[int] = NUM_CLASSES,
                     label_hint: str = "") -> source_lib.Source:
  """A Source with ImageNet-style preprocessing.

  Args:
    decode_payload: payload dict -> (encoded image bytes, int label).
  """
  decode_bytes, finish = _inception_fns(image_size, is_training,
                                        resize_method)

  def decode(payload, seed):
    image_bytes, label = decode_payload(payload)
    return decode_bytes(image_bytes, seed), tf.cast(label, tf.int32)

  return source_lib.Source(
      name=name, split=split, records=records, decode=decode, finish=finish,
      image_spec=tf.TensorSpec([None, None, 3], tf.uint8),
      output_shape=(image_size, image_size, 3), fallible=True,
      num_examples=num_examples, num_classes=num_classes,
      label_hint=label_hint)


# ------------------------------------------------------------ TFRecords
def tfrecord_files(data_dir: Optional[str], split: str,
                   file_pattern: Optional[str] = None) -> List[str]:
  """The sorted shard paths of a split; ValueError saying what to put where
  when there are none."""
  split = source_lib.canonical_split(split)
  pattern = file_pattern or FILE_PATTERNS[split]
  if not data_dir:
    raise ValueError(
        "imagenet_tfrecord needs data_dir: the directory holding the "
        "train-* and validation-* TFRecord shards.")
  source_lib.check_data_dir(
      data_dir, "imagenet_tfrecord needs the directory holding the train-* "
      "and validation-* TFRecord shards")
  files = source_lib.glob_files(source_lib.join(data_dir, pattern))
  if not files:
    where = ("does not exist" if not source_lib.is_dir(data_dir)
             else "has no such files")
    raise ValueError(
        f"No ImageNet TFRecord shards {pattern!r} in {data_dir} ({where}): "
        f"put train-00000-of-01024 ... and validation-00000-of-00128 ... "
        f"(tf.train.Example with image/encoded JPEG bytes and "
        f"image/class/label in [1, 1000], as written by the TF ResNet "
        f"imagenet_to_gcs.py script) in {data_dir}.")
  return files


def tfrecord_records(files: List[str], *, cycle_length: int = 16,
                     read_buffer_bytes: int = 8 << 20):
  """`Source.records` for TFRecord shards: shard by file when every input
  pipeline gets a file (else, and with `by_record`, by record over all
  files read in a fixed order: every pipeline then reads every file but
  keeps only its records), shuffle the file order with `file_seed` when
  given (an int or an int64 tensor), interleave the files (in a fixed order
  unless sharded by file with a file_seed, where `tf.data.Options`
  decides)."""
  files = list(files)

  def records(context: tf.distribute.InputContext, file_seed, *,
              by_record: bool = False):
    by_file = not by_record and source_lib.shard_by_file(len(files), context)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if by_file:
      ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
      if file_seed is not None:
        ds = ds.shuffle(len(files), seed=file_seed,
                        reshuffle_each_iteration=True)

    def read(path):
      records = tf.data.TFRecordDataset(path, buffer_size=read_buffer_bytes)
      # zip, not map: nothing here may be reordered (sharding by record).
      return tf.data.Dataset.zip(
          (tf.data.Dataset.from_tensors(path).repeat(), records.enumerate()))

    ds = ds.interleave(
        read, cycle_length=max(1, min(cycle_length, len(files))),
        block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
        # Sharding by record needs the same order in every pipeline; eval
        # (no file_seed) reads in a fixed order too.
        deterministic=None if by_file and file_seed is not None else True)
    if not by_file:
      ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
    return ds.map(lambda path, ir: {"file": path, "index": ir[0],
                                    "record": ir[1]})

  return records


def parse_example(serialized: tf.Tensor, label_offset: int = 1):
  """Standard ImageNet Example -> (JPEG bytes, label - label_offset)."""
  features = tf.io.parse_single_example(serialized, {
      "image/encoded": tf.io.FixedLenFeature([], tf.string),
      "image/class/label": tf.io.FixedLenFeature([], tf.int64),
  })
  return (features["image/encoded"],
          features["image/class/label"] - label_offset)


def tfrecord_source(split: str, *, data_dir: str, image_size: int,
                    is_training: bool, label_offset: int = 1,
                    file_pattern: Optional[str] = None,
                    resize_method: str = "bicubic", cycle_length: int = 16,
                    num_examples: Optional[int] = None,
                    num_classes: int = NUM_CLASSES) -> source_lib.Source:
  """ImageNet from TFRecord shards (module docstring).

  Args:
    label_offset: subtracted from `image/class/label` (1 for the standard
      1-based shards).
    file_pattern: glob relative to data_dir; default "train-*" /
      "validation-*".
    num_examples: the split's size if not the full ImageNet's.
    num_classes: labels (after the offset) must be in [0, num_classes).
  """
  split = source_lib.canonical_split(split)
  files = tfrecord_files(data_dir, split, file_pattern)
  return inception_source(
      "imagenet_tfrecord", split,
      tfrecord_records(files, cycle_length=cycle_length),
      lambda p: parse_example(p["record"], label_offset),
      image_size=image_size, is_training=is_training,
      resize_method=resize_method,
      num_examples=num_examples or NUM_EXAMPLES[split],
      num_classes=num_classes,
      label_hint=(f"labels are image/class/label - label_offset with "
                  f"label_offset={label_offset}: use 1 for the standard "
                  f"1-based ImageNet shards, 0 for 0-based ones"))


# ----------------------------------------------------------------- tfds
def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def find_tars(data_dir: Optional[str],
              manual_dir: Optional[str] = None) -> Optional[str]:
  """The directory holding both official tars, or None."""
  if manual_dir:
    candidates = [manual_dir]
  else:
    candidates = [d for d in (data_dir, data_dir and source_lib.join(
        data_dir, "downloads", "manual")) if d]
  for d in candidates:
    if all(tf.io.gfile.exists(source_lib.join(d, t))
           for t in (TRAIN_TAR, VAL_TAR)):
      return d
  return None


def prepare_tfds(data_dir: Optional[str], manual_dir: Optional[str] = None):
  """Makes sure tfds' imagenet2012 is prepared in data_dir.

  Returns the tfds builder. A no-op when it is prepared already; otherwise
  converts the two official tars (found by `find_tars`), which takes hours
  on first use. ValueError (one line: which files to put where) when
  neither is there.
  """
  source_lib.check_data_dir(
      data_dir, f"imagenet_tfds needs a tfds data_dir (a directory holding "
      f"{TFDS_NAME}/, or {TRAIN_TAR} and {VAL_TAR})")
  source_lib.check_data_dir(manual_dir, f"it must be the directory holding "
                            f"{TRAIN_TAR} and {VAL_TAR}", what="manual_dir")
  tfds = _tfds()
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  where = data_dir or os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  tar_dir = find_tars(where, manual_dir)
  if tar_dir is None:
    raise ValueError(
        f"ImageNet (tfds {TFDS_NAME}) is not prepared in {where} and its "
        f"tars are missing: put {TRAIN_TAR} and {VAL_TAR} (from "
        f"image-net.org) in {manual_dir or where}"
        + ("" if manual_dir else f" (or {where}/downloads/manual)") +
        ", or point data_dir at a tfds data_dir holding a prepared "
        f"{TFDS_NAME}.")
  logging.info("Preparing tfds %s from the tars in %s into %s; this takes "
               "hours the first time.", TFDS_NAME, tar_dir, where)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=tar_dir))
  return builder


def tfds_source(split: str, *, data_dir: Optional[str], image_size: int,
                is_training: bool, manual_dir: Optional[str] = None,
                resize_method: str = "bicubic",
                num_examples: Optional[int] = None) -> source_lib.Source:
  """ImageNet from tfds `imagenet2012` (module docstring)."""
  split = source_lib.canonical_split(split)
  builder = prepare_tfds(data_dir, manual_dir)
  return inception_source(
      "imagenet_tfds", split,
      source_lib.tfds_records(builder, _TFDS_SPLITS[split], is_training),
      lambda p: (p["image"], p["label"]),
      image_size=image_size, is_training=is_training,
      resize_method=resize_method,
      num_examples=num_examples or NUM_EXAMPLES[split])


def check_tfrecord(data_dir: Optional[str],
                   file_patterns: Optional[dict] = None):
  """ValueError unless both splits have shards in data_dir."""
  for split in (source_lib.TRAIN, source_lib.EVAL):
    tfrecord_files(data_dir, split, (file_patterns or {}).get(split))
