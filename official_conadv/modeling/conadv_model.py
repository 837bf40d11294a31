"""ConAdvModel: concurrent adversarial training around any dual-BN backbone.

Paper: Liu et al., "Concurrent Adversarial Learning for Large-Batch
Training", ICLR 2022, Algorithm 1. One training step t (weights theta_t,
clean batch (x_t, y_t), pixels in [0, 1]):

  1. x_adv = PGD(f_adv(.; theta_{t - tau}), x_t, y_t)  (stale weights, BN
     route "adv" in training mode, moving statistics left untouched)
  2. L = mean CE(f_main(x_t; theta_t), y_t) + mean CE(f_adv(x_adv; theta_t), y_t)
  3. one optimizer update with grad_theta L (averaged over replicas).

`AdversaryConfig.delay` is tau:

  * adversary=None: the plain baseline (clean loss only).
  * delay=0: sequential adversarial training (AdvProp-style): the attack uses
    theta_t, so its gradient must finish before the training gradient starts.
  * delay>=1: ConAdv. theta_{t - tau} comes from a ring buffer of `tau`
    snapshots of the backbone's trainable weights (slot t mod tau is read for
    the attack, then overwritten with theta_t; every slot holds theta_0 while
    t < tau). The attack depends only on weights that already exist at the
    start of the step, so it can overlap with the training computation.

All three are the same `train_step` with different configuration. The ring
buffer is made of Keras weights of this model (`only_first_replica`
aggregation), created in `build()` (inside the strategy scope), so
`save_weights` and checkpoints carry it and a resumed run is exact.

Lookahead schedule (`AdversaryConfig(schedule="lookahead")`, tau >= 1; paper
Algorithm 1 as written): no weight snapshots. `fit` takes a batched
`tf.data.Dataset` (fixed batch size) and feeds it tau batches ahead
(`x.skip(tau)` followed by the first tau batches of the next pass), so
`train_step` at step t receives batch t + tau. It attacks that batch with
theta_t (seeded with t + tau, exactly as the delayed schedule seeds batch
t + tau), pops slot t mod tau of a per-replica queue, i.e. (x_t, x_adv_t,
y_t) pushed tau steps earlier, pushes the new triple into the same slot,
and trains on the popped one. The first `fit` fills the queue from batches
0..tau-1 with theta_0 (seeds 0..tau-1), compiled like the train step
(`fill_lookahead_queue`; the CLI trainer calls it, then feeds every loop's
input from step + tau with `fit(..., input_is_ahead=True)`). The
attack and the update of a step then both depend only on theta_t. Same data
order => the same weights as the delayed schedule (lookahead_test.py, bit
for bit). The queue variables are `on_read` per replica, made once the batch
shape is known, not Keras weights of the model; `tf.train.Checkpoint`
saves every replica's copy and restores them, also into a model built
after the restore. Under MultiWorkerMirrored the slots are named by global
replica index, so each worker saves and restores its own (a worker that
restores a filled queue without its slots is refused in one line). Not
supported yet: dict (+AA) inputs, sample weights, gradient accumulation
(refused in one line).

Staleness counts optimizer updates, not batches. With an optimizer built
with Keras' `gradient_accumulation_steps=N` one update takes N micro-batches
(Keras 3.15: the raw counter `optimizer._iterations` counts micro-steps m,
`optimizer.iterations` returns m // N, the update weights are the mean of the
N micro-batch gradients; a `LossScaleOptimizer` delegates both to its inner
optimizer and, when it skips a non-finite step, leaves the counter alone, so
that micro-batch is simply not counted). At micro-step m, in update
u = m // N, the weights are theta_u (the weights after u updates) and the
attack of every micro-batch uses theta_{u - tau} (theta_0 while u < tau):
slot u mod tau is read at every micro-step, and theta_u is written into it
after the optimizer call only if that call completed update u (the counter
crossed a multiple of N), i.e. after the last micro-step of u was really
applied. That also keeps a skipped loss-scale step from overwriting the slot
its retry still has to read. The write uses the weights read before the
update (one transient copy of the trainable weights on update steps). The
attack's random numbers are seeded with the micro-step m, so micro-batches of
one update get independent noise. Without accumulation m = u = t.

Inputs (paper Sec. 5, "ConAdv + data augmentation", the "+AA" rows). The
training input `x` of `fit` is either

  * images float [B, H, W, C] in [0, 1]: the behaviour above; or
  * {"image": plain, "augmented": aa}, both float [B, H, W, C] in [0, 1], aa
    the AutoAugment (policy v0) version of the same crop. What trains where
    depends on `augmented_route`:

      augmented_route="main" (default, DESIGN.md: AutoAugment feeds the clean
      branch): the main route trains on "augmented"; the adversarial examples
      are generated from "image" with the stale weights and trained on with
      the adv route. L = CE_main(aa) + CE_adv(x_adv(image)), the same sum as
      Algorithm 1. Baseline (adversary=None): CE_main(aa) only.

      augmented_route="aug" (the authors' released code; the backbone needs
      a third BN set, e.g. `ResNet(augmented_bn=True)`): main route on
      "image", a third route "aug" on "augmented", adv route on
      x_adv(image), and label-smoothed CE averaged over all 3B images:
      L = (CE_main(image) + CE_aug(aa) + CE_adv(x_adv)) / 3
      (baseline: (CE_main + CE_aug) / 2). What differs from the default:
      the clean branch sees the un-augmented images, the AutoAugment images
      get BN statistics of their own, and the branches are averaged instead
      of summed, so at the same learning rate every branch's gradient is a
      third of its weight in the default sum (the LARS trust ratio rescales
      adapted layers, but not the excluded BN parameters and biases, and the
      weight decay's relative size grows). Regularisation losses
      (`model.losses`) are added once, outside the average.

`call`, `predict` and `evaluate` use "image" when given the dict.

Evaluation (`evaluate`, `test_step`): data (images, labels) or
(images, labels, weights), weights float32 [B] in {0, 1} (0 = padding that
makes every batch full so every image is scored exactly once). Logs:

  loss     = sum_i w_i * loss_i / sum_i w_i over the whole evaluation (all
             batches and replicas; loss_i the compiled loss per example, plus
             `model.losses`);
  metrics  = the compiled metrics (also those passed as `metrics=`, which
             Keras would not weight) with sample_weight w;
  examples = sum_i w_i, the number of images scored (a `keras.metrics.Sum`,
             summed over replicas).

Padding rows never reach a metric: their logits are replaced by zeros before
the loss and metrics see them (so garbage or NaN padding images are fine);
their labels must be valid class ids.

The backbone contract: a `keras.Model` whose
`call(images, training=None, bn_route="main")` takes float images
[B, H, W, C] in [0, 1] and returns logits [B, num_classes]; `bn_route` is
"main" (clean) or "adv" (adversarial), and "aug" (AutoAugment) for
`augmented_route="aug"`. Evaluation, `predict` and export use "main" only.
"""

