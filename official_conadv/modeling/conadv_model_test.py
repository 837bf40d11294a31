"""Tests for ConAdvModel: the three modes against hand-written reference loops,
the stale-weight ring buffer (also under gradient accumulation and loss
scaling), AutoAugment inputs (two- and three-branch), weighted evaluation,
strategies, serialization and export."""

import dataclasses

import numpy as np
import pytest
import keras
import tensorflow as tf

from official_conadv.adversarial import attacks
from official_conadv.adversarial import schedules
from official_conadv.modeling import conadv_model
from official_conadv.modeling import dual_batch_norm
from official_conadv.modeling import small_cnn
from official_conadv.optimization import lars
from official_conadv.testing import strategies

NUM_CLASSES = 5
SHAPE = (8, 8, 3)
LR = 0.1


def _data(num_batches, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (num_batches * batch,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, num_batches * batch).astype("int32")
  return x, y


def _dataset(x, y, batch=8):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _backbone(synchronized=False, seed=1, augmented=False):
  keras.utils.set_random_seed(seed)
  model = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8),
                             synchronized_bn=synchronized,
                             augmented_bn=augmented)
  model(tf.zeros((1,) + SHAPE), training=False)
  return model


def _copy_weights(src, dst):
  for a, b in zip(src.weights, dst.weights):
    b.assign(a)


class RecordingConAdv(conadv_model.ConAdvModel):
  """Records every step's adversarial examples (test hook)."""

  def build(self, input_shape):
    super().build(input_shape)
    self.recorded = tf.Variable(tf.zeros([16, 8] + list(SHAPE)),
                                trainable=False)

  def adversarial_examples(self, images, labels, step):
    x_adv = super().adversarial_examples(images, labels, step)
    self.recorded[tf.cast(step, tf.int32)].assign(x_adv)
    return x_adv


def _build(backbone, adversary, cls=conadv_model.ConAdvModel,
           optimizer=None, loss=None, metrics=("sparse_categorical_accuracy",),
           augmented_route="main"):
  model = cls(backbone, adversary=adversary, augmented_route=augmented_route)
  model.build((None,) + SHAPE)
  model.compile(optimizer=optimizer or keras.optimizers.SGD(LR),
                loss=loss or keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                metrics=list(metrics))
  return model


def _record_weights(model):
  history = []

  class Recorder(keras.callbacks.Callback):

    def on_train_batch_begin(self, batch, logs=None):
      history.append([v.numpy() for v in model.backbone.trainable_variables])

  return history, Recorder()


