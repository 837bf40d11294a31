"""When adversarial examples are made: the schedules of ConAdv (Algorithm 1).

Notation: step t (= optimizer update u; see "Gradient accumulation" below),
theta_t the trainable weights at the start of step t, (x_t, y_t) the clean
batch of step t, tau = `AdversaryConfig.delay`. Every schedule hands the
train step, at step t, the batch it trains on and the adversarial examples
of that batch, made from theta_{t - tau} (theta_0 while t < tau):

  `Sequential` (tau = 0, AdvProp-style; either `schedule` name): attack x_t
      with theta_t. The attack must finish before the training gradient.
  `Delayed` (tau >= 1, schedule="delayed"): attack x_t with theta_{t - tau},
      read from a ring buffer of tau weight snapshots (slot t mod tau, which
      is then overwritten with theta_t after the update). Both computations
      of a step only depend on weights that exist at its start.
  `Lookahead` (tau >= 1, schedule="lookahead", Algorithm 1 as written):
      attack x_{t + tau} with theta_t, push (x, x_adv, y) into slot t mod tau
      of a queue and train on the triple popped from that slot, pushed tau
      steps earlier (x_t, made with theta_{t - tau}). No weight copies; the
      input runs tau batches ahead (`input_offset`). Same data order => the
      same weights as `Delayed`, bit for bit (lookahead_test.py).

One interface, called by `ConAdvModel.train_step`:

  schedule.examples(model, batch, step) -> (batch to train on, x_adv)
  schedule.after_update(model, step, theta)   # theta_t, read before the update

and one mechanism for the tau slots of both buffers (`Slots`: slot-major
variables, read and written in one place per backend). Each schedule owns
its variables and their checkpoint names (`checkpoint_children`); the attack
itself is `ConAdvModel.adversarial_examples(images, labels, step, weights)`, a
function of (weights, batch, seed) through `keras.Model.stateless_call`.

Which schedule a config means, and which inputs it takes, is decided here
and only here: `AdversaryConfig.kind`, `input_offset`, `check_inputs`.

Backends: the step-time code (`examples`, `attack_weights`, `after_update`,
`Slots`) runs on TensorFlow and on JAX. On TensorFlow a slot is read or
written under one `tf.switch_case` and conditional writes sit in `tf.cond`
(the variables are assigned in place, per replica). On JAX the step is a
pure function (`official_conadv.modeling.jax_trainer`): reads go through
`keras.ops.switch`, and every write is an `assign` of
`where(condition and slot == index, new, old)` to each slot, which the
trainer's `keras.StatelessScope` collects. The input side of the lookahead
schedule (`stream`, `fill` of `tf.data` input, per-replica checkpoints) is
TensorFlow's; its JAX counterpart is `jax_trainer.lookahead_stream`.

Gradient accumulation (Keras' `gradient_accumulation_steps=N`, `Delayed` and
`Sequential` only): staleness counts optimizer updates. At micro-step m
(Keras' raw counter `optimizer._iterations`) in update u = m // N the attack
uses theta_{u - tau}: slot u mod tau is read at every micro-step and written
with theta_u after the optimizer call only if that call completed update u
(the counter crossed a multiple of N). A `LossScaleOptimizer` that skips a
non-finite step leaves the counter alone, so nothing is written and its retry
reads the same slot. The attack's random numbers are seeded with m.
"""

import dataclasses
from typing import Any, List, Optional, Sequence

import keras
from keras import ops
import numpy as np

from official_conadv import backends
from official_conadv.adversarial import attacks

# TensorFlow for the TensorFlow-only parts (tf.data input, tf.distribute,
# checkpoints); imported on first use, so the JAX path never loads it.
tf = backends.LazyModule("tensorflow")
keras_compat = backends.LazyModule("official_conadv.modeling.keras_compat")

SEQUENTIAL = "sequential"
DELAYED = "delayed"
LOOKAHEAD = "lookahead"
# Values of AdversaryConfig.schedule (tau = 0 is `Sequential` for both).
SCHEDULES = (DELAYED, LOOKAHEAD)