import dataclasses

import keras
import tensorflow as tf
# Private, no public equivalent: the 1 / replicas scaling Keras applies to
# the loss under a strategy (pinned by conadv_model_test's
# test_private_keras_loss_scaling_is_one_over_replicas).
from keras.src.losses import loss as keras_loss_module

from official_conadv import keras_mwms_fix
from official_conadv.adversarial import attacks
from official_conadv.modeling import dual_batch_norm

MAIN = dual_batch_norm.MAIN
ADV = dual_batch_norm.ADV
AUG = dual_batch_norm.AUG
# Keys of a dict training input (see the module docstring).
IMAGE_KEY = "image"
AUGMENTED_KEY = "augmented"
# Values of ConAdvModel's `augmented_route`.
AUGMENTED_ROUTES = (MAIN, AUG)
# Values of AdversaryConfig's `schedule` (module docstring).
DELAYED = "delayed"
LOOKAHEAD = "lookahead"
SCHEDULES = (DELAYED, LOOKAHEAD)


@keras.saving.register_keras_serializable(package="official_conadv")
@dataclasses.dataclass(frozen=True)
class AdversaryConfig(attacks.AttackConfig):
  """The attack (see `attacks.AttackConfig`) plus the staleness and seed.

  Attributes:
    delay: tau >= 0, how many optimizer updates old the attack's weights
      are. 0 is sequential (AdvProp-style) adversarial training, >= 1 is
      ConAdv. With gradient accumulation it counts updates, not batches.
    schedule: "delayed" (a ring buffer of tau weight snapshots; the attack
      of step t uses theta_{t - tau}) or "lookahead" (Algorithm 1 as
      written: step t attacks batch t + tau with theta_t and trains on
      batch t with the examples made tau steps earlier; a queue of tau
      batches instead of tau weight copies). Same weights for the same data
      order; see the module docstring.
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


def _replica_id():
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def _accuracy(labels, logits):
  """Per-example top-1 correctness (float32 [B]) for int or one-hot labels."""
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  return tf.cast(tf.equal(predicted, attacks.label_ids(labels)), tf.float32)


def _optimizer_counter(optimizer):
  """(inner optimizer, N): the optimizer that counts micro-steps and its
  `gradient_accumulation_steps` (1 without accumulation).

  A `keras.optimizers.LossScaleOptimizer` delegates its counter and the
  accumulation to `inner_optimizer` (it refuses `gradient_accumulation_steps`
  itself).
  """
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  steps = getattr(inner, "gradient_accumulation_steps", None) or 1
  return inner, int(steps)


@keras.saving.register_keras_serializable(package="official_conadv")
class ConAdvModel(keras.Model):
  """Trains `backbone` with clean + (stale-weight) adversarial examples.

  See the module docstring for the algorithm (paper Algorithm 1), gradient
  accumulation, the AutoAugment inputs and the evaluation contract.

  Args:
    backbone: a `keras.Model` following the dual-BN backbone contract.
    adversary: `AdversaryConfig` (or its config dict), or None for the plain
      baseline.
    augmented_route: where the "augmented" images of a dict input train:
      "main" (default: they replace the clean images on the main BN route)
      or "aug" (the authors' three-branch form: a third BN route, loss
      averaged over the three branches; the backbone must have the route,
      e.g. `ResNet(augmented_bn=True)`, and training inputs must be dicts).
    **kwargs: `keras.Model` arguments (name, ...).

  Logs during `fit`: `loss` (total), `clean_loss`, `adv_loss`,
  `clean_accuracy`, `adv_accuracy`, with augmented_route="aug" also
  `aug_loss` and `aug_accuracy`, and the compiled metrics (on the main-route
  logits), all unscaled whatever the number of replicas (no `adv_*` in
  baseline mode). `evaluate` reports `loss`, the compiled metrics (main BN,
  weighted by the sample weights) and `examples` (images scored).

  Raises:
    ValueError: bad `adversary` or `augmented_route`, or augmented_route="aug"
      with a backbone without an "aug" BN route.
  """

  def __init__(self, backbone, adversary=None, augmented_route=MAIN,
               **kwargs):
    super().__init__(**kwargs)
    if isinstance(adversary, dict):
      adversary = AdversaryConfig.from_config(adversary)
    if adversary is not None and not isinstance(adversary, AdversaryConfig):
      raise ValueError("`adversary` must be an AdversaryConfig, its config "
                       f"dict or None, got {type(adversary).__name__}.")
    if augmented_route not in AUGMENTED_ROUTES:
      raise ValueError(f"`augmented_route` must be one of {AUGMENTED_ROUTES}, "
                       f"got {augmented_route!r}.")
    if augmented_route == AUG and getattr(backbone, "augmented_bn",
                                          None) is False:
      raise ValueError(_no_aug_route_message(backbone))
    if (augmented_route == AUG and adversary is not None and
        adversary.schedule == LOOKAHEAD):
      raise ValueError("schedule='lookahead' does not support "
                       "augmented_route='aug' yet; use schedule='delayed'.")
    self.backbone = backbone
    self.adversary = adversary
    self.augmented_route = augmented_route
    self._stale_buffer = []  # tau * num_trainable Keras variables.
    # Lookahead: tau slots of (x, x_adv, y) per replica, made by the first
    # `fit` (`fill_lookahead_queue`) once the batch shape is known, and
    # whether they hold examples. The slots are not Keras weights of the
    # model (they exist only after training started, so a model rebuilt from
    # its config could not load them); checkpoints carry them
    # (`_trackable_children`).
    self._queue_holder = _Untracked()
    self._queue_ready = None
    self._evaluating = False  # True inside `evaluate` (see get_metrics_result).
    self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
    self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
    self.clean_accuracy_tracker = keras.metrics.Mean(name="clean_accuracy")
    self.adv_accuracy_tracker = keras.metrics.Mean(name="adv_accuracy")
    self.aug_loss_tracker = keras.metrics.Mean(name="aug_loss")
    self.aug_accuracy_tracker = keras.metrics.Mean(name="aug_accuracy")
    self.examples_tracker = keras.metrics.Sum(name="examples")
    self._train_trackers = (self.clean_loss_tracker, self.adv_loss_tracker,
                            self.clean_accuracy_tracker,
                            self.adv_accuracy_tracker, self.aug_loss_tracker,
                            self.aug_accuracy_tracker)

  @property
  def delay(self):
    return None if self.adversary is None else self.adversary.delay

  @property
  def _three_branch(self):
    return self.augmented_route == AUG

  @property
  def _queue(self):
    return self._queue_holder.variables

  @property
  def _lookahead(self):
    """True for the lookahead schedule with tau >= 1 (tau = 0 is the same
    sequential step for both schedules)."""
    return bool(self.delay) and self.adversary.schedule == LOOKAHEAD

  @property
  def _uses_stale_buffer(self):
    return bool(self.delay) and not self._lookahead

  # ----------------------------------------------------------------- build
  def build(self, input_shape):
    """Builds the backbone's BN routes, then the stale-weight buffer.

    Args:
      input_shape: the image shape (B, H, W, C), or a dict with an "image"
        shape (the training-input dict).

    Call it (or `fit`, which calls it) inside the strategy scope: the buffer
    must be created there, and the optimizer must see the adversarial (and
    "aug") BN variables when it is built.
    """
    strategy = self._check_build_scope()
    if not tf.distribute.has_strategy() and strategy is not None:
      # First use outside the scope the model was made in (e.g. a call):
      # the variables still belong to that strategy.
      with strategy.scope():
        return self.build(input_shape)
    if isinstance(input_shape, dict):
      if IMAGE_KEY not in input_shape:
        raise ValueError(f"A dict input needs an {IMAGE_KEY!r} entry, got "
                         f"keys {sorted(input_shape)}.")
      input_shape = input_shape[IMAGE_KEY]
    spec = keras.KerasTensor(tuple(input_shape), dtype="float32")
    routes = [MAIN]
    if self.adversary is not None:
      routes.append(ADV)
    if self._three_branch:
      routes.append(AUG)
    for route in routes:
      try:
        # A symbolic call: builds every layer the route uses, computes
        # nothing and moves no statistics.
        self.backbone(spec, training=True, bn_route=route)
      except ValueError as err:
        if route == AUG:
          raise ValueError(_no_aug_route_message(self.backbone)) from err
        raise
    if self._lookahead and self._queue_ready is None:
      with keras.name_scope(self.name, caller=self):
        self._queue_ready = keras.Variable(
            initializer="zeros", shape=(), dtype="int32", trainable=False,
            aggregation="only_first_replica", name="lookahead_queue_ready")
      # Restored before it existed (a checkpoint of an unbuilt model).
      self._handle_deferred_dependencies(name="lookahead_queue_ready",
                                         trackable=self._queue_ready)
    if self._uses_stale_buffer:
      # ON_READ + ONLY_FIRST_REPLICA: every replica keeps and writes its own
      # copy (all replicas write the same theta_t), so the writes need no
      # cross-replica merge and may sit inside tf.cond / tf.switch_case;
      # checkpoints and reads outside the step see the first replica's copy.
      variables = self.backbone.trainable_variables
      with keras.name_scope(self.name, caller=self):
        self._stale_buffer = [
            keras.Variable(
                initializer="zeros", shape=v.shape, dtype=v.dtype,
                trainable=False, aggregation="only_first_replica",
                synchronization="on_read", name=f"stale_slot{slot}_{i}")
            for slot in range(self.delay) for i, v in enumerate(variables)
        ]
    self.built = True

  def _fully_built(self):
    """Model, compiled loss and metrics, and optimizer all built."""
    parts = [self._compile_metrics, self._compile_loss,
             getattr(self, "optimizer", None)]
    return (self.built and all(l.built for l in self._flatten_layers()) and
            all(p is None or p.built for p in parts))

  def _check_build_scope(self):
    """The strategy the model was made under (None: made outside any).

    Raises ValueError (saying what to do, in one line) when building now
    would mix strategies: another strategy's scope is active than the one
    the model was made under, the optimizer was made under another strategy
    than the one the model builds under, or the backbone was already built
    under another one.
    """
    made = self._distribute_strategy
    active = (tf.distribute.get_strategy() if tf.distribute.has_strategy()
              else None)
    target = made or tf.distribute.get_strategy()
    fix = ("create the backbone and the ConAdvModel, compile it and call "
           "fit/evaluate/predict inside the same `with strategy.scope():`")
    if made is not None and active is not None and active is not made:
      raise ValueError(
          f"ConAdvModel {self.name!r} was created under "
          f"{type(made).__name__} but is used under {type(active).__name__}; "
          f"{fix}.")
    optimizer = getattr(self, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    made_opt = getattr(inner, "_distribution_strategy", None)
    if (made_opt is not None and inner is not None and not inner.built and
        made_opt is not target):
      raise ValueError(
          f"The optimizer of ConAdvModel {self.name!r} was created under "
          f"{type(made_opt).__name__} but the model builds under "
          f"{type(target).__name__}; {fix}.")
    for v in self.backbone.weights:
      if not target.extended.variable_created_in_scope(v.value):
        raise ValueError(
            f"Backbone {self.backbone.name!r} was built outside the scope of "
            f"{type(target).__name__} (weight {v.path}); {fix} (an unbuilt "
            "backbone is built by ConAdvModel).")
    return made

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Builds model, loss, metrics and optimizer before the first step.

    Keras 3.15 does this only when the model was made under a strategy, and
    by taking one batch from a fresh iterator of the dataset (so the input
    pipeline starts twice, and a resumed pipeline skips its records twice);
    without a strategy it defers to the first trace, where an optimizer
    built by `apply_gradients` would hold only the variables that got a
    gradient (so a checkpoint would depend on the strategy). Here every
    strategy takes the same path: the model (both BN routes, then the
    stale-weight buffer), the compiled loss and metrics, then the optimizer
    over all trainable variables, under the model's strategy scope, from
    the dataset's element spec (no batch is read); Keras' peek is the
    fallback for inputs without a plain spec. Nothing happens once all is
    built (`test_fit_reads_the_dataset_once_when_built`). Under a
    multi-worker MultiWorkerMirroredStrategy this also applies
    `keras_mwms_fix` (keras-team/keras#20585).
    """
    strategy = self.distribute_strategy
    keras_mwms_fix.apply_for(strategy)
    if self._fully_built():
      return None
    self._check_build_scope()
    if data_batch is None and iterator is not None:
      data_batch = _element_spec(iterator)
    if data_batch is None:
      if self._distribute_strategy is not None:
        return super()._maybe_symbolic_build(iterator=iterator)
      with strategy.scope():
        return self._symbolic_build(iterator=iterator)
    with strategy.scope():
      return self._symbolic_build(data_batch=data_batch)

  def make_train_function(self, force=False):
    keras_mwms_fix.apply_for(self.distribute_strategy)
    return super().make_train_function(force=force)

  def make_test_function(self, force=False):
    keras_mwms_fix.apply_for(self.distribute_strategy)
    return super().make_test_function(force=force)

  def _build_from_data(self, x):
    """Builds on the first traced step if nothing built the model before.

    Under a `tf.distribute` strategy scope Keras builds the model
    symbolically before the first step (`self(x)`); on the default strategy
    it defers building to the first trace of the step, which never calls
    `self` in training, so the stale-weight buffer would be missing.
    """
    if not self.built:
      self.build(tuple(self._plain_images(x).shape))

  # ----------------------------------------------------------------- inputs
  @staticmethod
  def _plain_images(x):
    """The un-augmented images of `x` (a tensor, or the dict's "image")."""
    if isinstance(x, dict):
      if IMAGE_KEY not in x:
        raise ValueError(f"A dict input needs an {IMAGE_KEY!r} entry, got "
                         f"keys {sorted(x)}.")
      return x[IMAGE_KEY]
    return x

  def _training_inputs(self, x):
    """(main-route images, images to attack, aug-route images or None)."""
    if not isinstance(x, dict):
      if self._three_branch:
        raise ValueError(
            "augmented_route='aug' trains on {'image': ..., 'augmented': ...} "
            f"inputs, got a plain {type(x).__name__}.")
      return x, x, None
    missing = {IMAGE_KEY, AUGMENTED_KEY} - set(x)
    if missing:
      raise ValueError(f"A dict training input needs the keys {IMAGE_KEY!r} "
                       f"and {AUGMENTED_KEY!r}, got {sorted(x)}.")
    image, augmented = x[IMAGE_KEY], x[AUGMENTED_KEY]
    if self._three_branch:
      return image, image, augmented
    return augmented, image, None

  # ----------------------------------------------------------------- calls
  def call(self, inputs, training=False):
    """Inference on the main (clean) BN.

    Args:
      inputs: images float [B, H, W, C] in [0, 1], or a dict whose "image"
        entry is used.
      training: BN batch statistics (and a main-route moving update).

    Returns:
      logits [B, num_classes].
    """
    return self.backbone(self._plain_images(inputs), training=training,
                         bn_route=MAIN)

  def stale_slot(self, slot):
    """The ring buffer's slot `slot` (variables parallel to the backbone's
    trainable variables); holds theta_u for the last completed update u with
    u % tau == slot."""
    n = len(self.backbone.trainable_variables)
    return self._stale_buffer[slot * n:(slot + 1) * n]

  def _micro_step(self):
    """m: the optimizer's raw counter (micro-steps applied), int64 scalar.

    0 without a compiled optimizer.
    """
    if self.optimizer is None:
      return tf.constant(0, tf.int64)
    inner, _ = _optimizer_counter(self.optimizer)
    counter = getattr(inner, "_iterations", None)
    if counter is None:  # Keras without a raw counter: iterations is raw.
      counter = inner.iterations
    return tf.cast(tf.convert_to_tensor(counter), tf.int64)

  def _accumulation_steps(self):
    if getattr(self, "optimizer", None) is None:  # Not compiled (benchmarks).
      return 1
    return _optimizer_counter(self.optimizer)[1]

  def _stale_weights(self, step):
    """theta_{u - tau} as tensors, u = step // N (the update of micro-step
    `step`); theta_0 while u < tau. Fills every slot with the current
    weights at step 0. Writes happen in `_record_stale_weights`.
    """
    current = self.backbone.trainable_variables
    tau = self.delay
    if tau == 0:
      return [tf.convert_to_tensor(v) for v in current]
    step = tf.cast(step, tf.int64)

    def fill_all():
      for slot in range(tau):
        for buf, v in zip(self.stale_slot(slot), current):
          buf.assign(v)
      return tf.constant(True)

    # theta_0 in every slot before the first read (also after loading new
    # backbone weights into an untrained model). A resumed run (step > 0)
    # restores the buffer from its checkpoint instead.
    tf.cond(tf.equal(step, 0), fill_all, lambda: tf.constant(False))

    def read(slot):
      return lambda: [tf.convert_to_tensor(b) for b in self.stale_slot(slot)]

    if tau == 1:
      return read(0)()
    update = step // self._accumulation_steps()
    slot_index = tf.cast(update % tau, tf.int32)
    return tf.switch_case(slot_index, [read(s) for s in range(tau)])

  def _record_stale_weights(self, step, theta):
    """After the optimizer call of micro-step `step`: if it completed update
    u = step // N (the counter reached (u + 1) * N), writes theta (= theta_u,
    the weights read before the call) into slot u mod tau; otherwise (an
    accumulation micro-step, or a skipped loss-scale step) writes nothing.
    """
    tau = self.delay
    n = self._accumulation_steps()
    update = tf.cast(step, tf.int64) // n
    # Read after the optimizer call (ordered by the counter's resource).
    completed = tf.greater(self._micro_step() // n, update)
    slot_index = tf.cast(update % tau, tf.int32)

    def write(slot):
      def fn():
        for buf, value in zip(self.stale_slot(slot), theta):
          buf.assign(value)
        return tf.constant(True)
      return fn

    def write_slot():
      if tau == 1:
        return write(0)()
      return tf.switch_case(slot_index, [write(s) for s in range(tau)])

    tf.cond(completed, write_slot, lambda: tf.constant(False))

  def adversarial_examples(self, images, labels, step, weights=None):
    """x_adv for micro-step `step` from theta_{u - tau} (module docstring).

    Args:
      images: float [B, H, W, C] in [0, 1] (this replica's batch; the
        un-augmented "image" of a dict input).
      labels: int [B] or one-hot [B, C].
      step: int scalar, the optimizer's micro-step counter m (= the global
        step t without gradient accumulation). It seeds the attack's random
        numbers; the weights are those of update u = m // N.
      weights: the backbone's trainable weights to attack with (tensors in
        `backbone.trainable_variables` order); None reads theta_{u - tau}
        from the ring buffer (delayed schedule). The lookahead schedule
        passes theta_t and the step the examples are for.

    Returns:
      float [B, H, W, C] in [0, 1], within epsilon of `images` (L-inf).
    """
    adversary = self.adversary
    stale = self._stale_weights(step) if weights is None else weights
    non_trainable = [
        tf.convert_to_tensor(v) for v in self.backbone.non_trainable_variables
    ]

    def logits_fn(x):
      # Training-mode BN on the adversarial route; the updated moving
      # statistics that stateless_call returns are dropped.
      logits, _ = self.backbone.stateless_call(
          stale, non_trainable, x, training=True, bn_route=ADV)
      return logits

    step = tf.cast(step, tf.int32)
    batch_seed = tf.stack([tf.constant(adversary.seed, tf.int32), step])
    seed = tf.random.experimental.stateless_fold_in(batch_seed, _replica_id())
    return attacks.pgd_attack(logits_fn, images, labels, adversary.attack,
                              seed=seed, batch_seed=batch_seed + 1)

  # ------------------------------------------------------------- lookahead
  def _check_lookahead_input(self, x, sample_weight):
    if isinstance(x, dict):
      raise ValueError("schedule='lookahead' takes image tensors; "
                       "{'image', 'augmented'} inputs need "
                       "schedule='delayed'.")
    if sample_weight is not None:
      raise ValueError("schedule='lookahead' does not take sample weights.")
    if self._accumulation_steps() != 1:
      raise ValueError("schedule='lookahead' does not support "
                       "gradient_accumulation_steps; use schedule='delayed'.")
    if not self._queue:
      raise ValueError(
          "schedule='lookahead': the example queue is empty; train with "
          "`fit` (its first call fills the queue from the first tau "
          "batches).")

  def queue_slot(self, slot):
    """Slot `slot` of the lookahead queue: (x, x_adv, y) variables of this
    replica's batch; holds batch t for the step t with t % tau == slot."""
    return self._queue[3 * slot:3 * slot + 3]

  def _switch_slot(self, slot_index, branch):
    """`branch(slot)` for slot `slot_index` (a tensor; a Python int is fine)."""
    if self.delay == 1:
      return branch(0)()
    return tf.switch_case(tf.cast(slot_index, tf.int32),
                          [branch(s) for s in range(self.delay)])

  def _push(self, slot_index, values):
    def write(slot):
      def fn():
        for var, value in zip(self.queue_slot(slot), values):
          var.assign(tf.cast(value, var.dtype))
        return tf.constant(True)
      return fn
    self._switch_slot(slot_index, write)

  def _current_weights(self):
    return [tf.convert_to_tensor(v) for v in self.backbone.trainable_variables]

  def _lookahead_exchange(self, x, y, step):
    """Step t = `step`: attacks the incoming batch t + tau with theta_t
    (seeded with t + tau, as the delayed schedule seeds that batch), pops
    slot t % tau = (x_t, x_adv_t, y_t) and pushes the new triple into it.

    The attack reads theta_t before the optimizer update and does not feed
    the update of step t: the two are independent computations.
    """
    tau = self.delay
    step = tf.cast(step, tf.int64)
    x_adv_new = self.adversarial_examples(x, y, step + tau,
                                          weights=self._current_weights())

    def read(slot):
      return lambda: [tf.identity(tf.convert_to_tensor(v))
                      for v in self.queue_slot(slot)]

    slot_index = step % tau
    x_t, x_adv_t, y_t = self._switch_slot(slot_index, read)
    with tf.control_dependencies([x_t, x_adv_t, y_t]):
      self._push(slot_index, (x, x_adv_new, y))
    return x_t, x_adv_t, y_t

  def _create_queue(self, element_spec, per_replica=False):
    """Makes the queue, in the strategy scope, for batches with
    `element_spec` ((images, labels) of the global batch, or of one
    replica's batch with `per_replica`), and restores it if a checkpoint
    restored before it existed holds it."""
    strategy = self.distribute_strategy
    replicas = 1 if per_replica else strategy.num_replicas_in_sync
    x_spec, y_spec, _ = keras.utils.unpack_x_y_sample_weight(element_spec)
    if not (isinstance(x_spec, tf.TensorSpec) and
            isinstance(y_spec, tf.TensorSpec)):
      raise ValueError("schedule='lookahead' trains from (images, labels) "
                       f"batches, got {element_spec}.")
    batch = x_spec.shape[0] if x_spec.shape.rank else None
    if (batch is None or any(d is None for d in x_spec.shape) or
        batch % replicas):
      raise ValueError(
          "schedule='lookahead' keeps batches in variables and needs a fixed "
          f"global batch divisible by the {replicas} replica(s), got "
          f"{x_spec.shape}; batch with drop_remainder=True (or, for a "
          "distributed dataset, call create_lookahead_queue with "
          "per_replica_batch_size).")
    local = batch // replicas
    shapes = {"x": (local,) + tuple(x_spec.shape[1:]),
              "y": (local,) + tuple(y_spec.shape[1:])}
    dtypes = {"x": x_spec.dtype.name, "y": y_spec.dtype.name}
    queue = []
    with strategy.scope(), keras.name_scope(self.name, caller=self):
      for slot in range(self.delay):
        for part, kind in (("x", "x"), ("x_adv", "x"), ("y", "y")):
          queue.append(keras.Variable(
              initializer="zeros", shape=shapes[kind], dtype=dtypes[kind],
              trainable=False, aggregation="only_first_replica",
              synchronization="on_read",
              name=f"lookahead_slot{slot}_{part}"))
    self._queue_holder.variables = queue
    restored_full = self.lookahead_queue_filled
    for name, component in self._queue_components():
      # A tf.train.Checkpoint restored into this model before the queue
      # existed keeps its values as deferred dependencies: restore them now.
      if restored_full and name not in self._deferred_dependencies:
        self._queue_holder.variables = []
        raise ValueError(
            "The checkpoint restored into this model marks the lookahead "
            f"queue as filled but holds no {name!r} (this worker's slots): "
            "under MultiWorkerMirrored every worker must save and restore "
            "its own checkpoint (the trainer does).")
      self._handle_deferred_dependencies(name=name, trackable=component)

  def _queue_components(self):
    """(checkpoint name, variable) of every replica's copy of every queue
    slot. Each replica holds its own batch, so each copy is saved (a
    synchronized variable would save the first replica's only), named by
    its global replica index: under MultiWorkerMirrored each worker saves
    (and must restore) its own replicas' slots."""
    out = []
    first = None
    for i, v in enumerate(self._queue):
      value = v.value
      components = getattr(value, "values", None) or (value,)
      if first is None:
        first = _worker_index(self.distribute_strategy) * len(components)
      for r, component in enumerate(components):
        out.append((f"lookahead_queue/{i}/replica{first + r}", component))
    return out

  def fill_lookahead_queue(self, batches):
    """Fills slots 0..tau-1 with the first tau batches of `batches` and
    their examples from the current weights (theta_0 before training;
    seeds 0..tau-1, as the delayed schedule's first tau steps).

    `fit` calls this itself on its first call. Call it directly only to
    feed `fit(..., input_is_ahead=True)` (the CLI trainer does): `batches`
    is then the start of the stream (batches 0, 1, ...), as a batched
    `tf.data.Dataset` of global batches or a distributed dataset of
    per-replica ones (`strategy.distribute_datasets_from_function`).
    """
    if not self._lookahead:
      raise ValueError("fill_lookahead_queue is for schedule='lookahead' "
                       "with tau >= 1.")
    strategy = self.distribute_strategy
    tau = self.delay
    self._ensure_queue(batches)
    if isinstance(batches, tf.data.Dataset):
      batches = strategy.experimental_distribute_dataset(batches.take(tau))

    # The attack compiled as the train step is (XLA draws other random
    # numbers than plain TF on CPU), per replica as Keras does.
    @tf.function(jit_compile=bool(getattr(self, "jit_compile", False)))
    def replica_fn(x, y, slot):
      x_adv = self.adversarial_examples(x, y, slot,
                                        weights=self._current_weights())
      self._push(slot, (x, x_adv, y))
      return tf.constant(True)

    @tf.function
    def fill(x, y, slot):
      strategy.run(replica_fn, args=(x, y, slot))

    filled = 0
    for batch in batches:
      if filled == tau:
        break
      x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
      self._check_lookahead_input(x, sample_weight)
      fill(x, y, tf.constant(filled, tf.int64))
      filled += 1
    if filled != tau:
      raise ValueError(f"schedule='lookahead' needs at least tau={tau} "
                       f"batches, the dataset has {filled}.")
    self._queue_ready.assign(1)

  def _ensure_queue(self, x):
    """Builds the model (the build Keras' fit would do) and makes the queue
    for the batches of `x` (a batched tf.data.Dataset of global batches or
    a distributed dataset of per-replica ones), if not done yet."""
    if isinstance(x, tf.data.Dataset):
      self._maybe_symbolic_build(data_batch=x.element_spec)
      if not self._queue:
        self._create_queue(x.element_spec)
    else:
      self.create_lookahead_queue(x.element_spec)

  def create_lookahead_queue(self, element_spec, per_replica_batch_size=None):
    """Builds the model and makes the lookahead queue for one replica's
    batches, if not done yet (`fit` and `fill_lookahead_queue` do it
    themselves when the batch size is static).

    Args:
      element_spec: (images, labels) `tf.TensorSpec`s of one replica's batch,
        or a distributed dataset's `element_spec` (`PerReplicaSpec` leaves:
        the first replica's is used).
      per_replica_batch_size: fills an unknown batch dimension: a
        multi-worker distributed dataset does not know it statically.

    Making the queue before a checkpoint is restored restores it directly
    (the CLI trainer does); made later, it is restored when it is made.
    """
    spec = _first_replica_spec(element_spec)
    if per_replica_batch_size:
      spec = tf.nest.map_structure(
          lambda s: tf.TensorSpec((per_replica_batch_size,) +
                                  tuple(s.shape[1:]), s.dtype), spec)
    self._maybe_symbolic_build(data_batch=spec)
    if not self._queue:
      self._create_queue(spec, per_replica=True)

  @property
  def lookahead_queue_filled(self):
    """Whether the lookahead queue holds examples (filled, or restored)."""
    return (self._queue_ready is not None and
            bool(int(self._queue_ready.numpy())))

  def fit(self, x=None, y=None, *args, input_is_ahead=False, **kwargs):
    """`keras.Model.fit`; with schedule='lookahead', `x` must be a batched
    `tf.data.Dataset` (fixed batch size), which this feeds tau batches
    ahead (module docstring): the same dataset, epochs and steps as the
    delayed schedule train on the same batches.

    `input_is_ahead=True` (lookahead only): `x` (a dataset or a distributed
    dataset) already yields batch t + tau at step t, and the queue already
    holds batches t..t+tau-1 (`fill_lookahead_queue`, or restored with the
    step count from a checkpoint). The CLI trainer feeds it so, starting
    its input pipeline at `start_step + tau`.
    """
    if not self._lookahead:
      if input_is_ahead:
        raise ValueError("input_is_ahead=True is for schedule='lookahead' "
                         "with tau >= 1.")
      return super().fit(x, y, *args, **kwargs)
    if y is not None or not (isinstance(x, tf.data.Dataset) or
                             (input_is_ahead and isinstance(
                                 x, tf.distribute.DistributedDataset))):
      raise ValueError(
          "schedule='lookahead' trains from a batched tf.data.Dataset of "
          "(images, labels) (drop_remainder=True)"
          + (" or a distributed one" if input_is_ahead else "") +
          f"; got {type(x).__name__}.")
    self._ensure_queue(x)
    if input_is_ahead:
      if not self.lookahead_queue_filled:
        raise ValueError(
            "fit(..., input_is_ahead=True) needs a filled lookahead queue: "
            "call fill_lookahead_queue with the first tau batches, or "
            "restore a checkpoint of a lookahead run.")
      return super().fit(x, None, *args, **kwargs)
    tau = self.delay
    if not self.lookahead_queue_filled:
      self.fill_lookahead_queue(x)
    # Step t reads batch t + tau: the stream starts tau batches in, and its
    # last tau batches (whose examples the next fit uses) are the first tau
    # of the next pass over `x`, which the queue then holds.
    return super().fit(x.skip(tau).concatenate(x.take(tau)), None, *args,
                       **kwargs)

  # ----------------------------------------------------------------- steps
  def _regularization_loss(self):
    """sum(model.losses), scaled by 1 / replicas as Keras' compute_loss."""
    losses = self.losses
    if not losses:
      return tf.constant(0.0, tf.float32)
    total = tf.add_n([tf.reduce_sum(tf.cast(l, tf.float32)) for l in losses])
    return keras_loss_module.scale_loss_for_distribution(total)

  def train_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    self._build_from_data(x)
    step = self._micro_step()
    if self._lookahead:
      # `x, y` is batch t + tau; train on batch t and its examples, made
      # tau steps ago with theta_t-tau (module docstring).
      self._check_lookahead_input(x, sample_weight)
      main_images, x_adv, y = self._lookahead_exchange(x, y, step)
      aug_images = None
    else:
      main_images, attack_images, aug_images = self._training_inputs(x)
      if self.adversary is not None:
        x_adv = self.adversarial_examples(attack_images, y, step)

    with tf.GradientTape() as tape:
      logits = tf.cast(self.backbone(main_images, training=True, bn_route=MAIN),
                       tf.float32)
      if self.adversary is not None:
        adv_logits = tf.cast(
            self.backbone(x_adv, training=True, bn_route=ADV), tf.float32)
        adv_loss = self._compile_loss(y, adv_logits, sample_weight)
      if self._three_branch:
        # The authors' form: CE averaged over the 3B (or 2B) images.
        aug_logits = tf.cast(
            self.backbone(aug_images, training=True, bn_route=AUG),
            tf.float32)
        aug_loss = self._compile_loss(y, aug_logits, sample_weight)
        regularization = self._regularization_loss()
        clean_ce = self._compile_loss(y, logits, sample_weight)
        branches = [clean_ce, aug_loss]
        if self.adversary is not None:
          branches.append(adv_loss)
        loss = tf.add_n(branches) / float(len(branches)) + regularization
        clean_loss = clean_ce + regularization
      else:
        # compute_loss adds model.losses and scales by 1 / replicas.
        clean_loss = self.compute_loss(
            x=main_images, y=y, y_pred=logits, sample_weight=sample_weight,
            training=True)
        loss = clean_loss
        if self.adversary is not None:
          loss = clean_loss + adv_loss
      scaled_loss = self.optimizer.scale_loss(loss)

    variables = self.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    # Variables without a gradient (the adversarial BN in baseline mode) are
    # left out: under Mirrored, None gradients desynchronise the collectives.
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    if self._uses_stale_buffer:
      theta = [tf.convert_to_tensor(v)
               for v in self.backbone.trainable_variables]
    self.optimizer.apply_gradients(pairs)
    if self._uses_stale_buffer:
      self._record_stale_weights(step, theta)

    batch = tf.shape(logits)[0]
    unscale = keras_loss_module.unscale_loss_for_distribution
    self._loss_tracker.update_state(unscale(loss), sample_weight=batch)
    self.clean_loss_tracker.update_state(unscale(clean_loss),
                                         sample_weight=batch)
    self.clean_accuracy_tracker.update_state(_accuracy(y, logits),
                                             sample_weight=sample_weight)
    if self.adversary is not None:
      self.adv_loss_tracker.update_state(unscale(adv_loss),
                                         sample_weight=batch)
      self.adv_accuracy_tracker.update_state(_accuracy(y, adv_logits),
                                             sample_weight=sample_weight)
    if self._three_branch:
      self.aug_loss_tracker.update_state(unscale(aug_loss),
                                         sample_weight=batch)
      self.aug_accuracy_tracker.update_state(_accuracy(y, aug_logits),
                                             sample_weight=sample_weight)
    if self._compile_metrics is not None:
      self._compile_metrics.update_state(y, logits, sample_weight)
    return self._logs(training=True)

  def _per_example_loss(self, y, logits):
    """The compiled loss per example, float32 [B], plus `model.losses`.

    Uses the compiled `keras.losses.Loss`'s `call` (its per-sample values,
    before any reduction), times the compiled loss weight. None if no loss
    was compiled.
    """
    compile_loss = self._compile_loss
    if compile_loss is None:
      return None
    if not compile_loss.built:
      compile_loss.build(y, logits)
    flat = compile_loss._flat_losses  # pylint: disable=protected-access
    if len(flat) != 1:
      raise ValueError("ConAdvModel has one output and takes one compiled "
                       f"loss, got {len(flat)}.")
    loss_fn, loss_weight = flat[0].loss, flat[0].loss_weights
    values = loss_fn.call(tf.cast(y, loss_fn.dtype),
                          tf.cast(logits, loss_fn.dtype))
    values = tf.cast(values, tf.float32)
    if values.shape.rank is not None and values.shape.rank > 1:
      values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    if loss_weight is not None:
      values = values * float(loss_weight)
    if self.losses:
      values = values + tf.add_n(
          [tf.reduce_sum(tf.cast(l, tf.float32)) for l in self.losses])
    return values

  def test_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    logits = tf.cast(self(x, training=False), tf.float32)
    batch = tf.shape(logits)[0]
    if sample_weight is None:
      weights = tf.ones([batch], tf.float32)
    else:
      weights = tf.reshape(tf.cast(sample_weight, tf.float32), [batch])
    # Padding rows (weight 0) get zero logits: whatever their images were
    # (zeros, garbage, NaN), nothing non-finite reaches loss or metrics.
    logits = tf.where(tf.not_equal(weights, 0.0)[:, None], logits,
                      tf.zeros_like(logits))
    per_example = self._per_example_loss(y, logits)
    if per_example is not None:
      # Mean: total += sum(w * loss_i), count += sum(w) per replica; the
      # result sums both over replicas, so loss = sum(w loss) / sum(w).
      self._loss_tracker.update_state(per_example, sample_weight=weights)
    self.examples_tracker.update_state(tf.reduce_sum(weights))
    compile_metrics = self._compile_metrics
    if compile_metrics is not None:
      if not compile_metrics.built:
        compile_metrics.build(y, logits)
      # Every compiled metric weighted, also those passed as `metrics=`
      # (Keras gives sample_weight only to `weighted_metrics`).
      for metric in compile_metrics.metrics:
        metric.update_state(y, logits, sample_weight=weights)
    return self._logs(training=False)

  # ----------------------------------------------------------------- logs
  def _hidden_logs(self, training):
    """Names of metrics that do not belong in the logs of this phase."""
    hidden = set()
    if training:
      hidden.add(self.examples_tracker.name)
    else:
      hidden.update(t.name for t in self._train_trackers)
    if self.adversary is None:
      hidden.update((self.adv_loss_tracker.name,
                     self.adv_accuracy_tracker.name))
    if not self._three_branch:
      hidden.update((self.aug_loss_tracker.name,
                     self.aug_accuracy_tracker.name))
    return hidden

  def _logs(self, training):
    logs = super().get_metrics_result()
    for name in self._hidden_logs(training):
      logs.pop(name, None)
    return logs

  def get_metrics_result(self):
    """Metric results of the current phase (`fit` or `evaluate`).

    Keras ends `fit` epochs and `evaluate` with this method (read in the
    cross-replica context, so every metric is aggregated over replicas) when
    its keys equal those of the step logs; otherwise it keeps the last
    step's logs, which are per-replica results averaged over replicas and
    wrong for weighted sums. Filtering by phase keeps the keys equal.
    """
    return self._logs(training=not self._evaluating)

  def evaluate(self, *args, **kwargs):
    """`keras.Model.evaluate`; see the module docstring for the logs."""
    previous, self._evaluating = self._evaluating, True
    try:
      return super().evaluate(*args, **kwargs)
    finally:
      self._evaluating = previous

  # ----------------------------------------------------------------- export
  def inference_model(self):
    """See `inference_model` (module function) for the backbone."""
    return inference_model(self.backbone)

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    """Adds every model weight to what `tf.train.Checkpoint` saves.

    On the TF backend Keras 3 keeps layers and weights held in Python lists
    (`SmallCNN.convs`, `ResNet.blocks`, this model's stale-weight buffer) in
    `TrackedList`s, which `tf.train.Checkpoint` does not traverse (Keras
    converts them for SavedModel only; keras-team/keras#18398). Without this
    a checkpoint of the model misses them: a restored model silently keeps
    its initial BN statistics and an empty ring buffer.
    """
    children = super()._trackable_children(save_type, **kwargs)
    if save_type == "checkpoint":
      # Keyed by position, not `variable.path`: paths carry auto-numbered
      # layer names ("small_cnn_3") that differ between processes.
      for i, v in enumerate(self.backbone.weights):
        children[f"backbone_weights/{i}"] = v
      for i, v in enumerate(self._stale_buffer):
        children[f"stale_buffer/{i}"] = v
      for name, component in self._queue_components():
        children[name] = component
      if self._queue_ready is not None:
        children["lookahead_queue_ready"] = self._queue_ready
    return children

  def get_config(self):
    config = super().get_config()
    config.update({
        "backbone": keras.saving.serialize_keras_object(self.backbone),
        "adversary": (None if self.adversary is None else
                      self.adversary.get_config()),
        "augmented_route": self.augmented_route,
    })
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["backbone"] = keras.saving.deserialize_keras_object(
        config["backbone"])
    return cls(**config)


def _element_spec(epoch_iterator):
  """The `tf.TensorSpec` structure of one batch of a Keras epoch iterator
  (first replica's spec of a distributed dataset), or None if unknown."""
  adapter = getattr(epoch_iterator, "data_adapter", None)
  try:
    spec = adapter.get_tf_dataset().element_spec
  except (AttributeError, NotImplementedError, TypeError, ValueError):
    return None
  try:
    return _first_replica_spec(spec)
  except TypeError:
    return None


def _first_replica_spec(spec):
  """`spec` with every `PerReplicaSpec` replaced by its first replica's
  `tf.TensorSpec` (the spec of one replica's batch); TypeError for other
  leaves."""

  def one(leaf):
    if isinstance(leaf, tf.TensorSpec):
      return leaf
    values = getattr(leaf, "_value_specs", None)  # PerReplicaSpec.
    if values and isinstance(values[0], tf.TensorSpec):
      return values[0]
    raise TypeError(f"not a tensor spec: {leaf!r}")

  return tf.nest.map_structure(one, spec)


def _worker_index(strategy):
  """This worker's index among a multi-worker strategy's workers (chief
  first), 0 for single-worker strategies."""
  if not keras_mwms_fix.is_multi_worker(strategy):
    return 0
  resolver = strategy.cluster_resolver
  jobs = resolver.cluster_spec().as_dict()
  index = int(resolver.task_id)
  if "chief" in jobs:
    return 0 if resolver.task_type == "chief" else index + 1
  return index


class _Untracked:
  """Holds variables out of Keras' attribute tracking."""

  def __init__(self):
    self.variables = []


def _no_aug_route_message(backbone):
  return (f"augmented_route='aug' needs a backbone with an 'aug' BN route "
          f"(e.g. ResNet/SmallCNN(augmented_bn=True)); {backbone.name!r} has "
          "none.")


def inference_model(backbone):
  """A copy of `backbone` without the auxiliary BN sets, main weights copied.

  The copy is rebuilt from `backbone.get_config()` inside
  `dual_batch_norm.main_only()`, so its `DualBatchNormalization` layers hold
  only the main set (no `adv`, no `aug`); its variables are exactly the
  backbone's variables outside `/adv/` and `/aug/`, in order. Its
  `call(images, training=False)` returns the same logits as
  `backbone(images, training=False, bn_route="main")`.

  A backbone with an `inference_model()` method of its own (e.g. a
  `convert.DualBNBackbone`, which exports the original architecture) is
  exported by that method instead.
  """
  export = getattr(backbone, "inference_model", None)
  if callable(export):
    return export()
  if not backbone.built:
    raise ValueError("`backbone` must be built before exporting it.")
  with dual_batch_norm.main_only():
    clone = backbone.__class__.from_config(backbone.get_config())
  shape = _input_shape(backbone)
  clone(tf.zeros((1,) + tuple(shape[1:]), tf.float32), training=False)
  source = [v for v in backbone.weights if not _is_auxiliary(v)]
  if len(source) != len(clone.weights):
    raise ValueError(
        f"Backbone {backbone.name!r} has {len(source)} main-route weights but "
        f"its main-only rebuild has {len(clone.weights)}; it must build its "
        "layers from its config.")
  for src, dst in zip(source, clone.weights):
    if tuple(src.shape) != tuple(dst.shape):
      raise ValueError(f"Weight mismatch exporting {src.path}: "
                       f"{src.shape} vs {dst.path} {dst.shape}.")
    dst.assign(src)
  return clone


def _is_adv(variable):
  return f"/{ADV}/" in f"/{variable.path}/"


def _is_auxiliary(variable):
  """True for a variable of an auxiliary BN set (`<bn>/adv/`, `<bn>/aug/`)."""
  path = f"/{variable.path}/"
  return any(f"/{route}/" in path
             for route in dual_batch_norm.AUXILIARY_ROUTES)


def _input_shape(model):
  shape = getattr(model, "_build_shapes_dict", None)
  if shape:
    return tuple(next(iter(shape.values())))
  try:
    return tuple(model.input_shape)
  except (AttributeError, ValueError) as err:
    raise ValueError(
        f"Cannot tell the input shape of backbone {model.name!r}; call it on "
        "a batch first.") from err