def _reference_run(backbone, adversary, x, y, batch=8, augmented=None,
                   augmented_route="main", accumulation=1, optimizer=None):
  """Plain eager loop of paper Algorithm 1, no ConAdvModel code.

  Micro-batch m of `batch` images belongs to update u = m // accumulation;
  theta_u are the weights after u updates. The attack's stale network is a
  separate copy of the backbone whose weights are set to theta_{u - tau}
  (theta_0 while u < tau; current moving statistics), run in training mode on
  the adversarial BN from the plain images, seeded with m. Each update
  applies the mean of its micro-batches' gradients, with plain SGD (LR) or
  `optimizer` (eagerly, no accumulation of its own).

  With `augmented` (the "augmented" images of a dict input): route "main"
  trains the main BN on them; route "aug" trains the main BN on `x`, the aug
  BN on them, and averages the branch losses.

  Returns:
    thetas: the weights at the start of every micro-step.
    x_advs: every micro-step's adversarial examples.
  """
  attacker = backbone.__class__.from_config(backbone.get_config())
  attacker(tf.zeros((1,) + SHAPE))
  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  variables = backbone.trainable_variables
  thetas, updates, x_advs, accumulated = [], [], [], None
  for m in range(len(x) // batch):
    u = m // accumulation
    rows = slice(m * batch, (m + 1) * batch)
    xb, yb = x[rows], y[rows]
    ab = None if augmented is None else augmented[rows]
    thetas.append([v.numpy() for v in variables])
    if m % accumulation == 0:
      updates.append(thetas[-1])
    main = ab if ab is not None and augmented_route == "main" else xb
    branches = [lambda main=main: ce(
        yb, backbone(main, training=True, bn_route="main"))]
    if augmented_route == "aug":
      branches.append(lambda ab=ab: ce(
          yb, backbone(ab, training=True, bn_route="aug")))
    if adversary is not None:
      stale = updates[max(u - adversary.delay, 0)]
      for v, value in zip(attacker.trainable_variables, stale):
        v.assign(value)
      for v, src in zip(attacker.non_trainable_variables,
                        backbone.non_trainable_variables):
        v.assign(src)
      seed = tf.random.experimental.stateless_fold_in(
          tf.constant([adversary.seed, m]), 0)
      x_adv = attacks.pgd_attack(
          lambda z: attacker(z, training=True, bn_route="adv"), xb, yb,
          adversary.attack, seed=seed,
          batch_seed=tf.constant([adversary.seed, m]) + 1).numpy()
      x_advs.append(x_adv)
      branches.append(lambda x_adv=x_adv: ce(
          yb, backbone(x_adv, training=True, bn_route="adv")))
    with tf.GradientTape() as tape:
      loss = tf.add_n([branch() for branch in branches])
      if augmented_route == "aug":
        loss = loss / len(branches)
    grads = tape.gradient(loss, variables)
    if accumulated is None:
      accumulated = grads
    else:
      accumulated = [None if g is None else a + g
                     for a, g in zip(accumulated, grads)]
    if (m + 1) % accumulation:
      continue
    mean = [None if g is None else g / accumulation for g in accumulated]
    accumulated = None
    if optimizer is not None:
      optimizer.apply_gradients(
          [(g, v) for g, v in zip(mean, variables) if g is not None])
      continue
    for g, v in zip(mean, variables):
      if g is not None:
        v.assign_sub(LR * g)
  return thetas, x_advs


MODES = {
    "baseline": None,
    "sequential": conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05,
                                               delay=0, seed=4),
    "conadv_tau1": conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05,
                                                delay=1, seed=5),
    "conadv_tau2_pgd2_targeted": conadv_model.AdversaryConfig(
        epsilon=0.1, step_size=0.05, steps=2, delay=2, targeted=True,
        prob_start_from_clean=0.5, seed=6),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fit_equals_hand_written_reference(mode):
  adversary = MODES[mode]
  steps = 5
  x, y = _data(steps)
  backbone = _backbone()
  reference = _backbone()
  _copy_weights(backbone, reference)
  model = _build(backbone, adversary, cls=RecordingConAdv)
  history, recorder = _record_weights(model)
  model.fit(_dataset(x, y), epochs=1, verbose=0, shuffle=False,
            callbacks=[recorder])
  thetas, x_advs = _reference_run(reference, adversary, x, y)

  for t in range(steps):
    for got, want in zip(history[t], thetas[t]):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  for got, want in zip(backbone.weights, reference.weights):
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5,
                               rtol=1e-4, err_msg=got.path)
  if adversary is not None:
    # The examples of step t are those computed independently from
    # theta_{t - tau} (theta_0 while t < tau).
    recorded = model.recorded.numpy()
    for t in range(steps):
      np.testing.assert_allclose(recorded[t], x_advs[t], atol=1e-5)
      assert np.abs(recorded[t] - x[t * 8:(t + 1) * 8]).max() <= 0.1 + 1e-6


def test_ring_buffer_holds_the_last_tau_weights():
  tau, steps = 2, 5
  x, y = _data(steps)
  model = _build(_backbone(), conadv_model.AdversaryConfig(delay=tau))
  history, recorder = _record_weights(model)
  model.fit(_dataset(x, y), epochs=1, verbose=0, shuffle=False,
            callbacks=[recorder])
  # After k steps slot (k - 1) % tau holds theta_{k-1}, the other theta_{k-2}.
  for k, slot in ((steps - 1, (steps - 1) % tau), (steps - 2,
                                                   (steps - 2) % tau)):
    for buf, want in zip(model.schedule.slot(slot), history[k]):
      np.testing.assert_array_equal(buf.numpy(), want)
  stale_names = [w.path for w in model.non_trainable_weights
                 if "stale_slot" in w.path]
  assert len(stale_names) == tau * len(model.backbone.trainable_variables)


def test_attack_does_not_touch_moving_statistics():
  model = _build(_backbone(), conadv_model.AdversaryConfig(delay=1))
  x, y = _data(1)
  before = [v.numpy() for v in model.backbone.non_trainable_variables]
  model.adversarial_examples(tf.constant(x), tf.constant(y),
                             tf.constant(0, tf.int64))
  for v, b in zip(model.backbone.non_trainable_variables, before):
    np.testing.assert_array_equal(v.numpy(), b)


