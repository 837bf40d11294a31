"""Training, evaluation, checkpointing and export for one experiment.

`run(config, model_dir, mode, strategy)` does the work; `train.py` only parses
flags. Training is one `model.fit` over an infinite input pipeline, cut into
"loops" of `train.steps_per_loop` steps (Keras epochs). At the end of every
loop: a checkpoint (model, optimizer, step and the stale-weight buffer) in
`model_dir/checkpoints`, TensorBoard scalars in `model_dir/{train,eval}` and,
in train_and_eval mode, an evaluation. A restarted command restores the latest
checkpoint and goes on from its step, with the input pipeline skipped to the
same batch, so an interrupted run ends with the same weights as an
uninterrupted one. A non-finite loss stops the run before anything is saved,
keeping the last good checkpoint.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, Optional

from absl import logging
import keras
import tensorflow as tf

from official_conadv import configs
from official_conadv import distribute_utils
from official_conadv.data import input_pipeline
from official_conadv.modeling import conadv_model
from official_conadv.modeling import resnet
from official_conadv.modeling import small_cnn
from official_conadv.optimization import lars
from official_conadv.optimization import lr_schedules

CONFIG_FILE = "config.json"


class TrainingError(RuntimeError):
  """A run that must stop; the message is one line for the user."""


# ---------------------------------------------------------------- building
def build_backbone(c: configs.ModelConfig) -> keras.Model:
  if c.name == "small_cnn":
    return small_cnn.SmallCNN(num_classes=c.num_classes,
                              filters=(c.width, 2 * c.width),
                              synchronized_bn=c.synchronized_bn,
                              bn_momentum=c.bn_momentum,
                              bn_epsilon=c.bn_epsilon)
  return resnet.ResNet(
      depth=c.depth, num_classes=c.num_classes, variant=c.variant,
      width=c.width, bn_momentum=c.bn_momentum, bn_epsilon=c.bn_epsilon,
      synchronized_bn=c.synchronized_bn,
      zero_init_residual=c.zero_init_residual, input_mean=c.input_mean,
      input_std=c.input_std)


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


def build_model(config: configs.ExperimentConfig, image_shape,
                total_steps: int, steps_per_epoch: int, jit_compile: bool):
  """ConAdvModel built (both BN routes, stale buffer, optimizer) and compiled.

  Call inside the strategy scope.
  """
  model = conadv_model.ConAdvModel(build_backbone(config.model),
                                   adversary=build_adversary(config.adversary))
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
                steps_per_execution=config.train.steps_per_execution,
                jit_compile=jit_compile)
  # Build the optimizer now, with the adversarial BN variables present, so a
  # checkpoint restores its slots exactly.
  model.optimizer.build(model.trainable_variables)
  return model


# ------------------------------------------------------------- callbacks
class StepLimit(keras.callbacks.Callback):
  """Stops `fit` once the optimizer has done `total_steps` updates."""

  def __init__(self, total_steps):
    super().__init__()
    self.total_steps = total_steps

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) >= self.total_steps:
      self.model.stop_training = True


class NonFiniteGuard(keras.callbacks.Callback):
  """Stops at the first non-finite loss; the checkpointer then saves nothing."""

  def __init__(self):
    super().__init__()
    self.bad_step = None

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      self.bad_step = int(self.model.optimizer.iterations.numpy())
      self.model.stop_training = True


def _all_finite(model) -> bool:
  return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                             for v in model.trainable_variables]))


class Checkpointer(keras.callbacks.Callback):
  """Saves model + optimizer (+ stale buffer) at the end of every loop."""

  def __init__(self, manager, guard):
    super().__init__()
    self.manager = manager
    self.guard = guard

  def save(self):
    if self.guard.bad_step is None and not _all_finite(self.model):
      # The last update produced inf/NaN weights although its loss (computed
      # before the update) was finite: never checkpoint them.
      self.guard.bad_step = int(self.model.optimizer.iterations.numpy())
      self.model.stop_training = True
    if self.guard.bad_step is None:
      step = int(self.model.optimizer.iterations.numpy())
      if self.manager.latest_checkpoint is None or step != self._last_step():
        self.manager.save(checkpoint_number=step)

  def _last_step(self):
    return int(self.manager.latest_checkpoint.rsplit("-", 1)[-1])

  def on_epoch_end(self, epoch, logs=None):
    self.save()


class Scalars(keras.callbacks.Callback):
  """TensorBoard scalars per loop: logs, learning rate and images/s."""

  def __init__(self, model_dir, global_batch_size, is_chief):
    super().__init__()
    self.global_batch_size = global_batch_size
    self.is_chief = is_chief
    self.train_writer = tf.summary.create_file_writer(
        os.path.join(model_dir, "train")) if is_chief else None
    self.eval_writer = tf.summary.create_file_writer(
        os.path.join(model_dir, "eval")) if is_chief else None
    self._t0 = self._step0 = None
    self.images_per_second = []

  def on_epoch_begin(self, epoch, logs=None):
    self._t0 = time.perf_counter()
    self._step0 = int(self.model.optimizer.iterations.numpy())

  def on_epoch_end(self, epoch, logs=None):
    step = int(self.model.optimizer.iterations.numpy())
    seconds = time.perf_counter() - self._t0
    ips = (step - self._step0) * self.global_batch_size / max(seconds, 1e-9)
    self.images_per_second.append(ips)
    if not self.is_chief:
      return
    lr = self.model.optimizer.learning_rate
    lr = float(lr(step) if callable(lr) else lr)
    with self.train_writer.as_default(step=step):
      for k, v in (logs or {}).items():
        if not k.startswith("val_"):
          tf.summary.scalar(k, float(v))
      tf.summary.scalar("learning_rate", lr)
      tf.summary.scalar("images_per_second", ips)
    with self.eval_writer.as_default(step=step):
      for k, v in (logs or {}).items():
        if k.startswith("val_"):
          tf.summary.scalar(k[4:], float(v))
    self.train_writer.flush()
    self.eval_writer.flush()


# ------------------------------------------------------------ model_dir
def check_and_write_config(config: configs.ExperimentConfig, model_dir: str,
                           write: bool):
  """Refuses a model_dir written by an incompatible config; saves ours."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); use a new "
                         "--model_dir.") from None
    diffs = configs.incompatibilities(saved, config)
    if diffs:
      raise ValueError(
          f"--model_dir {model_dir} holds a run with an incompatible config "
          f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}); use "
          "a new --model_dir or the same settings.")
  if write:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(config.to_json())


