"""ConAdvModel under a MultiWorkerMirroredStrategy the user made: worker.

Run by `official_conadv/multi_worker_test.py` through
`multi_worker.run_workers` (TF_CONFIG set per process). Unlike
`conadv_worker.py` it does what a user of the library would do, and nothing
more:

  * `tf.distribute.MultiWorkerMirroredStrategy()` straight from TF_CONFIG
    (not `distribute_utils.get_strategy`, which applies `keras_mwms_fix`);
  * the ConAdvModel of `conadv_worker` (delay 1) created and compiled in its
    scope, never built explicitly: `fit` builds it (a callback then sets the
    fixed initial weights of `conadv_worker.initialize`, so the run equals
    `conadv_worker.build_model()` trained in one process);
  * `fit` over the `NUM_STEPS` global batches, then `evaluate` over them;
  * `keras_mwms_fix` is never called here: the worker checks (and reports)
    that it was not applied before `fit` and was after, i.e. ConAdvModel
    applied it for the user's strategy.

`--no_auto_fix` replaces `keras_mwms_fix.apply_for` (what ConAdvModel calls)
with a no-op, to show what the auto-apply is for: `fit` then fails with the
upstream error (keras-team/keras#20585), reported as `error`.

Writes the final state (`conadv_worker.state`: backbone weights incl. BN
statistics, stale-weight slot 0, optimizer variables, iterations) to `--out`
("{task_index}" replaced by `run_workers`) and prints a JSON summary with
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

from official_conadv import keras_mwms_fix  # pylint: disable=g-import-not-at-top
from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
from official_conadv.modeling import small_cnn  # pylint: disable=g-import-not-at-top
from official_conadv.testing import conadv_worker as problem  # pylint: disable=g-import-not-at-top
from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top


def build_unbuilt_model():
  """`problem.build_model()` without `build` and `initialize`."""
  backbone = small_cnn.SmallCNN(num_classes=problem.NUM_CLASSES,
                                filters=(4, 8), synchronized_bn=True)
  model = conadv_model.ConAdvModel(backbone, adversary=problem.ADVERSARY)
  model.compile(
      optimizer=keras.optimizers.SGD(problem.LR, momentum=problem.MOMENTUM),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["sparse_categorical_accuracy"])
  return model


class _InitializeAtTrainBegin(keras.callbacks.Callback):
  """Sets the fixed initial weights once `fit` has built the model, and
  records whether the fix was in place by then."""

  def __init__(self):
    super().__init__()
    self.applied_at_train_begin = None

  def on_train_begin(self, logs=None):
    self.applied_at_train_begin = keras_mwms_fix.is_applied()
    problem.initialize(self.model)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--no_auto_fix", action="store_true",
                      help="make keras_mwms_fix.apply_for a no-op")
  args = parser.parse_args(argv)

  if args.no_auto_fix:
    keras_mwms_fix.apply_for = lambda strategy: keras_mwms_fix.is_applied()

  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  with strategy.scope():
    model = build_unbuilt_model()
  resolver = strategy.cluster_resolver
  info = {"task_index": int(resolver.task_id),
          "task_type": resolver.task_type,
          "replicas": strategy.num_replicas_in_sync,
          "is_multi_worker": keras_mwms_fix.is_multi_worker(strategy),
          "built_before_fit": bool(model.built),
          "applied_before_fit": keras_mwms_fix.is_applied()}
  # A user-made strategy: nothing so far may have applied the fix.
  assert not info["applied_before_fit"], info
  assert not info["built_before_fit"], info

  init = _InitializeAtTrainBegin()
  try:
    history = model.fit(
        strategy.distribute_datasets_from_function(problem.dataset_fn()),
        epochs=1, verbose=0, callbacks=[init])
  except Exception as e:  # pylint: disable=broad-except
    if not args.no_auto_fix:
      raise
    info["error"] = f"{type(e).__name__}: {e}"[:2000]
    info["applied_after_fit"] = keras_mwms_fix.is_applied()
    multi_worker.emit_result(info)
    return
  info["error"] = None
  info["applied_at_train_begin"] = init.applied_at_train_begin
  info["applied_after_fit"] = keras_mwms_fix.is_applied()
  assert info["applied_after_fit"] == (not args.no_auto_fix), info
  info["loss"] = history.history["loss"]
  info["iterations"] = int(model.optimizer.iterations.numpy())
  np.savez(args.out, **problem.state(model))
  info["eval"] = model.evaluate(
      strategy.distribute_datasets_from_function(problem.dataset_fn()),
      verbose=0, return_dict=True)
  multi_worker.emit_result(info)


if __name__ == "__main__":
  main(sys.argv[1:])
  multi_worker.exit_together()  # No 2 s teardown; outputs written.