def test_adv_route_statistics_only_move_in_adversarial_modes():
  x, y = _data(2)
  for adversary, adv_moves in ((None, False),
                               (conadv_model.AdversaryConfig(delay=1), True)):
    model = _build(_backbone(), adversary)
    adv_stats = [v for v in model.backbone.non_trainable_variables
                 if "/adv/" in v.path]
    main_stats = [v for v in model.backbone.non_trainable_variables
                  if "/adv/" not in v.path]
    assert adv_stats and main_stats
    adv_before = [v.numpy() for v in adv_stats]
    main_before = [v.numpy() for v in main_stats]
    model.fit(_dataset(x, y), verbose=0)
    assert not any(np.array_equal(v.numpy(), b)
                   for v, b in zip(main_stats, main_before))
    moved = [not np.array_equal(v.numpy(), b)
             for v, b in zip(adv_stats, adv_before)]
    assert all(moved) if adv_moves else not any(moved)


def _fit_under(strategy_name, adversary, x, y, synchronized=True, epochs=1):
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    model = _build(_backbone(synchronized=synchronized), adversary)
  logs = model.fit(_dataset(x, y), epochs=epochs, verbose=0, shuffle=False)
  return model, logs.history


def test_mirrored_equals_one_device_with_synchronized_bn():
  x, y = _data(4)
  adversary = conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05,
                                           delay=1, random_init=False)
  single, single_logs = _fit_under("default", adversary, x, y)
  mirrored, mirrored_logs = _fit_under("mirrored", adversary, x, y)
  assert mirrored.distribute_strategy.num_replicas_in_sync == 2
  for a, b in zip(single.weights, mirrored.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5,
                               err_msg=a.path)
  # Reported losses are unscaled: the same under 1 and 2 replicas.
  for key in ("loss", "clean_loss", "adv_loss", "clean_accuracy"):
    np.testing.assert_allclose(single_logs[key], mirrored_logs[key],
                               rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("strategy_name", ["default", "one_device",
                                           "mirrored"])
@pytest.mark.parametrize("mode", ["baseline", "sequential", "conadv_tau1"])
def test_fit_and_evaluate_every_mode_and_strategy(strategy_name, mode):
  x, y = _data(2)
  model, logs = _fit_under(strategy_name, MODES[mode], x, y,
                           synchronized=False, epochs=2)
  expected = {"loss", "clean_loss", "clean_accuracy",
              "sparse_categorical_accuracy"}
  if mode != "baseline":
    expected |= {"adv_loss", "adv_accuracy"}
  assert set(logs) == expected
  assert all(np.isfinite(v).all() for v in logs.values())
  if mode != "baseline":
    np.testing.assert_allclose(
        logs["loss"], np.add(logs["clean_loss"], logs["adv_loss"]), rtol=1e-5)
  results = model.evaluate(_dataset(x, y), verbose=0, return_dict=True)
  assert set(results) == {"loss", "sparse_categorical_accuracy", "examples"}
  assert results["examples"] == 16.0
  preds = model.predict(x, batch_size=8, verbose=0)
  assert preds.shape == (16, NUM_CLASSES)


@pytest.mark.parametrize("inputs", ["plain", "dict"])
def test_fit_builds_on_first_use_on_the_default_strategy(inputs):
  """No explicit build(): the first traced step builds the stale buffer, and
  training equals that of an explicitly built model."""
  adversary = MODES["conadv_tau2_pgd2_targeted"]
  x, y = _data(3)
  data = (_dataset(x, y) if inputs == "plain" else
          _dict_dataset(x, _augment(x), y))
  built = _build(_backbone(), adversary)
  lazy = conadv_model.ConAdvModel(_backbone(), adversary=adversary)
  lazy.compile(optimizer=keras.optimizers.SGD(LR),
               loss=keras.losses.SparseCategoricalCrossentropy(
                   from_logits=True))
  assert not lazy.built
  for model in (built, lazy):
    model.fit(data, verbose=0, shuffle=False)
  assert lazy.built and len(lazy.schedule.variables) == len(built.schedule.variables)
  for a, b in zip(lazy.backbone.weights + lazy.schedule.slot(0) +
                  lazy.schedule.slot(1),
                  built.backbone.weights + built.schedule.slot(0) +
                  built.schedule.slot(1)):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_one_hot_labels_with_label_smoothing():
  x, y = _data(2)
  model = _build(_backbone(), MODES["conadv_tau1"],
                 loss=keras.losses.CategoricalCrossentropy(
                     from_logits=True, label_smoothing=0.1),
                 metrics=["categorical_accuracy"])
  logs = model.fit(_dataset(x, tf.one_hot(y, NUM_CLASSES)), verbose=0)
  assert np.isfinite(logs.history["loss"]).all()


def test_inference_model_matches_main_route_and_drops_adv():
  x, y = _data(2)
  model = _build(_backbone(), MODES["conadv_tau1"])
  model.fit(_dataset(x, y), verbose=0)
  exported = model.inference_model()
  assert not [v for v in exported.weights if "/adv/" in v.path]
  assert len(exported.weights) == len(
      [v for v in model.backbone.weights if "/adv/" not in v.path])
  want = model.backbone(x, training=False, bn_route="main")
  np.testing.assert_allclose(exported(x, training=False), want, atol=1e-6)
  np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-5)


