"""Tests for dual_batch_norm: Keras-BN numerics per route, fused == unfused."""

import tensorflow as tf

# conftest.py splits the CPU into two logical devices for Mirrored tests.

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from official_conadv import distribute_utils
from official_conadv.modeling import dual_batch_norm  # pylint: disable=g-import-not-at-top

DualBN = dual_batch_norm.DualBatchNormalization
ATOL = 1e-5


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 2.0 + 0.5).astype("float32")


def _random_weights(dim, seed):
  rng = np.random.default_rng(seed)
  return [rng.uniform(0.5, 1.5, dim).astype("float32"),   # gamma
          rng.normal(size=dim).astype("float32"),         # beta
          rng.normal(size=dim).astype("float32"),         # moving mean
          rng.uniform(0.5, 2.0, dim).astype("float32")]   # moving variance


def _set_route(layer, route, values):
  for v, value in zip(layer.route_weights(route), values):
    v.assign(value)


def _get_route(layer, route):
  return [v.numpy() for v in layer.route_weights(route)]


def _pair(shape, axis, fused, seed=1):
  """A dual BN and a keras BN with equal weights on both routes."""
  layer = DualBN(axis=axis, fused=fused)
  layer.build(shape)
  ref = keras.layers.BatchNormalization(axis=axis, momentum=0.9,
                                        epsilon=1e-5)
  ref.build(shape)
  dim = shape[axis]
  for i, route in enumerate(dual_batch_norm.ROUTES):
    _set_route(layer, route, _random_weights(dim, seed + i))
  return layer, ref


def _has_fused_op(layer, x, training, route):
  fn = tf.function(lambda t: layer(t, training=training, bn_route=route))
  graph = fn.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
  return any(op.type.startswith("FusedBatchNorm")
             for op in graph.get_operations())


CASES = [((6, 5), -1, None),              # 2-D: always the Keras path
         ((4, 3, 5, 6), -1, True),        # NHWC fused
         ((4, 3, 5, 6), -1, False),       # NHWC unfused
         ((4, 6, 3, 5), 1, True),         # NCHW fused
         ((4, 6, 3, 5), 1, False)]        # NCHW unfused


@pytest.mark.parametrize("shape,axis,fused", CASES)
@pytest.mark.parametrize("route", dual_batch_norm.ROUTES)
def test_matches_keras_batch_norm(shape, axis, fused, route):
  layer, ref = _pair(shape, axis, fused)
  ref.set_weights(_get_route(layer, route))
  x = _inputs(shape)
  # Inference, training (moving update), inference with the new statistics.
  for training in (False, True, True, False):
    y = layer(x, training=training, bn_route=route)
    y_ref = ref(x, training=training)
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=ATOL)
    for got, want in zip(_get_route(layer, route), ref.get_weights()):
      np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
  expect_fused = len(shape) == 4 and fused is not False
  assert _has_fused_op(layer, x, True, route) == expect_fused
  assert _has_fused_op(layer, x, False, route) == expect_fused


@pytest.mark.parametrize("fused", [True, False])
def test_routes_are_isolated(fused):
  shape = (4, 3, 3, 5)
  layer, _ = _pair(shape, -1, fused)
  before = {r: _get_route(layer, r) for r in dual_batch_norm.ROUTES}
  x = _inputs(shape)
  for route, other in (("adv", "main"), ("main", "adv")):
    layer(x, training=True, bn_route=route)
    for got, want in zip(_get_route(layer, other), before[other]):
      np.testing.assert_array_equal(got, want)
    moved = _get_route(layer, route)
    assert not np.allclose(moved[2], before[route][2])   # moving mean
    assert not np.allclose(moved[3], before[route][3])   # moving variance
    np.testing.assert_array_equal(moved[0], before[route][0])  # gamma
    before[route] = moved
  # Different parameters per route => different outputs.
  assert not np.allclose(layer(x, bn_route="main"), layer(x, bn_route="adv"))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [-1, 1])
