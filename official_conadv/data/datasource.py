"""A configured dataset resolved once (`DataSource`), and its distributed
datasets.

    data = DataSource(config.data)      # Resolves config.data.name once.
    data.check()                        # One-line ValueError if missing.
    train = data.train_dataset(strategy, global_batch_size=4096, seed=0,
                               num_classes=1000, start_step=step,
                               num_steps=1000, steps_per_epoch=312)
    evaluation = data.eval_dataset(strategy, global_batch_size=1024, seed=0,
                                   num_classes=1000, eval_steps=49)

`distributed_dataset(strategy, data, ...)` is the same for callers that hold
only the config. `measure_throughput` times any of them.
"""

import functools
import time
from typing import Any, List, Optional, Tuple

import tensorflow as tf

from official_conadv.data import corrupt_records
from official_conadv.data import epochs
from official_conadv.data import pipeline
from official_conadv.data import registry
from official_conadv.data import source as source_lib


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


class DataSource:
  """The dataset a `configs.DataConfig`-like `data` names (name, data_dir,
  image_size, autoaugment, label_smoothing, shuffle_buffer, deterministic
  (default True), skip_corrupt, num_train_examples / num_eval_examples),
  with the name resolved once (`registry.lookup`: ValueError for an unknown
  one).

  Sizes (`num_examples`, `num_classes`, `image_shape`), the data check, and
  the distributed training and eval datasets; the corrupt records these
  skip are counted in `train_corrupt` and `eval_corrupt`.
  """

  def __init__(self, data: Any):
    self.data = data
    self.dataset = registry.lookup(data.name)
    self.train_corrupt = corrupt_records.CorruptRecordCounter()
    self.eval_corrupt = corrupt_records.CorruptRecordCounter()

  @property
  def data_dir(self) -> Optional[str]:
    return getattr(self.data, "data_dir", None)

  @functools.cached_property
  def num_classes(self) -> int:
    """The dataset's classes (image_folder: the class folders of
    data_dir/train)."""
    return self.dataset.classes(self.data_dir)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """(H, W, C) of the pipeline's images."""
    return self.dataset.image_shape(self.data.image_size)

  def num_examples(self, split: str) -> int:
    """Examples in `split`: data.num_train_examples / num_eval_examples
    when set, else the dataset's (registry.num_examples)."""
    split = source_lib.canonical_split(split)
    override = getattr(self.data, "num_train_examples"
                       if split == source_lib.TRAIN else
                       "num_eval_examples", None)
    return override or self.dataset.num_examples(split, self.data_dir)

  def check(self, **kwargs):
    """ValueError (one line: which files to put where) when the data is
    missing; prepares tfds datasets on first use (registry.check_data)."""
    self.dataset.check(self.data_dir, **kwargs)

  def train_dataset(self, strategy: tf.distribute.Strategy, *,
                    global_batch_size: int, num_classes: Optional[int],
                    seed: Optional[int], start_step: int,
                    num_steps: Optional[int], steps_per_epoch: Optional[int],
                    augment_pair: bool = False):
    """The training batches [start_step, start_step + num_steps),
    distributed; corrupt records skipped count in `train_corrupt`."""
    return self.distributed(
        strategy, split=source_lib.TRAIN, is_training=True,
        global_batch_size=global_batch_size, num_classes=num_classes,
        seed=seed, start_step=start_step, num_steps=num_steps,
        steps_per_epoch=steps_per_epoch, augment_pair=augment_pair,
        corrupt_counter=self.train_corrupt)

  def eval_dataset(self, strategy: tf.distribute.Strategy, *,
                   global_batch_size: int, num_classes: Optional[int],
                   seed: Optional[int], eval_steps: Optional[int],
                   repeat: bool = False):
    """The padded eval pass of `eval_steps` batches per replica (one pass
    by default), distributed; corrupt records skipped count in
    `eval_corrupt`."""
    return self.distributed(
        strategy, split=source_lib.EVAL, is_training=False,
        global_batch_size=global_batch_size, num_classes=num_classes,
        seed=seed, eval_steps=eval_steps, repeat=repeat,
        corrupt_counter=self.eval_corrupt)

  def skipped_records(self) -> Tuple[int, List[Tuple[str, int]]]:
    """(count, locations) of the corrupt records the train and eval
    datasets skipped so far."""
    return (self.train_corrupt.count + self.eval_corrupt.count,
            self.train_corrupt.locations + self.eval_corrupt.locations)

  def distributed(self, strategy: tf.distribute.Strategy, *,
                  split: str, is_training: bool, global_batch_size: int,
                  num_classes: Optional[int] = None,
                  seed: Optional[int] = 0, start_step: int = 0,
                  num_steps: Optional[int] = None,
                  steps_per_epoch: Optional[int] = None,
                  eval_steps: Optional[int] = None,
                  augment_pair: bool = False,
                  corrupt_counter: Optional[
                      corrupt_records.CorruptRecordCounter] = None,
                  repeat: bool = True, **source_kwargs):
    """`strategy.distribute_datasets_from_function` over `make_dataset_fn`,
    configured from `self.data`.

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
    epochs.check_batch_size(global_batch_size, strategy.num_replicas_in_sync)
    data = self.data
    smoothing = getattr(data, "label_smoothing", 0.0) or 0.0
    if smoothing > 0 and not num_classes:
      num_classes = self.num_classes
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
    dataset_fn = pipeline.make_dataset_fn(
        data.name, split, data_dir=self.data_dir,
        image_size=data.image_size, global_batch_size=global_batch_size,
        is_training=is_training,
        one_hot=num_classes if smoothing > 0 else None,
        shuffle_buffer=getattr(data, "shuffle_buffer", 10_000),
        seed=seed, deterministic=getattr(data, "deterministic", True),
        skip_corrupt=getattr(data, "skip_corrupt", False),
        corrupt_counter=corrupt_counter, **mode, **source_kwargs)
    return strategy.distribute_datasets_from_function(dataset_fn)


def distributed_dataset(strategy: tf.distribute.Strategy, data: Any,
                        **kwargs):
  """The trainer's datasets for callers that hold only a config:
  `DataSource(data).distributed(strategy, **kwargs)` (split, is_training,
  global_batch_size, num_classes, seed, start_step, num_steps,
  steps_per_epoch, eval_steps, augment_pair, corrupt_counter (default the
  process-wide CORRUPT_RECORDS), repeat (default True), source kwargs)."""
  return DataSource(data).distributed(strategy, **kwargs)


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

