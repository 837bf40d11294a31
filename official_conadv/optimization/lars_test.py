"""Tests for lars.py: update-for-update parity with tf-models-official's LARS,
exclusions, the zero-norm fall-backs, MirroredStrategy (custom loop and
`model.fit`), serialization and hyperparameter errors."""

import math

import tensorflow as tf

# Two logical CPUs for MirroredStrategy; only possible before TF's runtime
# starts. conftest.py does the same under pytest; this keeps the file
# runnable on its own (e.g. as a Bazel py_test).
try:
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices("CPU")[0],
      [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # Already configured, or the runtime has started.
  pass

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np
import pytest

from official.modeling.optimization import lars as tfm_lars
from official.modeling.optimization import lr_schedule as tfm_lr
from official_conadv.optimization import lars
from official_conadv.optimization import lr_schedules
from official_conadv.testing import strategies
# pylint: enable=g-import-not-at-top,wrong-import-position
# pylint: disable=protected-access

# path -> shape. "zero_w" starts at 0 (||w|| = 0); "conv" always gets a zero
# gradient (||g|| = 0 without decay); "both_zero" has both.
SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "bn/gamma": (4,),
          "conv/kernel": (2, 2), "zero_w/kernel": (2, 3),
          "both_zero/kernel": (3,)}
# tf-models-official searches "dense/bias:0" (the TF name), we search the
# Keras path "dense/bias": anchored patterns that accept both.
PARITY_EXCLUDE_WD = [r"(^|/)bias(:0)?$", r"(^|/)gamma(:0)?$"]
PARITY_EXCLUDE_LA = [r"(^|/)gamma(:0)?$", r"^dense/kernel"]


def _initial(seed=0):
  rng = np.random.default_rng(seed)
  values = {k: rng.normal(size=s).astype("float32") for k, s in SHAPES.items()}
  values["zero_w/kernel"][:] = 0.0
  values["both_zero/kernel"][:] = 0.0
  return values


def _grads(step, seed=1):
  rng = np.random.default_rng(seed + step)
  grads = {k: rng.normal(size=s).astype("float32") for k, s in SHAPES.items()}
  grads["conv/kernel"][:] = 0.0
  grads["both_zero/kernel"][:] = 0.0
  return grads


def _keras_vars(values):
  out = {}
  for path, value in values.items():
    scope, leaf = path.split("/")
    with keras.name_scope(scope):
      out[path] = keras.Variable(value, name=leaf)
  assert [v.path for v in out.values()] == list(values)
  return out


def _run_ours(kwargs, steps):
  variables = _keras_vars(_initial())
  opt = lars.LARS(**kwargs)
  for t in range(steps):
    grads = _grads(t)
    opt.apply([grads[k] for k in SHAPES], [variables[k] for k in SHAPES])
  return {k: v.numpy() for k, v in variables.items()}


def _run_tfm(kwargs, steps):
  # tf_keras' legacy optimizers take plain tf.Variables; the name is what
  # their exclusion regexes see ("dense/bias:0").
  variables = {k: tf.Variable(v, name=k) for k, v in _initial().items()}
  opt = tfm_lars.LARS(**kwargs)
  for t in range(steps):
    grads = _grads(t)
    opt.apply_gradients([(tf.constant(grads[k]), variables[k])
                         for k in SHAPES])
  return {k: v.numpy() for k, v in variables.items()}


def _assert_same(ours, theirs):
  for k in SHAPES:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7,
                               err_msg=k)