def test_fused_gradients_equal_unfused(training, axis):
  shape = (4, 5, 3, 6) if axis == -1 else (4, 6, 5, 3)
  x = tf.constant(_inputs(shape))
  upstream = tf.constant(_inputs(shape, seed=7))
  grads = {}
  for fused in (True, False):
    layer, _ = _pair(shape, axis, fused)
    gamma, beta, _, _ = layer.route_weights("adv")
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=training, bn_route="adv")
      loss = tf.reduce_sum(y * upstream)
    grads[fused] = tape.gradient(loss, [x, gamma.value, beta.value])
  for g_fused, g_keras in zip(grads[True], grads[False]):
    np.testing.assert_allclose(g_fused, g_keras, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_stateless_call(fused):
  # (A functional model would not forward `bn_route`; call the layer.)
  model = bn = DualBN(fused=fused, name="bn")
  x = _inputs((5, 3, 3, 4))
  bn.build(x.shape)
  before = [v.numpy() for v in model.non_trainable_variables]
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  y, new_non_trainable = model.stateless_call(trainable, non_trainable, x,
                                              training=True, bn_route="adv")
  for v, b in zip(model.non_trainable_variables, before):
    np.testing.assert_array_equal(v.numpy(), b)
  paths = [v.path for v in model.non_trainable_variables]
  new = dict(zip(paths, [np.asarray(t) for t in new_non_trainable]))
  np.testing.assert_array_equal(new["bn/moving_mean"], before[0])
  np.testing.assert_allclose(new["bn/adv/moving_mean"],
                             0.1 * x.mean(axis=(0, 1, 2)), atol=ATOL)
  np.testing.assert_allclose(y, bn(x, training=True, bn_route="adv"),
                             atol=ATOL)
  # Substituted values are used: doubled gamma doubles the centred output.
  trainable2 = [v * 2.0 if "gamma" in p else v for v, p in zip(
      trainable, [w.path for w in model.trainable_variables])]
  y2, _ = model.stateless_call(trainable2, non_trainable, x, training=True,
                               bn_route="adv")
  np.testing.assert_allclose(y2, 2.0 * np.asarray(y), atol=1e-4)


def test_variable_paths():
  inputs = keras.Input((4, 4, 3))
  model = keras.Model(inputs, DualBN(name="bn1")(inputs))
  assert [v.path for v in model.weights] == [
      "bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance",
      "bn1/adv/gamma", "bn1/adv/beta", "bn1/adv/moving_mean",
      "bn1/adv/moving_variance"]
  assert [v.path for v in model.trainable_weights] == [
      "bn1/gamma", "bn1/beta", "bn1/adv/gamma", "bn1/adv/beta"]
  # Main set keeps a plain keras BN's paths.
  plain = keras.layers.BatchNormalization(name="bn1")
  plain.build((None, 4, 4, 3))
  assert [v.path for v in plain.weights] == [
      v.path for v in model.weights if "/adv/" not in v.path]


def test_adversarial_false_and_main_only():
  layer = DualBN(adversarial=False)
  layer.build((2, 3))
  assert len(layer.weights) == 4 and layer.adv is None
  with pytest.raises(ValueError, match="bn_route"):
    layer(np.ones((2, 3), "float32"), bn_route="adv")
  full = DualBN(name="bn")
  with dual_batch_norm.main_only():
    assert dual_batch_norm.main_only_active()
    with dual_batch_norm.main_only():
      nested = DualBN.from_config(full.get_config())
    clone = DualBN.from_config(full.get_config())
  assert not dual_batch_norm.main_only_active()
  assert not clone.adversarial and not nested.adversarial
  assert not clone.get_config()["adversarial"]
  assert DualBN().adversarial   # outside the block again


def test_bad_route_raises():
  layer = DualBN()
  x = np.ones((2, 3), "float32")
  for bad in ("clean", "ADV", None, 1):
    with pytest.raises(ValueError, match=r"bn_route.*'main'.*'adv'"):
      layer(x, bn_route=bad)
  with pytest.raises(ValueError, match="bn_route"):
    dual_batch_norm.validate_route("aux")
  for ok in dual_batch_norm.ROUTES:
    dual_batch_norm.validate_route(ok)
  assert dual_batch_norm.ROUTES == (dual_batch_norm.MAIN, dual_batch_norm.ADV)


def test_fused_true_errors():
  with pytest.raises(ValueError, match="fused"):
    DualBN(fused=True)(np.ones((2, 3), "float32"))
  with pytest.raises(ValueError, match="synchronized"):
    DualBN(fused=True, synchronized=True)
  with pytest.raises(ValueError, match="fused"):
    DualBN(fused="yes")


def test_config_round_trip():
  kwargs = dict(axis=1, momentum=0.8, epsilon=1e-4, center=False, scale=True,
                beta_initializer="zeros", gamma_initializer="ones",
                moving_mean_initializer="zeros",
                moving_variance_initializer="ones", synchronized=True,
                adversarial=True, fused=False)
  layer = DualBN(name="x", **kwargs)
  config = layer.get_config()
  for key, value in kwargs.items():
    if key.endswith("initializer"):
      assert keras.initializers.get(config[key]).__class__ is (
          keras.initializers.get(value).__class__)
    else:
      assert config[key] == value, key
  import inspect  # pylint: disable=g-import-not-at-top
  params = set(inspect.signature(DualBN.__init__).parameters) - {
      "self", "kwargs"}
  assert params <= set(config)
  clone = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(layer))
  assert isinstance(clone, DualBN)
  assert clone.get_config() == config
  x = _inputs((2, 5, 3, 3))
  clone.build(x.shape)
  layer.build(x.shape)
  clone.set_weights(layer.get_weights())
  for route in dual_batch_norm.ROUTES:
    np.testing.assert_allclose(clone(x, bn_route=route),
                               layer(x, bn_route=route), atol=ATOL)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(policy):
  shape = (4, 3, 3, 6)
  x = _inputs(shape)
  outs, stats = {}, {}
  try:
    keras.config.set_dtype_policy(policy)
    for fused in (True, False):
      layer = DualBN(fused=fused)
      layer.build(shape)
      assert all(v.dtype == "float32" for v in layer.weights)
      xc = tf.cast(x, layer.compute_dtype)
      y = layer(xc, training=True, bn_route="adv")
      assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
      y_inf = layer(xc, training=False, bn_route="adv")
      outs[fused] = (np.asarray(tf.cast(y, "float32")),
                     np.asarray(tf.cast(y_inf, "float32")))
      stats[fused] = _get_route(layer, "adv")
      with tf.GradientTape() as tape:
        tape.watch(xc)
        loss = tf.reduce_sum(tf.cast(layer(xc, training=True), "float32"))
      assert tape.gradient(loss, xc).dtype == xc.dtype
      jit = tf.function(lambda t, l=layer: l(t, training=True),
                        jit_compile=True)
      assert np.isfinite(np.asarray(tf.cast(jit(xc), "float32"))).all()
  finally:
    keras.config.set_dtype_policy("float32")
  tol = 2e-2 if policy == "mixed_bfloat16" else 2e-3
  for a, b in zip(outs[True], outs[False]):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)
  for a, b in zip(stats[True], stats[False]):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=ATOL)


