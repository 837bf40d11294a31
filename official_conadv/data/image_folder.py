"""A class-per-subfolder directory of JPEG/PNG images.

On disk:
  data_dir/train/<class_name>/*.jpg|*.jpeg|*.png   (any depth below <class>)
  data_dir/validation/<class_name>/...
Class ids are the sorted class names of `data_dir/train` (0, 1, ...), so
both splits agree; a validation class missing from train is an error.
Preprocessing is ImageNet's (Inception crop / center crop, `preprocessing`).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from official_conadv.data import imagenet
from official_conadv.data import source as source_lib

EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = {source_lib.TRAIN: "train", source_lib.EVAL: "validation"}


def _layout(data_dir) -> str:
  return (f"put one sub-folder per class holding {'/'.join(EXTENSIONS)} "
          f"files in {data_dir}/train/<class>/ and "
          f"{data_dir}/validation/<class>/")


def split_dir(data_dir: Optional[str], split: str) -> str:
  split = source_lib.canonical_split(split)
  if not data_dir:
    raise ValueError("image_folder needs data_dir: " + _layout("DATA_DIR")
                     + ".")
  source_lib.check_data_dir(data_dir, "image_folder needs a directory: "
                            + _layout("DATA_DIR"))
  path = source_lib.join(data_dir, SPLIT_DIRS[split])
  if not source_lib.is_dir(path):
    raise ValueError(f"No directory {path}: {_layout(data_dir)}.")
  return path


def class_names(data_dir: Optional[str], split: str = "train") -> List[str]:
  """Sorted names of the class sub-folders of data_dir/train (or of the
  given split's folder)."""
  root = split_dir(data_dir, split)
  names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root)
                 if tf.io.gfile.isdir(source_lib.join(root, n.rstrip("/"))))
  if not names:
    raise ValueError(f"No class sub-folders in {root}: {_layout(data_dir)}.")
  return names


def list_images(data_dir: Optional[str], split: str,
                classes: Optional[Sequence[str]] = None
               ) -> Tuple[List[str], np.ndarray]:
  """(sorted image paths, int32 class ids) of a split."""
  root = split_dir(data_dir, split)
  classes = list(classes or class_names(data_dir, "train"))
  ids: Dict[str, int] = {c: i for i, c in enumerate(classes)}
  paths, labels = [], []
  for name in class_names(data_dir, split):
    if name not in ids:
      raise ValueError(f"Class folder {name!r} of {root} is not among the "
                       f"{len(classes)} train classes.")
    for dirpath, _, files in tf.io.gfile.walk(source_lib.join(root, name)):
      for f in sorted(files):
        if f.lower().endswith(EXTENSIONS):
          paths.append(source_lib.join(dirpath, f))
          labels.append(ids[name])
  if not paths:
    raise ValueError(f"No {'/'.join(EXTENSIONS)} images in {root}: "
                     f"{_layout(data_dir)}.")
  order = np.argsort(paths, kind="stable")
  return [paths[i] for i in order], np.asarray(labels, np.int32)[order]


def records_from_paths(paths: Sequence[str], labels: np.ndarray):
  """`Source.records` for a list of image files: a fixed pseudo-random order
  (so a partial eval pass sees every class, not the first few folders),
  shard by element, and for training shuffle the list per epoch."""
  order = np.random.RandomState(0).permutation(len(paths))
  paths = [paths[i] for i in order]
  labels = np.asarray(labels)[order]

  def records(context: tf.distribute.InputContext, file_seed, *,
              by_record: bool = False):
    del by_record  # Always by element.
    ds = tf.data.Dataset.from_tensor_slices({
        "file": paths, "index": np.zeros(len(paths), np.int64),
        "path": paths, "label": labels})
    ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
    if file_seed is not None:
      ds = ds.shuffle(len(paths), seed=file_seed,
                      reshuffle_each_iteration=True)
    return ds

  return records


def source(split: str, *, data_dir: str, image_size: int, is_training: bool,
           resize_method: str = "bicubic",
           classes: Optional[Sequence[str]] = None,
           num_examples: Optional[int] = None) -> source_lib.Source:
  """An image folder (module docstring); `classes` overrides the class list
  (ids follow its order)."""
  split = source_lib.canonical_split(split)
  classes = list(classes or class_names(data_dir, "train"))
  paths, labels = list_images(data_dir, split, classes)
  return imagenet.inception_source(
      "image_folder", split, records_from_paths(paths, labels),
      lambda p: (tf.io.read_file(p["path"]), p["label"]),
      image_size=image_size, is_training=is_training,
      resize_method=resize_method, num_examples=num_examples or len(paths),
      num_classes=len(classes))


def num_examples(data_dir: str, split: str) -> int:
  return len(list_images(data_dir, split)[0])

