"""Training, evaluation, checkpointing and export for one experiment.

`run(config, model_dir, mode, strategy)` does the work; `train.py` only parses
flags. `run` is a list of stages, each testable on its own:

  train_plan.make_plan        sizes, loop ends, eval steps, steps per
                              execution and why (pure: no TF op)
  check_model_dir,            refuse bad input before anything is written
  check_and_write_config
  train_session.open_session  the model built in the strategy scope and
                              restored from the newest good checkpoint
  train                       the loops: fit, guards, checkpoint, scalars,
                              evaluation, preemption
  finish                      the last evaluation, the export, summary.json

The data are one `input_pipeline.DataSource`, resolved once from
`config.data`. Training is cut into loops that end exactly at multiples of
`train.steps_per_loop` (counted from step 0) and at the last step; each loop
is one `model.fit` over a finite input window of exactly its steps, read from
the pipeline's per-epoch seeded order (`input_pipeline`), so
`steps_per_execution` need not divide anything and the run never overshoots.
With `adversary.schedule=lookahead` the queue is filled from batches
0..tau-1 before the first loop, and each loop's window starts tau batches
later (step t reads batch t + tau: `model.schedule.fill`, then
`ConAdvModel.fit(input_is_ahead=True)`).
At the end of every loop: a checkpoint (model, optimizer, step, BN statistics
and the stale-weight buffer or lookahead queue; under MultiWorkerMirrored each
worker's own, as the queue holds its replicas' batches) in
`model_dir/checkpoints`, TensorBoard scalars
in `model_dir/{train,eval}` and, in train_and_eval mode, an exact evaluation
(every validation image scored once: padded, masked batches). The BN moving
statistics are the mean over the replicas by then (ConAdvModel averages them
at the end of every fit and before every evaluation).

Weight average (`optimizer.ema_momentum`, optimization/ema.py): every loop
trains from the raw weights (`ema.keep_raw_weights`), evaluation and export
use the average (`ema.averaged_weights`, an exact swap); `eval` is the
average's evaluation and `eval_raw` the raw weights' (summary.json,
TensorBoard `eval/` and `eval_raw/`). Loop ends change no weight.

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
from official_conadv import train_plan
from official_conadv import train_session
from official_conadv.data import input_pipeline
from official_conadv.data import source as source_lib
from official_conadv.modeling import conadv_model
from official_conadv.optimization import ema


CONFIG_FILE = "config.json"
MODES = ("train", "eval", "train_and_eval")
# Parts of the stages, public here too (their home: train_plan.py and
# train_session.py).
loop_ends = train_plan.loop_ends
steps_per_execution_for = train_plan.steps_per_execution_for
build_backbone = train_session.build_backbone
build_adversary = train_session.build_adversary
build_optimizer = train_session.build_optimizer
build_model = train_session.build_model
restore_latest_good = train_session.restore_latest_good
check_workers_agree = train_session.check_workers_agree


class TrainingError(RuntimeError):
  """A run that must stop; the message is one line for the user."""


class Preempted(Exception):
  """Raised after the checkpoint of a SIGTERM-stopped run is saved."""


# ------------------------------------------------------------------- run
def run(config: configs.ExperimentConfig, model_dir: str, mode: str = "train",
        strategy: Optional[tf.distribute.Strategy] = None,
        verbose: int = 1, export: bool = True,
        callbacks=(), allow_config_change: bool = False) -> Dict[str, Any]:
  """Runs `mode` ("train", "eval" or "train_and_eval") and returns a summary.

  Training runs in loops that end exactly at multiples of
  `train.steps_per_loop` and at the last step (module docstring); after
  every loop: a checkpoint, TensorBoard scalars and, in train_and_eval
  mode, an exact evaluation (every image once).

  `callbacks` are extra Keras callbacks given to every loop's `fit`, after
  the trainer's own. The summary dict holds the final `eval` metrics (top-1 as
  `accuracy`, `top5`, `loss`, `examples` = images scored), `train` logs,
  `step`, `wall_seconds`, `train_seconds` and `images_per_second` (training
  steps only). Raises ValueError for bad input before anything is written to
  model_dir, TrainingError when training must stop (non-finite loss, an
  inexact loop or evaluation), Preempted after saving on SIGTERM.
  """
  if mode not in MODES:
    raise ValueError(f"--mode must be train, eval or train_and_eval, got "
                     f"{mode!r}.")
  config.validate()
  started = time.perf_counter()
  strategy = strategy or tf.distribute.get_strategy()
  is_chief = distribute_utils.is_chief()
  for batch_size in (config.train.global_batch_size,
                     config.train.eval_batch_size):
    distribute_utils.check_global_batch_size(batch_size, strategy)
  # Where we write and where we read must be directories (one-line errors
  # before anything is written; the data's are checked by the data layer).
  check_model_dir(model_dir)
  if is_chief:
    print(f"devices: {distribute_utils.describe_devices(strategy)}",
          flush=True)
  data = input_pipeline.DataSource(config.data)
  plan = train_plan.make_plan(config, data.num_examples("train"),
                              data.num_examples("eval"),
                              train_plan.StrategyFacts.of(strategy))
  data.check()  # Validate the data before touching model_dir.
  changed = check_and_write_config(config, model_dir,
                                   write=mode != "eval" and is_chief,
                                   allow_config_change=allow_config_change)
  if plan.steps_per_execution_note and is_chief:
    print(plan.steps_per_execution_note, flush=True)
  session = train_session.open_session(config, plan, data, strategy,
                                       model_dir, mode, is_chief)
  if changed:
    print(f"Config changed on resume at step {session.step} "
          f"(--allow_config_change): {'; '.join(changed)}. Learning rate now "
          f"{_learning_rate(session.model.optimizer, session.step):.6g}; "
          f"{plan.total_steps} steps in all.", flush=True)
  scalars = ScalarWriter(model_dir, enabled=is_chief)
  progress = Progress(step=session.step)
  if mode != "eval":
    progress = train(session, scalars,
                     evaluate_each_loop=mode == "train_and_eval",
                     callbacks=callbacks, verbose=verbose,
                     say=print if (verbose and is_chief) else _silent)
  return finish(session, progress, scalars, mode=mode, export=export,
                started=started)


def _silent(*args, **kwargs):
  del args, kwargs


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
    if (config.adversary.input_offset and
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


# ------------------------------------------------------------ evaluation
def evaluations(session: train_session.Session):
  """(eval, eval_raw): with a weight average (optimizer.ema_momentum), the
  evaluation of the averaged weights and of the raw ones; without, the
  evaluation of the weights and None. The raw weights are back afterwards,
  bit for bit (`ema.averaged_weights`)."""
  if not ema.enabled(session.model.optimizer):
    return evaluate(session), None
  with ema.averaged_weights(session.model):
    averaged = evaluate(session)
  return averaged, evaluate(session)


def evaluate(session: train_session.Session) -> Dict[str, Any]:
  """The session model's metrics, with its current weights, on
  `plan.eval_steps` batches of the eval pass (all of them unless
  train.eval_steps is smaller); `examples` = images scored. A full
  evaluation must score every image of the split once (TrainingError
  otherwise)."""
  plan = session.plan
  results = session.model.evaluate(session.eval_dataset(),
                                   steps=plan.eval_steps, verbose=0,
                                   return_dict=True)
  results = {k: float(v) for k, v in results.items()}
  results["examples"] = int(round(results.get("examples", 0)))
  skipped = session.data.eval_corrupt.count
  expected = plan.num_eval - skipped
  if plan.full_eval and results["examples"] != expected:
    raise TrainingError(
        f"Evaluation scored {results['examples']} images, expected "
        f"{expected} ({plan.num_eval} in the eval split, {skipped} "
        "skipped as corrupt); check data.num_eval_examples against the "
        "data.")
  return results


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


# ------------------------------------------------------------ the loops
class ScalarWriter:
  """TensorBoard scalars in model_dir/<kind> (the chief's; elsewhere `write`
  does nothing): train, eval and, with a weight average, eval_raw."""

  KINDS = ("train", "eval", "eval_raw")

  def __init__(self, model_dir: str, enabled: bool):
    self._model_dir, self._enabled = model_dir, enabled
    self._writers = {}

  def write(self, kind: str, step: int, values: Dict[str, Any]):
    """The numbers among `values` at `step` in `kind` (one of KINDS)."""
    if kind not in self.KINDS:
      raise ValueError(f"Unknown scalar kind {kind!r}; valid: {self.KINDS}.")
    if not self._enabled:
      return
    writer = self._writers.get(kind)
    if writer is None:
      writer = self._writers[kind] = tf.summary.create_file_writer(
          os.path.join(self._model_dir, kind))
    with writer.as_default(step=step):
      for k, v in values.items():
        if isinstance(v, (int, float)):
          tf.summary.scalar(k, v)
    writer.flush()


@dataclasses.dataclass
class Progress:
  """Where training got to: the summary's step, last `train` logs, `eval`
  metrics (of the weight average when there is one) and `eval_raw` (of the
  raw weights; None without an average), and the time spent in training
  steps."""
  step: int
  train: Dict[str, float] = dataclasses.field(default_factory=dict)
  eval: Dict[str, Any] = dataclasses.field(default_factory=dict)
  eval_raw: Optional[Dict[str, Any]] = None
  train_seconds: float = 0.0
  trained_steps: int = 0


def _check_loop(session: train_session.Session, guard: NonFiniteGuard,
                step: int, end: int, preempted: bool):
  """TrainingError (nothing saved) when a loop's loss or weights are not
  finite, or it stopped before `end` without a preemption."""
  last_good = session.manager.latest_checkpoint or "none"
  if guard.bad_step is not None:
    raise TrainingError(
        f"Non-finite loss at step {guard.bad_step}; stopped without "
        f"saving. Last good checkpoint: {last_good}.")
  if not _all_finite(session.model):
    raise TrainingError(
        f"Non-finite weights after step {step}; stopped without saving."
        f" Last good checkpoint: {last_good}.")
  if step != end and not preempted:
    raise TrainingError(
        f"Loop ended at step {step}, expected {end}: the input window "
        "ran short or a callback stopped training; nothing saved.")


def train(session: train_session.Session, scalars: ScalarWriter, *,
          evaluate_each_loop: bool, callbacks=(), verbose: int = 1,
          say=print) -> Progress:
  """The training loops from the session's step to `plan.total_steps`: each
  one `fit` over exactly its input window, then a checkpoint, scalars and,
  with `evaluate_each_loop`, an evaluation. Raises TrainingError, or
  Preempted after saving on SIGTERM."""
  plan, model = session.plan, session.model
  progress = Progress(step=session.step)
  ends = plan.loop_ends(progress.step)
  if not ends:
    return progress
  say(f"Training {session.config.name} ({session.config.method}) for "
      f"{plan.total_steps} steps from step {progress.step}: {len(ends)} loops "
      f"of up to {plan.steps_per_loop} steps, {plan.steps_per_execution} per "
      f"execution; TensorBoard: tensorboard --logdir={session.model_dir}",
      flush=True)
  guard = NonFiniteGuard()
  session.fill_lookahead()
  saved_step = progress.step if session.restored else None
  with PreemptionWatcher(session.strategy) as watcher:
    for end in ends:
      begin, timer = session.step, TrainTimer()
      # Loops continue from the raw weights (no end-of-fit overwrite with
      # the weight average).
      with ema.keep_raw_weights(model.optimizer):
        history = model.fit(
            session.train_window(begin + session.input_offset, end - begin),
            epochs=1, steps_per_epoch=end - begin,
            callbacks=[guard, timer, watcher] + list(callbacks),
            verbose=verbose, shuffle=False, **session.fit_kwargs())
      step = session.step
      _check_loop(session, guard, step, end, preempted=watcher.requested)
      progress.train_seconds += timer.seconds
      progress.trained_steps += step - begin
      if step != saved_step:
        session.manager.save(checkpoint_number=step)
        saved_step = step
      progress.train = {k: float(v[-1]) for k, v in history.history.items()
                        if v}
      progress.step = step
      ips = ((step - begin) * session.config.train.global_batch_size /
             max(timer.seconds, 1e-9))
      scalars.write("train", step, dict(
          progress.train, learning_rate=_learning_rate(model.optimizer, step),
          images_per_second=ips))
      if watcher.requested:
        raise Preempted(
            f"SIGTERM received: saved the checkpoint of step {step} in "
            f"{session.ckpt_dir}; rerun the same command to resume.")
      line = (f"step {step}/{plan.total_steps}: "
              f"loss={progress.train.get('loss', 0):.4f} "
              f"{ips:.1f} images/s (training steps only)")
      if evaluate_each_loop:
        progress.eval, progress.eval_raw = evaluations(session)
        _write_evaluations(scalars, step, progress.eval, progress.eval_raw)
        line += (f" | eval top1={progress.eval.get('accuracy', 0):.4f} "
                 f"on {progress.eval['examples']} images")
        if progress.eval_raw is not None:
          line += (" (weight average; raw weights "
                   f"{progress.eval_raw.get('accuracy', 0):.4f})")
      say(line, flush=True)
  return progress


def _write_evaluations(scalars, step, averaged, raw):
  scalars.write("eval", step, averaged)
  if raw is not None:
    scalars.write("eval_raw", step, raw)


def _all_finite(model) -> bool:
  return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                             for v in model.trainable_variables]))


def _learning_rate(optimizer, step: int) -> float:
  """The learning rate at `step` (the inner optimizer's under loss scaling)."""
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)
  schedule = getattr(optimizer, "_learning_rate", None)
  if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
    return float(schedule(step))
  return float(optimizer.learning_rate)


