"""The session of a run: the model built in the strategy scope and restored.

    session = open_session(config, plan, data, strategy, model_dir, mode,
                           is_chief)
    session.model, session.step, session.restored, session.train_window(...)

`build_model` makes the compiled ConAdvModel of a config (both BN routes,
the schedule's variables, the optimizer built). `open_session` builds it,
makes the checkpoint manager (the chief's `model_dir/checkpoints`, a
worker's scratch dir under MultiWorkerMirrored) and restores the newest
readable checkpoint (`restore_latest_good`), refusing a model_dir the
workers disagree on. The `Session` also holds the run's data (a
`DataSource`) and gives the training and eval inputs; its "lookahead
schedule hooks" are the trainer's only contact with the lookahead queue.
"""

import dataclasses
import os
import re
from typing import Any, Dict, Optional

from absl import logging
import keras
import tensorflow as tf

from official_conadv import configs
from official_conadv import distribute_utils
from official_conadv import keras_mwms_fix
from official_conadv import train_plan
from official_conadv.data import input_pipeline
from official_conadv.modeling import backbones
from official_conadv.modeling import conadv_model
from official_conadv.modeling import keras_compat
from official_conadv.optimization import ema
from official_conadv.optimization import lars
from official_conadv.optimization import lr_schedules


# ---------------------------------------------------------------- building
def build_backbone(c: configs.ModelConfig, image_shape) -> keras.Model:
  """The backbone `c.name` names (`backbones`), for images of `image_shape`
  (H, W, C); a third BN set ("aug") when `c.augmented_route == "aug"`."""
  return backbones.build(c, image_shape,
                         augmented_bn=c.augmented_route == conadv_model.AUG)


def build_adversary(c: configs.AdversaryConfig):
  """The model's AdversaryConfig (None: the baseline)."""
  return c.to_model()


def build_optimizer(c: configs.OptimizerConfig, total_steps: int,
                    steps_per_epoch: int, mixed_precision: Optional[str]):
  warmup = min(total_steps, int(round(c.warmup_epochs * steps_per_epoch)))
  schedule = lr_schedules.WarmupPolynomialDecay(
      peak_learning_rate=c.learning_rate, total_steps=total_steps,
      warmup_steps=warmup, end_learning_rate=min(c.end_learning_rate,
                                                 c.learning_rate),
      power=c.power)
  # Keras' weight average with the recipe's warmup (optimization/ema.py);
  # without it the optimizer's variables, and so the checkpoints, are those
  # of earlier versions.
  average = ({} if c.ema_momentum is None else
             {"use_ema": True, "ema_momentum": c.ema_momentum,
              "ema_warmup": True})
  if c.name == "lars":
    optimizer = lars.LARS(learning_rate=schedule, momentum=c.momentum,
                          weight_decay_rate=c.weight_decay, eeta=c.eeta,
                          nesterov=c.nesterov, **average)
  elif average:
    optimizer = ema.SGD(learning_rate=schedule, momentum=c.momentum,
                        nesterov=c.nesterov,
                        weight_decay=c.weight_decay or None, **average)
  else:
    optimizer = keras.optimizers.SGD(learning_rate=schedule,
                                     momentum=c.momentum, nesterov=c.nesterov,
                                     weight_decay=c.weight_decay or None)
  if mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


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


def _jit_default(strategy) -> bool:
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return True
  return bool(tf.config.list_logical_devices("GPU"))


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


