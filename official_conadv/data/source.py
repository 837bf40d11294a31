"""What a dataset module hands to the common input pipeline.

A `Source` is one split of one dataset, described by three functions:

* `records(input_context, file_seed, *, by_record=False)`: one epoch of this
  input pipeline's share of the raw records, as dicts with a location
  (`"file"`: string, `"index"`: int64, the record's index in that file or
  listing) and the payload (encoded bytes, a serialized Example, or decoded
  arrays).
  - Sharding across input pipelines happens here: by file when every
    pipeline gets a file, by record otherwise; `by_record=True` always
    shards by record (the eval split: shard sizes then differ by at most
    one), in an order that does not depend on the pipeline or on
    `tf.data.Options.deterministic`.
  - `file_seed`: None (eval) reads in a fixed order; an int64 scalar (a
    Python int or a TENSOR: the pipeline calls `records` inside a
    `flat_map` over epoch numbers, with a per-epoch seed) shuffles the file
    order (and, for in-memory sources, the records) with that seed.
    Sources must accept a tensor here; tfds forwards it to
    `tfds.ReadConfig(shuffle_seed=...)`, documented as a `tf.int64` seed
    forwarded to `tf.data.Dataset.shuffle`.
  - Called once per epoch; must be cheap to build (no I/O beyond listing).
* `decode(payload, seed) -> (image, label)`: the part that can fail on a
  corrupt record (parse, decode, crop). `image` matches `image_spec` (dtype;
  shape, possibly with unknown dims); `label` is an int scalar class id.
* `finish(image, seed) -> image`: the rest (resize, flip, scaling); float32
  in [0, 1] of shape `output_shape`. Training outputs lie on the 1/255 grid
  (uint8 levels / 255), so AutoAugment, which the pipeline applies after
  `finish` on the uint8 image, sees exactly the image the model would see
  without it.

The input pipeline (`pipeline.py`) adds everything common: epochs,
shuffling, per-element seeds, AutoAugment, the corrupt-record guard,
eval padding, batching, prefetch.
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


# records(input_context, file_seed, *, by_record=False) -> tf.data.Dataset;
# file_seed: None, a Python int or an int64 scalar tensor.
Records = Callable[..., tf.data.Dataset]
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


def is_remote(path: str) -> bool:
  """A path with a scheme (gs://, s3://, ram://...), not a local one."""
  return "://" in path


def nearest_existing(path: str) -> Optional[str]:
  """`path` or its nearest ancestor that exists (local paths), else None."""
  path = os.path.abspath(path)
  while not tf.io.gfile.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
  return path


def blocking_file(path: Optional[str]) -> Optional[str]:
  """The file that keeps `path` from being (or becoming) a directory, or
  None: `path` itself when it names a file, else (local paths) the nearest
  existing ancestor when that is a file. On object stores (gs://) only the
  first is checked: "a/b" may exist there beside an object "a"."""
  if not path:
    return None
  if tf.io.gfile.exists(path):
    return None if tf.io.gfile.isdir(path) else path
  if is_remote(path):
    return None
  existing = nearest_existing(path)
  if existing and not tf.io.gfile.isdir(existing):
    return existing
  return None


def not_a_directory(what: str, path: Optional[str]) -> Optional[str]:
  """"<what> <path> is a file, not a directory" (or "<what> <path>: <its
  ancestor> is a file, ...") when `blocking_file(path)`, else None."""
  blocker = blocking_file(path)
  if blocker is None:
    return None
  where = f"{what} {path}" if blocker == path else f"{what} {path}: {blocker}"
  return f"{where} is a file, not a directory"


def check_data_dir(data_dir: Optional[str], needs: str, what="data_dir"):
  """ValueError (one line) when `data_dir` names a file, or lies under one;
  `needs` says what the dataset wants there."""
  problem = not_a_directory(what, data_dir)
  if problem:
    raise ValueError(f"{problem}; {needs}.")


def tfds_records(builder, tfds_split: str, is_training: bool, *,
                 cycle_length: int = 16):
  """`Source.records` for a tfds dataset with an "image" (encoded bytes,
  not decoded) and a "label" feature; location from tfds ids.

  Training (`file_seed` given, a Python int or an int64 tensor): tfds
  shuffles its shard order with `ReadConfig(shuffle_seed=file_seed)` and
  reads with a deterministic interleave; no autocache (each epoch is a new
  dataset, a cache would be rebuilt every epoch). Sharding: by tfds shard
  when every pipeline gets one, else (and with `by_record`) a contiguous
  `tfds.even_splits` slice of the split, whose sizes differ by at most one;
  each pipeline then reads only its slice.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    num_shards = builder.info.splits[tfds_split].num_shards
  except (KeyError, AttributeError, TypeError):  # Unknown (e.g. mocked).
    num_shards = 0

  def records(context: tf.distribute.InputContext, file_seed, *,
              by_record: bool = False):
    pipelines = context.num_input_pipelines
    by_file = not by_record and (pipelines == 1 or
                                 shard_by_file(num_shards, context))
    shuffle = bool(is_training and file_seed is not None)
    read_config = tfds.ReadConfig(
        add_tfds_id=True,
        shuffle_seed=file_seed if shuffle else None,
        shuffle_reshuffle_each_iteration=True,
        interleave_cycle_length=cycle_length,
        try_autocache=not shuffle,
        input_context=context if by_file and pipelines > 1 else None)
    split = tfds_split
    if not by_file and pipelines > 1:  # A contiguous 1/pipelines slice.
      split = tfds.even_splits(tfds_split, n=pipelines)[
          context.input_pipeline_id]
    ds = builder.as_dataset(
        split=split, shuffle_files=shuffle,
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