def test_serialization_round_trip(tmp_path):
  x, y = _data(1)
  model = _build(_backbone(), MODES["conadv_tau2_pgd2_targeted"])
  model.fit(_dataset(x, y), verbose=0)
  config = keras.saving.serialize_keras_object(model)
  clone = keras.saving.deserialize_keras_object(config)
  assert clone.adversary == model.adversary
  assert clone.get_config() == model.get_config()
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert loaded.adversary == model.adversary
  np.testing.assert_allclose(loaded.predict(x, verbose=0),
                             model.predict(x, verbose=0), atol=1e-6)
  cfg = conadv_model.AdversaryConfig(delay=3, seed=2, targeted=True)
  assert keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(cfg)) == cfg


def test_save_weights_carries_the_stale_buffer(tmp_path):
  x, y = _data(3)
  model = _build(_backbone(), conadv_model.AdversaryConfig(delay=2))
  model.fit(_dataset(x, y), verbose=0)
  path = str(tmp_path / "w.weights.h5")
  model.save_weights(path)
  other = _build(_backbone(seed=9), conadv_model.AdversaryConfig(delay=2))
  other.load_weights(path)
  for a, b in zip(model.schedule.slot(1) + model.schedule.slot(0),
                  other.schedule.slot(1) + other.schedule.slot(0)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("kwargs,name", [
    ({"epsilon": -1.0}, "epsilon"),
    ({"step_size": 0.0}, "step_size"),
    ({"steps": 0}, "steps"),
    ({"delay": -1}, "delay"),
    ({"delay": 1.5}, "delay"),
    ({"prob_start_from_clean": 2.0}, "prob_start_from_clean"),
    ({"seed": "x"}, "seed"),
])
def test_bad_adversary_arguments(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    conadv_model.AdversaryConfig(**kwargs)


def test_bad_route_and_adversary_type():
  backbone = _backbone()
  with pytest.raises(ValueError, match="bn_route"):
    backbone(tf.zeros((1,) + SHAPE), bn_route="clean")
  with pytest.raises(ValueError, match="adversary"):
    conadv_model.ConAdvModel(backbone, adversary=0.1)


# ------------------------------------------------ gradient accumulation
def _assert_same_run(model, backbone, reference, history, thetas, x_advs,
                     x, adversary, atol=2e-5):
  """Weights at every micro-step, final weights and every x_adv agree."""
  assert len(history) == len(thetas)
  for m, (got_theta, want_theta) in enumerate(zip(history, thetas)):
    for got, want in zip(got_theta, want_theta):
      np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4,
                                 err_msg=f"micro-step {m}")
  for got, want in zip(backbone.weights, reference.weights):
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=atol,
                               rtol=1e-4, err_msg=got.path)
  if adversary is not None:
    recorded = model.recorded.numpy()
    for m, want in enumerate(x_advs):
      np.testing.assert_allclose(recorded[m], want, atol=1e-5,
                                 err_msg=f"x_adv of micro-step {m}")
      assert np.abs(recorded[m] - x[m * 8:(m + 1) * 8]).max() <= (
          adversary.epsilon + 1e-6)


def _lars(**kwargs):
  # eeta 0.1: weights move ~1% of their norm per update, enough for the
  # attack's gradient signs to tell theta_u from theta_{u-1}.
  kwargs = {"weight_decay_rate": 1e-3, **kwargs}
  return lars.LARS(learning_rate=LR, momentum=0.9, eeta=0.1, **kwargs)