# ------------------------------------------------------------- session
@dataclasses.dataclass
class Session:
  """The model of a run, built under the strategy and restored from
  model_dir (`open_session`), with what the later stages need of the run.

  `restored`: the checkpoint restored, None for a fresh run.
  `train_window(first, n)` is the distributed input of training steps
  [first, first + n), `eval_dataset()` one pass of the eval split.
  """
  config: configs.ExperimentConfig
  plan: train_plan.Plan
  data: input_pipeline.DataSource
  strategy: tf.distribute.Strategy
  model_dir: str
  is_chief: bool
  model: conadv_model.ConAdvModel
  checkpoint: tf.train.Checkpoint
  manager: tf.train.CheckpointManager
  ckpt_dir: str
  restored: Optional[str] = None
  input_offset: int = 0   # Step t reads input batch t + input_offset.
  _first_batches: Any = dataclasses.field(default=None, init=False,
                                          repr=False)
  _eval_dataset: Any = dataclasses.field(default=None, init=False,
                                         repr=False)

  @property
  def step(self) -> int:
    """The model's optimizer step (waits for the device)."""
    return int(self.model.optimizer.iterations.numpy())

  def train_window(self, first: int, num_steps: int):
    """The training batches [first, first + num_steps), distributed."""
    c = self.config
    return self.data.train_dataset(
        self.strategy, global_batch_size=c.train.global_batch_size,
        num_classes=c.model.num_classes, seed=c.train.seed, start_step=first,
        num_steps=num_steps, steps_per_epoch=self.plan.steps_per_epoch,
        augment_pair=c.adversary.enabled)

  def eval_dataset(self):
    """One padded pass of the eval split (`plan.eval_pass_steps` batches per
    replica), distributed; built at the first call."""
    if self._eval_dataset is None:
      self._eval_dataset = self.data.eval_dataset(
          self.strategy, global_batch_size=self.config.train.eval_batch_size,
          num_classes=self.config.model.num_classes,
          seed=self.config.train.seed, eval_steps=self.plan.eval_pass_steps)
    return self._eval_dataset

  # ------------------------------------------ lookahead schedule hooks
  # The trainer's only contact with the model's schedule (lookahead: step t
  # trains on batch t from the queue and reads batch t + tau). The queue is
  # made before the restore, so the checkpoint restores it directly (each
  # worker its own slots); a fresh run fills it with batches 0..tau-1.
  def lookahead_offset(self) -> int:
    """Batches the training input runs ahead of the step (tau, or 0)."""
    schedule = self.model.schedule
    return schedule.input_offset if schedule is not None else 0

  def prepare_lookahead(self):
    """Before the restore: the queue, shaped like one replica's share of
    batches 0..tau-1 (a multi-worker distributed dataset does not know its
    batch size statically: it is the global batch / replicas)."""
    self._first_batches = self.train_window(0, self.input_offset)
    x, y, _ = keras.utils.unpack_x_y_sample_weight(
        keras_compat.first_replica_spec(self._first_batches.element_spec))
    local = (self.config.train.global_batch_size //
             self.strategy.num_replicas_in_sync)
    self.model.schedule.make_queue(tuple(
        tf.TensorSpec((local,) + tuple(s.shape[1:]), s.dtype)
        for s in (x, y)))

  def lookahead_filled(self) -> bool:
    return self.model.schedule.filled

  def fill_lookahead(self):
    """Before the first loop: batches 0..tau-1 into a queue not restored."""
    if self.input_offset and not self.lookahead_filled():
      self.model.schedule.fill(self._first_batches)

  def fit_kwargs(self) -> Dict[str, Any]:
    return {"input_is_ahead": True} if self.input_offset else {}


def checkpoint_dir(model_dir: str, is_chief: bool) -> str:
  """model_dir/checkpoints; a non-chief worker's scratch dir (TF recipe)."""
  if is_chief:
    return os.path.join(model_dir, "checkpoints")
  return os.path.join(model_dir, "tmp_worker_checkpoints",
                      str(distribute_utils.task_index()))


def open_session(config: configs.ExperimentConfig, plan: train_plan.Plan,
                 data: input_pipeline.DataSource, strategy, model_dir: str,
                 mode: str, is_chief: bool) -> Session:
  """Builds the model in `strategy`'s scope and restores the newest good
  checkpoint of model_dir (ValueError in eval mode without one, or when the
  workers or the lookahead queue disagree with it)."""
  if config.runtime.mixed_precision:
    keras.mixed_precision.set_global_policy(config.runtime.mixed_precision)
  jit = config.runtime.jit_compile
  if jit is None:
    jit = _jit_default(strategy)
  # Same seed => same initial weights; a resumed run overwrites them from
  # its checkpoint anyway.
  keras.utils.set_random_seed(config.train.seed)
  with strategy.scope():
    model = build_model(config, data.image_shape, plan.total_steps,
                        plan.steps_per_epoch, jit_compile=jit,
                        steps_per_execution=plan.steps_per_execution)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  ckpt_dir = checkpoint_dir(model_dir, is_chief)
  manager = tf.train.CheckpointManager(
      checkpoint, ckpt_dir, max_to_keep=config.train.keep_checkpoints)
  session = Session(config, plan, data, strategy, model_dir, is_chief, model,
                    checkpoint, manager, ckpt_dir)
  session.input_offset = session.lookahead_offset()
  if session.input_offset and mode != "eval":
    session.prepare_lookahead()
  session.restored = restore_latest_good(checkpoint, manager, announce=print)
  if session.restored:
    logging.info("Restored %s", session.restored)
  elif mode == "eval":
    raise ValueError(f"No checkpoint in {session.ckpt_dir} to evaluate.")
  check_workers_agree(strategy, session.step, session.ckpt_dir)
  if (session.input_offset and session.restored and
      not session.lookahead_filled()):
    raise ValueError(f"Checkpoint {session.restored} holds no lookahead "
                     "queue; use the adversary.schedule it was trained with.")
  return session