@pytest.mark.parametrize("classic_momentum", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay_rate", [0.0, 0.05])
@pytest.mark.parametrize("adaptation_list", [True, False])
def test_equals_tf_models_official(classic_momentum, nesterov,
                                   weight_decay_rate, adaptation_list):
  kwargs = dict(learning_rate=0.5, momentum=0.9, eeta=0.01,
                weight_decay_rate=weight_decay_rate, nesterov=nesterov,
                classic_momentum=classic_momentum,
                exclude_from_weight_decay=PARITY_EXCLUDE_WD,
                # None: both fall back to the weight-decay list.
                exclude_from_layer_adaptation=(
                    PARITY_EXCLUDE_LA if adaptation_list else None))
  ours = _run_ours(kwargs, steps=6)
  _assert_same(ours, _run_tfm(kwargs, steps=6))
  initial = _initial()
  # ||w|| = 0: trust ratio 1 (plain momentum step), no NaN.
  assert np.isfinite(ours["zero_w/kernel"]).all()
  assert np.abs(ours["zero_w/kernel"]).max() > 0
  # ||w|| = ||g|| = 0: nothing moves, no NaN.
  np.testing.assert_array_equal(ours["both_zero/kernel"], 0.0)
  # ||g|| = 0: moves by weight decay only.
  if weight_decay_rate == 0:
    np.testing.assert_array_equal(ours["conv/kernel"], initial["conv/kernel"])
  else:
    assert not np.allclose(ours["conv/kernel"], initial["conv/kernel"])


def test_with_schedule_equals_tf_models_official():
  """Also pins the step convention: both optimizers call the schedule with
  the iteration count before the update (0 first, rate 0 at step 0)."""
  peak, total, warmup = 2.0, 8, 3
  ours = lr_schedules.WarmupPolynomialDecay(peak, total, warmup, power=1.6)
  theirs = tfm_lr.LinearWarmup(
      tfm_lr.PolynomialDecayWithOffset(
          initial_learning_rate=peak, decay_steps=total - warmup,
          end_learning_rate=1e-4, power=1.6, offset=warmup),
      warmup_steps=warmup, warmup_learning_rate=0.0)
  common = dict(momentum=0.9, eeta=0.01, weight_decay_rate=0.01,
                exclude_from_weight_decay=PARITY_EXCLUDE_WD)
  _assert_same(_run_ours(dict(learning_rate=ours, **common), steps=10),
               _run_tfm(dict(learning_rate=theirs, **common), steps=10))


def test_default_exclusions_are_normalization_and_bias_by_path():
  opt = lars.LARS(weight_decay_rate=1e-4)
  assert opt.weight_decay_exclusions == lars.DEFAULT_EXCLUDE
  assert opt.layer_adaptation_exclusions == lars.DEFAULT_EXCLUDE
  for path, excluded in [("resnet/stage1_block1/bn1/gamma", True),
                         ("resnet/stage1_block1/bn1/adv/beta", True),
                         ("resnet/stem_bn/adv/gamma", True),
                         ("resnet/logits/bias", True),
                         ("transformer/layer_norm/gamma", True),
                         ("gamma", True),
                         ("resnet/stage1_block1/conv1/kernel", False),
                         ("resnet/stage1_block1/bn_conv/kernel", False),
                         ("resnet/logits/kernel", False),
                         ("resnet/gammaray/kernel", False),
                         ("resnet/bias_free/kernel", False)]:
    assert opt.use_weight_decay(path) is not excluded, path
    assert opt.do_layer_adaptation(path) is not excluded, path
  assert not lars.LARS(weight_decay_rate=0.0).use_weight_decay("a/kernel")
  nothing = lars.LARS(weight_decay_rate=1e-4, exclude_from_weight_decay=[])
  assert nothing.use_weight_decay("bn/gamma")
  assert nothing.do_layer_adaptation("bn/gamma")
  # An explicit empty adaptation list means "nothing" (tf-models-official
  # would fall back to the weight-decay list).
  split = lars.LARS(weight_decay_rate=1e-4, exclude_from_layer_adaptation=[])
  assert not split.use_weight_decay("bn/gamma")
  assert split.do_layer_adaptation("bn/gamma")


@pytest.mark.parametrize("nesterov", [False, True])
def test_excluded_variable_gets_plain_momentum_sgd(nesterov):
  values = _initial()
  variables = _keras_vars(values)
  opt = lars.LARS(learning_rate=0.3, momentum=0.9, weight_decay_rate=0.1,
                  nesterov=nesterov)  # default exclusions: bn/gamma, bias
  sgd_vars = {k: keras.Variable(values[k]) for k in ("bn/gamma", "dense/bias")}
  sgd = keras.optimizers.SGD(learning_rate=0.3, momentum=0.9,
                             nesterov=nesterov)
  for t in range(5):
    g = _grads(t)
    opt.apply([g[k] for k in SHAPES], [variables[k] for k in SHAPES])
    # Keras SGD's "popular" momentum equals classic momentum at constant lr.
    sgd.apply([g[k] for k in sgd_vars], list(sgd_vars.values()))
  for k, v in sgd_vars.items():
    np.testing.assert_allclose(variables[k].numpy(), v.numpy(), rtol=1e-6,
                               atol=1e-7, err_msg=k)


def test_sparse_gradient_equals_dense():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(6, 3)).astype("float32")
  rows = rng.normal(size=(2, 3)).astype("float32")
  sparse = tf.IndexedSlices(tf.constant(rows), tf.constant([1, 4]),
                            tf.constant([6, 3]))
  results = []
  for grad in (sparse, tf.convert_to_tensor(sparse)):
    v = keras.Variable(table, name="embeddings")
    opt = lars.LARS(0.1, weight_decay_rate=0.01, eeta=0.1)
    for _ in range(3):
      opt.apply([grad], [v])
    results.append(v.numpy())
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_gradient_accumulation_and_clipping_come_from_the_base_optimizer():
  g1 = np.array([3.0, -4.0], "float32")
  g2 = np.array([1.0, 2.0], "float32")
  acc_var = keras.Variable(np.array([1.0, 1.0], "float32"), name="kernel")
  acc = lars.LARS(0.1, eeta=0.5, gradient_accumulation_steps=2)
  acc.apply([g1], [acc_var])
  np.testing.assert_array_equal(acc_var.numpy(), [1.0, 1.0])  # accumulating
  acc.apply([g2], [acc_var])
  ref_var = keras.Variable(np.array([1.0, 1.0], "float32"), name="kernel")
  lars.LARS(0.1, eeta=0.5).apply([(g1 + g2) / 2], [ref_var])
  np.testing.assert_allclose(acc_var.numpy(), ref_var.numpy(), rtol=1e-6)

  # clipnorm scales g before LARS sees it; the trust ratio then cancels the
  # gradient's norm, so clipping does not change a layer-adapted step.
  a = keras.Variable(np.array([1.0, 1.0], "float32"), name="kernel")
  b = keras.Variable(np.array([1.0, 1.0], "float32"), name="kernel")
  lars.LARS(0.1, clipnorm=0.5).apply([g1], [a])
  lars.LARS(0.1).apply([g1], [b])
  np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def _applier(opt, var_list):
  return lambda grads: opt.apply(grads, var_list)


