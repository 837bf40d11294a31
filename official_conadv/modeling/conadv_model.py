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
from keras import ops
# Private, no public equivalent: the 1 / replicas scaling Keras applies to
# the loss under a tf.distribute strategy (identity on JAX); pinned by
# conadv_model_test's test_private_keras_loss_scaling_is_one_over_replicas.
from keras.src.losses import loss as keras_loss_module

from official_conadv import backends
from official_conadv.adversarial import attacks
from official_conadv.adversarial import schedules
from official_conadv.modeling import dual_batch_norm

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


def _accuracy(labels, logits):
  """Per-example top-1 correctness (float32 [B]) for int or one-hot labels."""
  predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
  return ops.cast(ops.equal(predicted, attacks.label_ids(labels)), "float32")


def _trainer():
  """The backend's half of ConAdvModel (its train/test steps, `fit`), as
  Keras picks its own trainer per backend: `tf_trainer.TensorFlowTrainer`
  or `jax_trainer.JaxTrainer`."""
  if backends.is_tensorflow():
    from official_conadv.modeling import tf_trainer  # pylint: disable=g-import-not-at-top
    return tf_trainer.TensorFlowTrainer
  from official_conadv.modeling import jax_trainer  # pylint: disable=g-import-not-at-top
  return jax_trainer.JaxTrainer


@keras.saving.register_keras_serializable(package="official_conadv")
class ConAdvModel(_trainer(), keras.Model):
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
    scope = self._build_scope()
    if scope is not None:
      # First use outside the scope the model was made in (e.g. a call):
      # the variables still belong to that strategy (TensorFlow).
      with scope:
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
        ops.convert_to_tensor(v) for v in self.backbone.non_trainable_variables
    ]

    def logits_fn(x):
      # Training-mode BN on the adversarial route; the updated moving
      # statistics that stateless_call returns are dropped.
      logits, _ = self.backbone.stateless_call(
          weights, non_trainable, x, training=True, bn_route=ADV)
      return logits

    seed, batch_seed = backends.attack_keys(self.adversary.seed, step)
    return attacks.pgd_attack(logits_fn, images, labels, self.adversary.attack,
                              seed=seed, batch_seed=batch_seed)

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

  def _routes(self, batch, x_adv):
    """[(branch name, BN route, images)] one training step runs forward:
    the main route, then the adversarial, then the "aug" one."""
    routes = [("clean", MAIN, batch.main)]
    if x_adv is not None:
      routes.append(("adv", ADV, x_adv))
    if self._three_branch:
      routes.append(("aug", AUG, batch.aug))
    return routes

  def _examples(self, x, y, sample_weight, step):
    """(TrainingBatch, x_adv or None) of micro-step `step`: the
    schedule's."""
    batch, x_adv = self._training_batch(x, y), None
    if self.schedule is not None:
      if self.schedule.input_offset:
        schedules.check_plain(x, sample_weight)
      batch, x_adv = self.schedule.examples(self, batch, step)
    return batch, x_adv

  def _update_train_metrics(self, loss, branches, y, sample_weight):
    """Updates the trackers of a training step; `branches` maps "clean",
    "adv", "aug" to (logits float32, loss scaled by 1 / replicas)."""
    unscale = keras_loss_module.unscale_loss_for_distribution
    logits = branches["clean"][0]
    batch = ops.shape(logits)[0]
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

  def _update_test_metrics(self, y, logits, sample_weight):
    """Updates the evaluation trackers (class docstring, "Evaluation") with
    one batch's main-route logits (float32 [B, C])."""
    batch = ops.shape(logits)[0]
    if sample_weight is None:
      weights = ops.ones([batch], "float32")
    else:
      weights = ops.reshape(ops.cast(sample_weight, "float32"), [batch])
    # Padding rows (weight 0) get zero logits: whatever their images were
    # (zeros, garbage, NaN), nothing non-finite reaches loss or metrics.
    logits = ops.where(ops.not_equal(weights, 0.0)[:, None], logits,
                       ops.zeros_like(logits))
    per_example = per_example_loss(self, y, logits)
    if per_example is not None:
      # Mean: total += sum(w * loss_i), count += sum(w) per replica; the
      # result sums both over replicas, so loss = sum(w loss) / sum(w).
      self._loss_tracker.update_state(per_example, sample_weight=weights)
    self.examples_tracker.update_state(ops.sum(weights))
    compile_metrics = self._compile_metrics
    if compile_metrics is not None:
      if not compile_metrics.built:
        compile_metrics.build(y, logits)
      # Every compiled metric weighted, also those passed as `metrics=`
      # (Keras gives sample_weight only to `weighted_metrics`).
      for metric in compile_metrics.metrics:
        metric.update_state(y, logits, sample_weight=weights)

  _evaluating = False  # True inside `evaluate` (see get_metrics_result).

  def get_metrics_result(self):
    """Metric results of the current phase (`fit` or `evaluate`; on
    TensorFlow read in the cross-replica context, every metric aggregated
    over replicas). Keras ends `fit` epochs and `evaluate` with this method
    only when its keys equal the step logs' keys, otherwise it keeps the
    last step's (per-replica) logs, wrong for weighted sums; this model's
    logs differ by phase."""
    return self._logs(training=not self._evaluating)

  def evaluate(self, *args, **kwargs):
    """`keras.Model.evaluate` (logs: see the class docstring); on
    TensorFlow after `sync_moving_statistics`."""
    previous, self._evaluating = self._evaluating, True
    try:
      return super().evaluate(*args, **kwargs)
    finally:
      self._evaluating = previous

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
  clone(ops.zeros((1,) + tuple(shape[1:]), "float32"), training=False)
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
    # A copy (on JAX an assigned array is shared, and training the backbone
    # donates its buffers).
    dst.assign(ops.copy(ops.convert_to_tensor(src)))
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


def per_example_loss(model, y, logits):
  """The compiled loss per example, float32 [B], plus `model.losses`.

  Uses the compiled `keras.losses.Loss`'s `call` (its per-sample values,
  before any reduction), times the compiled loss weight. None if no loss
  was compiled.
  """
  compile_loss = model._compile_loss  # pylint: disable=protected-access
  if compile_loss is None:
    return None
  if not compile_loss.built:
    compile_loss.build(y, logits)
  flat = compile_loss._flat_losses  # pylint: disable=protected-access
  if len(flat) != 1:
    raise ValueError("ConAdvModel has one output and takes one compiled "
                     f"loss, got {len(flat)}.")
  loss_fn, loss_weight = flat[0].loss, flat[0].loss_weights
  values = loss_fn.call(ops.cast(y, loss_fn.dtype),
                        ops.cast(logits, loss_fn.dtype))
  values = ops.cast(values, "float32")
  if len(values.shape) > 1:
    values = ops.mean(values, axis=list(range(1, len(values.shape))))
  if loss_weight is not None:
    values = values * float(loss_weight)
  if model.losses:
    values = values + _sum([ops.sum(ops.cast(l, "float32"))
                            for l in model.losses])
  return values


def _sum(tensors):
  """Sum of a non-empty list of tensors (`tf.add_n` on TensorFlow)."""
  if backends.is_tensorflow():
    return backends.impl().add_n(tensors)
  total = tensors[0]
  for t in tensors[1:]:
    total = total + t
  return total
