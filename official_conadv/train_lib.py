"""Training, evaluation, checkpointing and export for one experiment.

`run(config, model_dir, mode, strategy)` does the work; `train.py` only parses
flags. Training is cut into loops that end exactly at multiples of
`train.steps_per_loop` (counted from step 0) and at the last step; each loop
is one `model.fit` over a finite input window of exactly its steps, read from
the pipeline's per-epoch seeded order (`input_pipeline`), so
`steps_per_execution` need not divide anything and the run never overshoots.
With `adversary.schedule=lookahead` the queue is filled from batches
0..tau-1 before the first loop, and each loop's window starts tau batches
later (step t reads batch t + tau, `ConAdvModel.fit(input_is_ahead=True)`).
At the end of every loop: a checkpoint (model, optimizer, step, BN statistics
and the stale-weight buffer or lookahead queue; under MultiWorkerMirrored each
worker's own, as the queue holds its replicas' batches) in
`model_dir/checkpoints`, TensorBoard scalars
in `model_dir/{train,eval}` and, in train_and_eval mode, an exact evaluation
(every validation image scored once: padded, masked batches).

Resume: a rerun of the same command restores the newest readable checkpoint
(a damaged one is named and skipped, never deleted) and continues with the
batches of that step, so an interrupted run ends with the same weights as an
uninterrupted one; the input cost of resuming is at most one data epoch of
record reads (no decoding), whatever the step. SIGTERM (preemption notice)
stops at the next step call, saves that step and raises `Preempted`. A
non-finite loss or non-finite weights stop the run before anything is saved,
keeping the last good checkpoint.
"""

import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
import uuid
from typing import Any, Dict, Optional

from absl import logging
import keras
import tensorflow as tf

from official_conadv import configs
from official_conadv import distribute_utils
from official_conadv import keras_mwms_fix
from official_conadv.data import input_pipeline
from official_conadv.data import source as source_lib
from official_conadv.modeling import backbones
from official_conadv.modeling import conadv_model
from official_conadv.optimization import lars
from official_conadv.optimization import lr_schedules

CONFIG_FILE = "config.json"


class TrainingError(RuntimeError):
  """A run that must stop; the message is one line for the user."""


# ---------------------------------------------------------------- building
def build_backbone(c: configs.ModelConfig, image_shape) -> keras.Model:
  """The backbone `c.name` names (`backbones`), for images of `image_shape`
  (H, W, C); a third BN set ("aug") when `c.augmented_route == "aug"`."""
  return backbones.build(c, image_shape,
                         augmented_bn=c.augmented_route == conadv_model.AUG)


def build_adversary(c: configs.AdversaryConfig):
  if not c.enabled:
    return None
  fields = dataclasses.asdict(c)
  fields.pop("enabled")
  return conadv_model.AdversaryConfig(**fields)


def build_optimizer(c: configs.OptimizerConfig, total_steps: int,
                    steps_per_epoch: int, mixed_precision: Optional[str]):
  warmup = min(total_steps, int(round(c.warmup_epochs * steps_per_epoch)))
  schedule = lr_schedules.WarmupPolynomialDecay(
      peak_learning_rate=c.learning_rate, total_steps=total_steps,
      warmup_steps=warmup, end_learning_rate=min(c.end_learning_rate,
                                                 c.learning_rate),
      power=c.power)
  if c.name == "lars":
    optimizer = lars.LARS(learning_rate=schedule, momentum=c.momentum,
                          weight_decay_rate=c.weight_decay, eeta=c.eeta,
                          nesterov=c.nesterov)
  else:
    optimizer = keras.optimizers.SGD(learning_rate=schedule,
                                     momentum=c.momentum, nesterov=c.nesterov,
                                     weight_decay=c.weight_decay or None)
  if mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def steps_per_execution_for(strategy, requested: int,
                            paired_inputs: bool = False) -> int:
  """`requested`, or 1 where several steps per call are broken or inexact.

  Keras 3's multi-step loop wraps each step in a `tf.cond` (so an execution
  can stop at the end of the data), and under MirroredStrategy and
  MultiWorkerMirroredStrategy the step's cross-replica `merge_call` inside
  that cond fails with "You must feed a value for placeholder tensor ...",
  even for a one-layer model (keras-team/keras#19246, open;
  `train_test.test_upstream_multi_step_loop_under_mirrored_still_fails`
  notices when that changes). The TPU rows' `steps_per_execution` is for
  TPUStrategy (fewer host round trips); GPU strategies run one step per call.

  `paired_inputs` (the +AA rows with an adversary: {"image", "augmented"}
  inputs): `make rehearse` found such runs with several steps per call not
  bitwise reproducible across runs in one process (largest weight difference
  0.13-0.86 at the toy rows' learning rates), while one step per call is;
  the cause is not found yet, so they run one step per call.
  """
  if requested > 1 and (paired_inputs or isinstance(strategy, (
      tf.distribute.MirroredStrategy,
      tf.distribute.MultiWorkerMirroredStrategy))):
    return 1
  return requested


