"""ConAdvModel: concurrent adversarial training around any dual-BN backbone.

Paper: Liu et al., "Concurrent Adversarial Learning for Large-Batch
Training", ICLR 2022, Algorithm 1. One training step t (weights theta_t,
clean batch (x_t, y_t), pixels in [0, 1]):

  1. x_adv = PGD(f_adv(.; theta_{t - tau}), x_t, y_t)  (stale weights, BN
     route "adv" in training mode, moving statistics left untouched)
  2. L = mean CE(f_main(x_t; theta_t), y_t) + mean CE(f_adv(x_adv; theta_t), y_t)
  3. one optimizer update with grad_theta L (averaged over replicas).

`adversary=None` is the plain baseline (clean loss only); otherwise an
`AdversaryConfig` with `delay` = tau: 0 is sequential adversarial training
(AdvProp-style), >= 1 is ConAdv. When and from which weights step 1 runs is
the job of a schedule object (`official_conadv.adversarial.schedules`,
`model.schedule`): `Sequential` (tau = 0), `Delayed` (a ring buffer of tau
weight snapshots, Keras weights of this model) or `Lookahead` (Algorithm 1
as written: step t attacks batch t + tau with theta_t; a per-replica queue of
tau batches; `fit` feeds the input tau batches ahead and fills the queue on
its first call). `train_step` below is the same for all of them; see the
schedules module for the timing, gradient accumulation and checkpoints.

Lookahead inputs: a batched `tf.data.Dataset` of (images, labels) whose
batches are all full (a fixed order), or numpy arrays with
`fit(x, y, batch_size=...)`; the queue is made from the first batch's shape,
a shorter batch later is refused in one line. Not supported: dict (+AA)
inputs, sample weights, gradient accumulation (refused in one line).

Inputs (paper Sec. 5, "ConAdv + data augmentation", the "+AA" rows). The
training input `x` of `fit` is either

  * images float [B, H, W, C] in [0, 1]: the behaviour above; or
  * {"image": plain, "augmented": aa}, both float [B, H, W, C] in [0, 1], aa
    the AutoAugment (policy v0) version of the same crop. What trains where
    depends on `augmented_route`:

      augmented_route="main" (default, docs/design.md: AutoAugment feeds the clean
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

Several replicas: every replica's BN moving statistics are set to their mean
over the replicas at the end of every epoch and of `fit` and before
`evaluate` and `predict` (`sync_moving_statistics`,
`official_conadv.modeling.replica_statistics`), so the evaluation, the
checkpoint and the export see one set of statistics on every strategy.

The backbone contract: a `keras.Model` whose
`call(images, training=None, bn_route="main")` takes float images
[B, H, W, C] in [0, 1] and returns logits [B, num_classes]; `bn_route` is
"main" (clean) or "adv" (adversarial), and "aug" (AutoAugment) for
`augmented_route="aug"`. Evaluation, `predict` and export use "main" only.
"""

import keras
import tensorflow as tf

from official_conadv.adversarial import attacks
from official_conadv.adversarial import schedules
from official_conadv.modeling import dual_batch_norm
from official_conadv.modeling import keras_compat
from official_conadv.modeling import replica_statistics

MAIN = dual_batch_norm.MAIN
ADV = dual_batch_norm.ADV
AUG = dual_batch_norm.AUG
# Keys of a dict training input (see the module docstring).
IMAGE_KEY = "image"
AUGMENTED_KEY = "augmented"
# Values of ConAdvModel's `augmented_route`.
AUGMENTED_ROUTES = (MAIN, AUG)
# The adversary and its schedules (public names of this module since v1).
AdversaryConfig = schedules.AdversaryConfig
DELAYED = schedules.DELAYED
LOOKAHEAD = schedules.LOOKAHEAD
SCHEDULES = schedules.SCHEDULES


def _replica_id():
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def _accuracy(labels, logits):
  """Per-example top-1 correctness (float32 [B]) for int or one-hot labels."""
  predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
  return tf.cast(tf.equal(predicted, attacks.label_ids(labels)), tf.float32)


