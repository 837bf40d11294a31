r"""Writes the committed test fixtures of testdata/ (see testdata/README.md).

  python testdata/make_testdata.py                    # rewrites testdata/
  python -m testdata.make_testdata --output_dir=/tmp/fixtures

Deterministic: fixed seeds (numpy's legacy `RandomState`, whose streams are
frozen), JPEG/PNG bytes from TensorFlow's encoders with fixed settings,
uncompressed TFRecords of Examples serialized with sorted map keys. Two runs
write byte-identical files; `official_conadv/data/testdata_test.py` checks
that the committed fixtures equal a fresh run. Only numpy and TensorFlow are
imported (no repo modules), so a change elsewhere cannot change the bytes.

Fixtures (paths relative to the output directory):

* `image_folder/`: the layout `official_conadv/data/image_folder.py` reads,
  `{train,validation}/<class>/*`, classes ant, moth, zebra; train 3 JPEGs per
  class plus one PNG and one non-image file (`notes.txt`, to be ignored) in
  ant, validation 2 JPEGs per class; 16x16 RGB.
* `imagenet_tfrecord/`: one train and one validation shard in the ImageNet
  TFRecord format `official_conadv/data/imagenet.py` reads (as written by
  the TF ResNet `imagenet_to_gcs.py` script): `image/encoded` JPEG,
  `image/class/label` 1-based int64 in [1, 1000], plus that script's
  height, width, colorspace, channels, synset, format and filename
  features; 16x24 (HxW) RGB.
"""

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_FOLDER = "image_folder"
IMAGENET_TFRECORD = "imagenet_tfrecord"
# The subdirectories this script owns: files in them that it did not write
# are deleted, so a rerun leaves exactly the fixtures.
MANAGED = (IMAGE_FOLDER, IMAGENET_TFRECORD)

# image_folder: class -> base RGB colour (classes differ by colour).
FOLDER_CLASSES = {"ant": (200, 60, 40), "moth": (60, 180, 70),
                  "zebra": (50, 70, 200)}
FOLDER_SIZE = (16, 16)
FOLDER_TRAIN_PER_CLASS = 3
FOLDER_VALIDATION_PER_CLASS = 2

# imagenet_tfrecord: (1-based label, synset) of the records, in file order.
# Labels follow the sorted-synset numbering of the ImageNet shards (1 =
# n01440764 ... 1000 = n15075141); 1000 is there to test the label offset at
# the top of the range.
IMAGENET_TRAIN = ((1, "n01440764"), (2, "n01443537"), (3, "n01484850"),
                  (4, "n01491361"), (5, "n01494475"), (6, "n01496331"),
                  (7, "n01498041"), (1000, "n15075141"))
IMAGENET_VALIDATION = ((1, "n01440764"), (2, "n01443537"),
                       (3, "n01484850"), (1000, "n15075141"))
IMAGENET_SIZE = (16, 24)
JPEG_QUALITY = 90


def image(rng: np.random.RandomState, size: Tuple[int, int],
          color: Sequence[int]) -> np.ndarray:
  """A smooth uint8 RGB image around `color` with a little seeded noise."""
  height, width = size
  rows = np.linspace(0.0, 1.0, height)[:, None, None]
  cols = np.linspace(0.0, 1.0, width)[None, :, None]
  base = np.asarray(color, np.float64)[None, None, :]
  pixels = (base * (0.6 + 0.4 * rows) + 40.0 * cols +
            rng.normal(0.0, 8.0, (height, width, 3)))
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
  return tf.io.encode_jpeg(pixels, format="rgb", quality=JPEG_QUALITY,
                           progressive=False, optimize_size=False,
                           chroma_downsampling=True).numpy()


def encode_png(pixels: np.ndarray) -> bytes:
  return tf.io.encode_png(pixels, compression=9).numpy()


def label_color(label: int) -> Tuple[int, int, int]:
  """A distinct colour per ImageNet label."""
  rng = np.random.RandomState(label)
  return tuple(int(v) for v in rng.randint(30, 226, 3))


def imagenet_example(jpeg: bytes, label: int, synset: str, filename: str,
                     size: Tuple[int, int]) -> bytes:
  """A serialized Example in the `imagenet_to_gcs.py` format."""

  def b(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  def i(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  example = tf.train.Example(features=tf.train.Features(feature={
      "image/height": i(size[0]),
      "image/width": i(size[1]),
      "image/colorspace": b(b"RGB"),
      "image/channels": i(3),
      "image/class/label": i(label),
      "image/class/synset": b(synset.encode()),
      "image/format": b(b"JPEG"),
      "image/filename": b(filename.encode()),
      "image/encoded": b(jpeg),
  }))
  return example.SerializeToString(deterministic=True)


def image_folder_files() -> Dict[str, bytes]:
  """{relative path: bytes} of the image_folder fixture."""
  files = {}
  rng = np.random.RandomState(0)
  for split, per_class in (("train", FOLDER_TRAIN_PER_CLASS),
                           ("validation", FOLDER_VALIDATION_PER_CLASS)):
    for name, color in sorted(FOLDER_CLASSES.items()):
      for k in range(per_class):
        files[f"{IMAGE_FOLDER}/{split}/{name}/img_{k}.jpg"] = encode_jpeg(
            image(rng, FOLDER_SIZE, color))
  files[f"{IMAGE_FOLDER}/train/ant/img_{FOLDER_TRAIN_PER_CLASS}.png"] = (
      encode_png(image(rng, FOLDER_SIZE, FOLDER_CLASSES["ant"])))
  files[f"{IMAGE_FOLDER}/train/ant/notes.txt"] = (
      b"Not an image: the image_folder reader must skip this file.\n")
  return files


def imagenet_records() -> Dict[str, List[bytes]]:
  """{relative shard path: serialized Examples} of the imagenet_tfrecord
  fixture."""
  shards = {}
  rng = np.random.RandomState(1)
  for split, records in (("train", IMAGENET_TRAIN),
                         ("validation", IMAGENET_VALIDATION)):
    examples = []
    for k, (label, synset) in enumerate(records):
      jpeg = encode_jpeg(image(rng, IMAGENET_SIZE, label_color(label)))
      filename = (f"{synset}_{k}.JPEG" if split == "train" else
                  f"ILSVRC2012_val_{k + 1:08d}.JPEG")
      examples.append(imagenet_example(jpeg, label, synset, filename,
                                       IMAGENET_SIZE))
    shards[f"{IMAGENET_TFRECORD}/{split}-00000-of-00001"] = examples
  return shards


def write_all(output_dir: str = HERE) -> List[str]:
  """Writes every fixture under `output_dir`; returns their relative paths,
  sorted. Other files in the managed subdirectories are deleted."""
  written = []
  for rel, data in image_folder_files().items():
    path = os.path.join(output_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    written.append(rel)
  for rel, examples in imagenet_records().items():
    path = os.path.join(output_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
      for example in examples:
        writer.write(example)
    written.append(rel)
  keep = set(written)
  for sub in MANAGED:
    for dirpath, _, names in os.walk(os.path.join(output_dir, sub)):
      for name in names:
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, output_dir).replace(os.sep, "/")
        if rel not in keep:
          os.remove(path)
  return sorted(written)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", default=HERE,
                      help="Where to write the fixtures (default: testdata/).")
  args = parser.parse_args(argv)
  written = write_all(args.output_dir)
  total = sum(os.path.getsize(os.path.join(args.output_dir, *p.split("/")))
              for p in written)
  print(f"Wrote {len(written)} files, {total} bytes, in {args.output_dir}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