def test_xla_and_loss_scale_optimizer_give_the_same_update():
  values = _initial()
  kwargs = dict(learning_rate=lr_schedules.WarmupPolynomialDecay(
      0.5, 6, 2, warmup_start_lr=0.1), weight_decay_rate=0.05, eeta=0.01,
                nesterov=True)
  results = []
  for mode in ("eager", "xla", "loss_scale"):
    variables = _keras_vars(values)
    var_list = [variables[k] for k in SHAPES]
    opt = lars.LARS(**kwargs)
    scale = 1.0
    if mode == "loss_scale":  # mixed_float16 path of the trainer
      opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=1024.0)
      scale = 1024.0
    apply = _applier(opt, var_list)
    if mode == "xla":
      opt.build(var_list)
      apply = tf.function(apply, jit_compile=True)
    for t in range(5):
      g = _grads(t)
      apply([tf.constant(g[k] * scale) for k in SHAPES])
    results.append({k: v.numpy() for k, v in variables.items()})
  for other in results[1:]:
    for k in SHAPES:
      np.testing.assert_allclose(other[k], results[0][k], rtol=1e-6,
                                 atol=1e-7, err_msg=k)


# --- tf.distribute -------------------------------------------------------


def _tiny_model():
  keras.utils.set_random_seed(3)
  inputs = keras.Input((5,))
  h = keras.layers.Dense(8, name="dense")(inputs)
  # synchronized: batch statistics over the global batch, as on one device.
  h = keras.layers.BatchNormalization(synchronized=True, name="bn")(h)
  outputs = keras.layers.Dense(3, name="head")(keras.ops.relu(h))
  return keras.Model(inputs, outputs, name="tiny")


