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

The backbone contract: a `keras.Model` whose
`call(images, training=None, bn_route="main")` takes float images
[B, H, W, C] in [0, 1] and returns logits [B, num_classes]; `bn_route` is
"main" (clean) or "adv" (adversarial). Evaluation, `predict` and export use
"main" only.
"""

import dataclasses

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from official_conadv.adversarial import attacks
from official_conadv.modeling import dual_batch_norm

MAIN = "main"
ADV = "adv"


@keras.saving.register_keras_serializable(package="official_conadv")
@dataclasses.dataclass(frozen=True)
class AdversaryConfig(attacks.AttackConfig):
  """The attack (see `attacks.AttackConfig`) plus the staleness and seed.

  Attributes:
    delay: tau >= 0, how many steps old the attack's weights are. 0 is
      sequential (AdvProp-style) adversarial training, >= 1 is ConAdv.
    seed: base seed of the attack's stateless random numbers (noise, random
      targets, start-from-clean draws); step t uses (seed, t).
  """

  delay: int = 1
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.delay, bool) or not isinstance(
        self.delay, int) or self.delay < 0:
      raise ValueError(f"`delay` must be an integer >= 0, got {self.delay!r}.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")

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


@keras.saving.register_keras_serializable(package="official_conadv")
class ConAdvModel(keras.Model):
  """Trains `backbone` with clean + (stale-weight) adversarial examples.

  Args:
    backbone: a `keras.Model` following the dual-BN backbone contract.
    adversary: `AdversaryConfig` (or its config dict), or None for the plain
      baseline.

  Logs during `fit`: `loss` (total), `clean_loss`, `adv_loss`,
  `clean_accuracy`, `adv_accuracy` and the compiled metrics (on the clean
  logits), all unscaled whatever the number of replicas. `evaluate` reports
  `loss` and the compiled metrics on the main BN.
  """

  def __init__(self, backbone, adversary=None, **kwargs):
    super().__init__(**kwargs)
    if isinstance(adversary, dict):
      adversary = AdversaryConfig.from_config(adversary)
    if adversary is not None and not isinstance(adversary, AdversaryConfig):
      raise ValueError("`adversary` must be an AdversaryConfig, its config "
                       f"dict or None, got {type(adversary).__name__}.")
    self.backbone = backbone
    self.adversary = adversary
    self._stale_buffer = []  # tau * num_trainable Keras variables.
    self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
    self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
    self.clean_accuracy_tracker = keras.metrics.Mean(name="clean_accuracy")
    self.adv_accuracy_tracker = keras.metrics.Mean(name="adv_accuracy")
    self._train_trackers = (self.clean_loss_tracker, self.adv_loss_tracker,
                            self.clean_accuracy_tracker,
                            self.adv_accuracy_tracker)

  @property
  def delay(self):
    return None if self.adversary is None else self.adversary.delay

  # ----------------------------------------------------------------- build
  def build(self, input_shape):
    """Builds both BN routes of the backbone, then the stale-weight buffer.

    Call it (or `fit`, which calls it) inside the strategy scope: the buffer
    must be created there, and the optimizer must see the adversarial BN
    variables when it is built.
    """
    spec = keras.KerasTensor(tuple(input_shape), dtype="float32")
    routes = (MAIN,) if self.adversary is None else (MAIN, ADV)
    for route in routes:
      keras.src.backend.compute_output_spec(
          lambda x, r=route: self.backbone(x, training=True, bn_route=r), spec)
    if self.delay:
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

  # ----------------------------------------------------------------- calls
  def call(self, inputs, training=False):
    """Inference on the main (clean) BN: images [B, H, W, C] -> logits."""
    return self.backbone(inputs, training=training, bn_route=MAIN)

  def stale_slot(self, slot):
    """The ring buffer's slot `slot` (variables parallel to the backbone's
    trainable variables); holds theta_t for the last t with t % tau == slot."""
    n = len(self.backbone.trainable_variables)
    return self._stale_buffer[slot * n:(slot + 1) * n]

  def _stale_weights(self, step):
    """Returns theta_{step - tau} as tensors and writes theta_step into its slot.

    Reads happen before the write (TF orders stateful ops on one resource by
    program order), so the returned tensors are the old slot contents.
    """
    current = self.backbone.trainable_variables
    tau = self.delay
    if tau == 0:
      return [tf.convert_to_tensor(v) for v in current]

    def fill_all():
      for slot in range(tau):
        for buf, v in zip(self.stale_slot(slot), current):
          buf.assign(v)
      return tf.constant(True)

    # theta_0 in every slot before the first read (also after loading new
    # backbone weights into an untrained model). A resumed run (step > 0)
    # restores the buffer from its checkpoint instead.
    tf.cond(tf.equal(step, 0), fill_all, lambda: tf.constant(False))
    slot_index = tf.cast(step % tau, tf.int32)

    def read(slot):
      return lambda: [tf.convert_to_tensor(b) for b in self.stale_slot(slot)]

    def write(slot):
      def fn():
        for buf, v in zip(self.stale_slot(slot), current):
          buf.assign(v)
        return tf.constant(True)
      return fn

    if tau == 1:
      stale = read(0)()
      with tf.control_dependencies(stale):
        write(0)()
    else:
      stale = tf.switch_case(slot_index, [read(s) for s in range(tau)])
      with tf.control_dependencies(stale):
        tf.switch_case(slot_index, [write(s) for s in range(tau)])
    return stale

  def adversarial_examples(self, images, labels, step):
    """x_adv for this step from theta_{step - tau} (see module docstring).

    Args:
      images: float [B, H, W, C] in [0, 1] (this replica's batch).
      labels: int [B] or one-hot [B, C].
      step: int scalar, the global step t.

    Returns:
      float [B, H, W, C] in [0, 1], within epsilon of `images` (L-inf).
    """
    adversary = self.adversary
    stale = self._stale_weights(step)
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

  # ----------------------------------------------------------------- steps
  def train_step(self, data):
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    step = self.optimizer.iterations
    if self.adversary is not None:
      x_adv = self.adversarial_examples(x, y, step)

    with tf.GradientTape() as tape:
      logits = tf.cast(self.backbone(x, training=True, bn_route=MAIN),
                       tf.float32)
      # compute_loss adds model.losses and scales by 1 / replicas.
      clean_loss = self._compute_loss(
          x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
      loss = clean_loss
      if self.adversary is not None:
        adv_logits = tf.cast(
            self.backbone(x_adv, training=True, bn_route=ADV), tf.float32)
        adv_loss = self._compile_loss(y, adv_logits, sample_weight)
        loss = clean_loss + adv_loss
      scaled_loss = self.optimizer.scale_loss(loss)

    variables = self.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    # Variables without a gradient (the adversarial BN in baseline mode) are
    # left out: under Mirrored, None gradients desynchronise the collectives.
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    self.optimizer.apply_gradients(pairs)

    batch = tf.shape(x)[0]
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
    if self._compile_metrics is not None:
      self._compile_metrics.update_state(y, logits, sample_weight)
    logs = self.get_metrics_result()
    if self.adversary is None:
      logs.pop("adv_loss", None)
      logs.pop("adv_accuracy", None)
    return logs

  def test_step(self, data):
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    logits = tf.cast(self(x, training=False), tf.float32)
    loss = self._compute_loss(
        x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=False)
    self._loss_tracker.update_state(
        keras_loss_module.unscale_loss_for_distribution(loss),
        sample_weight=tf.shape(x)[0])
    if self._compile_metrics is not None:
      self._compile_metrics.update_state(y, logits, sample_weight)
    logs = self.get_metrics_result()
    for tracker in self._train_trackers:
      logs.pop(tracker.name, None)
    return logs

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
    return children

  def get_config(self):
    config = super().get_config()
    config.update({
        "backbone": keras.saving.serialize_keras_object(self.backbone),
        "adversary": (None if self.adversary is None else
                      self.adversary.get_config()),
    })
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["backbone"] = keras.saving.deserialize_keras_object(
        config["backbone"])
    return cls(**config)


def inference_model(backbone):
  """A copy of `backbone` without the adversarial BN, main weights copied.

  The copy is rebuilt from `backbone.get_config()` inside
  `dual_batch_norm.main_only()`, so its `DualBatchNormalization` layers hold
  only the main set; its variables are exactly the backbone's non-`adv`
  variables, in order. Its `call(images, training=False)` returns the same
  logits as `backbone(images, training=False, bn_route="main")`.
  """
  if not backbone.built:
    raise ValueError("`backbone` must be built before exporting it.")
  with dual_batch_norm.main_only():
    clone = backbone.__class__.from_config(backbone.get_config())
  shape = _input_shape(backbone)
  clone(tf.zeros((1,) + tuple(shape[1:]), tf.float32), training=False)
  source = [v for v in backbone.weights if not _is_adv(v)]
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