def build_model(config: configs.ExperimentConfig, image_shape,
                total_steps: int, steps_per_epoch: int, jit_compile: bool,
                steps_per_execution: Optional[int] = None):
  """ConAdvModel built (both BN routes, stale buffer, optimizer) and compiled.

  Call inside the strategy scope. `steps_per_execution`: default
  `config.train.steps_per_execution`.
  """
  model = conadv_model.ConAdvModel(build_backbone(config.model, image_shape),
                                   adversary=build_adversary(config.adversary),
                                   augmented_route=config.model.augmented_route)
  model.build((None,) + tuple(image_shape))
  label_smoothing = config.data.label_smoothing
  if label_smoothing > 0:
    loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=label_smoothing)
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
               keras.metrics.TopKCategoricalAccuracy(5, name="top5")]
  else:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
               keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]
  optimizer = build_optimizer(config.optimizer, total_steps, steps_per_epoch,
                              config.runtime.mixed_precision)
  model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                steps_per_execution=(steps_per_execution or
                                     config.train.steps_per_execution),
                jit_compile=jit_compile)
  # Build the optimizer now, with the adversarial BN variables present, so a
  # checkpoint restores its slots exactly.
  model.optimizer.build(model.trainable_variables)
  return model


# ------------------------------------------------------------- callbacks
class NonFiniteGuard(keras.callbacks.Callback):
  """Stops at the first non-finite loss; the trainer then saves nothing."""

  def __init__(self):
    super().__init__()
    self.bad_step = None

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      self.bad_step = int(self.model.optimizer.iterations.numpy())
      self.model.stop_training = True


class TrainTimer(keras.callbacks.Callback):
  """Seconds spent in training steps only (not evaluation, checkpoints,
  pipeline start-up between loops): the sum over `fit`'s step calls, each
  closed by reading the step counter (which waits for the device)."""

  def __init__(self):
    super().__init__()
    self.seconds = 0.0
    self._t0 = None

  def on_train_batch_begin(self, batch, logs=None):
    self._t0 = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.model.optimizer.iterations.numpy()  # Waits for the step to finish.
    self.seconds += time.perf_counter() - self._t0


class PreemptionWatcher(keras.callbacks.Callback):
  """Turns SIGTERM (the TPU / GCE / Kubernetes preemption notice) into a
  clean stop at the next step boundary.

  The signal handler only sets a flag; after every `fit` step call (every
  `steps_per_execution` steps) the flag stops training, and the trainer then
  saves a checkpoint of that step and raises `Preempted`. Under multi-worker
  strategies the flag is summed across workers at every step call, so all
  workers stop at the same step even if only one got the signal.
  """

  def __init__(self, strategy):
    super().__init__()
    self.strategy = strategy
    self.requested = False
    self._previous = None
    self._installed = False

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
    return False

  def stop_requested(self) -> bool:
    if not keras_mwms_fix.is_multi_worker(self.strategy):
      return self.requested
    flag = tf.constant(1.0 if self.requested else 0.0)
    total = self.strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        self.strategy.run(lambda: tf.identity(flag)), axis=None)
    self.requested = bool(float(total) > 0)
    return self.requested

  def on_train_batch_end(self, batch, logs=None):
    if self.stop_requested():
      self.model.stop_training = True


class Preempted(Exception):
  """Raised after the checkpoint of a SIGTERM-stopped run is saved."""


