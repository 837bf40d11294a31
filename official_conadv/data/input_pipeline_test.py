"""Tests for input_pipeline.py on TFRecords written by the test (CPU, offline).

The shards use the standard ImageNet format (1-based labels); record r of
file f has the 0-based class f * per_file + r, so labels identify records.
"""

import types

import numpy as np
import pytest
import tensorflow as tf

from official_conadv.data import input_pipeline as ip
from official_conadv.data import synthetic

TRAIN_FILES, PER_FILE = 3, 4     # 12 train records, classes 0..11.
VAL_PER_FILE = 5                 # 1 validation file, classes 0..4.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("imagenet_tfrecord"))
  synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=TRAIN_FILES,
                                     per_file=PER_FILE, size=(40, 56))
  synthetic.write_imagenet_tfrecords(d, prefix="validation", num_files=1,
                                     per_file=VAL_PER_FILE, size=(40, 56))
  return d


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("corrupt"))
  files = synthetic.write_imagenet_tfrecords(
      d, prefix="train", num_files=1, per_file=6, size=(24, 24),
      corrupt=[(0, 3)])
  synthetic.write_imagenet_tfrecords(d, prefix="validation", num_files=1,
                                     per_file=2, size=(24, 24))
  return d, files[0][0]


def _build(data_dir, split="train", context=None, **kwargs):
  args = dict(data_dir=data_dir, image_size=32, global_batch_size=4,
              is_training=True, seed=0)
  args.update(kwargs)
  return ip.make_dataset_fn("imagenet_tfrecord", split, **args)(context)


def _labels(ds):
  return sorted(int(v) for _, y in ds for v in y.numpy())


def test_train_batches(data_dir):
  for images, labels in _build(data_dir).take(4):  # Repeats past 12.
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert labels.shape == (4,) and labels.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 1.0
    assert set(labels.numpy()) <= set(range(12))


def test_eval_one_pass_with_partial_batch(data_dir):
  ds = _build(data_dir, "validation", is_training=False,
              global_batch_size=2, image_size=24)
  shapes = [x.shape[0] for x, _ in ds]
  assert shapes == [2, 2, 1]
  assert _labels(ds) == list(range(VAL_PER_FILE))
  full = _build(data_dir, "eval", is_training=False, global_batch_size=2,
                drop_remainder=True)
  assert [x.shape[0] for x, _ in full] == [2, 2]
  assert full.element_spec[0].shape.as_list() == [2, 32, 32, 3]


def test_eval_is_deterministic_and_ordered(data_dir):
  ds = _build(data_dir, "eval", is_training=False, global_batch_size=1,
              deterministic=True)
  assert [int(y[0]) for _, y in ds] == list(range(VAL_PER_FILE))
  a = np.concatenate([x.numpy() for x, _ in ds])
  b = np.concatenate([x.numpy() for x, _ in ds])
  np.testing.assert_array_equal(a, b)


def test_label_offset(data_dir):
  ds = _build(data_dir, "eval", is_training=False, global_batch_size=1,
              label_offset=0, deterministic=True)
  assert [int(y[0]) for _, y in ds] == list(range(1, VAL_PER_FILE + 1))


def test_label_out_of_range_names_label_offset(data_dir):
  ds = _build(data_dir, "eval", is_training=False, global_batch_size=1,
              label_offset=2)  # Class 0 (stored as 1) becomes -1.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"Label out of range \[0, 1000\): -1.*label_offset"):
    list(ds)


def test_one_hot(data_dir):
  _, labels = next(iter(_build(data_dir, one_hot=1000)))
  assert labels.shape == (4, 1000) and labels.dtype == tf.float32
  np.testing.assert_array_equal(tf.reduce_sum(labels, -1), np.ones(4))


@pytest.mark.parametrize("split,total", [("train", TRAIN_FILES * PER_FILE),
                                         ("validation", VAL_PER_FILE)])
def test_two_input_pipelines_are_disjoint(data_dir, split, total):
  # train: 3 files -> sharded by file; validation: 1 file -> by record.
  seen = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
    ds = _build(data_dir, split, context, is_training=False,
                global_batch_size=2)
    assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    seen.append(_labels(ds))
  assert seen[0] and seen[1]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(total))


def test_two_pipelines_train_shards_are_disjoint(data_dir):
  seen = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(2, pipeline, 2)
    ds = _build(data_dir, "train", context, global_batch_size=2)
    seen.append(set(int(v) for _, y in ds.take(12) for v in y.numpy()))
  assert not seen[0] & seen[1]


def test_per_replica_batch_size(data_dir):
  context = tf.distribute.InputContext(num_input_pipelines=1,
                                       input_pipeline_id=0,
                                       num_replicas_in_sync=4)
  ds = _build(data_dir, context=context, global_batch_size=8)
  assert ds.element_spec[0].shape.as_list() == [2, 32, 32, 3]


def test_batch_not_divisible_by_replicas(data_dir):
  fn = ip.make_dataset_fn("imagenet_tfrecord", "train", data_dir=data_dir,
                          image_size=32, global_batch_size=8,
                          is_training=True)
  with pytest.raises(ValueError, match="8 is not divisible by the number of "
                     r"replicas \(3\)"):
    fn(tf.distribute.InputContext(1, 0, 3))
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(name="mnist", data_dir=None, image_size=28)
  with pytest.raises(ValueError, match="not divisible"):
    ip.distributed_dataset(strategy, data, split="train", is_training=True,
                           global_batch_size=5)