@keras.saving.register_keras_serializable(package="official_conadv")
@dataclasses.dataclass(frozen=True)
class AdversaryConfig(attacks.AttackConfig):
  """The attack (see `attacks.AttackConfig`) plus its timing and seed.

  Attributes:
    delay: tau >= 0, how many optimizer updates old the attack's weights
      are. 0 is sequential (AdvProp-style) adversarial training, >= 1 is
      ConAdv. With gradient accumulation it counts updates, not batches.
    schedule: "delayed" (a ring buffer of tau weight snapshots) or
      "lookahead" (a queue of tau batches and their examples; Algorithm 1 as
      written). Same weights for the same data order; module docstring.
    seed: base seed of the attack's stateless random numbers (noise, random
      targets, start-from-clean draws); micro-step m (= step t without
      gradient accumulation) uses (seed, m).
  """

  delay: int = 1
  seed: int = 0
  schedule: str = DELAYED

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.delay, bool) or not isinstance(
        self.delay, int) or self.delay < 0:
      raise ValueError(f"`delay` must be an integer >= 0, got {self.delay!r}.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"`schedule` must be one of {SCHEDULES}, got "
                       f"{self.schedule!r}.")

  @property
  def attack(self) -> attacks.AttackConfig:
    fields = {f.name for f in dataclasses.fields(attacks.AttackConfig)}
    return attacks.AttackConfig(
        **{k: v for k, v in self.get_config().items() if k in fields})

  @property
  def kind(self) -> str:
    """"sequential" (tau = 0, whatever `schedule` says), "delayed" or
    "lookahead" (tau >= 1): the one place that decides it."""
    return SEQUENTIAL if self.delay == 0 else self.schedule

  @property
  def input_offset(self) -> int:
    """How many batches ahead of the step the training input runs: tau for
    the lookahead schedule, 0 otherwise."""
    return self.delay if self.kind == LOOKAHEAD else 0


def input_offset(adversary: Optional[AdversaryConfig]) -> int:
  """`adversary.input_offset`, 0 without an adversary."""
  return 0 if adversary is None else adversary.input_offset


def check_inputs(adversary: Optional[AdversaryConfig], paired: bool,
                 what: str = "{'image', 'augmented'} inputs"):
  """ValueError (one line) if `adversary` cannot train on paired
  (AutoAugment, "+AA") inputs: the lookahead queue keeps plain batches.
  `what` names the inputs in the message (the config layer passes its
  field)."""
  if paired and adversary is not None and adversary.kind == LOOKAHEAD:
    raise ValueError(f"schedule='lookahead' does not support {what} yet; "
                     "use schedule='delayed'.")


def make(adversary: Optional[AdversaryConfig],
         model) -> Optional["Schedule"]:
  """The schedule of `adversary` for `model` (None: the plain baseline)."""
  if adversary is None:
    return None
  return {SEQUENTIAL: Sequential, DELAYED: Delayed,
          LOOKAHEAD: Lookahead}[adversary.kind](adversary, model)


# ------------------------------------------------------------ step counter
def optimizer_counter(optimizer):
  """(inner optimizer, N): the optimizer that counts micro-steps and its
  `gradient_accumulation_steps` (1 without accumulation). A
  `LossScaleOptimizer` delegates both to `inner_optimizer`."""
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  steps = getattr(inner, "gradient_accumulation_steps", None) or 1
  return inner, int(steps)


def step_dtype() -> str:
  """The dtype of step counters: int64 (int32 on JAX, whose default
  configuration has no 64-bit integers)."""
  return "int64" if backends.is_tensorflow() else "int32"


def micro_step(optimizer):
  """m: micro-steps applied so far (Keras' raw counter), an int scalar of
  `step_dtype()`; 0 without an optimizer."""
  if optimizer is None:
    return ops.convert_to_tensor(0, step_dtype())
  inner, _ = optimizer_counter(optimizer)
  counter = getattr(inner, "_iterations", None)
  if counter is None:  # Keras without a raw counter: iterations is raw.
    counter = inner.iterations
  return ops.cast(ops.convert_to_tensor(counter), step_dtype())