def _assert_replicas_agree(strategy, model):
  """Every device's copy of every weight is the same (MirroredVariable)."""
  for v in model.weights:
    copies = strategy.experimental_local_results(v.value)
    assert len(copies) == strategy.num_replicas_in_sync
    for c in copies[1:]:
      np.testing.assert_array_equal(c.numpy(), copies[0].numpy(),
                                    err_msg=v.path)


def _custom_loop(strategy_name, steps=4):
  """LARS applied in replica context to fixed gradients G (G / 2 from each
  of 2 replicas, all-reduced to G; G from the only replica otherwise)."""
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    model = _tiny_model()
    variables = model.trainable_variables
    opt = lars.LARS(learning_rate=0.2, momentum=0.9, weight_decay_rate=0.05,
                    eeta=0.02)
    opt.build(variables)
  rng = np.random.default_rng(7)
  grads = [[rng.normal(size=v.shape).astype("float32") for v in variables]
           for _ in range(steps)]
  initial = {v.path: v.numpy() for v in variables}
  share = 1.0 / strategy.num_replicas_in_sync

  @tf.function
  def step(step_grads):
    def replica_fn():
      opt.apply([g * share for g in step_grads], variables)
    strategy.run(replica_fn)

  for g in grads:
    step([tf.constant(x) for x in g])
  _assert_replicas_agree(strategy, model)
  return ({v.path: v.numpy() for v in variables}, initial, grads,
          [v.path for v in variables], opt)


def test_mirrored_custom_loop_equals_default_and_excludes_bn():
  final, initial, grads, paths, opt = _custom_loop("mirrored")
  assert opt.iterations.numpy() == len(grads)
  reference = _custom_loop("default")[0]
  for p in paths:
    np.testing.assert_allclose(final[p], reference[p], rtol=1e-6, atol=1e-7,
                               err_msg=p)
  # Excluded (BN gamma/beta, biases): exactly momentum SGD with grads G.
  for i, p in enumerate(paths):
    w, v = initial[p].copy(), np.zeros_like(initial[p])
    for g in grads:
      v = 0.9 * v + 0.2 * g[i]
      w = w - v
    if p.endswith(("/gamma", "/beta", "/bias")):
      np.testing.assert_allclose(final[p], w, rtol=1e-5, atol=1e-6,
                                 err_msg=p)
    else:  # Kernels are decayed and layer-adapted: far from plain SGD.
      assert not np.allclose(final[p], w, rtol=1e-2), p
  assert {p for p in paths if p.endswith(("gamma", "beta"))} == {
      "bn/gamma", "bn/beta"}


def _fit(strategy_name, data):
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    model = _tiny_model()
    schedule = lr_schedules.WarmupPolynomialDecay(2.0, total_steps=8,
                                                  warmup_steps=2)
    model.compile(optimizer=lars.LARS(schedule, weight_decay_rate=1e-3,
                                      eeta=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(data, epochs=2, verbose=0, shuffle=False)
  _assert_replicas_agree(strategy, model)
  return model


def test_mirrored_fit_equals_default():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5)).astype("float32")
  y = rng.integers(0, 3, 32)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # global batch
  single = _fit("default", data)
  mirrored = _fit("mirrored", data)
  assert int(mirrored.optimizer.iterations.numpy()) == 8
  for a, b in zip(single.weights, mirrored.weights):
    assert a.path == b.path
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
  # Decisions were taken by path in build(), before any replica update.
  opt = mirrored.optimizer
  flags = {v.path: (opt._decay_flags[i], opt._adapt_flags[i])
           for i, v in enumerate(mirrored.trainable_variables)}
  assert flags == {"dense/kernel": (True, True), "dense/bias": (False, False),
                   "bn/gamma": (False, False), "bn/beta": (False, False),
                   "head/kernel": (True, True), "head/bias": (False, False)}


