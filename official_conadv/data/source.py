"""What a dataset module hands to the common input pipeline.

A `Source` is one split of one dataset, described by three functions:

* `records(input_context, file_seed)`: one epoch of this input pipeline's
  share of the raw records, as dicts with a location (`"file"`: string,
  `"index"`: int64, the record's index in that file or listing) and the
  payload (encoded bytes, a serialized Example, or decoded arrays).
  Sharding across input pipelines happens here (by file when there are
  enough files, by element otherwise), and so does the per-epoch file
  shuffle when `file_seed` is given (training).
* `decode(payload, seed) -> (image, label)`: the part that can fail on a
  corrupt record (parse, decode, crop). `image` matches `image_spec` (dtype;
  shape, possibly with unknown dims); `label` is an int scalar class id.
* `finish(image, seed) -> image`: the rest (resize, flip, AutoAugment,
  scaling); float32 in [0, 1] of shape `output_shape`.

The input pipeline (`input_pipeline.py`) adds everything common: shuffling,
repeat, per-element seeds, the corrupt-record guard, batching, prefetch.
"""

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

import tensorflow as tf

TRAIN = "train"
EVAL = "eval"
_SPLIT_ALIASES = {
    "train": TRAIN,
    "eval": EVAL, "validation": EVAL, "val": EVAL, "test": EVAL,
    "heldout": EVAL, "held_out": EVAL,
}


def canonical_split(split: str) -> str:
  """"train" or "eval" ("validation", "val", "test" mean "eval")."""
  try:
    return _SPLIT_ALIASES[split]
  except KeyError:
    raise ValueError(f"Unknown split {split!r}: use 'train' or 'eval' "
                     "('validation', 'val' and 'test' mean 'eval').") from None


Records = Callable[[tf.distribute.InputContext, Optional[int]],
                   tf.data.Dataset]
Decode = Callable[[Dict[str, tf.Tensor], tf.Tensor], Tuple[tf.Tensor,
                                                            tf.Tensor]]
Finish = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  split: str                  # "train" or "eval".
  records: Records
  decode: Decode
  finish: Finish
  image_spec: tf.TensorSpec   # Static shape and dtype of `decode`'s image.
  output_shape: Tuple[int, int, int]  # Of `finish`'s image.
  fallible: bool = True       # False: decode cannot fail (in-memory arrays).
  num_examples: Optional[int] = None
  num_classes: Optional[int] = None  # Labels are checked to be in range.
  label_hint: str = ""        # Appended to the out-of-range label error.


def shard_by_file(num_files: int, context: tf.distribute.InputContext) -> bool:
  """File-level sharding when every input pipeline gets at least one file."""
  return num_files >= context.num_input_pipelines


def glob_files(pattern: str) -> List[str]:
  """Sorted matches of a glob (local or gs://), or [] if the dir is absent."""
  try:
    return sorted(tf.io.gfile.glob(pattern))
  except tf.errors.NotFoundError:
    return []


def is_dir(path: Optional[str]) -> bool:
  return bool(path) and tf.io.gfile.isdir(path)


def join(*parts: str) -> str:
  return os.path.join(*parts)


def tfds_records(builder, tfds_split: str, is_training: bool, *,
                 cycle_length: int = 16):
  """`Source.records` for a tfds dataset with an "image" (encoded bytes,
  not decoded) and a "label" feature; location from tfds ids."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    num_shards = builder.info.splits[tfds_split].num_shards
  except (KeyError, AttributeError, TypeError):  # Unknown (e.g. mocked).
    num_shards = 0

  def records(context: tf.distribute.InputContext, file_seed):
    pipelines = context.num_input_pipelines
    by_file = pipelines == 1 or shard_by_file(num_shards, context)
    read_config = tfds.ReadConfig(
        add_tfds_id=True,
        shuffle_seed=file_seed,
        shuffle_reshuffle_each_iteration=True,
        interleave_cycle_length=cycle_length,
        input_context=context if by_file and pipelines > 1 else None)
    split = tfds_split
    if not by_file:  # Too few shards: a contiguous 1/pipelines of the split.
      split = tfds.even_splits(tfds_split, n=pipelines)[
          context.input_pipeline_id]
    ds = builder.as_dataset(
        split=split,
        shuffle_files=bool(is_training and file_seed is not None),
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config)

    def location(ex):
      # tfds ids look like "imagenet2012-train.tfrecord-00012-of-01024__345".
      parts = tf.strings.split(ex["tfds_id"], "__")
      return {"file": parts[0],
              "index": tf.strings.to_number(parts[-1], tf.int64),
              "image": ex["image"], "label": ex["label"]}

    return ds.map(location)

  return records
