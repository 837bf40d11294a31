"""ConAdvModel's JAX half: stateless train and test steps, and lookahead
input for `fit`. Imports no TensorFlow.

Keras' JAX trainer (keras/src/backend/jax/trainer.py) runs
`train_step(state, data) -> (logs, state)` under `jax.jit`, with the model's
state passed in and returned as four lists of arrays (trainable,
non-trainable, optimizer and metric variables). ConAdvModel's step keeps that
contract and reads like its TensorFlow twin (`tf_trainer.py`):

  1. Open one `keras.StatelessScope` that maps every variable to its value
     in `state`. Inside it, reading a variable gives that value and an
     `assign` is recorded instead of performed, so the algorithm's code
     written for variables (the schedule's ring buffer and lookahead queue,
     the metric trackers) runs unchanged.
  2. The schedule hands over the batch and its adversarial examples
     (`schedules.Schedule.examples`, the attack through
     `ConAdvModel.adversarial_examples`; the same calls as on TensorFlow).
  3. `jax.value_and_grad` of the branch losses as a function of the
     backbone's trainable weights (`backbone.stateless_call` per BN route,
     returning the routes' new moving statistics).
  4. `optimizer.stateless_apply` on the variables that got a gradient (as on
     TensorFlow, the BN sets of routes the step does not run are left
     alone: no weight decay on them), then the schedule's `after_update`
     with theta_t, then the metric trackers.
  5. The new state is what the scope holds for every variable.

Several devices (`keras.distribution.DataParallel`): the step is one program
over the global batch, sharded by Keras; the attack draws its noise for the
global batch (every device's shard gets its own), and BN batch statistics
are over the global batch (XLA inserts the cross-device sums), so one set of
moving statistics exists and `sync_moving_statistics` has nothing to do.
The stale-weight buffer and the lookahead queue are replicated variables
like the weights (the queue holds the global batch).
"""

import warnings

import jax
import keras
from keras import ops
import numpy as np

from official_conadv.adversarial import schedules
from official_conadv.modeling import dual_batch_norm


