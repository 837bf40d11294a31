"""Tests for the input pipeline (pipeline.py, through its entry point
input_pipeline.py) on TFRecords written by the test (CPU, offline): batches,
sharding, corrupt records, and the padded eval pass. Resuming and epochs:
input_pipeline_resume_test.py; the datasets by name: registry_test.py;
DataSource and distributed datasets: datasource_test.py.

The shards use the standard ImageNet format (1-based labels); records are
numbered across files and record n has the 0-based class n, so labels
identify records.
"""

import types

import numpy as np
import pytest
import tensorflow as tf

from official_conadv import distribute_utils
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


EVAL_FILES = (5, 7, 2)             # Uneven eval files: classes 0..13.
NUM_EVAL = sum(EVAL_FILES)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("uneven"))
  synthetic.write_imagenet_tfrecords(d, prefix="validation",
                                     per_file=EVAL_FILES, size=(20, 28))
  synthetic.write_imagenet_tfrecords(d, prefix="train", per_file=[1],
                                     size=(20, 28))
  return d


def _build(data_dir, split="train", context=None, **kwargs):
  args = dict(data_dir=data_dir, image_size=32, global_batch_size=4,
              is_training=True, seed=0)
  args.update(kwargs)
  return ip.make_dataset_fn("imagenet_tfrecord", split, **args)(context)


def _eval(data_dir, context=None, **kwargs):
  args = dict(is_training=False, num_examples=NUM_EVAL, image_size=16)
  args.update(kwargs)
  return _build(data_dir, "validation", context, **args)


def _labels(ds):
  return sorted(int(v) for y in _real_labels(ds) for v in y)


def _real_labels(ds):
  """Labels of the real (weight 1) images of an eval dataset, per batch."""
  out = []
  for _, y, w in ds:
    w = w.numpy()
    assert set(np.unique(w)) <= {0.0, 1.0}
    out.append(y.numpy()[w == 1.0])
  return out


def _check_padding(images, labels, weights):
  """Zero-weight slots hold a zeros image and label 0 (or a zero one-hot)."""
  pad = weights.numpy() == 0.0
  assert not images.numpy()[pad].any()
  assert not labels.numpy()[pad].any()


def test_train_batches(data_dir):
  for images, labels in _build(data_dir).take(4):  # Repeats past 12.
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert labels.shape == (4,) and labels.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 1.0
    assert set(labels.numpy()) <= set(range(12))


def test_eval_pads_and_masks_every_image_once(eval_dir):
  # 14 images in files of 5, 7 and 2, batch 4: 4 batches, 2 padding slots.
  assert ip.num_eval_steps(NUM_EVAL, 4) == 4
  ds = _eval(eval_dir, global_batch_size=4)
  assert [s.shape.as_list() for s in ds.element_spec] == [
      [4, 16, 16, 3], [4], [4]]
  assert ds.element_spec[2].dtype == tf.float32
  batches = list(ds)
  assert len(batches) == 4
  weights = np.concatenate([w.numpy() for _, _, w in batches])
  np.testing.assert_array_equal(weights, [1.0] * NUM_EVAL + [0.0] * 2)
  assert _labels(batches) == list(range(NUM_EVAL))
  for batch in batches:
    _check_padding(*batch)
  real = np.concatenate([x.numpy() for x, _, _ in batches])[:NUM_EVAL]
  assert (real.reshape(NUM_EVAL, -1).max(-1) > 0).all()


