"""Training stream tests: data epochs, exact and cheap resume (start_step),
finite windows (num_steps), on TFRecords written by the test, MNIST and
tfds (CPU, offline).

Record n of the TFRecord set has the 0-based class n (labels identify
records). `global_batch_size=4` on one pipeline: 4 elements per step;
`steps_per_epoch=3`: an epoch is exactly the 12 records.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from official_conadv.data import input_pipeline as ip
from official_conadv.data import registry
from official_conadv.data import source as source_lib
from official_conadv.data import synthetic

FILES = (4, 5, 3)  # 12 records in 3 files of different sizes.
NUM = sum(FILES)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("train"))
  synthetic.write_imagenet_tfrecords(d, prefix="train", per_file=FILES,
                                     size=(24, 30))
  synthetic.write_imagenet_tfrecords(d, prefix="validation", per_file=[1],
                                     size=(24, 30))
  return d


def _fn(data_dir, **kwargs):
  args = dict(data_dir=data_dir, image_size=16, global_batch_size=4,
              is_training=True, seed=3, shuffle_buffer=5, steps_per_epoch=3,
              num_examples=NUM)
  args.update(kwargs)
  return ip.make_dataset_fn("imagenet_tfrecord", "train", **args)


def _arrays(ds):
  return [tuple(t.numpy() for t in tf.nest.flatten(b)) for b in ds]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)


def test_epochs_hold_the_shard_once_each_reshuffled(data_dir):
  batches = _arrays(_fn(data_dir, num_steps=9)())
  assert len(batches) == 9
  labels = np.concatenate([y for _, y in batches])
  epochs = labels.reshape(3, NUM)
  for epoch in epochs:
    assert sorted(epoch) == list(range(NUM))
  assert len({tuple(e) for e in epochs}) == 3  # A new order every epoch.
  # Another seed, another order.
  other = np.concatenate([y for _, y in _arrays(
      _fn(data_dir, num_steps=3, seed=4)())])
  assert sorted(other) == list(range(NUM))
  assert not np.array_equal(other, epochs[0])


def test_short_shard_repeats_within_the_epoch(data_dir):
  # steps_per_epoch=5: an epoch is 20 positions of a 12-record shard.
  labels = np.concatenate([y for _, y in _arrays(
      _fn(data_dir, num_steps=5, steps_per_epoch=5)())])
  assert np.bincount(labels[:NUM], minlength=NUM).tolist() == [1] * NUM
  assert len(labels) == 20 and set(labels) == set(range(NUM))


@pytest.mark.parametrize("start,n", [(1, 2), (2, 3), (3, 3), (7, 4)])
def test_resume_is_bitwise_exact(data_dir, start, n):
  # Mid-epoch, across an epoch boundary, at one, two epochs in.
  full = _arrays(_fn(data_dir)().take(start + n))
  resumed = _arrays(_fn(data_dir, start_step=start, num_steps=n)())
  _assert_same(full[start:], resumed)


@pytest.mark.parametrize("replicas", [2, 4])
def test_resume_is_exact_with_two_input_pipelines(data_dir, replicas):
  # 3 files, 2 pipelines: by file, 7 and 5 records; global batch 8 is
  # 4 elements per step per pipeline, 3 steps per epoch: 12-position
  # epochs of a short shard. With 4 replicas, each pipeline yields two
  # batches of 2 per step.
  per_pipeline = replicas // 2
  seen = [set(), set()]
  for p in range(2):
    context = tf.distribute.InputContext(2, p, replicas)
    fn = _fn(data_dir, global_batch_size=8)
    full = _arrays(fn(context).take(6 * per_pipeline))
    resumed = _arrays(_fn(data_dir, global_batch_size=8, start_step=4,
                          num_steps=2)(context))
    assert len(resumed) == 2 * per_pipeline
    _assert_same(full[4 * per_pipeline:], resumed)
    seen[p] = {int(v) for _, y in full for v in y}
  assert seen == [{0, 1, 2, 3, 9, 10, 11}, {4, 5, 6, 7, 8}]


def test_resume_is_exact_on_in_memory_mnist():
  def fn(**kwargs):
    return ip.make_dataset_fn("mnist", "train", image_size=28,
                              global_batch_size=50, is_training=True, seed=1,
                              shuffle_buffer=100, **kwargs)()
  full = _arrays(fn().take(83))  # 80 steps per 4,000-digit epoch.
  _assert_same(full[78:], _arrays(fn(start_step=78, num_steps=5)))


def test_resume_is_exact_with_augment_pairs(data_dir):
  full = _arrays(_fn(data_dir, augment="test", augment_pair=True)().take(5))
  resumed = _arrays(_fn(data_dir, augment="test", augment_pair=True,
                        start_step=3, num_steps=2)())
  _assert_same(full[3:], resumed)


def _counting(monkeypatch):
  """Counts the records the pipeline pulls from its source."""
  reads = tf.Variable(0, dtype=tf.int64)
  make_source = registry.make_source

  def counting_source(*args, **kwargs):
    src = make_source(*args, **kwargs)

    def records(*a, **k):
      def count(record):
        with tf.control_dependencies([reads.assign_add(1)]):
          return tf.nest.map_structure(tf.identity, record)
      return src.records(*a, **k).map(count)

    return dataclasses.replace(src, records=records)

  monkeypatch.setattr(registry, "make_source", counting_source)
  return reads


def test_resume_cost_does_not_grow_with_the_step(data_dir, monkeypatch):
  reads = _counting(monkeypatch)

  def reads_to_run(start, **kwargs):
    reads.assign(0)
    list(_fn(data_dir, start_step=start, num_steps=1, **kwargs)())
    return int(reads.numpy())

  at_0, at_1, at_60 = reads_to_run(0), reads_to_run(1), reads_to_run(60)
  # One step reads 4 records through a 5-record shuffle buffer: 5 + 4 - 1.
  # Step 1 also passes the epoch's first 4 positions; 20 epochs in (step
  # 60) costs what step 0 does. Skipping from step 0 would read 240 + 8.
  assert (at_0, at_1, at_60) == (8, 12, 8)
  assert reads_to_run(61) == at_1
  assert reads_to_run(0, shuffle_buffer=1) == 4
  assert reads_to_run(62, shuffle_buffer=1) == 12


def test_skipped_corrupt_record_keeps_the_window_full(tmp_path):
  d = str(tmp_path)
  synthetic.write_imagenet_tfrecords(d, prefix="train", per_file=[6],
                                     size=(24, 24), corrupt=[(0, 3)])
  counter = ip.CorruptRecordCounter()
  ds = _fn(d, global_batch_size=2, num_examples=6, num_steps=3,
           skip_corrupt=True, corrupt_counter=counter)()
  labels = [y for _, y in _arrays(ds)]
  assert len(labels) == 3  # Made up from the next epoch.
  assert 3 not in np.concatenate(labels)
  assert counter.count >= 1
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"record index 3"):
    list(_fn(d, global_batch_size=2, num_examples=6, num_steps=3)())


def test_resume_after_a_corrupt_record_is_guarded(tmp_path):
  # The guard's gap scan starts at the resumed element.
  d = str(tmp_path)
  files = synthetic.write_imagenet_tfrecords(
      d, prefix="train", per_file=[6], size=(24, 24), corrupt=[(0, 3)])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=f"file {files[0][0]}, record index 3"):
    list(_fn(d, global_batch_size=2, num_examples=6, start_step=4,
             num_steps=3, shuffle_buffer=1)())


def test_nondeterministic_mode_still_covers_each_epoch(data_dir):
  labels = np.concatenate([y for _, y in _arrays(
      _fn(data_dir, num_steps=3, deterministic=False)())])
  assert sorted(labels) == list(range(NUM))


def test_tfds_source_resumes_exactly(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    def fn(**kwargs):
      return ip.make_dataset_fn(
          "cifar10", "train", data_dir=str(tmp_path), image_size=32,
          global_batch_size=4, is_training=True, seed=0, shuffle_buffer=6,
          steps_per_epoch=2, **kwargs)()
    full = _arrays(fn().take(7))
    resumed = _arrays(fn(start_step=5, num_steps=2))
  _assert_same(full[5:], resumed)


def test_tfds_records_take_a_tensor_file_seed(tmp_path):
  # A real prepared tfds dataset (not mocked): tfds.ReadConfig gets the
  # per-epoch seed as a tensor inside flat_map.
  builder = tfds.testing.DummyMnist(data_dir=str(tmp_path))
  builder.download_and_prepare()
  records = source_lib.tfds_records(builder, "train", is_training=True)

  def epoch(e):
    tf.random.set_seed(1)  # In the traced function's graph only.
    return records(tf.distribute.InputContext(), e * 7 + 1).map(
        lambda r: r["index"])

  indices = list(tf.data.Dataset.range(2, 4).flat_map(epoch)
                 .as_numpy_iterator())
  n = builder.info.splits["train"].num_examples
  assert sorted(indices[:n]) == sorted(indices[n:]) == list(range(n))


def test_corrupt_last_record_of_a_window_fails(tmp_path):
  # The window's last position is corrupt: nothing after it in the window,
  # yet it must fail (not end one batch short).
  d = str(tmp_path)
  files = synthetic.write_imagenet_tfrecords(
      d, prefix="train", per_file=[6], size=(24, 24), corrupt=[(0, 5)])
  fn = _fn(d, global_batch_size=2, num_examples=6, num_steps=3,
           shuffle_buffer=1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=f"file {files[0][0]}, record index 5"):
    list(fn())
  # Stopping before it: 2 steps, no error.
  assert len(list(_fn(d, global_batch_size=2, num_examples=6, num_steps=2,
                      shuffle_buffer=1)())) == 2