class JaxTrainer:
  """The JAX steps of `ConAdvModel` (see its docstring and the module's)."""

  def _build_scope(self):
    return None  # No strategy scopes on JAX.

  def symbolic_build(self, data_spec):
    """Builds the model (every BN route, the schedule's variables), the
    compiled loss and metrics and the optimizer from one training batch
    (arrays or `keras.KerasTensor`s of (images, labels)), as `fit` does
    before its first step."""
    return self._symbolic_build(data_batch=data_spec)

  def sync_moving_statistics(self):
    """Nothing to do on JAX: one program holds one set of statistics
    (module docstring). Returns 0, as TensorFlow with one replica."""
    return 0

  def load_own_variables(self, store):
    """Keras' loading of the model's own weights (`load_model`,
    `load_weights`). On JAX the lookahead queue is a model weight once the
    first `fit` made it, so a saved lookahead model's file holds it after
    the "filled" flag: the queue is made here from the stored shapes, then
    Keras loads every value, and `fit` continues exactly."""
    schedule = self.schedule
    own = len(self._trainable_variables) + len(self._non_trainable_variables)
    if (schedule is not None and schedule.input_offset and
        schedule.queue is None and len(store.keys()) == own + 3 * schedule.tau):
      # Slot 0 holds (x, x_adv, y).
      schedule.make_queue((store[str(own)], store[str(own + 2)]))
    super().load_own_variables(store)

  # ----------------------------------------------------------------- steps
  def _state_groups(self, with_optimizer=True):
    groups = [self.trainable_variables, self.non_trainable_variables]
    if with_optimizer:
      groups.append(self.optimizer.variables)
    return groups + [self.metrics_variables]

  def train_step(self, state, data):
    groups = self._state_groups()
    mapping = [pair for variables, values in zip(groups, state)
               for pair in zip(variables, values)]
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    backbone = self.backbone
    with keras.StatelessScope(state_mapping=mapping) as scope:
      step = schedules.micro_step(self.optimizer)
      batch, x_adv = self._examples(x, y, sample_weight, step)
      y = batch.labels
      routes = self._routes(batch, x_adv)
      theta = [scope.get_current_value(v)
               for v in backbone.trainable_variables]
      statistics = [scope.get_current_value(v)
                    for v in backbone.non_trainable_variables]

      def loss_fn(theta):
        nonlocal_statistics = statistics
        logs, regularization = {}, 0.0
        for name, route, images in routes:
          logits, nonlocal_statistics, losses = backbone.stateless_call(
              theta, nonlocal_statistics, images, training=True,
              bn_route=route, return_losses=True)
          if name == "clean" and losses:  # Weight regularisers, once.
            regularization = sum(ops.sum(ops.cast(l, "float32"))
                                 for l in losses)
          logits = ops.cast(logits, "float32")
          logs[name] = (logits, self._compile_loss(y, logits, sample_weight))
        losses = [loss for _, loss in logs.values()]
        clean_loss = losses[0] + regularization
        if self._three_branch:
          # The authors' form: CE averaged over the branches' images, plus
          # the regularisation once.
          loss = sum(losses[1:], losses[0]) / float(len(losses)) + (
              regularization)
        else:
          loss = sum(losses[1:], clean_loss)
        logs["clean"] = (logs["clean"][0], clean_loss)
        return self.optimizer.scale_loss(loss), (loss, logs,
                                                 nonlocal_statistics)

      (_, (loss, logs, new_statistics)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(theta)
      for v, value in zip(backbone.non_trainable_variables, new_statistics):
        v.assign(value)

      # Variables of a BN route this step does not run get no update (as
      # TensorFlow leaves out their None gradients).
      used = {route for _, route, _ in routes}
      grads = [g if dual_batch_norm.route_of(v) in used else None
               for g, v in zip(grads, backbone.trainable_variables)]
      self._check_variable_order()
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        new_theta, new_optimizer = self.optimizer.stateless_apply(
            [scope.get_current_value(v) for v in self.optimizer.variables],
            grads, theta)
      for v, value in zip(self.trainable_variables, new_theta):
        v.assign(value)
      for v, value in zip(self.optimizer.variables, new_optimizer):
        v.assign(value)
      if self.schedule is not None and self.schedule.keeps_weights:
        self.schedule.after_update(self, step, theta)
      self._update_train_metrics(loss, logs, y, sample_weight)
      result = self._logs(training=True)
    new_state = tuple([scope.get_current_value(v) for v in variables]
                      for variables in groups)
    return result, new_state

  def _check_variable_order(self):
    """The gradient is taken w.r.t. the backbone's trainable weights, the
    optimizer updates the model's: they must be the same list."""
    if [id(v) for v in self.trainable_variables] != [
        id(v) for v in self.backbone.trainable_variables]:
      raise ValueError("ConAdvModel's trainable weights must be exactly its "
                       "backbone's (in order); found weights of its own.")

  def test_step(self, state, data):
    groups = self._state_groups(with_optimizer=False)
    mapping = [pair for variables, values in zip(groups, state)
               for pair in zip(variables, values)]
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with keras.StatelessScope(state_mapping=mapping) as scope:
      logits = ops.cast(self(x, training=False), "float32")
      self._update_test_metrics(y, logits, sample_weight)
      result = self._logs(training=False)
    metrics = [scope.get_current_value(v) for v in self.metrics_variables]
    return result, (state[0], state[1], metrics)

  # ------------------------------------------------------------------- fit
  def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
    """`keras.Model.fit`. With schedule='lookahead' (tau >= 1) `x`, `y` are
    numpy arrays and `batch_size` is given: the first call fills the queue
    from the first tau batches and every call trains from
    `lookahead_stream` (batch t + tau at step t), so the same arrays, epochs
    and steps train as the delayed schedule with `shuffle=False` does (with
    `shuffle=True` epoch e is in the order of a permutation seeded with
    (adversary.seed, e))."""
    if not (self.schedule is not None and self.schedule.input_offset):
      return super().fit(x, y, batch_size, *args, **kwargs)
    if args:
      raise ValueError("schedule='lookahead': pass fit's arguments after "
                       "batch_size by keyword.")
    for key in ("validation_split", "sample_weight", "class_weight"):
      if kwargs.get(key) is not None:
        raise ValueError(f"schedule='lookahead' on JAX does not take "
                         f"`{key}`.")
    position = (int(schedules.micro_step(self.optimizer))
                if getattr(self, "optimizer", None) is not None
                and self.optimizer.built else 0)
    stream, steps_per_epoch = lookahead_stream(
        self, x, y, batch_size, shuffle=kwargs.pop("shuffle", True),
        position=position)
    if kwargs.get("steps_per_epoch") is None:
      kwargs["steps_per_epoch"] = steps_per_epoch
    return super().fit(stream, None, None, shuffle=False, **kwargs)


def lookahead_stream(model, x, y, batch_size, shuffle, position):
  """(generator, steps_per_epoch): the input of a lookahead `fit` on JAX.

  `x`, `y` are numpy arrays whose length is a multiple of `batch_size`;
  epoch e visits them in order, or (shuffle) in the order of
  `np.random.default_rng([adversary.seed, e]).permutation`. The generator
  yields batch `position + tau` onwards (endless; `fit` stops it), after
  making and filling the queue from batches 0..tau-1 with the current
  weights on the first call (seeds 0..tau-1, as the delayed schedule seeds
  those batches).
  """
  schedule = model.schedule
  if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
    raise ValueError(
        "schedule='lookahead' on JAX trains from numpy arrays x, y with "
        f"batch_size; got {type(x).__name__}.")
  # As Keras feeds numpy arrays on JAX: float images in floatx, int labels
  # in int32 (no 64-bit types by default).
  if np.issubdtype(x.dtype, np.floating):
    x = x.astype(keras.config.floatx())
  if np.issubdtype(y.dtype, np.integer):
    y = y.astype(np.int32)
  batch_size, per_epoch = schedules.full_batches(x, y, batch_size)
  seed = schedule.adversary.seed

  def batch_at(index):
    epoch, within = divmod(index, per_epoch)
    order = (np.random.default_rng([seed, epoch]).permutation(len(x))
             if shuffle else np.arange(len(x)))
    rows = order[within * batch_size:(within + 1) * batch_size]
    return x[rows], y[rows]

  first = batch_at(0)
  model.symbolic_build(first)
  if not schedule.filled:
    schedule.make_queue(first)
    theta = [v.value for v in model.backbone.trainable_variables]
    # Compiled once for every slot (the step is an argument), as the train
    # step compiles the attack.
    attack = jax.jit(lambda theta, images, labels, step:
                     model.adversarial_examples(images, labels, step,
                                                weights=theta))
    for slot in range(schedule.tau):
      images, labels = (ops.convert_to_tensor(t) for t in batch_at(slot))
      x_adv = attack(theta, images, labels,
                     ops.convert_to_tensor(slot, schedules.step_dtype()))
      schedule.queue.write(slot, (images, x_adv, labels))
    schedule.ready.assign(1)
  elif schedule.queue is None:
    schedule.make_queue(first)  # Raises: the queue cannot be restored.

  def generate():
    index = position + schedule.tau
    while True:
      yield batch_at(index)
      index += 1

  return generate(), per_epoch