def check_workers_agree(strategy, step: int, ckpt_dir: str):
  """Under a multi-worker strategy every worker restores its own checkpoint
  (the chief from checkpoints/, the others from their scratch dirs); they
  must hold the same step, or the workers would train different weights.
  Raises ValueError on every worker whose step is not the workers' mean."""
  if not keras_mwms_fix.is_multi_worker(strategy):
    return
  value = tf.constant(float(step), tf.float64)
  total = float(strategy.reduce(
      tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(value)),
      axis=None))
  mean = total / strategy.num_replicas_in_sync
  if mean != step:
    raise ValueError(
        f"Worker {distribute_utils.task_index()} restored step {step} from "
        f"{ckpt_dir}, but the workers' mean step is {mean:g}: every worker "
        "must resume from the same step (a worker's scratch checkpoints "
        "were lost or are older); restore them or use a new --model_dir.")


def lookahead_schedule(model) -> bool:
  """Whether `model` trains with the lookahead schedule (tau >= 1)."""
  adversary = model.adversary
  return bool(adversary is not None and adversary.delay and
              adversary.schedule == conadv_model.LOOKAHEAD)


def _all_finite(model) -> bool:
  return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                             for v in model.trainable_variables]))


# ------------------------------------------------------------ model_dir
def check_model_dir(model_dir: Optional[str]):
  """ValueError (one line) unless `model_dir` is a writable directory or can
  be created as one. Call before anything is written.

  Refused: no model_dir; a model_dir that names a file or (local paths) lies
  under one; a directory this process cannot write to; a new local
  model_dir whose nearest existing ancestor it cannot write to. Writability
  is probed by writing and deleting one empty file with a fresh random name
  (`.write_probe-<hex>`, through tf.io.gfile, so gs:// works too) in
  model_dir, or in that ancestor when a local model_dir does not exist yet
  (nothing is created: model_dir is made later, by the run). A remote
  model_dir (gs://...) is probed in place, existing or not: object stores
  need no parent directory. Nothing that exists is read or changed.
  """
  if not model_dir:
    raise ValueError("--model_dir is required.")
  problem = source_lib.not_a_directory("--model_dir", model_dir)
  if problem:
    raise ValueError(f"{problem}; point it at a new or existing directory.")
  if source_lib.is_remote(model_dir) or tf.io.gfile.isdir(model_dir):
    where, prefix = model_dir, f"--model_dir {model_dir} is not writable"
  else:
    where = source_lib.nearest_existing(model_dir)
    if where is None:  # Nothing above it exists, not even the root.
      raise ValueError(f"--model_dir {model_dir} cannot be created.")
    prefix = (f"--model_dir {model_dir} cannot be created: {where} is not "
              "writable")
  probe = os.path.join(where, f".write_probe-{uuid.uuid4().hex}")
  try:
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("")
  except (tf.errors.OpError, OSError) as e:
    raise ValueError(f"{prefix} ({distribute_utils.one_line(e)[:160]}): use "
                     "a directory this job can write to.") from None
  finally:
    try:
      if tf.io.gfile.exists(probe):
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
      logging.warning("Could not delete the write probe %s: %s", probe, e)


