"""The input pipeline every dataset shares: `make_dataset_fn`.

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
never dropped silently: `skip_corrupt=False` (default) fails with the
record's location, `skip_corrupt=True` skips, logs and counts them
(corrupt_records.py).
"""

import dataclasses
import random
from typing import Any, Callable, Optional

import tensorflow as tf

from official_conadv.data import corrupt_records
from official_conadv.data import epochs
from official_conadv.data import preprocessing
from official_conadv.data import registry
from official_conadv.data import source as source_lib


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
  counter: corrupt_records.CorruptRecordCounter
  start_step: int
  num_steps: Optional[int]
  steps_per_epoch: Optional[int]
  eval_steps: Optional[int]
  repeat: bool


def _build(plan: _Plan,
           context: tf.distribute.InputContext) -> tf.data.Dataset:
  src = plan.source
  batch, replicas, per_step = epochs.layout(plan.global_batch_size, context)
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
    ds, first = epochs.train_positions(plan, context, per_step)
    finite = plan.num_steps is not None and not plan.skip_corrupt
  else:
    num_records = src.num_examples
    eval_steps = plan.eval_steps or epochs.num_eval_steps(
        num_records, plan.global_batch_size, pipelines)
    capacity = eval_steps * per_step
    largest = -(-num_records // pipelines) if num_records else 0
    if largest > capacity:
      needed = epochs.num_eval_steps(num_records, plan.global_batch_size,
                                     pipelines)
      raise ValueError(
          f"eval_steps={eval_steps} holds {capacity} images per input "
          f"pipeline, but a by-record shard of {num_records} has up to "
          f"{largest}: use num_eval_steps(...) = {needed}.")
    ds = src.records(context, None, by_record=True)
    if guarded:
      ds = ds.concatenate(tf.data.Dataset.from_tensors(
          epochs.end_marker(ds.element_spec)))
    ds, first = ds.enumerate(), 0

  def finish(k, image, label, file, index):
    """The part that cannot fail on bad data: augment, checks, one-hot."""
    if src.num_classes:
      in_range = tf.logical_and(label >= 0, label < src.num_classes)
      check = tf.debugging.Assert(in_range, [tf.strings.join([
          f"Label out of range [0, {src.num_classes}): ",
          tf.strings.as_string(label), " at ",
          corrupt_records.location_text(file, index),
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
    ds = corrupt_records.guarded_decode(ds, plan, src, seeds, split_record,
                                        first, finite)
    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=plan.deterministic)

  if not plan.is_training:
    padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                    ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = epochs.check_first_n(
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


def make_dataset_fn(name: str, split: str, *, data_dir: Optional[str] = None,
                    image_size: int, global_batch_size: int,
                    is_training: bool, augment: Optional[str] = None,
                    augment_pair: bool = False,
                    one_hot: Optional[int] = None,
                    shuffle_buffer: int = 10_000, seed: Optional[int] = None,
                    deterministic: bool = True, skip_corrupt: bool = False,
                    corrupt_counter: Optional[
                        corrupt_records.CorruptRecordCounter] = None,
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
    seed = random.SystemRandom().randrange(epochs.SEED_MOD)
  src = registry.make_source(name, split, data_dir=data_dir,
                             image_size=image_size, is_training=is_training,
                             **source_kwargs)
  plan = _Plan(
      source=src, augmenter=preprocessing.make_augmenter(augment),
      augment_pair=augment_pair, global_batch_size=global_batch_size,
      is_training=is_training, one_hot=one_hot,
      shuffle_buffer=shuffle_buffer, seed=int(seed) % epochs.SEED_MOD,
      deterministic=deterministic, skip_corrupt=skip_corrupt,
      counter=corrupt_counter or corrupt_records.CORRUPT_RECORDS,
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

