"""The lookahead schedule under MultiWorkerMirroredStrategy: worker + problem.

Run by `official_conadv/multi_worker_lookahead_test.py` through
`multi_worker.run_workers` (TF_CONFIG set per process); the test imports this
module for the one-process reference, so both sides train the same problem:

  * `ConAdvModel(SmallCNN(synchronized_bn=True), AdversaryConfig(delay=tau,
    steps=2, ...))` with plain SGD and sparse CE from logits, built under
    `distribute_utils.get_strategy("multi_worker_mirrored")`;
  * `NUM_STEPS` (>= 2 * tau + 3 for tau <= 2) global batches of
    `GLOBAL_BATCH` pseudo-random examples, one `model.fit` of the batched
    `tf.data.Dataset` (Keras splits every global batch between the workers);
  * fixed initial weights (`conadv_worker.initialize_weights`, numpy), the
    same in every process; the data of `conadv_worker.data`.

For every tau in `--taus` the worker trains three models, each written to
`--out` with "{run}" replaced by `tau{tau}_{schedule}_{init}`:

  delayed, random     PGD-2 from a random start (`random_init=True`);
  lookahead, random   the same adversary, lookahead schedule;
  lookahead, plain    PGD-2 from the clean image (`random_init=False`): the
                      run the test compares with the hand-written one-process
                      reference loop (random starts are drawn per replica,
                      so a one-replica loop cannot draw the same noise).

Prints (`multi_worker.emit_result`) {"task_index", "replicas", "runs": {run:
iterations}}.
"""

import argparse
import dataclasses
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
from official_conadv.testing import conadv_worker as shared  # pylint: disable=g-import-not-at-top

NUM_CLASSES = shared.NUM_CLASSES
SHAPE = shared.SHAPE
GLOBAL_BATCH = shared.GLOBAL_BATCH
NUM_STEPS = 7
LR = 0.1
ADVERSARY = conadv_model.AdversaryConfig(
    epsilon=0.1, step_size=0.05, steps=2, random_init=True, seed=3)
RUNS = (("delayed", True), ("lookahead", True), ("lookahead", False))


def run_name(tau, schedule, random_init):
  return f"tau{tau}_{schedule}_{'random' if random_init else 'plain'}"


def adversary(tau, schedule, random_init):
  return dataclasses.replace(ADVERSARY, delay=tau, schedule=schedule,
                             random_init=random_init)


def data():
  """x float32 [NUM_STEPS * GLOBAL_BATCH, 8, 8, 3] in [0, 1], y int32."""
  return shared.data(NUM_STEPS)


def dataset():
  """The global batches as one batched dataset (Keras shards it by data:
  each worker gets its part of every global batch)."""
  x, y = data()
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(
      GLOBAL_BATCH, drop_remainder=True).with_options(options)


def backbone():
  """SmallCNN with synchronized BN and the fixed initial weights."""
  model = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8),
                             synchronized_bn=True)
  model(tf.zeros((1,) + SHAPE), training=False)
  shared.initialize_weights(model.weights)
  return model


def build_model(tau, schedule, random_init):
  """The compiled ConAdvModel; call inside the strategy scope."""
  model = conadv_model.ConAdvModel(
      backbone(), adversary=adversary(tau, schedule, random_init))
  model.compile(
      optimizer=keras.optimizers.SGD(LR),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def weights(model):
  return {f"{i:03d}": v.numpy() for i, v in enumerate(model.backbone.weights)}


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--taus", default="1,2")
  args = parser.parse_args(argv)

  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
  from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
  strategy = distribute_utils.get_strategy("multi_worker_mirrored")
  info = {"task_index": distribute_utils.task_index(),
          "replicas": strategy.num_replicas_in_sync, "runs": {}}
  for tau in (int(t) for t in args.taus.split(",")):
    for schedule, random_init in RUNS:
      with strategy.scope():
        model = build_model(tau, schedule, random_init)
      model.fit(dataset(), epochs=1, verbose=0)
      name = run_name(tau, schedule, random_init)
      info["runs"][name] = int(model.optimizer.iterations.numpy())
      np.savez(args.out.replace("{run}", name), **weights(model))
  multi_worker.emit_result(info)


if __name__ == "__main__":
  main(sys.argv[1:])
  from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
  multi_worker.exit_together()  # No 2 s teardown; outputs written.