def _train_and_infer_step(layer):
  gamma = layer.route_weights("adv")[0]

  def step(t):
    with tf.GradientTape() as tape:
      tape.watch(t)
      y = layer(t, training=True, bn_route="adv")
      loss = tf.reduce_sum(y * y * t)
    gx, gg = tape.gradient(loss, [t, gamma.value])
    return y, gx, gg, layer(t, training=False, bn_route="adv")

  return step


@pytest.mark.parametrize("fused", [True, False])
def test_jit_compile_equals_eager(fused):
  shape = (4, 3, 5, 6)
  x = tf.constant(_inputs(shape))
  results = {}
  for jit in (False, True):
    layer, _ = _pair(shape, -1, fused)
    step = _train_and_infer_step(layer)
    fn = tf.function(step, jit_compile=True) if jit else step
    results[jit] = [np.asarray(r) for r in fn(x)] + _get_route(layer, "adv")
  for a, b in zip(results[True], results[False]):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(8, 5), (8, 3, 3, 5)])
def test_synchronized_mirrored_equals_one_device(shape):
  cpus = tf.config.list_logical_devices("CPU")
  if len(cpus) < 2:
    pytest.skip("needs 2 logical CPUs (TF was initialised before the split)")
  strategy = distribute_utils.get_strategy(
      "mirrored", devices=[d.name for d in cpus[:2]])
  x = _inputs(shape)
  half = shape[0] // 2
  weights = _random_weights(shape[-1], 3)

  single = DualBN(synchronized=True)
  single.build(shape)
  _set_route(single, "adv", weights)
  y_single = single(x, training=True, bn_route="adv")

  with strategy.scope():
    layer = DualBN(synchronized=True)
    layer.build(shape)
  _set_route(layer, "adv", weights)
  dist_x = strategy.experimental_distribute_values_from_function(
      lambda ctx: x[ctx.replica_id_in_sync_group * half:
                    (ctx.replica_id_in_sync_group + 1) * half])

  @tf.function
  def run(t):
    return strategy.run(lambda a: layer(a, training=True, bn_route="adv"),
                        args=(t,))

  y_dist = np.concatenate(
      [np.asarray(t) for t in strategy.experimental_local_results(run(dist_x))])
  np.testing.assert_allclose(y_dist, y_single, atol=ATOL, rtol=ATOL)
  for a, b in zip(_get_route(layer, "adv"), _get_route(single, "adv")):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=ATOL)
  # Unsynchronized replicas normalise with their own half-batch statistics.
  with strategy.scope():
    local = DualBN(synchronized=False)
    local.build(shape)
  _set_route(local, "adv", weights)
  y_local = np.concatenate([np.asarray(t) for t in (
      strategy.experimental_local_results(strategy.run(
          lambda a: local(a, training=True, bn_route="adv"),
          args=(dist_x,))))])
  assert not np.allclose(y_local, y_single, atol=1e-3)


