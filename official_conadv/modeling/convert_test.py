"""Tests for convert.dual_bn_backbone: keras.applications models keep their
numerics, variable paths and weights on the main route and gain exactly one
BN set; a converted model trains under ConAdvModel as a hand-written loop on
the default strategy and 2-replica Mirrored; the route reaches the BN layers
under tf.function, XLA and stateless_call; refused models; serialization;
export to a plain Keras model that loads without official_conadv."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv.adversarial import attacks
from official_conadv.modeling import conadv_model
from official_conadv.modeling import convert
from official_conadv.modeling import dual_batch_norm
from official_conadv.optimization import lars
from official_conadv.testing import strategies

NUM_CLASSES = 5


def _bn_layers(model):
  return [l for l in model.layers
          if isinstance(l, keras.layers.BatchNormalization)]


def _routed(backbone):
  return [l for l in backbone.model.layers
          if isinstance(l, convert.RoutedBatchNormalization)]


def _main_weights(backbone):
  return [v for v in backbone.weights
          if "/adv/" not in v.path and "/aug/" not in v.path]


def _randomize_bn(model, seed):
  """Gives every BN layer random gamma/beta/statistics ("trained" weights),
  so a conversion that dropped them could not pass."""
  rng = np.random.default_rng(seed)
  for layer in _bn_layers(model):
    for v in layer.weights:
      leaf = v.path.rsplit("/", 1)[1]
      low, high = ((0.5, 1.5) if leaf in ("gamma", "moving_variance")
                   else (-0.2, 0.2))
      v.assign(rng.uniform(low, high, v.shape).astype("float32"))


# ------------------------------------------------ 1. keras.applications
# (original count_params(), BN parameters = what the adv set adds), measured
# at 32x32x3 input and 5 classes.
APPLICATIONS = {
    "ResNet50": (23_597_957, 106_240),
    "EfficientNetB0": (4_055_976, 84_032),
    "MobileNetV2": (2_264_389, 68_224),
    "MobileNetV3Small": (1_535_093, 24_224),
}


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_keras_application_main_route_is_the_original(name):
  """(a) main-route logits equal the original fed images * 255, bit for bit
  with fused=False (inference and training mode, where the moving-statistics
  update lands in the main set only), within 1e-5 of max |logit| with the
  default fused kernel (inference); (b) count_params grows by exactly the
  BN parameters (one more set); (c) changing the adv set changes the adv
  route only (this also pins that Keras' Functional.call forwards
  `bn_route` to the layers that registered it). Also: same variable paths
  and values as the original, and the export reproduces it."""
  keras.utils.set_random_seed(0)
  original = getattr(keras.applications, name)(
      weights=None, input_shape=(32, 32, 3), classes=NUM_CLASSES,
      classifier_activation=None)
  _randomize_bn(original, seed=1)
  x = np.random.default_rng(2).uniform(0, 1, (4, 32, 32, 3)).astype(
      "float32")
  backbone = convert.dual_bn_backbone(original, pixel_scale=255.0,
                                      fused=False)

  # Main route: the original's variables, paths, order and values.
  main = _main_weights(backbone)
  assert [v.path for v in main] == [v.path for v in original.weights]
  for got, want in zip(main, original.weights):
    np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)
  # The adv set: one per BN layer under <bn>/adv/, a copy of the main set.
  bns = _routed(backbone)
  assert [l.name for l in bns] == [l.name for l in _bn_layers(original)]
  for layer in bns:
    for m, a in zip(layer.route_weights("main"), layer.route_weights("adv")):
      assert a.path == m.path.replace(f"{layer.name}/",
                                      f"{layer.name}/adv/", 1)
      np.testing.assert_array_equal(a.numpy(), m.numpy())

  # (b) one more BN set, nothing else.
  params, bn_params = APPLICATIONS[name]
  assert original.count_params() == params
  assert sum(l.count_params() for l in _bn_layers(original)) == bn_params
  assert backbone.count_params() == params + bn_params

  # (a) inference and training mode, bit for bit.
  want = original(x * 255.0, training=False).numpy()
  np.testing.assert_array_equal(backbone(x, training=False).numpy(), want)
  np.testing.assert_array_equal(  # The adv set is a copy of the main one.
      backbone(x, training=False, bn_route="adv").numpy(), want)
  adv_before = [[v.numpy() for v in l.route_weights("adv")] for l in bns]
  np.testing.assert_array_equal(
      backbone(x, training=True, bn_route="main").numpy(),
      original(x * 255.0, training=True).numpy())
  for layer, src in zip(bns, _bn_layers(original)):
    np.testing.assert_array_equal(layer.moving_mean.numpy(),
                                  src.moving_mean.numpy())
    np.testing.assert_array_equal(layer.moving_variance.numpy(),
                                  src.moving_variance.numpy())
  moved = False
  for layer, before in zip(bns, adv_before):
    for v, b in zip(layer.route_weights("adv"), before):
      np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    moved |= not np.array_equal(layer.moving_mean.numpy(), before[2])
  assert moved

  # (c) the adv route reads the adv set only.
  want = original(x * 255.0, training=False).numpy()
  for layer in bns:
    layer.adv.moving_variance.assign(layer.adv.moving_variance * 2.0 + 0.1)
  adv = backbone(x, training=False, bn_route="adv").numpy()
  assert np.abs(adv - want).max() > 1e-3 * np.abs(want).max()
  np.testing.assert_array_equal(backbone(x, training=False).numpy(), want)

  # Export: the original architecture (graph ops such as MobileNetV3's
  # hard-swish `x + 3` included) with the main weights, original input range.
  exported = backbone.inference_model()
  assert [v.path for v in exported.weights] == [
      v.path for v in original.weights]
  np.testing.assert_array_equal(exported(x * 255.0, training=False).numpy(),
                                want)

  # The default fused kernel: inference within float tolerance.
  fused = convert.dual_bn_backbone(original, pixel_scale=255.0)
  np.testing.assert_allclose(fused(x, training=False).numpy(), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


# --------------------------------------------------- 2. a tiny converted model
SHAPE = (8, 8, 3)
BATCH = 8
LR = 0.5


def _tiny(seed=0, bn_kwargs=None, sequential=False):
  """Input -> (Conv -> BN -> ReLU) x 2 -> GlobalAvgPool -> Dense(5)."""
  keras.utils.set_random_seed(seed)
  bn_kwargs = dict(bn_kwargs or {})
  layers = [
      keras.layers.Conv2D(4, 3, padding="same", name="conv0"),
      keras.layers.BatchNormalization(name="bn0", **bn_kwargs),
      keras.layers.ReLU(name="relu0"),
      keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                          name="conv1"),
      keras.layers.BatchNormalization(name="bn1", momentum=0.9, **bn_kwargs),
      keras.layers.ReLU(name="relu1"),
      keras.layers.GlobalAveragePooling2D(name="pool"),
      keras.layers.Dense(NUM_CLASSES, name="logits"),
  ]
  if sequential:
    model = keras.Sequential([keras.Input(SHAPE)] + layers, name="tiny")
  else:
    inputs = keras.Input(SHAPE, name="images")
    x = inputs
    for layer in layers:
      x = layer(x)
    model = keras.Model(inputs, x, name="tiny")
  _randomize_bn(model, seed + 1)
  return model


def _data(num_batches, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (num_batches * BATCH,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, num_batches * BATCH).astype("int32")
  return x, y


class _HandWrittenTiny(keras.Model):
  """`_tiny()` written as a dual-BN backbone by hand (no converter code):
  the route is passed to each DualBatchNormalization explicitly."""

  def __init__(self, pixel_scale, synchronized):
    super().__init__()
    self.pixel_scale = pixel_scale
    self.conv0 = keras.layers.Conv2D(4, 3, padding="same", name="conv0")
    self.bn0 = dual_batch_norm.DualBatchNormalization(
        momentum=0.99, epsilon=1e-3, synchronized=synchronized, name="bn0")
    self.conv1 = keras.layers.Conv2D(8, 3, strides=2, padding="same",
                                     use_bias=False, name="conv1")
    self.bn1 = dual_batch_norm.DualBatchNormalization(
        momentum=0.9, epsilon=1e-3, synchronized=synchronized, name="bn1")
    self.head = keras.layers.Dense(NUM_CLASSES, name="logits")

  def call(self, images, training=None, bn_route="main"):
    x = images * self.pixel_scale
    x = keras.ops.relu(self.bn0(self.conv0(x), training=training,
                                bn_route=bn_route))
    x = keras.ops.relu(self.bn1(self.conv1(x), training=training,
                                bn_route=bn_route))
    return self.head(keras.ops.mean(x, axis=(1, 2)))


def _hand_written(theta0, pixel_scale, synchronized):
  model = _HandWrittenTiny(pixel_scale, synchronized)
  model(tf.zeros((1,) + SHAPE))
  assert len(model.weights) == len(theta0)
  for v, value in zip(model.weights, theta0):
    assert tuple(v.shape) == value.shape, v.path
    v.assign(value)
  return model


def _reference(theta0, adversary, x, y, pixel_scale, synchronized):
  """Eager loop of paper Algorithm 1 on the global batch (no ConAdvModel,
  no converter): step t attacks with a copy of the hand-written network
  holding theta_{t - tau} (and the current moving statistics), adv BN,
  training mode; then L = CE_main(x_t) + CE_adv(x_adv_t), one LARS update.
  Returns the trained network and the trainable weights at the start of
  every step."""
  backbone = _hand_written(theta0, pixel_scale, synchronized)
  attacker = _hand_written(theta0, pixel_scale, synchronized)
  optimizer = lars.LARS(learning_rate=LR, momentum=0.9,
                        weight_decay_rate=1e-3)
  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  variables = backbone.trainable_variables
  thetas = []
  for t in range(len(x) // BATCH):
    xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
    thetas.append([v.numpy() for v in variables])
    for v, value in zip(attacker.trainable_variables,
                        thetas[max(t - adversary.delay, 0)]):
      v.assign(value)
    for v, src in zip(attacker.non_trainable_variables,
                      backbone.non_trainable_variables):
      v.assign(src)
    x_adv = attacks.pgd_attack(
        lambda z: attacker(z, training=True, bn_route="adv"), xb, yb,
        adversary.attack, seed=tf.constant([adversary.seed, t]))
    with tf.GradientTape() as tape:
      loss = (ce(yb, backbone(xb, training=True, bn_route="main"))
              + ce(yb, backbone(x_adv, training=True, bn_route="adv")))
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
  return backbone, thetas


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_converted_model_trains_like_the_reference_loop(strategy_name):
  """ConAdvModel(delay=1, LARS) on a converted tiny model equals an eager
  reference loop over the same network written by hand with
  DualBatchNormalization, step for step (trainable weights) and at the end
  (every weight, both BN sets' moving statistics included). Mirrored: 2
  replicas, synchronized_bn=True (so replica BN statistics are the global
  batch's, as in the reference); the original model is made outside the
  scope, the conversion inside. The attack has no random start, so the
  reference need not redraw per-replica noise."""
  steps = 3
  x, y = _data(steps)
  adversary = conadv_model.AdversaryConfig(
      epsilon=0.1, step_size=0.1, random_init=False, delay=1, seed=3)
  mirrored = strategy_name == "mirrored"
  original = _tiny()
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    backbone = convert.dual_bn_backbone(original, pixel_scale=2.0,
                                        synchronized_bn=mirrored)
    model = conadv_model.ConAdvModel(backbone, adversary=adversary)
    model.compile(optimizer=lars.LARS(learning_rate=LR, momentum=0.9,
                                      weight_decay_rate=1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  record = {"theta0": None, "steps": []}

  class Recorder(keras.callbacks.Callback):

    def on_train_begin(self, logs=None):
      record["theta0"] = [v.numpy() for v in backbone.weights]

    def on_train_batch_begin(self, batch, logs=None):
      record["steps"].append(
          [v.numpy() for v in backbone.trainable_variables])

  model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
            epochs=1, verbose=0, shuffle=False, callbacks=[Recorder()])
  assert model.distribute_strategy.num_replicas_in_sync == (
      2 if mirrored else 1)
  reference, thetas = _reference(record["theta0"], adversary, x, y,
                                 pixel_scale=2.0, synchronized=mirrored)
  # The same variables in the same order ("<model>/bn0/adv/gamma" there).
  assert [v.path.split("/", 1)[1] for v in reference.weights] == [
      v.path for v in backbone.weights]
  for t, (got_step, want_step) in enumerate(zip(record["steps"], thetas)):
    for got, want in zip(got_step, want_step):
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"step {t}")
  for got, want in zip(backbone.weights, reference.weights):
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5,
                               err_msg=got.path)
  # Both BN sets trained and moved apart; the weights really changed.
  start = dict(zip([v.path for v in backbone.weights], record["theta0"]))
  for layer in _routed(backbone):
    for v in layer.weights:
      assert not np.allclose(v.numpy(), start[v.path]), v.path
    assert not np.allclose(layer.moving_mean.numpy(),
                           layer.adv.moving_mean.numpy())
    assert not np.allclose(layer.gamma.numpy(), layer.adv.gamma.numpy())
  assert not all(np.allclose(a, b) for a, b in zip(thetas[-1], thetas[0]))

  # LARS' default exclusions cover the adv set (matched on variable.path);
  # the optimizer's per-variable flags, taken in build(), say the same.
  optimizer = model.optimizer
  adv = [v for v in backbone.trainable_variables if "/adv/" in v.path]
  assert sorted(v.path for v in adv) == [
      "bn0/adv/beta", "bn0/adv/gamma", "bn1/adv/beta", "bn1/adv/gamma"]
  flags = dict(zip([v.path for v in model.trainable_variables],
                   optimizer._decay_flags))  # pylint: disable=protected-access
  for v in adv:
    assert not optimizer.use_weight_decay(v.path), v.path
    assert not optimizer.do_layer_adaptation(v.path), v.path
    assert not flags[v.path]
  assert flags["conv1/kernel"] and optimizer.do_layer_adaptation(
      "conv1/kernel")


def test_route_under_tf_function_xla_and_stateless_call():
  """The route is fixed at trace time (one trace per route) and is the same
  eagerly, in a tf.function, under XLA and through stateless_call, which
  leaves the variables alone and moves only the chosen set's statistics."""
  backbone = convert.dual_bn_backbone(_tiny(), pixel_scale=2.0)
  for layer in _routed(backbone):
    layer.adv.gamma.assign(layer.adv.gamma * 1.5)
    layer.adv.moving_mean.assign(layer.adv.moving_mean + 0.3)
  x = tf.constant(_data(1)[0])
  eager = {r: backbone(x, training=False, bn_route=r).numpy()
           for r in ("main", "adv")}
  assert np.abs(eager["main"] - eager["adv"]).max() > 1e-3
  traces = []

  def fn(images, route):
    traces.append(route)
    return backbone(images, training=False, bn_route=route)

  graph = tf.function(fn)
  xla = tf.function(fn, jit_compile=True)
  for route in ("main", "adv", "main", "adv"):
    np.testing.assert_allclose(graph(x, route), eager[route], atol=1e-6)
    np.testing.assert_allclose(xla(x, route), eager[route], atol=1e-5)
  assert sorted(traces) == ["adv", "adv", "main", "main"]  # 2 per function.

  # stateless_call, as ConAdvModel's attack calls it (training mode, adv BN,
  # other weights), equals an eager call of a model holding those weights.
  trainable = [v * 1.1 for v in backbone.trainable_variables]
  non_trainable = [tf.convert_to_tensor(v)
                   for v in backbone.non_trainable_variables]
  before = [v.numpy() for v in backbone.variables]
  twin = convert.DualBNBackbone.from_config(backbone.get_config())
  for v, value in zip(twin.trainable_variables, trainable):
    v.assign(value)
  for v, value in zip(twin.non_trainable_variables, non_trainable):
    v.assign(value)
  for call in (backbone.stateless_call,
               tf.function(backbone.stateless_call, jit_compile=True)):
    logits, new_state = call(trainable, non_trainable, x, training=True,
                             bn_route="adv")
    np.testing.assert_allclose(
        logits, twin(x, training=True, bn_route="adv"), atol=1e-5)
    for v, old, new in zip(backbone.non_trainable_variables, non_trainable,
                           new_state):
      assert np.array_equal(old, new) != ("/adv/moving_" in v.path), v.path
    for v, b in zip(backbone.variables, before):
      np.testing.assert_array_equal(v.numpy(), b)
    for v, value in zip(twin.non_trainable_variables, non_trainable):
      v.assign(value)  # Undo the eager update.


# ------------------------------------------------------------- 3. refusals
class _Subclassed(keras.Model):

  def __init__(self):
    super().__init__()
    self.bn = keras.layers.BatchNormalization()
    self.head = keras.layers.Dense(NUM_CLASSES)

  def call(self, x, training=None):
    return self.head(self.bn(x, training=training))


class _BlockWithBN(keras.layers.Layer):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.bn = keras.layers.BatchNormalization()

  def call(self, x, training=None):
    return self.bn(x, training=training)


def _functional(*layers, inputs=None):
  inputs = inputs if inputs is not None else keras.Input(SHAPE)
  x = inputs
  for layer in layers:
    x = layer(x)
  return keras.Model(inputs, x, name="m")


def _no_bn():
  return _functional(keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                     keras.layers.Dense(NUM_CLASSES))


def _nested():
  inner = _tiny()
  return _functional(inner)


def _shared_bn():
  inputs = keras.Input(SHAPE)
  bn = keras.layers.BatchNormalization(name="shared_bn")
  x = bn(keras.layers.Conv2D(3, 1)(bn(inputs)))
  return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(
      keras.layers.Flatten()(x)), name="m")


def _masked_bn():
  inputs = keras.Input((6,), dtype="int32")
  x = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
  x = keras.layers.BatchNormalization(name="masked_bn")(x)
  return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(
      keras.layers.GlobalAveragePooling1D()(x)), name="m")