@pytest.mark.parametrize("tau", [1, 2])
def test_gradient_accumulation_staleness_counts_updates(tau):
  """LARS(gradient_accumulation_steps=2): micro-step m is in update
  u = m // 2 and attacks with theta_{u - tau}; equal to the eager loop."""
  adversary = conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05,
                                           delay=tau, seed=7)
  micro_steps, n = 12, 2  # 6 updates: every slot is rewritten >= twice.
  x, y = _data(micro_steps)
  backbone, reference = _backbone(), _backbone()
  _copy_weights(backbone, reference)
  model = _build(backbone, adversary, cls=RecordingConAdv,
                 optimizer=_lars(gradient_accumulation_steps=n))
  history, recorder = _record_weights(model)
  model.fit(_dataset(x, y), epochs=1, verbose=0, shuffle=False,
            callbacks=[recorder])
  thetas, x_advs = _reference_run(reference, adversary, x, y,
                                  accumulation=n, optimizer=_lars())

  assert int(model.optimizer.iterations) == micro_steps // n
  _assert_same_run(model, backbone, reference, history, thetas, x_advs, x,
                   adversary)
  # Weights move once per update only.
  for m in range(1, micro_steps):
    same = all(np.array_equal(a, b) for a, b in zip(history[m],
                                                    history[m - 1]))
    assert same == (m % n != 0), m
  # After 6 updates slot 5 % tau holds theta_5 (start of micro-step 10) and
  # slot 4 % tau theta_4 (micro-step 8) for tau = 2.
  for u in range(micro_steps // n - tau, micro_steps // n):
    for buf, want in zip(model.schedule.slot(u % tau), history[u * n]):
      np.testing.assert_array_equal(buf.numpy(), want)
  # The attacks really differ from attacks with the current weights (what a
  # buffer written every micro-step would use in N - 1 of N micro-steps).
  _, current = _reference_run(
      _backbone(), dataclasses.replace(adversary, delay=0), x, y,
      accumulation=n, optimizer=_lars())
  assert not np.allclose(current[n * tau + 1], x_advs[n * tau + 1], atol=1e-5)


def test_skipped_loss_scale_step_leaves_the_ring_buffer():
  """A LossScaleOptimizer step with non-finite gradients is no update: the
  counter stays, and so does the slot its retry still has to read."""
  adversary = conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05,
                                           delay=1)
  x, y = _data(3)
  x[16, 0, 0, 0] = np.nan  # batch 2 -> NaN gradients -> skipped.
  model = _build(_backbone(), adversary,
                 optimizer=keras.optimizers.LossScaleOptimizer(
                     keras.optimizers.SGD(LR)))
  history, recorder = _record_weights(model)
  model.fit(_dataset(x, y), epochs=1, verbose=0, shuffle=False,
            callbacks=[recorder])
  assert int(model.optimizer.iterations) == 2
  current = [v.numpy() for v in model.backbone.trainable_variables]
  for got, want in zip(current, history[2]):  # batch 2 changed nothing
    np.testing.assert_array_equal(got, want)
  # Slot 0 keeps theta_1 (written after batch 1), the weights update 2 must
  # attack with; a write before the optimizer call would hold theta_2.
  for buf, want in zip(model.schedule.slot(0), history[1]):
    np.testing.assert_array_equal(buf.numpy(), want)
  assert not all(np.array_equal(a, b) for a, b in zip(history[1], current))


def test_keras_counter_convention_the_buffer_relies_on():
  """Keras 3.15: `_iterations` counts applied micro-steps, `iterations` is
  `_iterations // N`; LossScaleOptimizer delegates both to its inner
  optimizer and does not count a non-finite step."""
  v = keras.Variable(1.0)
  sgd = keras.optimizers.SGD(0.1, gradient_accumulation_steps=3)
  for _ in range(7):
    sgd.apply_gradients([(tf.constant(1.0), v)])
  assert (int(sgd._iterations), int(sgd.iterations)) == (7, 2)  # pylint: disable=protected-access
  lso = keras.optimizers.LossScaleOptimizer(
      keras.optimizers.SGD(0.1, gradient_accumulation_steps=3))
  for g in (1.0, np.inf, 1.0, 1.0):
    lso.apply_gradients([(tf.constant(g), v)])
  inner = lso.inner_optimizer
  assert (int(inner._iterations), int(lso.iterations)) == (3, 1)  # pylint: disable=protected-access
  assert schedules.optimizer_counter(lso) == (inner, 3)


# ------------------------------------------------ AutoAugment inputs
def _augment(x):
  """Stand-in for AutoAugment: an image far from x in L-inf."""
  return (1.0 - x).astype("float32")


def _dict_dataset(x, augmented, y, batch=8):
  return tf.data.Dataset.from_tensor_slices(
      ({"image": x, "augmented": augmented}, y)).batch(batch)