def test_eval_is_deterministic_and_ordered(data_dir):
  ds = _eval(data_dir, global_batch_size=1, num_examples=VAL_PER_FILE)
  assert [int(y[0]) for _, y, _ in ds] == list(range(VAL_PER_FILE))
  a = np.concatenate([x.numpy() for x, _, _ in ds])
  b = np.concatenate([x.numpy() for x, _, _ in ds])
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pipelines,batch", [(2, 4), (3, 6), (2, 8)])
def test_eval_shards_by_record_across_pipelines(eval_dir, pipelines, batch):
  # Every real image once across pipelines, shards of 7/7, 5/5/4, 7/7 (by
  # record, though 3 files would allow a by-file shard of 5+2 / 7).
  steps = ip.num_eval_steps(NUM_EVAL, batch, pipelines)
  assert steps == {(2, 4): 4, (3, 6): 3, (2, 8): 2}[(pipelines, batch)]
  seen, sizes = [], []
  for p in range(pipelines):
    context = tf.distribute.InputContext(pipelines, p, pipelines)
    ds = _eval(eval_dir, context, global_batch_size=batch)
    batches = list(ds)
    assert len(batches) == steps
    assert ds.element_spec[0].shape[0] == batch // pipelines
    for b in batches:
      _check_padding(*b)
    labels = [int(v) for y in _real_labels(batches) for v in y]
    sizes.append(len(labels))
    seen.extend(labels)
  assert sorted(seen) == list(range(NUM_EVAL))
  assert max(sizes) - min(sizes) <= 1


def test_eval_on_two_replicas_repeats_whole_passes(eval_dir):
  strategy = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
  data = types.SimpleNamespace(
      name="imagenet_tfrecord", data_dir=eval_dir, image_size=16,
      label_smoothing=0.1, num_eval_examples=NUM_EVAL)
  assert ip.num_input_pipelines(strategy) == 1
  steps = ip.num_eval_steps(NUM_EVAL, 6, 1)  # 3 steps, 18 slots.
  dist = ip.distributed_dataset(strategy, data, split="eval",
                                is_training=False, global_batch_size=6,
                                num_classes=1000)
  iterator = iter(dist)
  passes = []
  for _ in range(2):
    labels, weights = [], []
    for _ in range(steps):
      x, y, w = (strategy.experimental_local_results(t)
                 for t in next(iterator))
      assert [t.shape.as_list() for t in x] == [[3, 16, 16, 3]] * 2
      for xr, yr, wr in zip(x, y, w):
        _check_padding(xr, yr, wr)
        labels.append(yr.numpy())
        weights.append(wr.numpy())
    passes.append((np.concatenate(labels), np.concatenate(weights)))
  (labels, weights), again = passes
  assert weights.sum() == NUM_EVAL and len(weights) == 18
  ids = sorted(int(i) for i in labels[weights == 1].argmax(-1))
  assert ids == list(range(NUM_EVAL))
  np.testing.assert_array_equal(labels, again[0])
  np.testing.assert_array_equal(weights, again[1])


def test_eval_steps_too_small_or_too_many_records(eval_dir):
  with pytest.raises(ValueError, match="eval_steps=3 holds 12 images.*up "
                     "to 14.*num_eval_steps"):
    _eval(eval_dir, global_batch_size=4, eval_steps=3)
  # The source says 10 images (3 steps, 12 slots) but 14 are there: the
  # pipeline fails within the 3 steps a consumer takes, dropping none.
  ds = _eval(eval_dir, global_batch_size=4, num_examples=10)
  iterator = iter(ds)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="has more than 12 records"):
    for _ in range(3):
      next(iterator)
  # Exactly full (14 images, 7 steps of 2): no padding, no error.
  ds = _eval(eval_dir, global_batch_size=2, eval_steps=7)
  assert [float(np.sum(w)) for _, _, w in ds] == [2.0] * 7


def test_eval_one_hot_padding_is_zero(eval_dir):
  ds = _eval(eval_dir, global_batch_size=8, one_hot=1000)
  _, labels, weights = list(ds)[-1]
  np.testing.assert_array_equal(weights, [1.0] * 6 + [0.0] * 2)
  np.testing.assert_array_equal(tf.reduce_sum(labels, -1), weights)


def test_label_offset(data_dir):
  ds = _eval(data_dir, global_batch_size=1, label_offset=0,
             num_examples=VAL_PER_FILE)
  assert [int(y[0]) for _, y, _ in ds] == list(range(1, VAL_PER_FILE + 1))


def test_label_out_of_range_names_label_offset(data_dir):
  ds = _eval(data_dir, global_batch_size=1, num_examples=VAL_PER_FILE,
             label_offset=2)  # Class 0 (stored as 1) becomes -1.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"Label out of range \[0, 1000\): -1.*label_offset"):
    list(ds)