def test_augmented_set_paths_numerics_and_isolation():
  """augmented=True adds a third set under `<bn>/aug/` (the authors'
  three-way BN split); the main and adv paths stay where they were."""
  inputs = keras.Input((4, 4, 3))
  model = keras.Model(inputs, DualBN(name="bn1", augmented=True)(inputs))
  assert [v.path for v in model.weights] == [
      "bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance",
      "bn1/adv/gamma", "bn1/adv/beta", "bn1/adv/moving_mean",
      "bn1/adv/moving_variance",
      "bn1/aug/gamma", "bn1/aug/beta", "bn1/aug/moving_mean",
      "bn1/aug/moving_variance"]
  assert [v.path for v in model.trainable_weights] == [
      "bn1/gamma", "bn1/beta", "bn1/adv/gamma", "bn1/adv/beta",
      "bn1/aug/gamma", "bn1/aug/beta"]

  shape = (4, 3, 3, 5)
  for fused in (True, False):
    layer = DualBN(fused=fused, augmented=True)
    layer.build(shape)
    for i, route in enumerate(dual_batch_norm.ALL_ROUTES):
      _set_route(layer, route, _random_weights(5, 10 + i))
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    ref.build(shape)
    ref.set_weights(_get_route(layer, "aug"))
    before = {r: _get_route(layer, r) for r in dual_batch_norm.ALL_ROUTES}
    x = _inputs(shape)
    for training in (False, True, False):
      np.testing.assert_allclose(layer(x, training=training, bn_route="aug"),
                                 ref(x, training=training), atol=ATOL,
                                 rtol=ATOL)
    for got, want in zip(_get_route(layer, "aug"), ref.get_weights()):
      np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
    assert not np.allclose(_get_route(layer, "aug")[2], before["aug"][2])
    for other in ("main", "adv"):  # Only the aug statistics moved.
      for got, want in zip(_get_route(layer, other), before[other]):
        np.testing.assert_array_equal(got, want)


def test_augmented_false_by_default_and_dropped_by_main_only():
  layer = DualBN()
  layer.build((2, 3))
  assert layer.aug is None and not layer.get_config()["augmented"]
  assert len(layer.weights) == 8
  with pytest.raises(ValueError, match="augmented=True"):
    layer(np.ones((2, 3), "float32"), bn_route="aug")
  full = DualBN(augmented=True)
  assert full.get_config()["augmented"]
  with dual_batch_norm.main_only():
    clone = DualBN.from_config(full.get_config())
  clone.build((2, 3))
  assert clone.aug is None and clone.adv is None
  assert not clone.get_config()["augmented"]
  assert [v.path.split("/", 1)[1] for v in clone.weights] == [
      "gamma", "beta", "moving_mean", "moving_variance"]
  assert dual_batch_norm.ALL_ROUTES == ("main", "adv", "aug")
  dual_batch_norm.validate_route("aug")


def test_frozen_layer_freezes_every_set():
  """trainable=False (e.g. a frozen layer rebuilt from its config) leaves no
  BN set trainable: the adv and aug gammas/betas get no gradient either."""
  layer = dual_batch_norm.DualBatchNormalization(trainable=False,
                                                 augmented=True)
  layer.build((2, 4))
  assert layer.trainable_weights == []
  assert len(layer.non_trainable_weights) == 12
  rebuilt = dual_batch_norm.DualBatchNormalization.from_config(
      layer.get_config())
  rebuilt.build((2, 4))
  assert rebuilt.trainable_weights == []