@keras.saving.register_keras_serializable(package="official_conadv")
class ConAdvModel(keras_compat.ModelWorkarounds, keras.Model):
  """Trains `backbone` with clean + (stale-weight) adversarial examples.

  See the module docstring for the algorithm (paper Algorithm 1), the
  AutoAugment inputs and the evaluation contract, and
  `official_conadv.adversarial.schedules` for the timing of the attack.

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

  Attributes:
    schedule: the `schedules.Schedule` of `adversary` (None for the
      baseline): its variables, checkpoint names and, for the lookahead
      schedule, `input_offset`, `filled` and `fill(batches)`.

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
    schedules.check_inputs(adversary, augmented_route == AUG,
                           "augmented_route='aug'")
    self.backbone = backbone
    self.adversary = adversary
    self.augmented_route = augmented_route
    self.schedule = schedules.make(adversary, self)
    self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
    self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
    self.clean_accuracy_tracker = keras.metrics.Mean(name="clean_accuracy")
    self.adv_accuracy_tracker = keras.metrics.Mean(name="adv_accuracy")
    self.aug_loss_tracker = keras.metrics.Mean(name="aug_loss")
    self.aug_accuracy_tracker = keras.metrics.Mean(name="aug_accuracy")
    self.examples_tracker = keras.metrics.Sum(name="examples")

  @property
  def delay(self):
    """tau (None for the baseline)."""
    return None if self.adversary is None else self.adversary.delay

  @property
  def _three_branch(self):
    return self.augmented_route == AUG

  # ----------------------------------------------------------------- build
  def build(self, input_shape):
    """Builds the backbone's BN routes, then the schedule's variables.

    Args:
      input_shape: the image shape (B, H, W, C), or a dict with an "image"
        shape (the training-input dict).

    Call it (or `fit`, which calls it) inside the strategy scope: the
    schedule's variables must be created there, and the optimizer must see
    the adversarial (and "aug") BN variables when it is built.
    """
    strategy = self._check_build_scope()
    if not tf.distribute.has_strategy() and strategy is not None:
      # First use outside the scope the model was made in (e.g. a call):
      # the variables still belong to that strategy.
      with strategy.scope():
        return self.build(input_shape)
    if isinstance(input_shape, dict):
      input_shape = _plain(input_shape)
    spec = keras.KerasTensor(tuple(input_shape), dtype="float32")
    routes = [MAIN] + [ADV] * (self.adversary is not None) + [AUG] * (
        self._three_branch)
    for route in routes:
      try:
        # A symbolic call: builds every layer the route uses, computes
        # nothing and moves no statistics.
        self.backbone(spec, training=True, bn_route=route)
      except ValueError as err:
        if route == AUG:
          raise ValueError(_no_aug_route_message(self.backbone)) from err
        raise
    if self.schedule is not None:
      self.schedule.build(self)
    self.built = True

  def symbolic_build(self, data_spec):
    """Builds the model (every BN route, the schedule's variables), the
    compiled loss and metrics and the optimizer from the spec of one
    training batch ((images, labels) `tf.TensorSpec`s), in the model's
    strategy scope, as `fit` does before its first step. Nothing happens
    once all is built."""
    return self._maybe_symbolic_build(data_batch=data_spec)

  def _build_extra_checkpoint_children(self):
    return {} if self.schedule is None else self.schedule.checkpoint_children()

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
    return self.backbone(_plain(inputs), training=training, bn_route=MAIN)

  def adversarial_examples(self, images, labels, step, weights=None):
    """x_adv for micro-step `step`: PGD on the adversarial BN route with
    `weights` (the schedule's theta_{u - tau} when None).

    Args:
      images: float [B, H, W, C] in [0, 1] (this replica's batch; the
        un-augmented "image" of a dict input).
      labels: int [B] or one-hot [B, C].
      step: int scalar, the optimizer's micro-step counter m (= the global
        step t without gradient accumulation). It seeds the attack's random
        numbers: (adversary.seed, m), the replica id folded in.
      weights: the backbone's trainable weights to attack with (tensors in
        `backbone.trainable_variables` order); None asks the schedule.

    Returns:
      float [B, H, W, C] in [0, 1], within epsilon of `images` (L-inf).
    """
    if weights is None:
      weights = self.schedule.attack_weights(self, step)
    non_trainable = [
        tf.convert_to_tensor(v) for v in self.backbone.non_trainable_variables
    ]

    def logits_fn(x):
      # Training-mode BN on the adversarial route; the updated moving
      # statistics that stateless_call returns are dropped.
      logits, _ = self.backbone.stateless_call(
          weights, non_trainable, x, training=True, bn_route=ADV)
      return logits

    step = tf.cast(step, tf.int32)
    batch_seed = tf.stack([tf.constant(self.adversary.seed, tf.int32), step])
    seed = tf.random.experimental.stateless_fold_in(batch_seed, _replica_id())
    return attacks.pgd_attack(logits_fn, images, labels, self.adversary.attack,
                              seed=seed, batch_seed=batch_seed + 1)

  # ----------------------------------------------------------------- steps
  def _training_batch(self, x, y):
    """Routes a training input (module docstring, "Inputs")."""
    if not isinstance(x, dict):
      if self._three_branch:
        raise ValueError(
            "augmented_route='aug' trains on {'image': ..., 'augmented': ...} "
            f"inputs, got a plain {type(x).__name__}.")
      return schedules.TrainingBatch(main=x, attack=x, aug=None, labels=y)
    missing = {IMAGE_KEY, AUGMENTED_KEY} - set(x)
    if missing:
      raise ValueError(f"A dict training input needs the keys {IMAGE_KEY!r} "
                       f"and {AUGMENTED_KEY!r}, got {sorted(x)}.")
    schedules.check_inputs(self.adversary, paired=True)
    image, augmented = x[IMAGE_KEY], x[AUGMENTED_KEY]
    if self._three_branch:
      return schedules.TrainingBatch(main=image, attack=image, aug=augmented,
                                     labels=y)
    return schedules.TrainingBatch(main=augmented, attack=image, aug=None,
                                   labels=y)

  def _branch(self, images, route, y, sample_weight):
    """(logits float32, compiled loss) of one BN route."""
    logits = tf.cast(self.backbone(images, training=True, bn_route=route),
                     tf.float32)
    return logits, self._compile_loss(y, logits, sample_weight)

  def train_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not self.built:  # Keras defers building to here without a strategy.
      self.build(tuple(_plain(x).shape))
    step = schedules.micro_step(self.optimizer)
    batch, x_adv = self._training_batch(x, y), None
    if self.schedule is not None:
      if self.schedule.input_offset:
        schedules.check_plain(x, sample_weight)
      batch, x_adv = self.schedule.examples(self, batch, step)
    y = batch.labels

    logs = {}  # branch name -> (logits, loss), losses scaled by 1/replicas.
    with tf.GradientTape() as tape:
      logits = tf.cast(self.backbone(batch.main, training=True, bn_route=MAIN),
                       tf.float32)
      if x_adv is not None:
        logs["adv"] = self._branch(x_adv, ADV, y, sample_weight)
      if self._three_branch:
        # The authors' form: CE averaged over the 3B (or 2B) images, plus
        # the regularisation once.
        logs["aug"] = self._branch(batch.aug, AUG, y, sample_weight)
        clean_ce = self._compile_loss(y, logits, sample_weight)
        branches = [clean_ce] + [loss for _, loss in logs.values()]
        regularization = keras_compat.regularization_loss(self)
        loss = tf.add_n(branches) / float(len(branches)) + regularization
        clean_loss = clean_ce + regularization
      else:
        # compute_loss adds model.losses and scales by 1 / replicas.
        clean_loss = self.compute_loss(x=batch.main, y=y, y_pred=logits,
                                       sample_weight=sample_weight,
                                       training=True)
        loss = tf.add_n([clean_loss] + [l for _, l in logs.values()])
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

  def _update_train_metrics(self, loss, branches, y, sample_weight):
    unscale = keras_compat.unscale_loss_for_distribution
    logits = branches["clean"][0]
    batch = tf.shape(logits)[0]
    self._loss_tracker.update_state(unscale(loss), sample_weight=batch)
    trackers = {"clean": (self.clean_loss_tracker, self.clean_accuracy_tracker),
                "adv": (self.adv_loss_tracker, self.adv_accuracy_tracker),
                "aug": (self.aug_loss_tracker, self.aug_accuracy_tracker)}
    for name in ("clean", "adv", "aug"):
      if name in branches:
        branch_logits, branch_loss = branches[name]
        loss_tracker, accuracy_tracker = trackers[name]
        loss_tracker.update_state(unscale(branch_loss), sample_weight=batch)
        accuracy_tracker.update_state(_accuracy(y, branch_logits),
                                      sample_weight=sample_weight)
    if self._compile_metrics is not None:
      self._compile_metrics.update_state(y, logits, sample_weight)

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
    per_example = keras_compat.per_example_loss(self, y, logits)
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

  def _logs(self, training):
    """The metric results of one phase: training shows the branch trackers
    of this model's branches, evaluation `examples`."""
    hidden = {self.examples_tracker.name} if training else {
        t.name for t in (self.clean_loss_tracker, self.clean_accuracy_tracker)}
    if self.adversary is None or not training:
      hidden.update((self.adv_loss_tracker.name,
                     self.adv_accuracy_tracker.name))
    if not self._three_branch or not training:
      hidden.update((self.aug_loss_tracker.name,
                     self.aug_accuracy_tracker.name))
    logs = keras.Model.get_metrics_result(self)
    return {k: v for k, v in logs.items() if k not in hidden}

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

  # ---------------------------------------------------------------- export
  def inference_model(self):
    """See `inference_model` (module function) for the backbone."""
    return inference_model(self.backbone)

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


def _plain(x):
  """The un-augmented images of `x` (a tensor, or the dict's "image")."""
  if isinstance(x, dict):
    if IMAGE_KEY not in x:
      raise ValueError(f"A dict input needs an {IMAGE_KEY!r} entry, got "
                       f"keys {sorted(x)}.")
    return x[IMAGE_KEY]
  return x


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
  source = [v for v in backbone.weights
            if not dual_batch_norm.is_auxiliary(v)]
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