@pytest.mark.parametrize("mode", ["baseline", "conadv_tau1"])
def test_autoaugment_dict_trains_main_route_on_augmented(mode):
  """Default (augmented_route="main"): main BN on "augmented", attack from
  "image" with the stale weights, adv BN on x_adv; equal to the eager loop."""
  adversary = MODES[mode]
  steps = 4
  x, y = _data(steps)
  aug = _augment(x)
  backbone, reference = _backbone(), _backbone()
  _copy_weights(backbone, reference)
  model = _build(backbone, adversary, cls=RecordingConAdv)
  history, recorder = _record_weights(model)
  logs = model.fit(_dict_dataset(x, aug, y), epochs=1, verbose=0,
                   shuffle=False, callbacks=[recorder]).history
  thetas, x_advs = _reference_run(reference, adversary, x, y, augmented=aug)
  _assert_same_run(model, backbone, reference, history, thetas, x_advs, x,
                   adversary)
  assert "aug_loss" not in logs
  if adversary is not None:
    recorded = model.recorded.numpy()[:steps]
    for t in range(steps):
      rows = slice(t * 8, (t + 1) * 8)
      # Within epsilon of the plain image, per image far from the augmented.
      assert np.abs(recorded[t] - x[rows]).max() <= adversary.epsilon + 1e-6
      far = np.abs(recorded[t] - aug[rows]).reshape(8, -1).max(axis=1)
      assert (far > 0.5).all(), far
  # call / predict / evaluate use "image".
  want = model.predict(x, verbose=0)
  np.testing.assert_array_equal(
      model.predict({"image": x, "augmented": aug}, verbose=0), want)
  plain = model.evaluate(_dataset(x, y), verbose=0, return_dict=True)
  dict_results = model.evaluate(_dict_dataset(x, aug, y), verbose=0,
                                return_dict=True)
  assert dict_results == plain


@pytest.mark.parametrize("augmented_route", ["main", "aug"])
def test_autoaugment_dict_several_steps_per_call_equal_one(augmented_route):
  """+AA inputs ({"image", "augmented"}) trained with 2 and 3 steps per call
  end bitwise where one step per call ends: every weight (each BN set with
  its moving statistics), the stale-weight buffer and LARS' slots, and the
  same training loss. The +AA rows run several steps per call
  (train_plan.steps_per_execution_for); tau 2, PGD-2 with random start."""
  adversary = MODES["conadv_tau2_pgd2_targeted"]
  x, y = _data(5)
  aug = _augment(x)
  states, losses = [], []
  for steps_per_execution in (1, 2, 3):  # 5 steps: calls of 2+2+1, 3+2.
    model = conadv_model.ConAdvModel(
        _backbone(augmented=augmented_route == "aug"), adversary=adversary,
        augmented_route=augmented_route)
    model.build((None,) + SHAPE)
    model.compile(optimizer=_lars(),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  steps_per_execution=steps_per_execution)
    history = model.fit(_dict_dataset(x, aug, y), epochs=1, verbose=0,
                        shuffle=False).history
    assert int(model.optimizer.iterations) == 5
    losses.append(history["loss"])
    states.append([v.numpy() for v in model.weights] +
                  [v.numpy() for v in model.schedule.variables] +
                  [v.numpy() for v in model.optimizer.variables])
  assert len(states[0]) == len(states[1]) == len(states[2])
  for other in states[1:]:
    for want, got in zip(states[0], other):
      np.testing.assert_array_equal(got, want)
  assert losses[0] == losses[1] == losses[2]
  # The buffer holds weights other than the current ones (tau 2 is live).
  assert not all(np.array_equal(a, b) for a, b in zip(
      [v.numpy() for v in model.schedule.variables],
      [v.numpy() for v in model.backbone.trainable_variables]))


def test_three_branch_aug_route_equals_reference():
  """augmented_route="aug": main BN on "image", aug BN on "augmented", adv BN
  on x_adv(image), loss = (L_clean + L_aug + L_adv) / 3 (authors' code)."""
  adversary = MODES["conadv_tau1"]
  steps = 4
  x, y = _data(steps)
  aug = _augment(x)
  backbone, reference = _backbone(augmented=True), _backbone(augmented=True)
  _copy_weights(backbone, reference)
  model = _build(backbone, adversary, cls=RecordingConAdv,
                 augmented_route="aug")
  history, recorder = _record_weights(model)
  logs = model.fit(_dict_dataset(x, aug, y), epochs=1, verbose=0,
                   shuffle=False, callbacks=[recorder]).history
  thetas, x_advs = _reference_run(reference, adversary, x, y, augmented=aug,
                                  augmented_route="aug")
  _assert_same_run(model, backbone, reference, history, thetas, x_advs, x,
                   adversary)
  assert set(logs) == {"loss", "clean_loss", "clean_accuracy", "adv_loss",
                       "adv_accuracy", "aug_loss", "aug_accuracy",
                       "sparse_categorical_accuracy"}
  np.testing.assert_allclose(
      logs["loss"], (np.array(logs["clean_loss"]) + logs["aug_loss"]
                     + logs["adv_loss"]) / 3, rtol=1e-5)
  # Every route's moving statistics moved (from their 0 / 1 start).
  routes = {"main": 0, "adv": 0, "aug": 0}
  for v in backbone.non_trainable_variables:
    start = 1.0 if "variance" in v.path else 0.0
    assert not np.allclose(v.numpy(), start), v.path
    route = "adv" if "/adv/" in v.path else (
        "aug" if "/aug/" in v.path else "main")
    routes[route] += 1
  assert routes == {"main": 4, "adv": 4, "aug": 4}


