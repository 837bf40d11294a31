"""Tests for ConAdvModel: the three modes against hand-written reference loops,
the stale-weight ring buffer, strategies, serialization and export."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from official_conadv.adversarial import attacks
from official_conadv.modeling import conadv_model
from official_conadv.modeling import small_cnn
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


def _backbone(synchronized=False, seed=1):
  keras.utils.set_random_seed(seed)
  model = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8),
                             synchronized_bn=synchronized)
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
           optimizer=None, loss=None, metrics=("sparse_categorical_accuracy",)):
  model = cls(backbone, adversary=adversary)
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


def _reference_run(backbone, adversary, x, y, batch=8):
  """Plain eager loop of paper Algorithm 1 with SGD, no ConAdvModel code.

  The attack's stale network is a separate copy of the backbone whose weights
  are set to theta_{t - tau} (current moving statistics), run in training
  mode on the adversarial BN.
  """
  attacker = small_cnn.SmallCNN.from_config(backbone.get_config())
  attacker(tf.zeros((1,) + SHAPE))
  thetas, x_advs = [], []
  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  for t in range(len(x) // batch):
    xb, yb = x[t * batch:(t + 1) * batch], y[t * batch:(t + 1) * batch]
    thetas.append([v.numpy() for v in backbone.trainable_variables])
    loss_fn = lambda: ce(yb, backbone(xb, training=True, bn_route="main"))
    if adversary is not None:
      stale = thetas[max(t - adversary.delay, 0)]
      for v, value in zip(attacker.trainable_variables, stale):
        v.assign(value)
      for v, src in zip(attacker.non_trainable_variables,
                        backbone.non_trainable_variables):
        v.assign(src)
      seed = tf.random.experimental.stateless_fold_in(
          tf.constant([adversary.seed, t]), 0)
      x_adv = attacks.pgd_attack(
          lambda z: attacker(z, training=True, bn_route="adv"), xb, yb,
          adversary.attack, seed=seed,
          batch_seed=tf.constant([adversary.seed, t]) + 1).numpy()
      x_advs.append(x_adv)
      clean_fn = loss_fn
      loss_fn = lambda: clean_fn() + ce(
          yb, backbone(x_adv, training=True, bn_route="adv"))
    with tf.GradientTape() as tape:
      loss = loss_fn()
    grads = tape.gradient(loss, backbone.trainable_variables)
    for g, v in zip(grads, backbone.trainable_variables):
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
    for buf, want in zip(model.stale_slot(slot), history[k]):
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
  assert set(results) == {"loss", "sparse_categorical_accuracy"}
  preds = model.predict(x, batch_size=8, verbose=0)
  assert preds.shape == (16, NUM_CLASSES)


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
  for a, b in zip(model.stale_slot(1) + model.stale_slot(0),
                  other.stale_slot(1) + other.stale_slot(0)):
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
