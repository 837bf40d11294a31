"""Tests for lr_schedules.py: hand values, tf-models-official parity, tensor
steps under tf.function / XLA, serialization and argument errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from official.modeling.optimization import lr_schedule as tfm_lr
from official_conadv.optimization import lr_schedules


def _values(schedule, steps, dtype=tf.int64):
  return np.array([float(schedule(tf.constant(s, dtype))) for s in steps])


def _tfm(peak, total, warmup, end, power, start=0.0):
  decay = tfm_lr.PolynomialDecayWithOffset(
      initial_learning_rate=peak, decay_steps=total - warmup,
      end_learning_rate=end, power=power, offset=warmup)
  return tfm_lr.LinearWarmup(decay, warmup_steps=warmup,
                             warmup_learning_rate=start)


def test_values_at_known_steps():
  s = lr_schedules.WarmupPolynomialDecay(
      peak_learning_rate=10.0, total_steps=110, warmup_steps=10,
      end_learning_rate=0.1, power=2.0)
  steps = [0, 1, 5, 9, 10, 60, 109, 110, 111, 10_000]
  want = [0.0, 1.0, 5.0, 9.0,                 # warmup: 10 * step / 10
          10.0,                                # end of warmup: the peak
          9.9 * 0.5**2 + 0.1,                  # half way through the decay
          9.9 * (1 / 100)**2 + 0.1,            # the last update of the run
          0.1, 0.1, 0.1]                       # end and past the end
  np.testing.assert_allclose(_values(s, steps), want, rtol=1e-6)


def test_warmup_start_lr_and_power():
  s = lr_schedules.WarmupPolynomialDecay(6.0, total_steps=14, warmup_steps=4,
                                         end_learning_rate=1.0, power=1.5,
                                         warmup_start_lr=2.0)
  want = [2.0, 3.0, 4.0, 5.0, 6.0,             # 2 + (6 - 2) * step / 4
          5.0 * (1 - 0.3)**1.5 + 1.0,          # step 7: 3 of 10 decay steps
          1.0, 1.0]
  np.testing.assert_allclose(_values(s, [0, 1, 2, 3, 4, 7, 14, 20]), want,
                             rtol=1e-6)


def test_no_warmup_and_no_decay_phase():
  s = lr_schedules.WarmupPolynomialDecay(4.0, total_steps=4, warmup_steps=0,
                                         end_learning_rate=0.0, power=1.0)
  np.testing.assert_allclose(_values(s, [0, 1, 2, 3, 4, 9]),
                             [4, 3, 2, 1, 0, 0])
  # warmup_steps == total_steps: warm up, then `end` from the last step on.
  s = lr_schedules.WarmupPolynomialDecay(4.0, total_steps=4, warmup_steps=4,
                                         end_learning_rate=0.5)
  np.testing.assert_allclose(_values(s, [0, 2, 3, 4, 5]),
                             [0, 2, 3, 0.5, 0.5])


def test_monotonic():
  s = lr_schedules.WarmupPolynomialDecay(3.0, total_steps=200,
                                         warmup_steps=50, power=1.6)
  values = _values(s, range(0, 250))
  assert (np.diff(values[:51]) > 0).all()    # strictly rising in warmup
  assert (np.diff(values[50:]) <= 0).all()   # never rising after it
  assert values.max() == pytest.approx(3.0)


@pytest.mark.parametrize("warmup,power,start", [
    (25, 2.0, 0.0), (41, 1.6, 0.0), (7, 2.0, 0.3), (0, 2.0, 0.0),
    (129, 1.0, 0.0)])
def test_equals_tf_models_official_linear_warmup(warmup, power, start):
  total, peak, end = 130, 43.0, 1e-4
  ours = lr_schedules.WarmupPolynomialDecay(peak, total, warmup, end, power,
                                            warmup_start_lr=start)
  theirs = _tfm(peak, total, warmup, end, power, start)
  steps = range(0, total + 20)
  np.testing.assert_allclose(_values(ours, steps), _values(theirs, steps),
                             rtol=1e-6, atol=1e-7)


def test_polynomial_warmup_differs_at_step_zero_only():
  total, warmup, peak = 60, 12, 8.0
  ours = lr_schedules.WarmupPolynomialDecay(peak, total, warmup)
  decay = tfm_lr.PolynomialDecayWithOffset(
      initial_learning_rate=peak, decay_steps=total - warmup,
      end_learning_rate=1e-4, power=2.0, offset=warmup)
  theirs = tfm_lr.PolynomialWarmUp(decay, warmup_steps=warmup)
  steps = range(0, total + 5)
  a, b = _values(ours, steps), _values(theirs, steps)
  np.testing.assert_allclose(a[1:], b[1:], rtol=1e-6)
  assert a[0] == 0.0 and b[0] == pytest.approx(peak / warmup)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.float32,
                                   tf.float64])
def test_tensor_steps_under_tf_function_and_xla(dtype):
  s = lr_schedules.WarmupPolynomialDecay(5.0, 100, 10, power=1.6,
                                         warmup_start_lr=0.5)
  steps = [0, 3, 10, 55, 100, 130]
  want = _values(s, steps)
  for jit in (False, True):
    fn = tf.function(s, jit_compile=jit)
    got = fn(tf.constant(steps, dtype))             # batched steps
    assert got.dtype == tf.float32 and got.shape == (len(steps),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
  # The optimizer's own counter: a Keras int64 variable.
  step = keras.Variable(55, dtype="int64", trainable=False)
  assert float(s(step)) == pytest.approx(want[3], rel=1e-6)


def test_optimizer_sees_step_zero_first():
  s = lr_schedules.WarmupPolynomialDecay(1.0, 10, 4, warmup_start_lr=0.25)
  opt = keras.optimizers.SGD(learning_rate=s)
  v = keras.Variable(np.zeros(2, "float32"))
  seen = []
  for _ in range(3):
    seen.append(float(opt.learning_rate))
    opt.apply([tf.ones(2)], [v])
  np.testing.assert_allclose(seen, [0.25, 0.4375, 0.625])
  np.testing.assert_allclose(v.numpy(), [-sum(seen)] * 2, rtol=1e-6)


def test_serialization_round_trip():
  s = lr_schedules.WarmupPolynomialDecay(3.0, 100, 5, end_learning_rate=2e-4,
                                         power=1.6, warmup_start_lr=0.1)
  kwargs = dict(peak_learning_rate=3.0, total_steps=100, warmup_steps=5,
                end_learning_rate=2e-4, power=1.6, warmup_start_lr=0.1)
  assert s.get_config() == kwargs
  clones = [
      keras.saving.deserialize_keras_object(
          keras.saving.serialize_keras_object(s)),
      keras.optimizers.schedules.deserialize(
          keras.optimizers.schedules.serialize(s)),
      lr_schedules.WarmupPolynomialDecay.from_config(s.get_config()),
  ]
  for clone in clones:
    assert isinstance(clone, lr_schedules.WarmupPolynomialDecay)
    assert clone.get_config() == kwargs
    np.testing.assert_array_equal(_values(clone, [0, 3, 50, 120]),
                                  _values(s, [0, 3, 50, 120]))


@pytest.mark.parametrize("kwargs,name", [
    (dict(peak_learning_rate=-1.0), "peak_learning_rate"),
    (dict(peak_learning_rate=math.nan), "peak_learning_rate"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.5), "total_steps"),
    (dict(warmup_steps=11), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.0), "warmup_steps"),
    (dict(end_learning_rate=-1e-4), "end_learning_rate"),
    (dict(power=0.0), "power"),
    (dict(power=-2.0), "power"),
    (dict(warmup_start_lr=-0.1), "warmup_start_lr"),
])
def test_bad_arguments_name_themselves(kwargs, name):
  args = dict(peak_learning_rate=1.0, total_steps=10, warmup_steps=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=f"`{name}`"):
    lr_schedules.WarmupPolynomialDecay(**args)


def test_scale_learning_rate():
  assert lr_schedules.scale_learning_rate(0.1, 1024) == pytest.approx(0.4)
  assert lr_schedules.scale_learning_rate(0.1, 256) == pytest.approx(0.1)
  assert lr_schedules.scale_learning_rate(25.0, 4096, 16384,
                                          "sqrt") == pytest.approx(12.5)
  for kwargs, name in [(dict(rule="cubic"), "rule"),
                       (dict(batch_size=0), "batch_size"),
                       (dict(base_batch_size=-256), "base_batch_size"),
                       (dict(base_lr=-0.1), "base_lr")]:
    args = dict(base_lr=0.1, batch_size=512)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
      lr_schedules.scale_learning_rate(**args)