def accumulation_steps(optimizer) -> int:
  return 1 if optimizer is None else optimizer_counter(optimizer)[1]


# ------------------------------------------------------------------ slots
class Slots:
  """`num` slots of `width` variables each (a flat, slot-major list).

  `read(index)`, `write(index, values, when)` and `fill(values, when)` take
  the slot and the condition as tensors. TensorFlow branches once per slot
  (`tf.switch_case`; no branch for one slot) and writes under `tf.cond`, so
  a compiled step reads or writes one slot without gathering all of them.
  JAX reads with `keras.ops.switch` and writes every slot with a `where`
  (module docstring).
  """

  def __init__(self, variables: Sequence, num: int):
    if num < 1 or len(variables) % num:
      raise ValueError(f"{len(variables)} variables do not make {num} slots.")
    self.variables = list(variables)
    self.num = num
    self.width = len(self.variables) // num

  def __getitem__(self, slot: int) -> List:
    return self.variables[slot * self.width:(slot + 1) * self.width]

  def _switch(self, index, branch):
    if self.num == 1:
      return branch(0)()
    return tf.switch_case(tf.cast(index, tf.int32),
                          [branch(s) for s in range(self.num)])

  def read(self, index) -> List:
    if not backends.is_tensorflow():
      branches = [lambda s=s: [v.value for v in self[s]]
                  for s in range(self.num)]
      if self.num == 1:
        return branches[0]()
      return ops.switch(ops.cast(index, "int32"), branches)
    return self._switch(index, lambda s: lambda: [
        tf.identity(tf.convert_to_tensor(v)) for v in self[s]])

  def write(self, index, values, when=None):
    """Writes `values` into slot `index` (if `when`, a bool scalar)."""
    if not backends.is_tensorflow():
      self._where_write(values, index=index, when=when)
      return

    def branch(s):
      def fn():
        for var, value in zip(self[s], values):
          var.assign(tf.cast(value, var.dtype))
        return tf.constant(True)
      return fn

    if when is None:
      self._switch(index, branch)
      return

    def write():
      self._switch(index, branch)
      return tf.constant(True)

    tf.cond(when, write, lambda: tf.constant(False))

  def fill(self, values, when):
    """Writes `values` into every slot if `when` (a bool scalar)."""
    if not backends.is_tensorflow():
      self._where_write(values, index=None, when=when)
      return

    def fill_all():
      for s in range(self.num):
        for var, value in zip(self[s], values):
          var.assign(value)
      return tf.constant(True)

    tf.cond(when, fill_all, lambda: tf.constant(False))

  def _where_write(self, values, index, when):
    """JAX: slot s <- where(when and (index is None or s == index), values,
    slot s), as assigns a `keras.StatelessScope` collects."""
    for s in range(self.num):
      hit = ops.convert_to_tensor(True) if when is None else when
      if index is not None:
        hit = ops.logical_and(hit, ops.equal(ops.cast(index, "int32"), s))
      for var, value in zip(self[s], values):
        var.assign(ops.where(hit, ops.cast(value, var.dtype), var.value))


def trainable_weights(backbone) -> List:
  """theta: the backbone's trainable weights as tensors (the `weights` the
  attack takes)."""
  return [ops.convert_to_tensor(v) for v in backbone.trainable_variables]


def _track_variables(model, variables):
  """Adds `variables` to `model.weights` (non-trainable), as `add_weight`
  would; `add_weight` cannot make ON_READ variables. Also after `build`
  (the JAX lookahead queue), when Keras has locked the model's state."""
  tracker = model._tracker  # pylint: disable=protected-access
  locked = tracker.locked
  if locked:
    tracker.unlock()
  try:
    for v in variables:
      model._track_variable(v)  # pylint: disable=protected-access
  finally:
    if locked:
      tracker.lock()