def check_and_write_config(config: configs.ExperimentConfig, model_dir: str,
                           write: bool, allow_config_change: bool = False):
  """Refuses a model_dir written by an incompatible config; saves ours.

  Fields in `configs.SCHEDULE_FIELDS` (run length, global batch, seeds, data
  order) may change only with `allow_config_change`, and the change is
  logged; every other incompatible field is refused. Returns the list of
  allowed changes ("field: old -> new").
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  changed = []
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); use a new "
                         "--model_dir.") from None
    diffs = configs.incompatibilities(saved, config)
    hard = [d for d in diffs if d.field not in configs.SCHEDULE_FIELDS]
    soft = [d for d in diffs if d.field in configs.SCHEDULE_FIELDS]
    if hard:
      raise ValueError(
          f"--model_dir {model_dir} holds a run with an incompatible config "
          f"({'; '.join(map(str, hard[:3]))}"
          f"{'; ...' if len(hard) > 3 else ''}); use a new --model_dir or "
          "the same settings.")
    if soft and not allow_config_change:
      raise ValueError(
          f"--model_dir {model_dir} holds a run with another schedule or data "
          f"order ({'; '.join(map(str, soft))}); resuming would change the "
          "learning rate or the batches: rerun with the same settings, or "
          "pass --allow_config_change to continue with the new ones.")
    a = config.adversary
    if (a.enabled and a.delay and a.schedule == "lookahead" and
        any(d.field == "train.global_batch_size" for d in soft)):
      raise ValueError(
          "train.global_batch_size cannot change on resume with "
          "adversary.schedule='lookahead': the checkpoint's queue holds "
          "batches of the old size; use a new --model_dir.")
    changed = [str(d) for d in soft]
  if write:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(config.to_json())
  return changed


def _jit_default(strategy) -> bool:
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return True
  return bool(tf.config.list_logical_devices("GPU"))


# Errors that mean "this checkpoint's files are damaged" (truncated, missing
# shard, bad checksum), as opposed to "written by another model". TF's
# checkpoint reader reports a data file cut short as IndexError ("Read less
# bytes than requested").
_CORRUPT_CHECKPOINT_ERRORS = (tf.errors.DataLossError, tf.errors.NotFoundError,
                              tf.errors.OutOfRangeError,
                              tf.errors.UnknownError, IndexError)
# What other errors say when they come from a damaged file (a truncated
# .index: "file is too short to be an sstable").
_DAMAGE_MARKERS = re.compile(
    r"sstable|too short|truncat|corrupt|checksum|Read less bytes|"
    r"Unable to open table", re.IGNORECASE)


def restore_latest_good(checkpoint: tf.train.Checkpoint,
                        manager: tf.train.CheckpointManager,
                        announce=print) -> Optional[str]:
  """Restores the newest readable checkpoint of `manager`; returns its path.

  A damaged checkpoint (truncated or missing files) is named in one line and
  the next older one is tried; nothing is deleted. A checkpoint written by
  another model is a ValueError (no fallback: the model_dir is wrong).
  """
  candidates = list(reversed(manager.checkpoints))
  damaged = []
  for path in candidates:
    try:
      try:
        checkpoint.restore(path).assert_existing_objects_matched()
      except (ValueError, tf.errors.OpError) as e:
        if _DAMAGE_MARKERS.search(str(e)):
          raise tf.errors.DataLossError(None, None, str(e)) from None
        raise
    except _CORRUPT_CHECKPOINT_ERRORS as e:
      reason = distribute_utils.one_line(e)[:160]
      damaged.append(path)
      announce(f"Checkpoint {path} is unreadable ({reason}); trying the "
               "previous one (nothing is deleted).")
      continue
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      raise ValueError(
          f"Checkpoint {path} does not match this model "
          f"({distribute_utils.one_line(e)[:200]}); it was written by "
          "another model or version: use a new --model_dir.") from None
    if damaged:
      announce(f"Resuming from {path} instead of the unreadable "
               f"{', '.join(damaged)}.")
    return path
  if damaged:
    raise ValueError(f"Every checkpoint in {manager.directory} is unreadable "
                     f"({', '.join(damaged)}); use a new --model_dir or "
                     "restore the files.")
  return None


def loop_ends(step: int, total_steps: int, steps_per_loop: int):
  """The global steps at which loops end from `step` on: multiples of
  `steps_per_loop` counted from step 0, and `total_steps` (a resume from a
  mid-loop preemption checkpoint first finishes that loop)."""
  ends = []
  while step < total_steps:
    step = min(total_steps, (step // steps_per_loop + 1) * steps_per_loop)
    ends.append(step)
  return ends


def _learning_rate(optimizer, step: int) -> float:
  """The learning rate at `step` (the inner optimizer's under loss scaling)."""
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)
  schedule = getattr(optimizer, "_learning_rate", None)
  if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
    return float(schedule(step))
  return float(optimizer.learning_rate)