# --- serialization and errors ---------------------------------------------


@pytest.mark.parametrize("with_schedule", [False, True])
def test_serialization_round_trip(with_schedule):
  schedule = lr_schedules.WarmupPolynomialDecay(3.0, 100, 5, power=1.6)
  opt = lars.LARS(schedule if with_schedule else 0.25, momentum=0.92,
                  weight_decay_rate=5e-5, eeta=0.002, nesterov=True,
                  classic_momentum=False,
                  exclude_from_weight_decay=[r"bias$"],
                  exclude_from_layer_adaptation=[],
                  global_clipnorm=1.0, name="my_lars")
  config = opt.get_config()
  assert {k: config[k] for k in (
      "momentum", "weight_decay_rate", "eeta", "nesterov", "classic_momentum",
      "exclude_from_weight_decay", "exclude_from_layer_adaptation",
      "global_clipnorm", "name")} == dict(
          momentum=0.92, weight_decay_rate=5e-5, eeta=0.002, nesterov=True,
          classic_momentum=False, exclude_from_weight_decay=[r"bias$"],
          exclude_from_layer_adaptation=[], global_clipnorm=1.0,
          name="my_lars")
  assert lars.LARS().get_config()["exclude_from_weight_decay"] is None
  clones = [
      keras.optimizers.deserialize(keras.optimizers.serialize(opt)),
      keras.saving.deserialize_keras_object(
          keras.saving.serialize_keras_object(opt)),
      lars.LARS.from_config(opt.get_config()),
  ]
  for clone in clones:
    assert isinstance(clone, lars.LARS)
    assert clone.get_config() == config
    if with_schedule:
      assert isinstance(clone._learning_rate,
                        lr_schedules.WarmupPolynomialDecay)
      assert clone._learning_rate.get_config() == schedule.get_config()
  # A clone updates like the original.
  results = []
  for o in (opt, clones[0]):
    v = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    for _ in range(8):
      o.apply([tf.fill((2, 2), 0.5)], [v])
    results.append(v.numpy())
  np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("kwargs,name", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(learning_rate=math.inf), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(momentum="0.9"), "momentum"),
    (dict(weight_decay_rate=-1e-4), "weight_decay_rate"),
    (dict(weight_decay_rate=math.nan), "weight_decay_rate"),
    (dict(eeta=0.0), "eeta"),
    (dict(eeta=-1e-3), "eeta"),
    (dict(nesterov="yes"), "nesterov"),
    (dict(classic_momentum=1), "classic_momentum"),
    (dict(exclude_from_weight_decay=[3]), "exclude_from_weight_decay"),
    (dict(exclude_from_weight_decay={"bias": 1}), "exclude_from_weight_decay"),
    (dict(exclude_from_layer_adaptation=["("]),
     "exclude_from_layer_adaptation"),
    (dict(exclude_from_layer_adaptation=7), "exclude_from_layer_adaptation"),
    (dict(weight_decay=1e-4), "weight_decay"),
])
def test_bad_hyperparameters_name_themselves(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    lars.LARS(**kwargs)


def test_accepted_edge_values():
  opt = lars.LARS(learning_rate=1, momentum=0.0, exclude_from_weight_decay="x")
  assert opt.get_config()["learning_rate"] == 1.0
  assert opt.weight_decay_exclusions == ("x",)
  with pytest.raises(NotImplementedError, match="constructor"):
    opt.exclude_from_weight_decay(var_names=["bias"])
