"""Tests for the PGD adversary (attacks.py)."""

import numpy as np
import pytest
import tensorflow as tf

from official_conadv.adversarial import attacks

SEED = tf.constant([3, 7], tf.int32)


def _images(batch=4, size=6, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.uniform(0, 1, (batch, size, size, channels)),
                     tf.float32)


def _linear_logits_fn(weights):
  """logits = flatten(x) @ W: its input gradient is known in closed form."""
  def fn(x):
    return tf.reshape(x, [tf.shape(x)[0], -1]) @ weights
  return fn


def _linear_weights(dim, classes=5, seed=1):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.normal(size=(dim, classes)), tf.float32)


def _hand_ce_grad(x, w, labels):
  """d/dx sum_i CE(softmax(x_i W), y_i) = (softmax - onehot) W^T, per example."""
  flat = x.numpy().reshape(x.shape[0], -1)
  logits = flat @ w.numpy()
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(w.shape[1])[labels]
  return ((p - onehot) @ w.numpy().T).reshape(x.shape)


def test_fgsm_equals_hand_computed_step():
  x = _images()
  w = _linear_weights(6 * 6 * 3)
  y = tf.constant([0, 1, 2, 3])
  eps, step = 0.03, 0.02
  cfg = attacks.AttackConfig(epsilon=eps, step_size=step, steps=1,
                             random_init=False)
  got = attacks.pgd_attack(_linear_logits_fn(w), x, y, cfg, SEED).numpy()
  want = x.numpy() + step * np.sign(_hand_ce_grad(x, w, y.numpy()))
  want = np.clip(np.clip(want, x.numpy() - eps, x.numpy() + eps), 0, 1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # One-hot labels give the same attack as integer ids.
  got_onehot = attacks.pgd_attack(_linear_logits_fn(w), x, tf.one_hot(y, 5),
                                  cfg, SEED).numpy()
  np.testing.assert_array_equal(got, got_onehot)


def test_random_init_step_equals_hand_computation():
  x = _images()
  w = _linear_weights(6 * 6 * 3)
  y = tf.constant([4, 3, 2, 1])
  eps = 0.05
  cfg = attacks.AttackConfig(epsilon=eps, step_size=eps, steps=1)
  got = attacks.pgd_attack(_linear_logits_fn(w), x, y, cfg, SEED).numpy()
  # Reproduce the documented noise: U(-1, 1) * eps from the first split seed.
  noise_seed = tf.random.experimental.stateless_split(SEED, num=2)[0]
  x0 = np.clip(x.numpy() + eps * tf.random.stateless_uniform(
      x.shape, seed=noise_seed, minval=-1.0, maxval=1.0).numpy(), 0, 1)
  want = x0 + eps * np.sign(_hand_ce_grad(tf.constant(x0), w, y.numpy()))
  want = np.clip(np.clip(want, x.numpy() - eps, x.numpy() + eps), 0, 1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert not np.allclose(got, attacks.pgd_attack(
      _linear_logits_fn(w), x, y,
      attacks.AttackConfig(epsilon=eps, step_size=eps, random_init=False),
      SEED).numpy())


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("targeted", [False, True])
def test_stays_within_epsilon_and_unit_range(steps, targeted):
  # Saturated pixels (0 and 1) exercise the [0, 1] clip.
  x = tf.concat([_images(2), tf.zeros([1, 6, 6, 3]), tf.ones([1, 6, 6, 3])],
                axis=0)
  w = _linear_weights(6 * 6 * 3, seed=4)
  eps = 8 / 255
  cfg = attacks.AttackConfig(epsilon=eps, step_size=eps / 2 + 0.01,
                             steps=steps, targeted=targeted)
  adv = attacks.pgd_attack(_linear_logits_fn(w), x, tf.constant([0, 1, 2, 3]),
                           cfg, SEED).numpy()
  assert np.abs(adv - x.numpy()).max() <= eps + 1e-6
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  assert np.abs(adv - x.numpy()).max() > eps / 2  # It did move.


def test_untargeted_raises_and_targeted_lowers_the_right_loss():
  x = _images(8, seed=5)
  w = _linear_weights(6 * 6 * 3, seed=6)
  fn = _linear_logits_fn(w)
  y = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
  ce = lambda lab, xx: tf.nn.sparse_softmax_cross_entropy_with_logits(
      lab, fn(xx)).numpy()
  untargeted = attacks.pgd_attack(
      fn, x, y, attacks.AttackConfig(epsilon=0.02, step_size=0.01, steps=2,
                                     random_init=False), SEED)
  assert (ce(y, untargeted) > ce(y, x)).all()

  cfg = attacks.AttackConfig(epsilon=0.02, step_size=0.01, steps=2,
                             random_init=False, targeted=True)
  targeted = attacks.pgd_attack(fn, x, y, cfg, SEED)
  target_seed = tf.random.experimental.stateless_split(SEED, num=2)[1]
  target = attacks.random_wrong_labels(y, 5, target_seed)
  assert (ce(target, targeted) < ce(target, x)).all()


def test_random_wrong_labels_are_wrong_and_cover_all_classes():
  y = tf.zeros([4000], tf.int32) + 2
  t = attacks.random_wrong_labels(y, 5, SEED).numpy()
  assert (t != 2).all()
  counts = np.bincount(t, minlength=5)
  assert counts[2] == 0
  assert counts[[0, 1, 3, 4]].min() > 900  # ~1000 each: uniform.


def test_prob_start_from_clean_is_per_batch():
  x = _images()
  y = tf.constant([0, 1, 2, 3])
  w = _linear_weights(6 * 6 * 3)
  fn = _linear_logits_fn(w)
  cfg_clean = attacks.AttackConfig(epsilon=0.05, step_size=0.01,
                                   prob_start_from_clean=1.0)
  no_init = attacks.AttackConfig(epsilon=0.05, step_size=0.01,
                                 random_init=False)
  np.testing.assert_array_equal(
      attacks.pgd_attack(fn, x, y, cfg_clean, SEED).numpy(),
      attacks.pgd_attack(fn, x, y, no_init, SEED).numpy())
  # p = 0.5 over many batch seeds: about half the batches start clean.
  cfg_half = attacks.AttackConfig(epsilon=0.05, step_size=0.01,
                                  prob_start_from_clean=0.5)
  clean = [
      np.array_equal(
          attacks.pgd_attack(fn, x, y, cfg_half, SEED,
                             batch_seed=tf.constant([9, s])).numpy(),
          attacks.pgd_attack(fn, x, y, no_init, SEED).numpy())
      for s in range(40)
  ]
  assert 10 <= sum(clean) <= 30


def test_epsilon_zero_returns_clean_images():
  x = _images()
  cfg = attacks.AttackConfig(epsilon=0.0, step_size=0.01)
  adv = attacks.pgd_attack(_linear_logits_fn(_linear_weights(108)), x,
                           tf.constant([0, 1, 2, 3]), cfg, SEED)
  np.testing.assert_array_equal(adv.numpy(), x.numpy())


@pytest.mark.parametrize("kwargs,name", [
    ({"epsilon": -0.1}, "epsilon"),
    ({"step_size": 0.0}, "step_size"),
    ({"step_size": -1.0}, "step_size"),
    ({"steps": 0}, "steps"),
    ({"steps": 1.5}, "steps"),
    ({"prob_start_from_clean": 1.5}, "prob_start_from_clean"),
    ({"prob_start_from_clean": -0.1}, "prob_start_from_clean"),
])
def test_bad_arguments_name_themselves(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    attacks.AttackConfig(**kwargs)


def test_targeted_needs_two_classes():
  with pytest.raises(ValueError, match="num_classes"):
    attacks.random_wrong_labels(tf.constant([0]), 1, SEED)


def test_config_round_trip():
  cfg = attacks.AttackConfig(epsilon=0.1, steps=2, targeted=True)
  assert attacks.AttackConfig.from_config(cfg.get_config()) == cfg
