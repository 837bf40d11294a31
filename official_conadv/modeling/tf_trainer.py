"""ConAdvModel's TensorFlow half: its train and test steps, `fit`, and the
`tf.distribute` parts (scopes, BN statistics across replicas, checkpoints).

Keras keeps one trainer per backend (keras/src/backend/*/trainer.py);
`ConAdvModel` does the same: `conadv_model._trainer()` puts this mixin (or
`jax_trainer.JaxTrainer`) before `keras.Model` in its bases. Both steps call
the same algorithm: the schedule's `examples` (`adversarial.schedules`), the
attack (`adversarial.attacks`, through `ConAdvModel.adversarial_examples`)
and the model's metric updates. What is TensorFlow's is how they run: one
`tf.GradientTape`, variables assigned in place, a step per replica under a
`tf.distribute` strategy.
"""

import keras
import tensorflow as tf

from official_conadv.adversarial import schedules
from official_conadv.modeling import dual_batch_norm
from official_conadv.modeling import keras_compat
from official_conadv.modeling import replica_statistics

MAIN = dual_batch_norm.MAIN


class TensorFlowTrainer(keras_compat.ModelWorkarounds):
  """The TensorFlow steps of `ConAdvModel` (see its docstring)."""

  def _build_scope(self):
    """The strategy scope to build in, if the model was made under a
    strategy that is not active now (None: build here)."""
    strategy = self._check_build_scope()
    if not tf.distribute.has_strategy() and strategy is not None:
      return strategy.scope()
    return None

  def symbolic_build(self, data_spec):
    """Builds the model (every BN route, the schedule's variables), the
    compiled loss and metrics and the optimizer from the spec of one
    training batch ((images, labels) `tf.TensorSpec`s), in the model's
    strategy scope, as `fit` does before its first step. Nothing happens
    once all is built."""
    return self._maybe_symbolic_build(data_batch=data_spec)

  def _build_extra_checkpoint_children(self):
    return {} if self.schedule is None else self.schedule.checkpoint_children()

  # ----------------------------------------------------------------- steps
  def train_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not self.built:  # Keras defers building to here without a strategy.
      self.build(tuple(_plain_shape(x)))
    step = schedules.micro_step(self.optimizer)
    batch, x_adv = self._examples(x, y, sample_weight, step)
    y = batch.labels

    logs = {}  # branch name -> (logits, loss), losses scaled by 1/replicas.
    with tf.GradientTape() as tape:
      for name, route, images in self._routes(batch, x_adv):
        logits = tf.cast(self.backbone(images, training=True, bn_route=route),
                         tf.float32)
        logs[name] = (logits, None if name == "clean" else
                      self._compile_loss(y, logits, sample_weight))
      logits = logs["clean"][0]
      others = [loss for name, (_, loss) in logs.items() if name != "clean"]
      if self._three_branch:
        # The authors' form: CE averaged over the 3B (or 2B) images, plus
        # the regularisation once.
        clean_ce = self._compile_loss(y, logits, sample_weight)
        branches = [clean_ce] + others
        regularization = keras_compat.regularization_loss(self)
        loss = tf.add_n(branches) / float(len(branches)) + regularization
        clean_loss = clean_ce + regularization
      else:
        # compute_loss adds model.losses and scales by 1 / replicas.
        clean_loss = self.compute_loss(x=batch.main, y=y, y_pred=logits,
                                       sample_weight=sample_weight,
                                       training=True)
        loss = tf.add_n([clean_loss] + others)
      scaled_loss = self.optimizer.scale_loss(loss)
    logs["clean"] = (logits, clean_loss)

    variables = self.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    # Variables without a gradient (the adversarial BN in baseline mode) are
    # left out: under Mirrored, None gradients desynchronise the collectives.
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    keeps = self.schedule is not None and self.schedule.keeps_weights
    if keeps:  # theta_t, read before the update (the delayed ring buffer).
      theta = [tf.convert_to_tensor(v)
               for v in self.backbone.trainable_variables]
    self.optimizer.apply_gradients(pairs)
    if keeps:
      self.schedule.after_update(self, step, theta)
    self._update_train_metrics(loss, logs, y, sample_weight)
    return self._logs(training=True)

  def test_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    logits = tf.cast(self(x, training=False), tf.float32)
    self._update_test_metrics(y, logits, sample_weight)
    return self._logs(training=False)

  # ------------------------------------------------------------------- fit
  def fit(self, x=None, y=None, batch_size=None, *args, input_is_ahead=False,
          **kwargs):
    """`keras.Model.fit`. With schedule='lookahead' (tau >= 1) the input is
    fed tau batches ahead and the queue filled on the first call
    (`schedules.Lookahead.stream`): the same dataset, epochs and steps as
    the delayed schedule train on the same batches. `x` is then a batched
    `tf.data.Dataset` of (images, labels) with full batches, or numpy
    arrays `x`, `y` with `batch_size`.

    `input_is_ahead=True` (lookahead only): `x` (a dataset or a distributed
    dataset) already yields batch t + tau at step t, and the queue already
    holds batches t..t+tau-1 (`model.schedule.fill`, or restored with the
    step count from a checkpoint). The CLI trainer feeds it so.

    Under several replicas the BN moving statistics are averaged over the
    replicas at the end of every epoch (before the callbacks given here see
    it) and of the call: see `sync_moving_statistics`.
    """
    if len(args) > 2:  # fit(x, y, batch_size, epochs, verbose, callbacks..)
      args = args[:2] + (_with_sync_callback(args[2], self),) + args[3:]
    else:
      kwargs["callbacks"] = _with_sync_callback(kwargs.get("callbacks"), self)
    if not (self.schedule is not None and self.schedule.input_offset):
      if input_is_ahead:
        raise ValueError("input_is_ahead=True is for schedule='lookahead' "
                         "with tau >= 1.")
      return super().fit(x, y, batch_size, *args, **kwargs)
    if args:
      raise ValueError("schedule='lookahead': pass fit's arguments after "
                       "batch_size by keyword.")
    position = (int(schedules.micro_step(self.optimizer).numpy())
                if getattr(self, "optimizer", None) is not None else 0)
    stream, steps_per_epoch = self.schedule.stream(
        x, y, batch_size, shuffle=kwargs.pop("shuffle", True),
        input_is_ahead=input_is_ahead, position=position)
    if steps_per_epoch and kwargs.get("steps_per_epoch") is None:
      kwargs["steps_per_epoch"] = steps_per_epoch
    return super().fit(stream, None, None, shuffle=False, **kwargs)

  # ------------------------------------------------- replicas, evaluation
  def sync_moving_statistics(self):
    """Sets every replica's BN moving statistics (all routes) to their mean
    over the replicas; returns how many variables were averaged (0 with one
    replica). See `official_conadv.modeling.replica_statistics`.

    `fit` (every epoch end and its end), `evaluate` and `predict` call it,
    so evaluation, checkpoints and the export after them see one set of
    statistics on every strategy. Call it yourself after `train_on_batch`
    or before saving in the middle of an epoch; under
    MultiWorkerMirroredStrategy on every worker (it is a collective).
    """
    return replica_statistics.sync(self)

  def evaluate(self, *args, **kwargs):
    """`keras.Model.evaluate` (logs: see the class docstring), after
    `sync_moving_statistics`."""
    self.sync_moving_statistics()
    return super().evaluate(*args, **kwargs)

  def predict(self, *args, **kwargs):
    """`keras.Model.predict` (main BN route), after
    `sync_moving_statistics`."""
    self.sync_moving_statistics()
    return super().predict(*args, **kwargs)


def _plain_shape(x):
  return (x["image"] if isinstance(x, dict) else x).shape


def _with_sync_callback(callbacks, model):
  """`callbacks` (None, a list or a CallbackList) with a
  `replica_statistics.SyncCallback` first."""
  if isinstance(callbacks, keras.callbacks.CallbackList):
    if not any(isinstance(c, replica_statistics.SyncCallback)
               for c in callbacks.callbacks):
      callback = replica_statistics.SyncCallback()
      callback.set_model(model)
      callbacks.callbacks.insert(0, callback)
    return callbacks
  callbacks = list(callbacks or [])
  if not any(isinstance(c, replica_statistics.SyncCallback)
             for c in callbacks):
    callbacks.insert(0, replica_statistics.SyncCallback())
  return callbacks