# ------------------------------------------------------------- the finish
def finish(session: train_session.Session, progress: Progress,
           scalars: ScalarWriter, *, mode: str, export: bool,
           started: float) -> Dict[str, Any]:
  """The run's summary: an evaluation unless the last loop made one (eval
  and train_and_eval modes), the export (train modes, chief), corrupt
  records skipped, timings; written to model_dir/summary.json (chief).
  With a weight average, `eval` and the export are the average's and
  `eval_raw` is the raw weights' evaluation."""
  summary = {"step": progress.step, "train": progress.train,
             "eval": progress.eval}
  if progress.eval_raw is not None:
    summary["eval_raw"] = progress.eval_raw
  if mode == "eval" or (mode == "train_and_eval" and not summary["eval"]):
    summary["eval"], raw = evaluations(session)
    if raw is not None:
      summary["eval_raw"] = raw
    _write_evaluations(scalars, summary["step"], summary["eval"], raw)
  if export and mode != "eval" and session.is_chief:
    with ema.averaged_weights(session.model):
      summary["export"] = export_model(session.model, session.model_dir,
                                       session.data.image_shape)
  skipped, locations = session.data.skipped_records()
  summary["corrupt_records_skipped"] = skipped
  summary["corrupt_record_locations"] = [list(l) for l in locations[:20]]
  if skipped:
    logging.warning("Skipped %d corrupt records, e.g. %s", skipped,
                    locations[:5])
  summary["wall_seconds"] = time.perf_counter() - started
  summary["train_seconds"] = progress.train_seconds
  summary["images_per_second"] = (
      progress.trained_steps * session.config.train.global_batch_size /
      progress.train_seconds if progress.train_seconds > 0 else None)
  if session.is_chief:
    with tf.io.gfile.GFile(os.path.join(session.model_dir, "summary.json"),
                           "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def export_model(model: conadv_model.ConAdvModel, model_dir: str,
                 image_shape) -> Dict[str, str]:
  """Writes the main-BN inference model as a SavedModel and a .keras file.

  SavedModel (`export/saved_model`): `serve(images)` float32 [B, H, W, C] in
  [0, 1] -> float32 logits, for every backbone (a converted keras.applications
  backbone's `pixel_scale` is applied inside); loads with plain
  `tf.saved_model.load`, no official_conadv needed. `.keras`
  (`export/model.keras`): `model.inference_model()`, the backbone without
  the adversarial BN. For the project's backbones it takes [0, 1] images and
  loading it needs official_conadv.modeling (its layer classes); for a
  converted keras.applications backbone it is the original architecture,
  which takes images * pixel_scale and loads with Keras alone.
  """
  inference = model.inference_model()
  # A converted backbone scales [0, 1] pixels by pixel_scale before the
  # original model; its inference model is that original model.
  scale = float(getattr(model.backbone, "pixel_scale", 1.0))
  export_dir = os.path.join(model_dir, "export")
  saved_model_dir = os.path.join(export_dir, "saved_model")
  archive = keras.export.ExportArchive()
  archive.track(inference)

  def serve(images):
    if scale != 1.0:
      images = images * scale
    return tf.cast(inference(images, training=False), tf.float32)

  archive.add_endpoint(
      "serve", serve,
      input_signature=[tf.TensorSpec((None,) + tuple(image_shape),
                                     tf.float32, name="images")])
  archive.write_out(saved_model_dir, verbose=False)
  keras_path = os.path.join(export_dir, "model.keras")
  inference.save(keras_path)
  return {"saved_model": saved_model_dir, "keras": keras_path}
