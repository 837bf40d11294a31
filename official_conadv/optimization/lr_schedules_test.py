"""Tests for lr_schedules.py: hand values, tf-models-official parity, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from official.modeling.optimization import lr_schedule as tfm_lr
from official_conadv.optimization import lr_schedules


def _values(schedule, steps):
  return np.array([float(schedule(tf.constant(s, tf.int64))) for s in steps])


def test_values_at_known_steps():
  s = lr_schedules.WarmupPolynomialDecay(
      peak_learning_rate=10.0, total_steps=110, warmup_steps=10,
      end_learning_rate=0.1, power=2.0)
  got = _values(s, [0, 1, 5, 9, 10, 60, 110, 500])
  want = [1.0, 1.0, 5.0, 9.0, 10.0, (10 - 0.1) * 0.5**2 + 0.1, 0.1, 0.1]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  warm = _values(s, range(11))
  assert (np.diff(warm) >= 0).all()
  decay = _values(s, range(10, 111))
  assert (np.diff(decay) <= 0).all()


def test_no_warmup_and_start_lr():
  s = lr_schedules.WarmupPolynomialDecay(4.0, total_steps=4, warmup_steps=0,
                                         end_learning_rate=0.0, power=1.0)
  np.testing.assert_allclose(_values(s, [0, 1, 2, 4]), [4, 3, 2, 0])
  s = lr_schedules.WarmupPolynomialDecay(4.0, total_steps=10, warmup_steps=4,
                                         warmup_start_lr=2.0)
  np.testing.assert_allclose(_values(s, [1, 2]), [2.5, 3.0])


@pytest.mark.parametrize("warmup,power", [(25, 2.0), (41, 1.6), (0, 2.0)])
def test_equals_tf_models_official_composition(warmup, power):
  total, peak, end = 130, 43.0, 1e-4
  ours = lr_schedules.WarmupPolynomialDecay(peak, total, warmup, end, power)
  decay = tfm_lr.PolynomialDecayWithOffset(
      initial_learning_rate=peak, decay_steps=total - warmup,
      end_learning_rate=end, power=power, offset=warmup)
  theirs = tfm_lr.PolynomialWarmUp(decay, warmup_steps=warmup)
  steps = list(range(0, total + 20))
  np.testing.assert_allclose(_values(ours, steps), _values(theirs, steps),
                             rtol=1e-5, atol=1e-7)


def test_works_under_xla_and_serializes():
  s = lr_schedules.WarmupPolynomialDecay(5.0, 100, 10, power=1.6)
  fn = tf.function(s, jit_compile=True)
  np.testing.assert_allclose(float(fn(tf.constant(55))), float(s(55)),
                             rtol=1e-6)
  clone = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(s))
  assert clone.get_config() == s.get_config()
  assert isinstance(clone, lr_schedules.WarmupPolynomialDecay)


@pytest.mark.parametrize("kwargs,name", [
    (dict(peak_learning_rate=-1.0, total_steps=10), "peak_learning_rate"),
    (dict(peak_learning_rate=1.0, total_steps=0), "total_steps"),
    (dict(peak_learning_rate=1.0, total_steps=10, warmup_steps=11),
     "warmup_steps"),
    (dict(peak_learning_rate=1.0, total_steps=10, warmup_steps=-1),
     "warmup_steps"),
    (dict(peak_learning_rate=1.0, total_steps=10, power=0.0), "power"),
    (dict(peak_learning_rate=1.0, total_steps=10, end_learning_rate=-1.0),
     "end_learning_rate"),
])
def test_bad_arguments_name_themselves(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    lr_schedules.WarmupPolynomialDecay(**kwargs)


def test_scale_learning_rate():
  assert lr_schedules.scale_learning_rate(0.1, 1024) == pytest.approx(0.4)
  assert lr_schedules.scale_learning_rate(25.0, 4096, 16384,
                                          "sqrt") == pytest.approx(12.5)
  with pytest.raises(ValueError, match="`rule`"):
    lr_schedules.scale_learning_rate(0.1, 512, rule="cubic")
  with pytest.raises(ValueError, match="`batch_size`"):
    lr_schedules.scale_learning_rate(0.1, 0)