def _two_outputs():
  inputs = keras.Input(SHAPE)
  x = keras.layers.Flatten()(keras.layers.BatchNormalization()(inputs))
  return keras.Model(inputs, [keras.layers.Dense(2)(x),
                              keras.layers.Dense(3)(x)], name="m")


def _unbuilt_sequential():
  return keras.Sequential([keras.layers.BatchNormalization(),
                           keras.layers.Dense(NUM_CLASSES)])


REFUSED = {
    "no_bn": (_no_bn, "no BatchNormalization"),
    "subclassed": (_Subclassed, "subclassed _Subclassed"),
    "nested": (_nested, "uses the model 'tiny' .*nested"),
    "shared_bn": (_shared_bn, "'shared_bn' .*called more than once"),
    "renorm": (lambda: _functional(
        keras.layers.BatchNormalization(renorm=True, name="renorm_bn"),
        keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)),
               "'renorm_bn' has renorm=True"),
    "masked": (_masked_bn, "'masked_bn' .*with a mask"),
    "bn_inside_a_layer": (lambda: _functional(
        _BlockWithBN(name="block"), keras.layers.Flatten(),
        keras.layers.Dense(NUM_CLASSES)), "'block' .*holds the batch norm"),
    "already_dual": (lambda: _functional(
        dual_batch_norm.DualBatchNormalization(name="dual"),
        keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)),
                     "'dual' .*already"),
    "softmax": (lambda: _functional(
        keras.layers.BatchNormalization(), keras.layers.Flatten(),
        keras.layers.Dense(NUM_CLASSES, activation="softmax",
                           name="probs")), "softmax \\(layer 'probs'\\)"),
    "two_outputs": (_two_outputs, "1 inputs and 2 outputs"),
    "unbuilt_sequential": (_unbuilt_sequential, "has no input yet"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_models(case):
  make, message = REFUSED[case]
  with pytest.raises(ValueError, match=message):
    convert.dual_bn_backbone(make())


def test_bad_arguments():
  for scale in (0, -1.0, float("nan"), "255", True):
    with pytest.raises(ValueError, match="pixel_scale"):
      convert.dual_bn_backbone(_tiny(), pixel_scale=scale)
  with pytest.raises(ValueError, match="synchronized_bn"):
    convert.dual_bn_backbone(_tiny(), synchronized_bn="yes")
  backbone = convert.dual_bn_backbone(_tiny())
  with pytest.raises(ValueError, match="bn_route"):
    backbone(tf.zeros((1,) + SHAPE), bn_route="clean")
  with pytest.raises(ValueError, match="augmented_bn=True"):
    backbone(tf.zeros((1,) + SHAPE), bn_route="aug")


def test_bn_options_are_mapped():
  """synchronized (kept, or overridden by synchronized_bn), regularizers and
  constraints (on every set), frozen BN (trainable=False), Sequential
  models, and the optional "aug" set."""
  kwargs = dict(synchronized=True, gamma_regularizer=keras.regularizers.L2(
      0.1), beta_constraint="non_neg")
  original = _tiny(bn_kwargs=kwargs, sequential=True)
  original.get_layer("bn1").trainable = False
  backbone = convert.dual_bn_backbone(original, augmented_bn=True)
  bns = _routed(backbone)
  assert type(backbone.model) is keras.src.models.Functional  # pylint: disable=unidiomatic-typecheck
  # A frozen BN freezes all its sets (DualBatchNormalization(trainable=False)
  # once left its adv set trainable).
  assert [v.path for v in backbone.trainable_weights] == [
      "conv0/kernel", "conv0/bias", "bn0/gamma", "bn0/beta", "bn0/adv/gamma",
      "bn0/adv/beta", "bn0/aug/gamma", "bn0/aug/beta", "conv1/kernel",
      "logits/kernel", "logits/bias"]
  assert [bn.synchronized for bn in bns] == [True, True]
  assert [bn.trainable for bn in bns] == [True, False]
  assert backbone.augmented_bn and backbone.adversarial_bn
  for route in ("main", "adv", "aug"):
    gamma, beta, _, _ = bns[0].route_weights(route)
    assert isinstance(gamma.regularizer, keras.regularizers.L2)
    assert isinstance(beta.constraint, keras.constraints.NonNeg)
  # L2 on the trainable gamma of every set of bn0: main, adv, aug.
  original_loss = float(sum(original.losses))
  assert len(original.losses) == 1 and original_loss > 0
  np.testing.assert_allclose(float(sum(backbone.losses)), 3 * original_loss,
                             rtol=1e-6)
  x = _data(1)[0]
  want = original(x, training=True).numpy()
  for route in ("main", "aug"):
    np.testing.assert_allclose(backbone(x, training=True, bn_route=route),
                               want, atol=1e-5)
  assert [bn.synchronized for bn in _routed(convert.dual_bn_backbone(
      original, synchronized_bn=False))] == [False, False]
  # Export: a Functional with the original layers and options.
  exported = backbone.inference_model()
  bn = exported.get_layer("bn0")
  assert type(bn) is keras.layers.BatchNormalization  # pylint: disable=unidiomatic-typecheck
  assert bn.synchronized and isinstance(bn.gamma.regularizer,
                                        keras.regularizers.L2)
  assert not exported.get_layer("bn1").trainable
  np.testing.assert_allclose(exported(x, training=False),
                             original(x, training=False), atol=1e-5)

  # BN without gamma / beta: the sets hold only the moving statistics.
  plain = _functional(keras.layers.BatchNormalization(center=False,
                                                      scale=False),
                      keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES))
  _randomize_bn(plain, 3)
  backbone = convert.dual_bn_backbone(plain)
  assert backbone.count_params() == plain.count_params() + 2 * SHAPE[-1]
  np.testing.assert_allclose(backbone(x, training=True, bn_route="adv"),
                             plain(x, training=True), atol=1e-5)


