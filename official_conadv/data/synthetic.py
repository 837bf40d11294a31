"""Synthetic on-disk datasets for tests and benchmarks (nothing downloaded).

`write_imagenet_tfrecords` writes shards in the standard ImageNet TFRecord
format (`image/encoded` JPEG bytes, `image/class/label` 1-based int64), so
the real pipeline runs on them unchanged; `write_image_folder` writes a
class-per-subfolder tree of JPEG/PNG files.
"""

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf


def random_image(rng: np.random.RandomState, height: int, width: int,
                 channels: int = 3) -> np.ndarray:
  """A smooth random uint8 image (compresses like a photo, not like noise)."""
  coarse = rng.randint(0, 256, (max(2, height // 8), max(2, width // 8),
                                channels)).astype(np.float32)
  image = tf.image.resize(coarse[None], (height, width), method="bicubic")[0]
  image = image + rng.normal(0, 6, (height, width, channels))
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
  if fmt == "jpeg":
    return tf.io.encode_jpeg(image, quality=quality).numpy()
  if fmt == "png":
    return tf.io.encode_png(image).numpy()
  raise ValueError(f"fmt must be 'jpeg' or 'png', got {fmt!r}.")


def imagenet_example(image_bytes: bytes, label: int) -> bytes:
  """A serialized standard ImageNet tf.train.Example."""
  feature = {
      "image/encoded": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      "image/class/label": tf.train.Feature(
          int64_list=tf.train.Int64List(value=[label])),
      "image/format": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[b"JPEG"])),
  }
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


def write_imagenet_tfrecords(
    directory: str, *, prefix: str = "train", num_files: int = 2,
    per_file: Union[int, Sequence[int]] = 4,
    size: Tuple[int, int] = (48, 64),
    num_classes: int = 1000, label_offset: int = 1, seed: int = 0,
    corrupt: Sequence[Tuple[int, int]] = (), num_distinct: Optional[int] = None
) -> List[Tuple[str, List[int]]]:
  """Writes `num_files` shards `prefix-0000i-of-0000n` of JPEG Examples.

  Args:
    per_file: records per file, or one count per file (then num_files is
      ignored).
    size: (height, width) of every image.
    corrupt: (file, record) positions whose image/encoded gets garbage bytes.
    num_distinct: encode only this many distinct images and cycle them (fast
      for large benchmark files); None: every image distinct.

  Returns:
    [(path, [label of each record, 0-based])] per file. The class of record
    r of file f is (records in the files before f + r) % num_classes, so
    labels number the records when num_classes is large enough.
  """
  counts = ([per_file] * num_files if isinstance(per_file, int)
            else list(per_file))
  num_files = len(counts)
  tf.io.gfile.makedirs(directory)
  rng = np.random.RandomState(seed)
  cache = {}
  out = []
  for f, count in enumerate(counts):
    path = os.path.join(directory,
                        f"{prefix}-{f:05d}-of-{num_files:05d}")
    labels = []
    with tf.io.TFRecordWriter(path) as writer:
      for r in range(count):
        n = sum(counts[:f]) + r
        label = n % num_classes
        key = n if num_distinct is None else n % num_distinct
        if key not in cache:
          cache[key] = encode(random_image(rng, *size))
        data = cache[key]
        if (f, r) in set(corrupt):
          data = b"this is not an image" + bytes(range(64))
        writer.write(imagenet_example(data, label + label_offset))
        labels.append(label)
    out.append((path, labels))
  return out


def write_image_folder(directory: str, classes: Sequence[str], *,
                       per_class: int = 3, size: Tuple[int, int] = (40, 52),
                       fmt: str = "png", seed: int = 0,
                       splits: Sequence[str] = ("train", "validation")):
  """Writes directory/<split>/<class>/img_<i>.<fmt> images."""
  rng = np.random.RandomState(seed)
  ext = "jpg" if fmt == "jpeg" else fmt
  for split in splits:
    for c in classes:
      d = os.path.join(directory, split, c)
      tf.io.gfile.makedirs(d)
      for i in range(per_class):
        with tf.io.gfile.GFile(os.path.join(d, f"img_{i}.{ext}"), "wb") as f:
          f.write(encode(random_image(rng, *size), fmt))