def _per_replica_variable(model, shape, dtype, name):
  """A zero variable of which every replica keeps and writes its own copy
  (ON_READ + ONLY_FIRST_REPLICA: writes need no cross-replica merge and may
  sit in tf.cond / tf.switch_case; reads outside the step see replica 0)."""
  with keras.name_scope(model.name, caller=model):
    return keras.Variable(
        initializer="zeros", shape=shape, dtype=dtype, trainable=False,
        aggregation="only_first_replica", synchronization="on_read",
        name=name)


# --------------------------------------------------------------- schedules
class Schedule:
  """Base: the sequential schedule's behaviour (tau = 0, no state)."""

  def __init__(self, adversary: AdversaryConfig, model):
    self.adversary = adversary
    self._model = model  # The ConAdvModel this schedule times.
    self.tau = adversary.delay
    self.input_offset = adversary.input_offset

  # Called by ConAdvModel.build, inside the strategy scope.
  def build(self, model):
    del model

  def examples(self, model, batch, step):
    """(batch, x_adv) for step `step` (the micro-step counter m).

    `batch` is a `TrainingBatch`; x_adv (float [B, H, W, C] in [0, 1]) are
    the adversarial examples of the batch returned, made from theta_{u-tau}.
    """
    return batch, model.adversarial_examples(batch.attack, batch.labels, step)

  def attack_weights(self, model, step) -> List:
    """theta_{u - tau} (tensors, `backbone.trainable_variables` order)."""
    del step
    return trainable_weights(model.backbone)

  # Whether `after_update` needs theta_t (one transient copy of the weights).
  keeps_weights = False

  def after_update(self, model, step, theta):
    del model, step, theta

  def checkpoint_children(self):
    """{checkpoint name: trackable} this schedule adds to the model's."""
    return {}


class Sequential(Schedule):
  """tau = 0: the attack uses the current weights (AdvProp-style)."""