# ------------------------------------------------- 4. saving and export
def test_keras_file_round_trip(tmp_path):
  backbone = convert.dual_bn_backbone(_tiny(), pixel_scale=2.0,
                                      augmented_bn=True)
  for i, layer in enumerate(_routed(backbone)):
    layer.adv.beta.assign(layer.adv.beta + 0.1 * (i + 1))
    layer.aug.gamma.assign(layer.aug.gamma * 0.7)
    layer.aug.moving_mean.assign(layer.aug.moving_mean - 0.2)
  x = _data(1)[0]
  path = str(tmp_path / "backbone.keras")
  backbone.save(path)
  loaded = keras.saving.load_model(path)
  assert type(loaded) is convert.DualBNBackbone  # pylint: disable=unidiomatic-typecheck
  # (JSON: a loaded config has lists where the original has tuples.)
  assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(
      backbone.get_config(), sort_keys=True)
  assert [v.path for v in loaded.weights] == [v.path for v in backbone.weights]
  for a, b in zip(loaded.weights, backbone.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  outputs = set()
  for route in ("main", "adv", "aug"):
    for training in (False, True):
      got = loaded(x, training=training, bn_route=route).numpy()
      want = backbone(x, training=training, bn_route=route).numpy()
      np.testing.assert_array_equal(got, want, err_msg=route)
      outputs.add(got.tobytes())
  assert len(outputs) == 6


# As on a machine without the package (the venv has it installed): None in
# sys.modules makes every import of it fail.
_LOAD_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["official_conadv"] = None
    try:
      import official_conadv
      raise SystemExit("official_conadv is importable here")
    except ImportError:
      pass
    import numpy as np
    import keras
    model = keras.saving.load_model(sys.argv[1])
    np.save(sys.argv[3], model(np.load(sys.argv[2]), training=False))
    assert not [m for m in sys.modules if m.startswith("official_conadv.")]
    print("LOADED", type(model).__name__)
""")


def _class_names(config):
  """Every (module, class_name) in a serialized Keras config."""
  found = set()
  if isinstance(config, dict):
    if "class_name" in config and "module" in config:
      found.add((config["module"], config["class_name"],
                 config.get("registered_name")))
    for value in config.values():
      found |= _class_names(value)
  elif isinstance(config, list):
    for value in config:
      found |= _class_names(value)
  return found


def test_inference_model_is_the_original_architecture(tmp_path):
  """inference_model() (direct, via conadv_model.inference_model and via
  ConAdvModel) is a plain functional model: the original's layers and
  variable paths, the main-route weights, Keras classes only, and its
  .keras file loads in a Python without official_conadv on the path. It
  takes the original's input (images * pixel_scale)."""
  original = _tiny()
  backbone = convert.dual_bn_backbone(original, pixel_scale=2.0)
  x, y = _data(2)
  model = conadv_model.ConAdvModel(
      backbone, adversary=conadv_model.AdversaryConfig(delay=1))
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  model.fit(x, y, batch_size=BATCH, verbose=0)  # Both sets move apart.
  want = backbone(x, training=False, bn_route="main").numpy()
  assert np.abs(backbone(x, training=False, bn_route="adv").numpy()
                - want).max() > 1e-4

  for exported in (backbone.inference_model(),
                   conadv_model.inference_model(backbone),
                   model.inference_model()):
    assert type(exported) is keras.src.models.Functional  # pylint: disable=unidiomatic-typecheck
    assert [type(l) for l in exported.layers] == [
        type(l) for l in original.layers]
    assert [l.name for l in exported.layers] == [
        l.name for l in original.layers]
    assert [v.path for v in exported.weights] == [
        v.path for v in original.weights]
    for got, src in zip(exported.weights, _main_weights(backbone)):
      np.testing.assert_array_equal(got.numpy(), src.numpy())
    np.testing.assert_allclose(exported(x * 2.0, training=False), want,
                               atol=1e-6)
  modules = {m for m, _, _ in _class_names(exported.get_config())}
  assert modules and all(m.startswith("keras") for m in modules), modules
  assert "official_conadv" not in json.dumps(exported.get_config())

  path = str(tmp_path / "exported.keras")
  exported.save(path)
  np.save(tmp_path / "x.npy", x * 2.0)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, "-c", _LOAD_SCRIPT, path, str(tmp_path / "x.npy"),
       str(tmp_path / "y.npy")], cwd=str(tmp_path), env=env,
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "LOADED Functional" in result.stdout
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-6)

  # The trainer's SavedModel takes [0, 1] images like every other export:
  # pixel_scale is applied inside its serve endpoint.
  from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
  paths = train_lib.export_model(model, str(tmp_path / "run"), SHAPE)
  loaded = tf.saved_model.load(paths["saved_model"])
  served = loaded.serve(tf.constant(x))
  np.testing.assert_allclose(served.numpy(), want, atol=1e-5)
