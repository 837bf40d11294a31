"""BN moving statistics over replicas: the shared problem, and its worker.

Used by `official_conadv/modeling/replica_statistics_test.py`: in process on
2-replica MirroredStrategy, and through `multi_worker.run_workers` as 2
worker processes (MultiWorkerMirroredStrategy, one replica each).

The problem: `ConAdvModel(SmallCNN(filters=(4, 8)), delay 1)` with
per-replica (unsynchronized) BN, trained so that the replicas see images of
different brightness (replica 0 / worker 0 gets them dimmed to a quarter),
so every replica's moving statistics move differently. Then three
evaluations of the eval split must agree: `evaluate` right after `fit`,
`evaluate` of a new model restored from a `tf.train.Checkpoint`, and the
exported SavedModel (`train_lib.export_model`) scored in plain TensorFlow.

Worker process (`--out`, `--ckpt_dir`, `--export_dir`; `--no_sync` turns
the averaging off to show what it fixes): prints a JSON summary with the
three evaluations (the export on the chief), and writes this worker's local
copy of every moving statistic to `--out`.
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
from official_conadv.modeling import dual_batch_norm  # pylint: disable=g-import-not-at-top
from official_conadv.modeling import replica_statistics  # pylint: disable=g-import-not-at-top
from official_conadv.modeling import small_cnn  # pylint: disable=g-import-not-at-top

NUM_CLASSES = 4
SHAPE = (8, 8, 3)
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 2
EPOCHS = 2
NUM_EVAL = 40  # Not a multiple of the batch: the last batch is short.
DIM = 0.25  # Replica 0's training images are scaled by this.
ADVERSARY = conadv_model.AdversaryConfig(
    epsilon=0.1, step_size=0.05, steps=1, random_init=False, delay=1, seed=3)


def train_data():
  """x float32 [EPOCHS * STEPS_PER_EPOCH * GLOBAL_BATCH, 8, 8, 3], y."""
  rng = np.random.default_rng(0)
  n = EPOCHS * STEPS_PER_EPOCH * GLOBAL_BATCH
  x = rng.uniform(0.0, 1.0, (n,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, n).astype("int32")
  return x, y


def eval_data():
  rng = np.random.default_rng(1)
  x = rng.uniform(0.0, 1.0, (NUM_EVAL,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, NUM_EVAL).astype("int32")
  return x, y


def mirrored_train_dataset():
  """Global batches whose first half (replica 0's under Mirrored) is
  dimmed."""
  x, y = train_data()
  first_half = (np.arange(len(x)) % GLOBAL_BATCH) < GLOBAL_BATCH // 2
  x[first_half] *= DIM
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def worker_train_dataset_fn():
  """`distribute_datasets_from_function` input: input pipeline 0 (worker 0)
  dims its images."""
  x, y = train_data()

  def fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    scale = DIM if ctx.input_pipeline_id == 0 else 1.0
    ds = ds.map(lambda image, label: (image * scale, label))
    return ds.batch(ctx.get_per_replica_batch_size(GLOBAL_BATCH),
                    drop_remainder=True)

  return fn


def eval_dataset():
  x, y = eval_data()
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def build_model():
  """The compiled ConAdvModel with fixed weights; call in the scope."""
  backbone = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8),
                                bn_momentum=0.5)
  model = conadv_model.ConAdvModel(backbone, adversary=ADVERSARY)
  model.build((None,) + SHAPE)
  rng = np.random.default_rng(2)
  for v in model.backbone.weights:
    if len(v.shape) >= 2:
      fan_in = int(np.prod(v.shape[:-1]))
      v.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), v.shape)
               .astype("float32"))
  model.compile(
      optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["sparse_categorical_accuracy"])
  model.optimizer.build(model.trainable_variables)
  return model


def evaluation(model):
  """{"loss", "accuracy", "examples"} of `model.evaluate` on the eval set."""
  logs = model.evaluate(eval_dataset(), verbose=0, return_dict=True)
  return {"loss": float(logs["loss"]),
          "accuracy": float(logs["sparse_categorical_accuracy"]),
          "examples": float(logs["examples"])}


def export_evaluation(model, export_dir):
  """The same numbers from the exported SavedModel, loaded and called by
  plain TensorFlow on the whole eval set."""
  from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
  paths = train_lib.export_model(model, export_dir, SHAPE)
  loaded = tf.saved_model.load(paths["saved_model"])
  x, y = eval_data()
  logits = loaded.serve(tf.constant(x)).numpy()
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      y, logits)
  accuracy = float(np.mean(np.argmax(logits, -1) == y))
  return {"loss": float(loss), "accuracy": accuracy,
          "examples": float(len(y))}


def local_copies(model):
  """{"<i>:<route>/<name>": this process's copies [replicas, ...]} of every
  moving statistic (keys independent of auto-numbered layer names)."""
  out = {}
  strategy = model.distribute_strategy
  for i, v in enumerate(replica_statistics.moving_statistics(model)):
    copies = strategy.experimental_local_results(v.value)
    key = f"{i:03d}:{dual_batch_norm.route_of(v)}/{v.name}"
    out[key] = np.stack([np.asarray(c) for c in copies])
  return out


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--ckpt_dir", required=True)
  parser.add_argument("--export_dir", required=True)
  parser.add_argument("--no_sync", action="store_true",
                      help="turn the averaging off (the behaviour before it)")
  args = parser.parse_args(argv)

  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
  from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
  if args.no_sync:
    replica_statistics.sync = lambda model, strategy=None: 0
  strategy = distribute_utils.get_strategy("multi_worker_mirrored")
  chief = distribute_utils.is_chief()
  with strategy.scope():
    model = build_model()
  model.fit(strategy.distribute_datasets_from_function(
      worker_train_dataset_fn()), epochs=EPOCHS,
            steps_per_epoch=STEPS_PER_EPOCH, verbose=0)
  info = {"task_index": distribute_utils.task_index(),
          "after_fit": evaluation(model)}
  np.savez(args.out, **local_copies(model))
  ckpt_dir = args.ckpt_dir if chief else os.path.join(
      args.ckpt_dir, "scratch", f"worker{distribute_utils.task_index()}")
  path = tf.train.Checkpoint(model=model).save(os.path.join(ckpt_dir, "ckpt"))
  if chief:
    info["export"] = export_evaluation(model, args.export_dir)
  with strategy.scope():
    restored = build_model()
  tf.train.Checkpoint(model=restored).restore(path).assert_consumed()
  info["after_restore"] = evaluation(restored)
  multi_worker.emit_result(info)


if __name__ == "__main__":
  main(sys.argv[1:])