def test_deterministic_mode_repeats_batches(data_dir):
  def first(seed):
    ds = _build(data_dir, seed=seed, deterministic=True, shuffle_buffer=8)
    return [(x.numpy(), y.numpy()) for x, y in ds.take(4)]

  a, b, c = first(3), first(3), first(4)
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_skip_batches_resumes_exactly(data_dir):
  full = [x.numpy() for x, _ in _build(data_dir, deterministic=True).take(5)]
  resumed = [x.numpy() for x, _ in
             _build(data_dir, deterministic=True, skip_batches=2).take(3)]
  for a, b in zip(full[2:], resumed):
    np.testing.assert_array_equal(a, b)


def test_corrupt_record_fails_with_its_location(corrupt_dir):
  d, path = corrupt_dir
  ds = _build(d, is_training=False, global_batch_size=1)
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    list(ds)
  assert f"file {path}, record index 3" in str(e.value)
  assert "skip_corrupt=True" in str(e.value)


def test_corrupt_record_skipped_and_counted(corrupt_dir):
  d, path = corrupt_dir
  counter = ip.CorruptRecordCounter()
  ds = _build(d, is_training=False, global_batch_size=1, skip_corrupt=True,
              corrupt_counter=counter)
  assert _labels(ds) == [0, 1, 2, 4, 5]
  assert counter.count == 1 and int(counter) == 1
  assert counter.locations == [(path, 3)]
  counter.reset()
  assert counter.count == 0 and counter.locations == []


def test_last_record_corrupt_and_truncated_file(tmp_path):
  # A corrupt last record (nothing after it in the pass) and a TFRecord file
  # cut in its last record (an error before decoding: unknown location).
  d = str(tmp_path)
  files = synthetic.write_imagenet_tfrecords(
      d, prefix="train", num_files=2, per_file=3, size=(24, 24),
      corrupt=[(1, 2)])
  path = files[0][0]
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-20])
  counter = ip.CorruptRecordCounter()
  ds = _build(d, is_training=False, global_batch_size=1, skip_corrupt=True,
              corrupt_counter=counter, deterministic=True)
  assert _labels(ds) == [0, 1, 3, 4]
  assert sorted(counter.locations) == sorted([("<unknown>", -1),
                                              (files[1][0], 2)])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="Corrupt or unreadable image record"):
    list(_build(d, is_training=False, global_batch_size=1))


def test_corrupt_record_default_counter_in_training(corrupt_dir):
  d, _ = corrupt_dir
  before = ip.corrupt_records_skipped()
  ds = _build(d, global_batch_size=5, skip_corrupt=True)
  labels = next(iter(ds))[1].numpy()
  assert 3 not in labels and len(labels) == 5
  # At least the one in the first epoch; prefetching may read further.
  assert ip.corrupt_records_skipped() >= before + 1


def test_distributed_dataset_on_two_replicas(corrupt_dir):
  d, _ = corrupt_dir
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(
      name="imagenet_tfrecord", data_dir=d, image_size=24, autoaugment=None,
      label_smoothing=0.1, shuffle_buffer=16, deterministic=True,
      skip_corrupt=True)
  counter = ip.CorruptRecordCounter()
  dist = ip.distributed_dataset(strategy, data, split="train",
                                is_training=True, global_batch_size=4,
                                num_classes=1000, seed=0,
                                corrupt_counter=counter)
  iterator = iter(dist)
  for _ in range(3):  # 12 images: two passes over the 5 good records.
    images, labels = next(iterator)
    local = strategy.experimental_local_results(images)
    assert [t.shape.as_list() for t in local] == [[2, 24, 24, 3]] * 2
    assert strategy.experimental_local_results(labels)[0].shape == (2, 1000)
  assert counter.count >= 2


def test_missing_and_empty_data_dir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=r"train-00000-of-01024.*does not "
                     "exist|does not exist.*train-00000-of-01024"):
    _build(missing)
  with pytest.raises(ValueError, match=f"in {tmp_path} .has no such files"):
    _build(str(tmp_path))
  with pytest.raises(ValueError, match="needs data_dir"):
    _build(None)
  with pytest.raises(ValueError) as e:
    ip.check_data("imagenet_tfrecord", str(tmp_path))
  assert len(str(e.value).splitlines()) == 1


def test_check_data_needs_both_splits(tmp_path):
  d = str(tmp_path)
  synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=1,
                                     per_file=1)
  with pytest.raises(ValueError, match="'validation-\\*'"):
    ip.check_data("imagenet_tfrecord", d)
  synthetic.write_imagenet_tfrecords(d, prefix="validation", num_files=1,
                                     per_file=1)
  ip.check_data("imagenet_tfrecord", d)


def test_argument_errors(data_dir):
  with pytest.raises(ValueError, match="Unknown dataset"):
    ip.make_dataset_fn("imagenet", "train", image_size=8,
                       global_batch_size=1, is_training=True)
  with pytest.raises(ValueError, match="Unknown split"):
    _build(data_dir, "dev")
  with pytest.raises(ValueError, match="training pipelines only"):
    _build(data_dir, is_training=False, augment="v0")
  with pytest.raises(ValueError, match="global_batch_size must be > 0"):
    _build(data_dir, global_batch_size=0)


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


def test_measure_throughput(data_dir):
  rate = ip.measure_throughput(_build(data_dir), num_batches=3, warmup=1)
  assert rate > 0
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(name="imagenet_tfrecord", data_dir=data_dir,
                               image_size=32)
  dist = ip.distributed_dataset(strategy, data, split="train",
                                is_training=True, global_batch_size=4)
  assert ip.measure_throughput(dist, num_batches=2, warmup=1) > 0

