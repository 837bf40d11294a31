"""ConAdvModel under MultiWorkerMirroredStrategy: worker script + shared problem.

Run by `official_conadv/multi_worker_test.py` through
`multi_worker.run_workers` (TF_CONFIG set per process); the test imports the
same module for the one-process reference, so both sides train exactly the
same problem:

  * `ConAdvModel(SmallCNN(synchronized_bn=True), AdversaryConfig(delay=1,
    random_init=False))`, SGD with momentum, sparse CE from logits;
  * `NUM_STEPS` global batches of `GLOBAL_BATCH` examples of fixed
    pseudo-random data (`data()`); with `strategy.distribute_datasets_from_function`
    worker i of n gets examples i, i + n, ... of every global batch, so the
    union of the workers' shards is the one-process global batch;
  * fixed initial weights (`initialize()`, numpy, not Keras' seeded
    initializers), the same in every process.

Worker phases (`--phase`):

  full    one uninterrupted `fit` over batches [0, NUM_STEPS); a callback
          checkpoints after `--save_at` steps (`tf.train.Checkpoint(model=,
          optimizer=)` + `CheckpointManager`; the chief writes to
          `--ckpt_dir`, the other workers to a scratch dir under it, the
          standard MWMS recipe) and records the state at that point.
  resume  a fresh process: builds the model and optimizer, restores the
          latest checkpoint of `--ckpt_dir`, then `fit`s batches
          [restored step, NUM_STEPS) (the input skips the trained batches).

Each worker writes its state (backbone weights, stale-weight slot 0,
optimizer variables, iterations) to `--out` (npz; "{task_index}" is replaced
by `run_workers`) and prints a small JSON summary with
`multi_worker.emit_result`.
"""

import argparse
import os
import sys

if __name__ == "__main__":  # Worker process: quiet, CPU only, one device.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ["CUDA_VISIBLE_DEVICES"] = ""

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
from official_conadv.modeling import small_cnn  # pylint: disable=g-import-not-at-top

NUM_CLASSES = 5
SHAPE = (8, 8, 3)
GLOBAL_BATCH = 16
NUM_STEPS = 4
SAVE_AT = 2
LR = 0.1
MOMENTUM = 0.9
ADVERSARY = conadv_model.AdversaryConfig(
    epsilon=0.1, step_size=0.05, steps=1, random_init=False, delay=1, seed=3)


# ------------------------------------------------------------ shared problem
def data(num_steps=NUM_STEPS):
  """x float32 [num_steps * GLOBAL_BATCH, 8, 8, 3] in [0, 1], y int32."""
  rng = np.random.default_rng(0)
  n = num_steps * GLOBAL_BATCH
  x = rng.uniform(0.0, 1.0, (n,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, n).astype("int32")
  return x, y


def build_model():
  """The compiled ConAdvModel; call inside the strategy scope."""
  backbone = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8),
                                synchronized_bn=True)
  model = conadv_model.ConAdvModel(backbone, adversary=ADVERSARY)
  model.build((None,) + SHAPE)
  initialize(model)
  model.compile(
      optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["sparse_categorical_accuracy"])
  return model


def initialize(model):
  """Fixed, process-independent initial weights of `model.backbone`."""
  initialize_weights(model.backbone.weights)


def initialize_weights(weights):
  """Fixed, process-independent initial weights (kernels from numpy; BN
  gamma/beta/statistics and biases keep their constant initializers)."""
  rng = np.random.default_rng(1)
  for v in weights:
    if len(v.shape) >= 2:
      fan_in = int(np.prod(v.shape[:-1]))
      v.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), v.shape)
               .astype("float32"))


def dataset_fn(start=0, stop=NUM_STEPS):
  """`distribute_datasets_from_function` input: batches [start, stop)."""
  x, y = data()

  def fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    ds = ds.batch(ctx.get_per_replica_batch_size(GLOBAL_BATCH),
                  drop_remainder=True)
    return ds.skip(start).take(stop - start)

  return fn


def state(model):
  """Everything a resumed run must reproduce, as a dict of numpy arrays."""
  out = {}
  for i, v in enumerate(model.backbone.weights):
    out[f"backbone/{i:03d}"] = v.numpy()
  for i, v in enumerate(model.schedule.slot(0)):
    out[f"stale0/{i:03d}"] = v.numpy()
  for i, v in enumerate(model.optimizer.variables):
    out[f"optimizer/{i:03d}"] = np.asarray(v.numpy())
  out["iterations"] = np.asarray(int(model.optimizer.iterations.numpy()))
  return out


def checkpoint_dir(base):
  """The chief writes to `base`; every other worker to its own scratch dir
  (all workers must take part in saving under MWMS)."""
  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
  if distribute_utils.is_chief():
    return base
  return os.path.join(base, "scratch",
                      f"worker{distribute_utils.task_index()}")


# ------------------------------------------------------------ worker process
class _SaveAt(keras.callbacks.Callback):
  """Checkpoints (and records the state) after `step` training steps."""

  def __init__(self, manager, step, out_path):
    super().__init__()
    self.manager, self.step, self.out_path = manager, step, out_path
    self.saved = None

  def on_train_batch_end(self, batch, logs=None):
    if batch + 1 == self.step:
      self.saved = self.manager.save(checkpoint_number=self.step)
      np.savez(self.out_path, **state(self.model))


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--phase", choices=["full", "resume"], required=True)
  parser.add_argument("--ckpt_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--save_at", type=int, default=SAVE_AT)
  args = parser.parse_args(argv)

  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
  from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
  strategy = distribute_utils.get_strategy("multi_worker_mirrored")
  with strategy.scope():
    model = build_model()
    # Slots exist before a restore (and are what fit would build anyway).
    model.optimizer.build(model.trainable_variables)
  ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  manager = tf.train.CheckpointManager(
      ckpt, checkpoint_dir(args.ckpt_dir), max_to_keep=2)
  info = {"task_index": distribute_utils.task_index(),
          "is_chief": distribute_utils.is_chief(),
          "replicas": strategy.num_replicas_in_sync,
          "phase": args.phase}

  callbacks = []
  start = 0
  if args.phase == "full":
    save = _SaveAt(manager, args.save_at,
                   args.out.replace(".npz", f"_at{args.save_at}.npz"))
    callbacks.append(save)
  else:
    latest = tf.train.latest_checkpoint(args.ckpt_dir)  # The chief's.
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in {args.ckpt_dir}")
    ckpt.restore(latest).assert_existing_objects_matched()
    start = int(model.optimizer.iterations.numpy())
    info["restored_from"] = os.path.basename(latest)
    np.savez(args.out.replace(".npz", "_restored.npz"), **state(model))
  info["start"] = start

  history = model.fit(
      strategy.distribute_datasets_from_function(dataset_fn(start)),
      epochs=1, verbose=0, callbacks=callbacks)
  if args.phase == "full":
    info["saved"] = save.saved and os.path.basename(save.saved)
  info["loss"] = history.history["loss"]
  info["iterations"] = int(model.optimizer.iterations.numpy())
  np.savez(args.out, **state(model))
  multi_worker.emit_result(info)


if __name__ == "__main__":
  main(sys.argv[1:])
  from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
  multi_worker.exit_together()  # No 2 s teardown; outputs written.