def test_three_branch_export_serialization_and_lars_exclusions(tmp_path):
  x, y = _data(2)
  aug = _augment(x)
  model = _build(_backbone(augmented=True), MODES["conadv_tau1"],
                 augmented_route="aug",
                 optimizer=_lars(weight_decay_rate=1e-4))
  model.fit(_dict_dataset(x, aug, y), verbose=0)
  backbone = model.backbone
  aug_vars = [v for v in backbone.trainable_variables if "/aug/" in v.path]
  assert sorted(v.path.rsplit("/", 1)[1] for v in aug_vars) == [
      "beta", "beta", "gamma", "gamma"]
  # LARS' default exclusions (by variable.path) cover the aug gamma/beta.
  optimizer = model.optimizer
  for v in aug_vars:
    assert not optimizer.use_weight_decay(v.path), v.path
    assert not optimizer.do_layer_adaptation(v.path), v.path
  flags = dict(zip([v.path for v in model.trainable_variables],
                   optimizer._decay_flags))  # pylint: disable=protected-access
  assert not any(flags[v.path] for v in aug_vars)
  assert flags[backbone.convs[0].kernel.path]

  # Export: exactly the main-route variables.
  exported = model.inference_model()
  main = [v for v in backbone.weights
          if "/adv/" not in v.path and "/aug/" not in v.path]
  assert [v.path.split("/", 1)[1] for v in exported.weights] == [
      v.path.split("/", 1)[1] for v in main]
  for got, want in zip(exported.weights, main):
    np.testing.assert_array_equal(got.numpy(), want.numpy())
  np.testing.assert_allclose(exported(x, training=False),
                             backbone(x, training=False, bn_route="main"),
                             atol=1e-6)

  # Serialization round trip keeps augmented_route and the aug BN set.
  config = model.get_config()
  assert config["augmented_route"] == "aug"
  clone = conadv_model.ConAdvModel.from_config(config)
  assert clone.augmented_route == "aug" and clone.backbone.augmented_bn
  assert clone.get_config() == config
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert loaded.augmented_route == "aug"
  for a, b in zip(loaded.backbone.weights, backbone.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  np.testing.assert_allclose(
      loaded.backbone(x, training=False, bn_route="aug"),
      backbone(x, training=False, bn_route="aug"), atol=1e-6)


class _GenericBackbone(keras.Model):
  """A backbone of the contract that is not one of ours (no augmented_bn)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.conv = keras.layers.Conv2D(4, 3, padding="same")
    self.bn = dual_batch_norm.DualBatchNormalization()
    self.pool = keras.layers.GlobalAveragePooling2D()
    self.head = keras.layers.Dense(NUM_CLASSES)

  def call(self, images, training=None, bn_route="main"):
    x = self.bn(self.conv(images), training=training, bn_route=bn_route)
    return self.head(self.pool(keras.ops.relu(x)))


def test_three_branch_errors():
  with pytest.raises(ValueError, match=r"augmented_route='aug' needs .*"
                     r"'aug' BN route"):
    conadv_model.ConAdvModel(_backbone(), augmented_route="aug")
  generic = conadv_model.ConAdvModel(_GenericBackbone(name="generic"),
                                     adversary=MODES["conadv_tau1"],
                                     augmented_route="aug")
  with pytest.raises(ValueError, match=r"augmented_route='aug' needs"):
    generic.build((None,) + SHAPE)
  with pytest.raises(ValueError, match="augmented_route"):
    conadv_model.ConAdvModel(_backbone(), augmented_route="third")
  x, y = _data(1)
  model = _build(_backbone(augmented=True), MODES["conadv_tau1"],
                 augmented_route="aug")
  with pytest.raises(ValueError, match=r"augmented_route='aug' trains on"):
    model.fit(_dataset(x, y), verbose=0)
  with pytest.raises(ValueError, match="'augmented'"):
    model.fit(tf.data.Dataset.from_tensor_slices(({"image": x}, y)).batch(8),
              verbose=0)


# ------------------------------------------------ weighted evaluation
@pytest.mark.parametrize("labels", ["sparse", "one_hot_smoothed"])
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_weighted_evaluation_scores_every_real_image_once(strategy_name,
                                                          labels):
  """(images, labels, weights) with zero-weight padding rows gives exactly
  the unpadded numbers, and `examples` = the number of real images."""
  real, pad = 21, 3  # batches of 8: unpadded 8 + 8 + 5, padded 8 + 8 + 8
  x, y = _data(3)
  x, y = x[:real], y[:real]
  garbage = np.stack([np.zeros(SHAPE), np.full(SHAPE, 1e4),
                      np.full(SHAPE, np.nan)]).astype("float32")
  x_pad = np.concatenate([x, garbage])
  y_pad = np.concatenate([y, np.zeros(pad, "int32")])
  w_pad = np.concatenate([np.ones(real), np.zeros(pad)]).astype("float32")
  if labels == "sparse":
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
               keras.metrics.SparseTopKCategoricalAccuracy(2, name="top2")]
    targets, targets_pad = y, y_pad
  else:
    loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                label_smoothing=0.1)
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
               keras.metrics.TopKCategoricalAccuracy(2, name="top2")]
    targets = np.eye(NUM_CLASSES, dtype="float32")[y]
    targets_pad = np.eye(NUM_CLASSES, dtype="float32")[y_pad]
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    # Synchronized BN: unsynchronized moving statistics differ between
    # Mirrored replicas, so a score would depend on which replica got the row.
    model = _build(_backbone(synchronized=True), MODES["conadv_tau1"],
                   loss=loss, metrics=metrics)
  padded_ds = tf.data.Dataset.from_tensor_slices(
      (x_pad, targets_pad, w_pad)).batch(8)
  # One epoch for non-trivial weights and BN statistics, validating on the
  # padded set (fit's validation goes through the same evaluate).
  history = model.fit(_dataset(x[:16], targets[:16]), verbose=0,
                      validation_data=padded_ds).history
  unpadded = model.evaluate(_dataset(x, targets), verbose=0,
                            return_dict=True)
  padded = model.evaluate(padded_ds, verbose=0, return_dict=True)
  assert "examples" not in history and history["val_examples"] == [real]
  np.testing.assert_allclose(history["val_loss"], [padded["loss"]],
                             rtol=1e-6)
  assert history["val_accuracy"] == [padded["accuracy"]]
  assert set(padded) == {"loss", "accuracy", "top2", "examples"}
  assert padded["examples"] == unpadded["examples"] == float(real)
  assert padded["accuracy"] == unpadded["accuracy"]
  assert padded["top2"] == unpadded["top2"]
  np.testing.assert_allclose(padded["loss"], unpadded["loss"], rtol=1e-6)

  # And they are the true numbers over the 21 images.
  logits = model.predict(x, batch_size=8, verbose=0).astype("float64")
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  smoothing = 0.0 if labels == "sparse" else 0.1
  soft = (np.eye(NUM_CLASSES)[y] * (1 - smoothing) + smoothing / NUM_CLASSES)
  np.testing.assert_allclose(padded["loss"], -(soft * log_p).sum(1).mean(),
                             rtol=1e-5)
  ranks = (logits > logits[np.arange(real), y][:, None]).sum(1)
  np.testing.assert_allclose(padded["accuracy"], (ranks == 0).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(padded["top2"], (ranks < 2).mean(), rtol=1e-6)


@pytest.mark.parametrize("strategy_name", ["one_device", "mirrored"])
def test_fit_reads_the_dataset_once_when_built(strategy_name):
  """After the first fit/evaluate built everything, a later fit or evaluate
  under a strategy produces each element of its dataset exactly once (Keras
  would otherwise start a second iterator to peek at a batch)."""
  x, y = _data(4)
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    model = _build(_backbone(synchronized=True),
                   conadv_model.AdversaryConfig(delay=1, random_init=False))
  model.fit(_dataset(x, y), epochs=1, verbose=0)
  model.evaluate(_dataset(x, y), verbose=0)
  produced = []

  def count(images, labels):
    def tick(n):
      produced.append(int(n))
      return n
    n = tf.py_function(tick, [tf.shape(images)[0]], tf.int32)
    with tf.control_dependencies([n]):
      return tf.identity(images), labels

  model.fit(_dataset(x, y).map(count), epochs=1, verbose=0)
  assert sum(produced) == len(x)
  produced.clear()
  model.evaluate(_dataset(x, y).map(count), verbose=0)
  assert sum(produced) == len(x)