def _jit_default(strategy) -> bool:
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return True
  return bool(tf.config.list_logical_devices("GPU"))


# ------------------------------------------------------------------- run
def run(config: configs.ExperimentConfig, model_dir: str, mode: str = "train",
        strategy: Optional[tf.distribute.Strategy] = None,
        verbose: int = 1, export: bool = True,
        callbacks=()) -> Dict[str, Any]:
  """Runs `mode` ("train", "eval" or "train_and_eval") and returns a summary.

  `callbacks` are extra Keras callbacks, run after the trainer's own (so a
  loop's checkpoint is written before they see its end).
  The summary dict holds the final `eval` metrics (top-1 as `accuracy`,
  `top5`), `train` logs, `step`, `wall_seconds` and `images_per_second`.
  Raises ValueError for bad input before anything is written to model_dir,
  TrainingError when training must stop (non-finite loss).
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
  data = config.data
  num_train = data.num_train_examples or input_pipeline.num_examples(
      data.name, "train", data_dir=data.data_dir)
  num_eval = data.num_eval_examples or input_pipeline.num_examples(
      data.name, "eval", data_dir=data.data_dir)
  steps_per_epoch = config.steps_per_epoch(num_train)
  total_steps = config.total_steps(num_train)
  steps_per_loop = min(config.train.steps_per_loop, total_steps)
  eval_steps = config.train.eval_steps or max(
      1, num_eval // config.train.eval_batch_size)

  # Validate the data before touching model_dir.
  input_pipeline.check_data(data.name, data_dir=data.data_dir)
  check_and_write_config(config, model_dir, write=mode != "eval" and is_chief)

  if config.runtime.mixed_precision:
    keras.mixed_precision.set_global_policy(config.runtime.mixed_precision)
  jit = config.runtime.jit_compile
  if jit is None:
    jit = _jit_default(strategy)

  image_shape = input_pipeline.image_shape(data.name, data.image_size)
  # Same seed => same initial weights (and, with data.deterministic, the same
  # run); a resumed run overwrites them from its checkpoint anyway.
  keras.utils.set_random_seed(config.train.seed)
  with strategy.scope():
    model = build_model(config, image_shape, total_steps, steps_per_epoch,
                        jit_compile=jit)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  if not is_chief:  # Non-chief workers write to a scratch dir (TF recipe).
    ckpt_dir = os.path.join(model_dir, "tmp_worker_checkpoints",
                            str(distribute_utils.task_index()))
  manager = tf.train.CheckpointManager(
      checkpoint, ckpt_dir, max_to_keep=config.train.keep_checkpoints)
  if manager.latest_checkpoint:
    try:
      checkpoint.restore(
          manager.latest_checkpoint).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      raise ValueError(
          f"Checkpoint {manager.latest_checkpoint} does not match this model "
          f"({str(e).strip().splitlines()[0][:200]}); it was written by "
          "another model or version: use a new --model_dir.") from None
    logging.info("Restored %s", manager.latest_checkpoint)
  elif mode == "eval":
    raise ValueError(f"No checkpoint in {ckpt_dir} to evaluate.")
  step = int(model.optimizer.iterations.numpy())

  def eval_dataset():
    return input_pipeline.distributed_dataset(
        strategy, data, split="eval", is_training=False,
        global_batch_size=config.train.eval_batch_size,
        num_classes=config.model.num_classes, seed=config.train.seed,
        corrupt_counter=corrupt)

  summary = {"step": step, "train": {}, "eval": {}}
  corrupt = input_pipeline.CorruptRecordCounter()
  scalars = Scalars(model_dir, config.train.global_batch_size, is_chief)
  if mode in ("train", "train_and_eval") and step < total_steps:
    train_ds = input_pipeline.distributed_dataset(
        strategy, data, split="train", is_training=True,
        global_batch_size=config.train.global_batch_size,
        num_classes=config.model.num_classes, seed=config.train.seed,
        skip_batches=step, corrupt_counter=corrupt)
    guard = NonFiniteGuard()
    all_callbacks = [guard, StepLimit(total_steps),
                     Checkpointer(manager, guard), scalars] + list(callbacks)
    if verbose:
      print(f"Training {config.name} ({config.method}) for {total_steps} "
            f"steps from step {step}; TensorBoard: tensorboard "
            f"--logdir={model_dir}", flush=True)
    history = model.fit(
        train_ds, epochs=math.ceil(total_steps / steps_per_loop),
        initial_epoch=step // steps_per_loop, steps_per_epoch=steps_per_loop,
        validation_data=eval_dataset() if mode == "train_and_eval" else None,
        validation_steps=eval_steps, callbacks=all_callbacks, verbose=verbose,
        shuffle=False)
    if guard.bad_step is not None:
      raise TrainingError(
          f"Non-finite loss at step {guard.bad_step}; stopped without saving. "
          f"Last good checkpoint: {manager.latest_checkpoint or 'none'}.")
    summary["train"] = {k: float(v[-1]) for k, v in history.history.items()
                        if v and not k.startswith("val_")}
    summary["step"] = int(model.optimizer.iterations.numpy())
  if mode in ("eval", "train_and_eval"):
    results = model.evaluate(eval_dataset(), steps=eval_steps,
                             verbose=verbose, return_dict=True)
    summary["eval"] = {k: float(v) for k, v in results.items()}
    if is_chief:
      with scalars.eval_writer.as_default(step=summary["step"]):
        for k, v in summary["eval"].items():
          tf.summary.scalar(k, v)
      scalars.eval_writer.flush()
  if export and mode != "eval" and is_chief:
    summary["export"] = export_model(model, model_dir, image_shape)
  summary["corrupt_records_skipped"] = corrupt.count
  summary["corrupt_record_locations"] = [list(l) for l in
                                         corrupt.locations[:20]]
  if corrupt.count:
    logging.warning("Skipped %d corrupt records, e.g. %s", corrupt.count,
                    corrupt.locations[:5])
  summary["wall_seconds"] = time.perf_counter() - start
  summary["images_per_second"] = (
      sorted(scalars.images_per_second)[len(scalars.images_per_second) // 2]
      if scalars.images_per_second else None)
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
