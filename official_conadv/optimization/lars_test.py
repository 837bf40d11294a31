"""Tests for lars.py: update-for-update parity with tf-models-official's LARS,
exclusions, the zero-norm fall-back, distribution and serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from official.modeling.optimization import lars as tfm_lars
from official_conadv.optimization import lars
from official_conadv.optimization import lr_schedules
from official_conadv.testing import strategies

# (path, initial value): a zero weight exercises the ||w|| = 0 fall-back.
SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "bn/gamma": (4,),
          "conv/kernel": (2, 2), "zero/kernel": (2, 3)}


def _initial(seed=0):
  rng = np.random.default_rng(seed)
  values = {k: rng.normal(size=s).astype("float32") for k, s in SHAPES.items()}
  values["zero/kernel"][:] = 0.0
  return values


def _grads(step, seed=1):
  rng = np.random.default_rng(seed + step)
  grads = {k: rng.normal(size=s).astype("float32") for k, s in SHAPES.items()}
  grads["conv/kernel"][:] = 0.0  # ||g|| = 0 (and ||g + wd w|| = 0 if no wd).
  return grads


def _keras_vars(values):
  out = {}
  for path, value in values.items():
    scope, leaf = path.split("/")
    with keras.name_scope(scope):
      out[path] = keras.Variable(value, name=leaf)
  return out


def _run_ours(kwargs, steps):
  variables = _keras_vars(_initial())
  assert [v.path for v in variables.values()] == list(SHAPES)
  opt = lars.LARS(**kwargs)
  for t in range(steps):
    grads = _grads(t)
    opt.apply([grads[k] for k in SHAPES], [variables[k] for k in SHAPES])
  return {k: v.numpy() for k, v in variables.items()}


def _run_tfm(kwargs, steps):
  variables = {k: tf.Variable(v, name=k) for k, v in _initial().items()}
  opt = tfm_lars.LARS(**kwargs)
  for t in range(steps):
    grads = _grads(t)
    opt.apply_gradients([(tf.constant(grads[k]), variables[k])
                         for k in SHAPES])
  return {k: v.numpy() for k, v in variables.items()}


@pytest.mark.parametrize("classic_momentum", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay_rate", [0.0, 0.05])
def test_equals_tf_models_official(classic_momentum, nesterov,
                                   weight_decay_rate):
  kwargs = dict(learning_rate=0.5, momentum=0.9, eeta=0.01,
                weight_decay_rate=weight_decay_rate, nesterov=nesterov,
                classic_momentum=classic_momentum,
                # Plain substrings so tf-models-official (matching
                # "dense/bias:0") and we (matching "dense/bias") agree.
                exclude_from_weight_decay=["bias", "gamma"],
                exclude_from_layer_adaptation=["gamma"])
  ours = _run_ours(kwargs, steps=6)
  theirs = _run_tfm(kwargs, steps=6)
  for k in SHAPES:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7,
                               err_msg=k)
  # The zero weight moved with trust ratio 1 (plain momentum SGD), as theirs.
  assert np.abs(ours["zero/kernel"]).max() > 0
  # The zero-gradient weight only moved by weight decay.
  if weight_decay_rate == 0:
    np.testing.assert_array_equal(ours["conv/kernel"],
                                  _initial()["conv/kernel"])


def test_default_exclusions_are_bn_and_bias_by_path():
  opt = lars.LARS(weight_decay_rate=1e-4)
  for path, excluded in [("resnet/stage1_block1/bn1/gamma", True),
                         ("resnet/stage1_block1/bn1/adv/beta", True),
                         ("resnet/logits/bias", True),
                         ("resnet/stage1_block1/conv1/kernel", False),
                         ("resnet/logits/kernel", False),
                         ("resnet/gammaray/kernel", False)]:
    assert opt.use_weight_decay(path) is not excluded, path
    assert opt.do_layer_adaptation(path) is not excluded, path
  assert not lars.LARS(weight_decay_rate=0.0).use_weight_decay("a/kernel")
  nothing = lars.LARS(weight_decay_rate=1e-4, exclude_from_weight_decay=[])
  assert nothing.use_weight_decay("bn/gamma")


def test_excluded_variable_gets_plain_momentum_sgd():
  values = _initial()
  variables = _keras_vars(values)
  opt = lars.LARS(learning_rate=0.3, momentum=0.9, weight_decay_rate=0.1)
  sgd_var = keras.Variable(values["bn/gamma"])
  sgd = keras.optimizers.SGD(learning_rate=0.3, momentum=0.9)
  for t in range(3):
    g = _grads(t)
    opt.apply([g[k] for k in SHAPES], [variables[k] for k in SHAPES])
    # Keras SGD's momentum is the "popular" form, equal to classic momentum
    # with a constant learning rate.
    sgd.apply([g["bn/gamma"]], [sgd_var])
  np.testing.assert_allclose(variables["bn/gamma"].numpy(), sgd_var.numpy(),
                             rtol=1e-6)


def _fit(strategy_name, data):
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, name="dense")(inputs)
    h = keras.layers.BatchNormalization(synchronized=True, name="bn")(h)
    outputs = keras.layers.Dense(3, name="head")(keras.ops.relu(h))
    model = keras.Model(inputs, outputs)
    schedule = lr_schedules.WarmupPolynomialDecay(2.0, total_steps=8,
                                                  warmup_steps=2)
    model.compile(optimizer=lars.LARS(schedule, weight_decay_rate=1e-3,
                                      eeta=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(data, epochs=2, verbose=0)
  return model


def test_mirrored_fit_equals_default():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5)).astype("float32")
  y = rng.integers(0, 3, 32)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
  single = _fit("default", data)
  mirrored = _fit("mirrored", data)
  for a, b in zip(single.weights, mirrored.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
  assert int(mirrored.optimizer.iterations.numpy()) == 8


def test_serialization_round_trip():
  schedule = lr_schedules.WarmupPolynomialDecay(3.0, 100, 5, power=1.6)
  opt = lars.LARS(schedule, momentum=0.92, weight_decay_rate=5e-5,
                  nesterov=True, exclude_from_weight_decay=["bias"],
                  global_clipnorm=1.0)
  for clone in (keras.optimizers.deserialize(keras.optimizers.serialize(opt)),
                keras.saving.deserialize_keras_object(
                    keras.saving.serialize_keras_object(opt))):
    assert isinstance(clone, lars.LARS)
    assert clone.get_config() == opt.get_config()
    assert isinstance(clone._learning_rate,  # pylint: disable=protected-access
                      lr_schedules.WarmupPolynomialDecay)


@pytest.mark.parametrize("kwargs,name", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay_rate=-1e-4), "weight_decay_rate"),
    (dict(eeta=0.0), "eeta"),
    (dict(exclude_from_weight_decay=[3]), "exclude_from_weight_decay"),
    (dict(exclude_from_layer_adaptation=["("]),
     "exclude_from_layer_adaptation"),
])
def test_bad_hyperparameters_name_themselves(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    lars.LARS(**kwargs)