# ------------------------------------------------------------------- run
def run(config: configs.ExperimentConfig, model_dir: str, mode: str = "train",
        strategy: Optional[tf.distribute.Strategy] = None,
        verbose: int = 1, export: bool = True,
        callbacks=(), allow_config_change: bool = False) -> Dict[str, Any]:
  """Runs `mode` ("train", "eval" or "train_and_eval") and returns a summary.

  Training runs in loops that end exactly at multiples of
  `train.steps_per_loop` and at the last step, each one `model.fit` over a
  finite input window of exactly its steps (so `steps_per_execution` that
  does not divide the loop runs a last, shorter chunk and never overshoots).
  After every loop: a checkpoint, TensorBoard scalars and, in
  train_and_eval mode, an exact evaluation (every image once).

  `callbacks` are extra Keras callbacks given to every loop's `fit`, after
  the trainer's own. The summary dict holds the final `eval` metrics (top-1 as
  `accuracy`, `top5`, `loss`, `examples` = images scored), `train` logs,
  `step`, `wall_seconds`, `train_seconds` and `images_per_second` (training
  steps only). Raises ValueError for bad input before anything is written to
  model_dir, TrainingError when training must stop (non-finite loss, an
  inexact loop or evaluation), Preempted after saving on SIGTERM.
  """
  if mode not in ("train", "eval", "train_and_eval"):
    raise ValueError(f"--mode must be train, eval or train_and_eval, got "
                     f"{mode!r}.")
  config.validate()
  start = time.perf_counter()
  strategy = strategy or tf.distribute.get_strategy()
  is_chief = distribute_utils.is_chief()
  distribute_utils.check_global_batch_size(config.train.global_batch_size,
                                           strategy)
  distribute_utils.check_global_batch_size(config.train.eval_batch_size,
                                           strategy)
  # Where we write and where we read must be directories (one-line errors
  # before anything is written; the data's are checked by the data layer).
  check_model_dir(model_dir)
  if is_chief:
    print(f"devices: {distribute_utils.describe_devices(strategy)}",
          flush=True)
  data = config.data
  num_train = data.num_train_examples or input_pipeline.num_examples(
      data.name, "train", data_dir=data.data_dir)
  num_eval = data.num_eval_examples or input_pipeline.num_examples(
      data.name, "eval", data_dir=data.data_dir)
  steps_per_epoch = config.steps_per_epoch(num_train)
  total_steps = config.total_steps(num_train)
  steps_per_loop = min(config.train.steps_per_loop, total_steps)
  pipelines = input_pipeline.num_input_pipelines(strategy)
  # The eval pipeline always holds one whole padded pass; train.eval_steps
  # (a quick partial evaluation) only scores its first batches.
  pass_steps = input_pipeline.num_eval_steps(
      num_eval, config.train.eval_batch_size, pipelines)
  eval_steps = min(config.train.eval_steps or pass_steps, pass_steps)
  full_eval = eval_steps == pass_steps

  # Validate the data before touching model_dir.
  input_pipeline.check_data(data.name, data_dir=data.data_dir)
  changed = check_and_write_config(config, model_dir,
                                   write=mode != "eval" and is_chief,
                                   allow_config_change=allow_config_change)

  if config.runtime.mixed_precision:
    keras.mixed_precision.set_global_policy(config.runtime.mixed_precision)
  jit = config.runtime.jit_compile
  if jit is None:
    jit = _jit_default(strategy)

  image_shape = input_pipeline.image_shape(data.name, data.image_size)
  # Same seed => same initial weights; a resumed run overwrites them from
  # its checkpoint anyway.
  keras.utils.set_random_seed(config.train.seed)
  paired = bool(config.adversary.enabled and data.autoaugment)
  steps_per_execution = steps_per_execution_for(
      strategy, config.train.steps_per_execution, paired_inputs=paired)
  if steps_per_execution != config.train.steps_per_execution and is_chief:
    why = ("AutoAugment + adversary runs are not reproducible with several "
           "steps per call yet" if paired else
           f"Keras 3's multi-step loop fails under {type(strategy).__name__} "
           "(keras-team/keras#19246)")
    print(f"train.steps_per_execution={config.train.steps_per_execution} "
          f"runs as 1: {why}.", flush=True)
  corrupt = input_pipeline.CorruptRecordCounter()  # Training records.

  def _train_input(first, num_steps):
    """The training batches [first, first + num_steps), distributed."""
    return input_pipeline.distributed_dataset(
        strategy, data, split="train", is_training=True,
        global_batch_size=config.train.global_batch_size,
        num_classes=config.model.num_classes, seed=config.train.seed,
        start_step=first, num_steps=num_steps,
        steps_per_epoch=steps_per_epoch, corrupt_counter=corrupt,
        augment_pair=config.adversary.enabled)

  with strategy.scope():
    model = build_model(config, image_shape, total_steps, steps_per_epoch,
                        jit_compile=jit,
                        steps_per_execution=steps_per_execution)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  if not is_chief:  # Non-chief workers write to a scratch dir (TF recipe).
    ckpt_dir = os.path.join(model_dir, "tmp_worker_checkpoints",
                            str(distribute_utils.task_index()))
  manager = tf.train.CheckpointManager(
      checkpoint, ckpt_dir, max_to_keep=config.train.keep_checkpoints)
  # Lookahead: step t trains on batch t from the queue and reads batch
  # t + tau. The queue exists before the restore (so a checkpoint without
  # this worker's queue does not match); a fresh run fills it with batches
  # 0..tau-1, a resumed one restores it (each worker its own slots).
  ahead = model.delay if lookahead_schedule(model) else 0
  first_batches = None
  if ahead and mode != "eval":
    first_batches = _train_input(0, ahead)
    model.create_lookahead_queue(
        first_batches.element_spec,
        per_replica_batch_size=(config.train.global_batch_size //
                                strategy.num_replicas_in_sync))
  say = print if (verbose and is_chief) else (lambda *a, **k: None)
  restored = restore_latest_good(checkpoint, manager, announce=print)
  if restored:
    logging.info("Restored %s", restored)
  elif mode == "eval":
    raise ValueError(f"No checkpoint in {ckpt_dir} to evaluate.")
  step = int(model.optimizer.iterations.numpy())
  check_workers_agree(strategy, step, ckpt_dir)
  if ahead and restored and not model.lookahead_queue_filled:
    raise ValueError(f"Checkpoint {restored} holds no lookahead queue; use "
                     "the adversary.schedule it was trained with.")
  if changed:
    print(f"Config changed on resume at step {step} (--allow_config_change): "
          f"{'; '.join(changed)}. Learning rate now "
          f"{_learning_rate(model.optimizer, step):.6g}; {total_steps} steps "
          "in all.", flush=True)

  eval_corrupt = input_pipeline.CorruptRecordCounter()
  eval_ds = None

  def evaluate():
    nonlocal eval_ds
    if eval_ds is None:
      eval_ds = input_pipeline.distributed_dataset(
          strategy, data, split="eval", is_training=False,
          global_batch_size=config.train.eval_batch_size,
          num_classes=config.model.num_classes, seed=config.train.seed,
          eval_steps=pass_steps, corrupt_counter=eval_corrupt, repeat=False)
    results = model.evaluate(eval_ds, steps=eval_steps, verbose=0,
                             return_dict=True)
    results = {k: float(v) for k, v in results.items()}
    results["examples"] = int(round(results.get("examples", 0)))
    expected = num_eval - eval_corrupt.count
    if full_eval and results["examples"] != expected:
      raise TrainingError(
          f"Evaluation scored {results['examples']} images, expected "
          f"{expected} ({num_eval} in the eval split, {eval_corrupt.count} "
          "skipped as corrupt); check data.num_eval_examples against the "
          "data.")
    return results

  train_writer = eval_writer = None
  if is_chief:
    train_writer = tf.summary.create_file_writer(
        os.path.join(model_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(model_dir,
                                                             "eval"))

  def write_scalars(writer, at_step, values):
    if writer is None:
      return
    with writer.as_default(step=at_step):
      for k, v in values.items():
        if isinstance(v, (int, float)):
          tf.summary.scalar(k, v)
    writer.flush()

  summary = {"step": step, "train": {}, "eval": {}}
  train_seconds, trained_steps = 0.0, 0
  saved_step = step if restored else None
  if mode in ("train", "train_and_eval") and step < total_steps:
    ends = loop_ends(step, total_steps, steps_per_loop)
    say(f"Training {config.name} ({config.method}) for {total_steps} steps "
        f"from step {step}: {len(ends)} loops of up to {steps_per_loop} "
        f"steps, {steps_per_execution} per execution; "
        f"TensorBoard: tensorboard --logdir={model_dir}", flush=True)
    guard = NonFiniteGuard()
    if ahead and not model.lookahead_queue_filled:
      model.fill_lookahead_queue(first_batches)
    with PreemptionWatcher(strategy) as watcher:
      for end in ends:
        begin = int(model.optimizer.iterations.numpy())
        timer = TrainTimer()
        history = model.fit(
            _train_input(begin + ahead, end - begin), epochs=1,
            steps_per_epoch=end - begin,
            callbacks=[guard, timer, watcher] + list(callbacks),
            verbose=verbose, shuffle=False,
            **({"input_is_ahead": True} if ahead else {}))
        step = int(model.optimizer.iterations.numpy())
        if guard.bad_step is not None:
          raise TrainingError(
              f"Non-finite loss at step {guard.bad_step}; stopped without "
              f"saving. Last good checkpoint: "
              f"{manager.latest_checkpoint or 'none'}.")
        if not _all_finite(model):
          raise TrainingError(
              f"Non-finite weights after step {step}; stopped without saving."
              f" Last good checkpoint: {manager.latest_checkpoint or 'none'}.")
        if step != end and not watcher.requested:
          raise TrainingError(
              f"Loop ended at step {step}, expected {end}: the input window "
              "ran short or a callback stopped training; nothing saved.")
        train_seconds += timer.seconds
        trained_steps += step - begin
        if step != saved_step:
          manager.save(checkpoint_number=step)
          saved_step = step
        logs = {k: float(v[-1]) for k, v in history.history.items() if v}
        summary["train"] = logs
        summary["step"] = step
        ips = ((step - begin) * config.train.global_batch_size /
               max(timer.seconds, 1e-9))
        write_scalars(train_writer, step, dict(
            logs, learning_rate=_learning_rate(model.optimizer, step),
            images_per_second=ips))
        if watcher.requested:
          raise Preempted(
              f"SIGTERM received: saved the checkpoint of step {step} in "
              f"{ckpt_dir}; rerun the same command to resume.")
        line = (f"step {step}/{total_steps}: loss={logs.get('loss', 0):.4f} "
                f"{ips:.1f} images/s (training steps only)")
        if mode == "train_and_eval":
          summary["eval"] = evaluate()
          write_scalars(eval_writer, step, summary["eval"])
          line += (f" | eval top1={summary['eval'].get('accuracy', 0):.4f} "
                   f"on {summary['eval']['examples']} images")
        say(line, flush=True)
  if mode == "eval" or (mode == "train_and_eval" and not summary["eval"]):
    summary["eval"] = evaluate()
    write_scalars(eval_writer, summary["step"], summary["eval"])
  if export and mode != "eval" and is_chief:
    summary["export"] = export_model(model, model_dir, image_shape)
  skipped = corrupt.count + eval_corrupt.count
  locations = corrupt.locations + eval_corrupt.locations
  summary["corrupt_records_skipped"] = skipped
  summary["corrupt_record_locations"] = [list(l) for l in locations[:20]]
  if skipped:
    logging.warning("Skipped %d corrupt records, e.g. %s", skipped,
                    locations[:5])
  summary["wall_seconds"] = time.perf_counter() - start
  summary["train_seconds"] = train_seconds
  summary["images_per_second"] = (
      trained_steps * config.train.global_batch_size / train_seconds
      if train_seconds > 0 else None)
  if is_chief:
    with tf.io.gfile.GFile(os.path.join(model_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def export_model(model: conadv_model.ConAdvModel, model_dir: str,
                 image_shape) -> Dict[str, str]:
  """Writes the main-BN inference model as a SavedModel and a .keras file.

  SavedModel (`export/saved_model`): `serve(images)` float32 [B, H, W, C] in
  [0, 1] -> float32 logits; loads with plain `tf.saved_model.load`, no
  official_conadv needed. `.keras` (`export/model.keras`): the backbone
  without the adversarial BN; loading it needs official_conadv.modeling (its
  layer classes), not the training code.
  """
  inference = model.inference_model()
  export_dir = os.path.join(model_dir, "export")
  saved_model_dir = os.path.join(export_dir, "saved_model")
  archive = keras.export.ExportArchive()
  archive.track(inference)
  archive.add_endpoint(
      "serve", lambda images: tf.cast(inference(images, training=False),
                                      tf.float32),
      input_signature=[tf.TensorSpec((None,) + tuple(image_shape),
                                     tf.float32, name="images")])
  archive.write_out(saved_model_dir, verbose=False)
  keras_path = os.path.join(export_dir, "model.keras")
  inference.save(keras_path)
  return {"saved_model": saved_model_dir, "keras": keras_path}