class Delayed(Schedule):
  """A ring buffer of tau snapshots of the backbone's trainable weights.

  The buffer is made of Keras weights of the model (so `save_weights` and
  checkpoints carry it; checkpoint names `stale_buffer/<i>`), created in the
  strategy scope by `build`. Step 0 fills every slot with theta_0 (also after
  new weights were loaded into an untrained model); a resumed run restores
  the buffer instead.
  """

  keeps_weights = True

  def __init__(self, adversary, model):
    super().__init__(adversary, model)
    self.buffer = None  # Slots, made by `build`.

  def build(self, model):
    if self.buffer is not None:
      return
    current = model.backbone.trainable_variables
    variables = [
        _per_replica_variable(model, v.shape, v.dtype, f"stale_slot{s}_{i}")
        for s in range(self.tau) for i, v in enumerate(current)]
    _track_variables(model, variables)
    self.buffer = Slots(variables, self.tau)

  @property
  def variables(self):
    return [] if self.buffer is None else self.buffer.variables

  def slot(self, slot: int):
    """Slot `slot` (variables parallel to `backbone.trainable_variables`):
    theta_u of the last completed update u with u % tau == slot."""
    return self.buffer[slot]

  def attack_weights(self, model, step):
    step = ops.cast(step, step_dtype())
    current = model.backbone.trainable_variables
    # Step 0 fills every slot with theta_0.
    self.buffer.fill([ops.convert_to_tensor(v) for v in current],
                     when=ops.equal(step, 0))
    update = step // accumulation_steps(getattr(model, "optimizer", None))
    return self.buffer.read(update % self.tau)

  def after_update(self, model, step, theta):
    """Writes theta_u into slot u mod tau if the optimizer call completed
    update u = step // N; otherwise (an accumulation micro-step, a skipped
    loss-scale step) nothing."""
    n = accumulation_steps(getattr(model, "optimizer", None))
    update = ops.cast(step, step_dtype()) // n
    # Read after the optimizer call (ordered by the counter's resource).
    completed = ops.greater(micro_step(model.optimizer) // n, update)
    self.buffer.write(update % self.tau, theta, when=completed)

  def checkpoint_children(self):
    return {f"stale_buffer/{i}": v for i, v in enumerate(self.variables)}


class Lookahead(Schedule):
  """A per-replica queue of tau (x, x_adv, y) slots; the input runs tau
  batches ahead.

  Life cycle: `build` makes the "queue filled" flag (a model weight); the
  first `fit` (or the CLI trainer through `fill`) makes the queue from the
  first batch's shape and fills it from batches 0..tau-1 with theta_0
  (seeds 0..tau-1, as `Delayed` seeds them); every step then exchanges one
  slot. The queue is not a Keras weight of the model (it exists only once a
  batch was seen); `tf.train.Checkpoint` saves every replica's copy under
  `lookahead_queue/<i>/replica<g>` (g the global replica index, so under
  MultiWorkerMirrored each worker saves and restores its own slots) and
  restores them also into a queue made after the restore.
  """

  def __init__(self, adversary, model):
    super().__init__(adversary, model)
    self.queue = None  # Slots of (x, x_adv, y), made from the first batch.
    self.ready = None  # int32 flag: 1 once the queue holds examples.

  def build(self, model):
    if self.ready is not None:
      return
    with keras.name_scope(model.name, caller=model):
      self.ready = keras.Variable(
          initializer="zeros", shape=(), dtype="int32", trainable=False,
          aggregation="only_first_replica", name="lookahead_queue_ready")
    _track_variables(model, [self.ready])
    if backends.is_tensorflow():
      keras_compat.restore_deferred(model, "lookahead_queue_ready",
                                    self.ready)

  @property
  def variables(self):
    return [] if self.queue is None else self.queue.variables

  def slot(self, slot: int):
    """(x, x_adv, y) variables of this replica's batch in slot `slot`."""
    return self.queue[slot]

  @property
  def filled(self) -> bool:
    """Whether the queue holds examples (filled, or restored)."""
    return self.ready is not None and bool(int(self.ready.numpy()))

  # ------------------------------------------------------------- the step
  def examples(self, model, batch, step):
    """`batch` is batch t + tau: attack it with theta_t (seeded t + tau, as
    `Delayed` seeds that batch), pop slot t % tau = (x_t, x_adv_t, y_t) and
    push the new triple. The attack does not feed the update of step t."""
    x, y = batch.attack, batch.labels
    self._check_queue()
    step = ops.cast(step, step_dtype())
    x_adv_new = model.adversarial_examples(
        x, y, step + self.tau,
        weights=trainable_weights(model.backbone))
    index = step % self.tau
    if not backends.is_tensorflow():  # A pure step: no ordering to force.
      x_t, x_adv_t, y_t = self.queue.read(index)
      self.queue.write(index, (x, x_adv_new, y))
    else:
      # Read after the incoming batch exists: a failed read (a short batch)
      # then stops the whole step, not only the push.
      with tf.control_dependencies([x, y]):
        x_t, x_adv_t, y_t = self.queue.read(index)
      with tf.control_dependencies([x_t, x_adv_t, y_t]):
        self.queue.write(index, (x, x_adv_new, y))
    return TrainingBatch(main=x_t, attack=x_t, aug=None, labels=y_t), x_adv_t

  def _check_queue(self):
    if self.queue is None:
      raise ValueError(
          "schedule='lookahead': the example queue is empty; train with "
          "`fit` (its first call fills the queue from the first tau "
          "batches).")

  def _full_batches(self, data, first_step):
    """`data` with every batch checked to be as large as the queue's
    (global) batch: a shorter one stops `fit` in one line naming the step
    and the sizes, before the step runs (the queue cannot hold it)."""
    want = (int(self.queue[0][0].shape[0]) *
            self._model.distribute_strategy.num_replicas_in_sync)

    def check(i, batch):
      got = tf.shape(tf.nest.flatten(batch)[0])[0]
      step = i + first_step
      with tf.control_dependencies([tf.debugging.Assert(tf.equal(got, want), [
          "schedule='lookahead' keeps full batches of", want,
          "examples; the batch read at step", step, "(tau =", self.tau,
          "ahead) has", got, "- use full batches"], summarize=1)]):
        return tf.nest.map_structure(tf.identity, batch)

    return data.enumerate().map(check)

  # ---------------------------------------------------------- the queue
  def make_queue(self, per_replica_batch):
    """Makes the queue for batches shaped like `per_replica_batch` (one
    replica's (x, y) tensors or specs with static shapes), in the strategy
    scope, and restores it from a checkpoint restored before it existed.

    `fill` and `fit` call it with the first batch; call it directly only to
    size the queue (benchmarks/schedules.py)."""
    model = self._model
    x, y = per_replica_batch
    shapes = {"x": tuple(x.shape), "y": tuple(y.shape)}
    if any(d is None for d in shapes["x"] + shapes["y"]):
      raise ValueError("schedule='lookahead' needs batches of a known shape, "
                       f"got {shapes['x']} and {shapes['y']}.")
    dtypes = {"x": keras.backend.standardize_dtype(x.dtype),
              "y": keras.backend.standardize_dtype(y.dtype)}
    make = lambda: [  # pylint: disable=g-long-lambda
        _per_replica_variable(model, shapes[kind], dtypes[kind],
                              f"lookahead_slot{s}_{part}")
        for s in range(self.tau)
        for part, kind in (("x", "x"), ("x_adv", "x"), ("y", "y"))]
    restored_full = self.filled
    if not backends.is_tensorflow():
      if restored_full:
        raise ValueError(
            "This lookahead model's weights mark its queue as filled, but "
            "Keras weight files do not hold the queue (it exists once a "
            "batch was seen); on JAX, resume a saved run with "
            "schedule='delayed' (the same weights for the same data).")
      # The queue travels in the model's state (a JAX step returns its new
      # values), so on JAX it is a model weight, made by the first `fit`.
      variables = make()
      _track_variables(model, variables)
      self.queue = Slots(variables, self.tau)
      return
    with model.distribute_strategy.scope():
      variables = make()
    self.queue = Slots(variables, self.tau)
    for name, component in self.checkpoint_children().items():
      if name == "lookahead_queue_ready":
        continue
      if not keras_compat.restore_deferred(model, name, component) and (
          restored_full):
        self.queue = None
        raise ValueError(
            "The checkpoint restored into this model marks the lookahead "
            f"queue as filled but holds no {name!r} (this worker's slots): "
            "under MultiWorkerMirrored every worker must save and restore "
            "its own checkpoint (the trainer does).")

  def _replica_batch_shape(self, batches, first):
    """(x, y) of one replica's batch from the first element of `batches`."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(first)
    check_plain(x, sample_weight)
    strategy = self._model.distribute_strategy
    if isinstance(batches, tf.distribute.DistributedDataset):
      x = strategy.experimental_local_results(x)[0]
      y = strategy.experimental_local_results(y)[0]
      return x, y
    replicas = strategy.num_replicas_in_sync
    batch = int(x.shape[0])
    if batch % replicas:
      raise ValueError(
          f"schedule='lookahead' splits each batch over {replicas} replicas; "
          f"the first batch has {batch} examples.")
    return (tf.TensorSpec((batch // replicas,) + tuple(x.shape[1:]), x.dtype),
            tf.TensorSpec((batch // replicas,) + tuple(y.shape[1:]), y.dtype))

  def fill(self, batches):
    """Makes the queue from the first batch of `batches` (if not made yet)
    and fills slots 0..tau-1 with its first tau batches and their examples
    from the current weights (theta_0 before training; seeds 0..tau-1).

    `fit` calls this itself. Call it directly only to feed
    `fit(..., input_is_ahead=True)` (the CLI trainer does): `batches` is
    then the start of the stream (batches 0, 1, ...), a batched
    `tf.data.Dataset` of global batches or a distributed dataset of
    per-replica ones (`strategy.distribute_datasets_from_function`).
    """
    model = self._model
    strategy = model.distribute_strategy
    spec = batches.element_spec
    if not isinstance(batches, tf.data.Dataset):
      spec = keras_compat.first_replica_spec(spec)
    model.symbolic_build(spec)
    if isinstance(batches, tf.data.Dataset):
      batches = strategy.experimental_distribute_dataset(
          batches.take(self.tau))

    # The attack compiled as the train step is (XLA draws other random
    # numbers than plain TF on CPU), per replica as Keras does.
    @tf.function(jit_compile=bool(getattr(model, "jit_compile", False)))
    def replica_fn(x, y, slot):
      x_adv = model.adversarial_examples(
          x, y, slot, weights=trainable_weights(model.backbone))
      self.queue.write(slot, (x, x_adv, y))
      return tf.constant(True)

    @tf.function
    def fill_slot(x, y, slot):
      strategy.run(replica_fn, args=(x, y, slot))

    filled = 0
    for batch in batches:
      if filled == self.tau:
        break
      if self.queue is None:
        self.make_queue(self._replica_batch_shape(batches, batch))
      x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
      check_plain(x, sample_weight)
      for part in strategy.experimental_local_results(x):
        if part.shape[0] != self.queue[0][0].shape[0]:
          raise ValueError(
              f"schedule='lookahead' keeps full batches: batch {filled} has "
              f"{part.shape[0]} examples per replica, batch 0 has "
              f"{self.queue[0][0].shape[0]}.")
      fill_slot(x, y, tf.constant(filled, tf.int64))
      filled += 1
    if filled != self.tau:
      raise ValueError(f"schedule='lookahead' needs at least tau={self.tau} "
                       f"batches, the dataset has {filled}.")
    self.ready.assign(1)

  def ensure_queue(self, batches):
    """Makes the queue (if not made yet) for a restored, filled run from the
    shape of the first batch of `batches` (read once)."""
    if self.queue is None:
      first = next(iter(batches))
      self.make_queue(self._replica_batch_shape(batches, first))

  def stream(self, x, y=None, batch_size=None, shuffle=True,
             input_is_ahead=False, position=0):
    """(dataset, steps_per_epoch or None): the input `fit` trains from, in
    which step t reads batch t + tau.

    `x` is a batched `tf.data.Dataset` of (images, labels) whose batches are
    all full, in a fixed order (it is read more than once), or numpy arrays
    `x`, `y` with `batch_size`. A dataset's stream starts tau batches in and
    ends with its first tau batches (whose examples the next `fit` trains
    on, as the next pass starts with them). Numpy arrays become an endless
    stream of epochs of full batches (the number of examples must be a
    multiple of batch_size), epoch e in the order of a stateless shuffle
    seeded with (adversary.seed, e) when `shuffle` (Keras' own shuffling of
    numpy inputs draws another order), read from batch `position` (the
    model's step: consecutive `fit` calls continue the stream).

    With `input_is_ahead=True`, `x` (a dataset or a distributed dataset)
    already yields batch t + tau at step t and the queue already holds
    batches t..t+tau-1 (`fill`, or restored with the step count).
    """
    if input_is_ahead:
      if y is not None or not isinstance(
          x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        raise ValueError("fit(..., input_is_ahead=True) takes a dataset or a "
                         f"distributed dataset, got {type(x).__name__}.")
      if not self.filled:
        raise ValueError(
            "fit(..., input_is_ahead=True) needs a filled lookahead queue: "
            "call model.schedule.fill with the first tau batches, or "
            "restore a checkpoint of a lookahead run.")
      self.ensure_queue(x)
      return x, None
    if isinstance(x, tf.data.Dataset):
      if y is not None:
        raise ValueError("schedule='lookahead': with a dataset, pass "
                         "(images, labels) batches as `x` and no `y`.")
      self._start(x)
      return self._full_batches(x.skip(self.tau).concatenate(
          x.take(self.tau)), position), None
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
      raise ValueError(
          "schedule='lookahead' trains from a batched tf.data.Dataset of "
          "(images, labels) or numpy arrays x, y with batch_size; got "
          f"{type(x).__name__}.")
    batch_size, per_epoch = full_batches(x, y, batch_size)
    self._start(_epochs(x, y, batch_size, shuffle, self.adversary.seed, 0))
    return (_epochs(x, y, batch_size, shuffle, self.adversary.seed,
                    position + self.tau), per_epoch)

  def _start(self, data):
    """Fills the queue from `data` on the first `fit`, or (restored) makes
    it from the shape of `data`'s first batch. Builds the model first: a
    checkpoint restored into an unbuilt model sets the filled flag only
    when the flag is made."""
    self._model.symbolic_build(data.element_spec)
    if not self.filled:
      self.fill(data)
    else:
      self.ensure_queue(data)

  def checkpoint_children(self):
    children = {}
    if self.queue is not None:
      replica_names = _replica_names(self._model.distribute_strategy)
      for i, v in enumerate(self.queue.variables):
        components = getattr(v.value, "values", None) or (v.value,)
        for name, component in zip(replica_names(len(components)),
                                   components):
          children[f"lookahead_queue/{i}/{name}"] = component
    if self.ready is not None:
      children["lookahead_queue_ready"] = self.ready
    return children


def full_batches(x, y, batch_size):
  """(batch_size, batches per epoch) of numpy arrays `x`, `y` fed to the
  lookahead queue (both backends): one-line errors unless they hold equally
  many examples, a non-zero multiple of `batch_size` (None: Keras' 32)."""
  batch_size = int(batch_size or 32)
  if len(y) != len(x):
    raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
  if len(x) % batch_size or not len(x):
    raise ValueError(
        f"schedule='lookahead' trains on full batches: {len(x)} examples "
        f"are not a multiple of batch_size={batch_size}.")
  return batch_size, len(x) // batch_size


def _epochs(x, y, batch_size, shuffle, seed, position):
  """Endless full batches of numpy (x, y), epoch e shuffled with the
  stateless seed (seed, e) (or in order), from batch `position` on."""
  n = len(x)
  per_epoch = n // batch_size
  x_t, y_t = tf.constant(x), tf.constant(y)

  def epoch(e):
    order = tf.range(n, dtype=tf.int64)
    if shuffle:
      order = tf.random.experimental.index_shuffle(
          order, seed=tf.stack([tf.constant(seed, tf.int64), e]),
          max_index=n - 1)
    return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

  return (tf.data.Dataset.counter(start=position // per_epoch)
          .flat_map(epoch).skip(position % per_epoch)
          .map(lambda i: (tf.gather(x_t, i), tf.gather(y_t, i))))


def _replica_names(strategy):
  first_worker = keras_compat.worker_index(strategy)

  def names(local_replicas):
    first = first_worker * local_replicas
    return [f"replica{first + r}" for r in range(local_replicas)]

  return names


def check_plain(x, sample_weight):
  """The lookahead queue keeps (images, labels) batches: one-line errors for
  dict (+AA) inputs and sample weights."""
  if isinstance(x, dict):
    raise ValueError("schedule='lookahead' takes image tensors; "
                     "{'image', 'augmented'} inputs need "
                     "schedule='delayed'.")
  if sample_weight is not None:
    raise ValueError("schedule='lookahead' does not take sample weights.")


@dataclasses.dataclass
class TrainingBatch:
  """What one training step trains on (this replica's part).

  main: images of the main (clean) BN route; attack: the images the
  adversary perturbs (= main, or the un-augmented "image" of a +AA input);
  aug: images of the third "aug" route (augmented_route="aug") or None;
  labels: int [B] or one-hot [B, C].
  """
  main: Any
  attack: Any
  aug: Optional[Any]
  labels: Any
