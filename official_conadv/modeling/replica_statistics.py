"""One set of BN moving statistics across replicas (TensorFlow strategies).

Why: under `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy,
TPUStrategy) every replica normalises its training images with their own
batch statistics (per-replica BN, as the paper's 96 images per TPU core) and
updates its own copy of the moving statistics: Keras 3 creates them with
aggregation "none", and a replica-context assign of such a variable writes
that replica's copy only. Given different images, the copies drift apart.
Left so, evaluation on replica r would normalise with copy r, while
`tf.train.Checkpoint`, `save_weights` and the SavedModel export hold the
first replica's copy (and a restore writes that copy to every replica): the
number logged during training would not be the number of the saved model.

`sync(model)` replaces every replica's copy of every moving statistic (all BN
routes: "main", "adv", "aug"; `DualBatchNormalization`, converted
keras.applications models, plain `keras.layers.BatchNormalization`) by the
mean of the copies over all replicas of all workers, in one all-reduce.

What the mean is: the moving statistics are exponential moving averages,
which are linear, so with equal per-replica batches the mean of the moving
means is the moving average of the global batch's mean, and the mean of the
moving variances the moving average of the mean within-replica variance (the
spread between the replicas' means is not in it; timm's `--dist-bn reduce`
makes the same choice). For the same reason averaging does not depend on
when it happens (up to float rounding), and training never reads the moving
statistics (it normalises with batch statistics; the attack too), so
synchronising changes no trained weight.

When: `ConAdvModel` calls `sync` at the end of every `fit` call and of every
epoch (through `SyncCallback`, placed before the user's callbacks, so a
`ModelCheckpoint` or `BackupAndRestore` saving at epoch end saves the mean),
and at the start of `evaluate` and `predict`. After `train_on_batch` or a
custom loop, or before a checkpoint saved in the middle of an epoch, call
`model.sync_moving_statistics()` yourself, on every worker (it is a
collective). With one replica it does nothing. With `synchronized=True` BN
the copies are already equal (the mean leaves them so exactly for a
power-of-two number of replicas, and to the last bit otherwise).
"""

import weakref

import keras
import tensorflow as tf

MOVING_NAMES = ("moving_mean", "moving_variance")

# model -> _Sync (one traced all-reduce per model and strategy).
_SYNCS = weakref.WeakKeyDictionary()


def moving_statistics(model):
  """The BN moving statistics of `model`: its non-trainable weights named
  moving_mean or moving_variance (every BN route of every layer)."""
  return [v for v in model.non_trainable_weights if v.name in MOVING_NAMES]


class _Sync:
  """strategy.run(all-reduce MEAN, assign) over fixed variables, traced once.

  In the replica context a read of a variable gives this replica's copy and
  an assign (aggregation "none") writes this replica's copy only.
  """

  def __init__(self, strategy, variables):
    self.strategy = strategy
    self.variables = list(variables)
    self.function = tf.function(self._run, autograph=False)

  def _replica_fn(self):
    context = tf.distribute.get_replica_context()
    # tf.identity places each copy on this replica's device (a variable
    # read has none under MultiWorkerMirroredStrategy, which the all-reduce
    # refuses: "destinations can not be empty").
    copies = [tf.identity(v.value) for v in self.variables]
    means = context.all_reduce(tf.distribute.ReduceOp.MEAN, copies)
    for variable, mean in zip(self.variables, means):
      variable.assign(mean)

  def _run(self):
    self.strategy.run(self._replica_fn)


def sync(model, strategy=None) -> int:
  """Sets every replica's moving statistics of `model` to their mean over
  the replicas (module docstring). A collective: under
  MultiWorkerMirroredStrategy every worker must call it.

  Args:
    model: a built `keras.Model` (e.g. a ConAdvModel or its backbone).
    strategy: the strategy holding its variables (default:
      `model.distribute_strategy`).

  Returns:
    how many variables were averaged (0 with one replica).
  """
  if strategy is None:
    strategy = model.distribute_strategy
  if strategy.num_replicas_in_sync == 1:
    return 0
  variables = moving_statistics(model)
  if not variables:
    return 0
  cached = _SYNCS.get(model)
  if (cached is None or cached.strategy is not strategy or
      len(cached.variables) != len(variables) or
      any(a is not b for a, b in zip(cached.variables, variables))):
    cached = _Sync(strategy, variables)
    _SYNCS[model] = cached
  cached.function()
  return len(variables)


class SyncCallback(keras.callbacks.Callback):
  """Averages the model's moving statistics over the replicas at the end of
  every epoch and at the end of training, when a training batch ran since
  the last average. ConAdvModel.fit puts it first in the callbacks, so the
  user's epoch-end callbacks (checkpoints, backups) see the mean."""

  def __init__(self):
    super().__init__()
    self._trained = False

  def on_train_batch_end(self, batch, logs=None):
    self._trained = True

  def _sync(self):
    if self._trained:
      sync(self.model)
      self._trained = False

  def on_epoch_end(self, epoch, logs=None):
    self._sync()

  def on_train_end(self, logs=None):
    self._sync()