def test_one_hot(data_dir):
  _, labels = next(iter(_build(data_dir, one_hot=1000)))
  assert labels.shape == (4, 1000) and labels.dtype == tf.float32
  np.testing.assert_array_equal(tf.reduce_sum(labels, -1), np.ones(4))


def test_two_input_pipelines_eval_one_file(data_dir):
  # One validation file, two pipelines: 3 + 2 records.
  seen = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
    ds = _eval(data_dir, context, global_batch_size=2,
               num_examples=VAL_PER_FILE, image_size=32)
    assert ds.element_spec[0].shape.as_list() == [1, 32, 32, 3]
    seen.append(_labels(ds))
  assert [len(s) for s in seen] == [3, 2]
  assert sorted(seen[0] + seen[1]) == list(range(VAL_PER_FILE))


def test_two_pipelines_train_shards_are_disjoint(data_dir):
  # 3 files, 2 pipelines: by file, files {0, 2} and {1}.
  seen = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(2, pipeline, 2)
    ds = _build(data_dir, "train", context, global_batch_size=2)
    seen.append(set(int(v) for _, y in ds.take(12) for v in y.numpy()))
  assert seen == [{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7}]


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
  strategy = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
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


def test_corrupt_record_fails_with_its_location(corrupt_dir):
  d, path = corrupt_dir
  ds = _build(d, is_training=False, global_batch_size=1, num_examples=6)
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    list(ds)
  assert f"file {path}, record index 3" in str(e.value)
  assert "skip_corrupt=True" in str(e.value)


def test_corrupt_record_skipped_and_counted(corrupt_dir):
  d, path = corrupt_dir
  counter = ip.CorruptRecordCounter()
  ds = _build(d, is_training=False, global_batch_size=4, skip_corrupt=True,
              corrupt_counter=counter, num_examples=6, image_size=16)
  batches = list(ds)
  assert len(batches) == 2  # 8 slots: 5 images, 3 padding.
  assert [float(np.sum(w)) for _, _, w in batches] == [4.0, 1.0]
  assert _labels(batches) == [0, 1, 2, 4, 5]
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
              corrupt_counter=counter, num_examples=6)
  assert _labels(ds) == [0, 1, 3, 4]
  assert sorted(counter.locations) == sorted([("<unknown>", -1),
                                              (files[1][0], 2)])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="Corrupt or unreadable image record"):
    list(_build(d, is_training=False, global_batch_size=1, num_examples=6))


def test_corrupt_record_default_counter_in_training(corrupt_dir):
  d, _ = corrupt_dir
  before = ip.corrupt_records_skipped()
  ds = _build(d, global_batch_size=5, skip_corrupt=True)
  labels = next(iter(ds))[1].numpy()
  assert 3 not in labels and len(labels) == 5
  # At least the one in the first epoch; prefetching may read further.
  assert ip.corrupt_records_skipped() >= before + 1


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
  for kwargs, message in [
      (dict(start_step=-1), "start_step must be >= 0"),
      (dict(num_steps=0), "num_steps must be > 0"),
      (dict(steps_per_epoch=0), "steps_per_epoch must be > 0"),
      (dict(eval_steps=2), "eval_steps applies to eval pipelines only"),
      (dict(repeat=True), "repeat applies to eval pipelines only"),
      (dict(is_training=False, start_step=2), "start_step applies to "
       "training pipelines only"),
      (dict(is_training=False, num_steps=2), "num_steps applies to "
       "training"),
      (dict(is_training=False, augment_pair=True), "augment_pair applies"),
      (dict(is_training=False, eval_steps=0), "eval_steps must be > 0")]:
    with pytest.raises(ValueError, match=message):
      _build(data_dir, **kwargs)
  with pytest.raises(ValueError, match="multiple of num_input_pipelines"):
    _build(data_dir, "train", tf.distribute.InputContext(2, 0, 3),
           global_batch_size=6)
