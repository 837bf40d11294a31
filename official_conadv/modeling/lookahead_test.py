"""Tests of the lookahead schedule (`AdversaryConfig(schedule="lookahead")`).

Lookahead attacks batch t + tau with theta_t and trains on batch t with the
examples made tau steps earlier; the delayed schedule attacks batch t with
theta_{t - tau}. Same data order and seeds => the same weights: these tests
compare the two bit for bit (and with conadv_model_test's hand-written
reference loop), on the default strategy, one device and 2-replica Mirrored,
across fit calls and across a checkpoint and restore.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv.modeling import conadv_model
from official_conadv.modeling import conadv_model_test as cmt
from official_conadv.modeling import keras_compat
from official_conadv.testing import strategies

STEPS = 7  # >= 2 * tau + 3 for tau = 1, 2.
ADVERSARY = conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05,
                                         steps=2, random_init=True, seed=3)


def _adversary(tau, schedule):
  return dataclasses.replace(ADVERSARY, delay=tau, schedule=schedule)


def _dataset(x, y):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(
      8, drop_remainder=True)


def _model(strategy_name, tau, schedule, synchronized=True):
  with strategies.get(strategy_name).scope():
    backbone = cmt._backbone(synchronized=synchronized)  # pylint: disable=protected-access
    model = conadv_model.ConAdvModel(backbone,
                                     adversary=_adversary(tau, schedule))
    model.compile(optimizer=keras.optimizers.SGD(cmt.LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  return model


def _weights(model):
  return [v.numpy() for v in model.backbone.weights]


def _max_difference(a, b):
  return max(float(np.abs(p - q).max()) for p, q in zip(a, b))


@pytest.mark.parametrize("strategy_name", strategies.NAMES)
@pytest.mark.parametrize("tau", [1, 2])
def test_lookahead_equals_delayed(strategy_name, tau):
  """Every weight (BN statistics included) equal after 2 epochs of 7
  steps; lookahead keeps no weight copies and tau queue slots per replica
  of (x, x_adv, y) instead."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  results = {}
  for schedule in conadv_model.SCHEDULES:
    model = _model(strategy_name, tau, schedule)
    model.fit(_dataset(x, y), epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2 * STEPS
    results[schedule] = (model, _weights(model))
  delayed, lookahead = results["delayed"][0], results["lookahead"][0]
  assert _max_difference(results["delayed"][1], results["lookahead"][1]) == 0
  per_replica = 8 // delayed.distribute_strategy.num_replicas_in_sync
  assert len(delayed.schedule.variables) == tau * len(
      delayed.backbone.trainable_variables)
  assert not hasattr(lookahead.schedule, "buffer")  # No weight copies.
  assert len(lookahead.schedule.variables) == 3 * tau
  assert tuple(lookahead.schedule.slot(0)[0].shape) == (per_replica,) + cmt.SHAPE
  assert tuple(lookahead.schedule.slot(0)[2].shape) == (per_replica,)


@pytest.mark.parametrize("tau", [1, 2])
def test_lookahead_equals_the_hand_written_reference(tau):
  """conadv_model_test's reference loop (attack batch t from theta_{t-tau},
  theta_0 while t < tau) gives the lookahead run's weights at every step."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  model = _model("default", tau, "lookahead", synchronized=False)
  reference = cmt._backbone()  # pylint: disable=protected-access
  cmt._copy_weights(model.backbone, reference)  # pylint: disable=protected-access
  history, recorder = cmt._record_weights(model)  # pylint: disable=protected-access
  model.fit(_dataset(x, y), epochs=1, verbose=0, callbacks=[recorder])
  thetas, _ = cmt._reference_run(reference, _adversary(tau, "delayed"), x, y)  # pylint: disable=protected-access
  for t in range(STEPS):
    for got, want in zip(history[t], thetas[t]):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5,
                                 err_msg=f"step {t}")
  for got, want in zip(model.backbone.weights, reference.weights):
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5,
                               rtol=1e-5, err_msg=got.path)


def test_the_comparison_detects_a_wrong_schedule():
  """Attacking batch t + tau with the seed of step t (not t + tau) changes
  the weights: equality above is not trivial."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  delayed = _model("default", 2, "delayed")
  delayed.fit(_dataset(x, y), epochs=1, verbose=0)

  class WrongSeed(conadv_model.ConAdvModel):

    def adversarial_examples(self, images, labels, step, weights=None):
      if weights is not None:
        step = step - self.delay
      return super().adversarial_examples(images, labels, step, weights)

  backbone = cmt._backbone(synchronized=True)  # pylint: disable=protected-access
  wrong = WrongSeed(backbone, adversary=_adversary(2, "lookahead"))
  wrong.compile(optimizer=keras.optimizers.SGD(cmt.LR),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  wrong.fit(_dataset(x, y), epochs=1, verbose=0)
  assert _max_difference(_weights(delayed), _weights(wrong)) > 1e-4


@pytest.mark.parametrize("strategy_name, tau", [("default", 1),
                                                ("default", 2),
                                                ("mirrored", 2)])
def test_fit_calls_and_restore_continue_exactly(strategy_name, tau,
                                                tmp_path):
  """fit(epochs=1) twice, and fit(epochs=1) + checkpoint + a new model
  restored from it + fit(epochs=1), both equal fit(epochs=2): the queue
  (every replica's slots) and its ready flag are restored with the model."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  ds = _dataset(x, y)
  want = _model(strategy_name, tau, "lookahead")
  want.fit(ds, epochs=2, verbose=0)
  twice = _model(strategy_name, tau, "lookahead")
  twice.fit(ds, epochs=1, verbose=0)
  path = tf.train.Checkpoint(model=twice, optimizer=twice.optimizer).save(
      str(tmp_path / "ckpt"))
  twice.fit(ds, epochs=1, verbose=0)
  assert _max_difference(_weights(want), _weights(twice)) == 0

  restored = _model(strategy_name, tau, "lookahead")
  with restored.distribute_strategy.scope():
    restored.build((None,) + cmt.SHAPE)
    restored.optimizer.build(restored.trainable_variables)
  tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(
      path)
  assert int(restored.schedule.ready.numpy()) == 1
  restored.fit(ds, epochs=1, verbose=0)
  assert _max_difference(_weights(want), _weights(restored)) == 0


def _per_replica_stream(strategy, x, y, start, steps):
  """Global batches start..start+steps-1 of `_dataset(x, y)` (wrapping
  around like `repeat`) as `distribute_datasets_from_function` gives them to
  the trainer: each replica's share in order."""
  local = 8 // strategy.num_replicas_in_sync
  order = [(start + t) % STEPS for t in range(steps)]
  xs = np.concatenate([x[8 * b:8 * b + 8] for b in order])
  ys = np.concatenate([y[8 * b:8 * b + 8] for b in order])
  return strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensor_slices((xs, ys)).batch(
          local, drop_remainder=True))


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_stream_fed_ahead_equals_fit(strategy_name):
  """The trainer's way: `schedule.fill` with batches 0..tau-1, then
  loops of `fit(stream from begin + tau, input_is_ahead=True)` over
  distributed datasets, split 3 + 6 + 5 steps: the same weights as one
  `fit` of the dataset for 2 epochs (tau 2, loops cross the epoch)."""
  tau = 2
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  want = _model(strategy_name, tau, "lookahead")
  want.fit(_dataset(x, y), epochs=2, verbose=0)
  model = _model(strategy_name, tau, "lookahead")
  strategy = model.distribute_strategy
  assert not model.schedule.filled
  model.schedule.fill(_per_replica_stream(strategy, x, y, 0, tau))
  assert model.schedule.filled
  for begin, end in ((0, 3), (3, 9), (9, 14)):
    model.fit(_per_replica_stream(strategy, x, y, begin + tau, end - begin),
              steps_per_epoch=end - begin, verbose=0, input_is_ahead=True)
    assert int(model.optimizer.iterations.numpy()) == end
  assert _max_difference(_weights(want), _weights(model)) == 0


def test_input_is_ahead_errors():
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  model = _model("default", 1, "lookahead")
  with pytest.raises(ValueError, match="needs a filled lookahead queue"):
    model.fit(_dataset(x, y), verbose=0, input_is_ahead=True)
  assert int(model.optimizer.iterations.numpy()) == 0
  delayed = _model("default", 1, "delayed")
  with pytest.raises(ValueError, match="input_is_ahead=True is for"):
    delayed.fit(_dataset(x, y), verbose=0, input_is_ahead=True)
  assert not hasattr(delayed.schedule, "fill")  # Nothing to fill.
  with pytest.raises(ValueError, match="needs at least tau=2"):
    _model("default", 2, "lookahead").schedule.fill(
        _dataset(x, y).take(1))


def test_restore_without_this_workers_slots_is_refused(monkeypatch,
                                                       tmp_path):
  """Under MultiWorkerMirrored each worker saves its own replicas' queue
  slots (named by global replica index). Restoring a checkpoint that marks
  the queue filled but holds none of this worker's slots (another worker's
  checkpoint) must fail in one line, not train on zeros."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  saved = _model("default", 1, "lookahead")
  saved.fit(_dataset(x, y), epochs=1, verbose=0)
  names = [name for name in saved.schedule.checkpoint_children()
           if name.startswith("lookahead_queue/")]
  assert names == [f"lookahead_queue/{i}/replica0" for i in range(3)]
  path = tf.train.Checkpoint(model=saved).save(str(tmp_path / "ckpt"))

  monkeypatch.setattr(keras_compat, "worker_index", lambda strategy: 1)
  other = _model("default", 1, "lookahead")
  other.build((None,) + cmt.SHAPE)
  tf.train.Checkpoint(model=other).restore(path).expect_partial()
  assert other.schedule.filled
  with pytest.raises(ValueError, match="replica1.*its own checkpoint"):
    other.fit(_dataset(x, y), verbose=0)
  assert int(other.optimizer.iterations.numpy()) == STEPS  # No step ran.
  monkeypatch.setattr(keras_compat, "worker_index", lambda strategy: 0)
  same = _model("default", 1, "lookahead")
  same.build((None,) + cmt.SHAPE)
  tf.train.Checkpoint(model=same).restore(path).expect_partial()
  same.fit(_dataset(x, y), epochs=1, verbose=0)  # Its own slots: fine.


def test_lookahead_input_errors():
  x, y = cmt._data(2)  # pylint: disable=protected-access
  model = _model("default", 1, "lookahead")
  with pytest.raises(ValueError, match="batched tf.data.Dataset"):
    model.fit(list(x), verbose=0)
  with pytest.raises(ValueError, match="not a multiple of batch_size=8"):
    model.fit(x[:12], y[:12], batch_size=8, verbose=0)
  # A short batch later in the stream: refused when it is read, in one line
  # naming the step and the sizes; the step trains nothing (Keras' counter
  # increment does not wait for the data, so TF may still count it: the
  # trainer saves nothing after an error).
  short = tf.data.Dataset.from_tensor_slices((x[:12], y[:12])).batch(8)
  model.build((None,) + cmt.SHAPE)
  before = _weights(model)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"keeps full batches of\] \[8\] \[examples; the "
                     r"batch read at step\] \[0\] .* has\] \[4\]"):
    model.fit(short, verbose=0)
  assert _max_difference(before, _weights(model)) == 0
  with pytest.raises(ValueError, match="augmented_route='aug'"):
    conadv_model.ConAdvModel(cmt._backbone(augmented=True),  # pylint: disable=protected-access
                             adversary=_adversary(1, "lookahead"),
                             augmented_route="aug")
  with pytest.raises(ValueError, match="`schedule` must be one of"):
    conadv_model.AdversaryConfig(schedule="ahead")
  fresh = _model("default", 1, "lookahead")
  fresh.build((None,) + cmt.SHAPE)
  with pytest.raises(ValueError, match="the example queue is empty"):
    fresh.train_on_batch(x[:8], y[:8])


def test_lookahead_takes_what_delayed_takes():
  """A dataset batched without drop_remainder (batch dimension unknown,
  every batch full), repeated, and numpy arrays through
  fit(x, y, batch_size): lookahead trains exactly as delayed (shuffle=False
  gives both the same order)."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  repeated = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
  assert repeated.element_spec[0].shape[0] is None
  feeds = {
      "dataset": lambda m: m.fit(repeated, steps_per_epoch=STEPS, epochs=2,
                                 verbose=0),
      "numpy": lambda m: m.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                               verbose=0),
  }
  for name, feed in feeds.items():
    weights = {}
    for schedule in conadv_model.SCHEDULES:
      model = _model("default", 2, schedule)
      feed(model)
      assert int(model.optimizer.iterations.numpy()) == 2 * STEPS, name
      weights[schedule] = _weights(model)
    assert _max_difference(weights["delayed"], weights["lookahead"]) == 0, (
        name)


def test_lookahead_numpy_shuffle_continues_across_fit_calls():
  """Numpy inputs shuffled per epoch (stateless seeds): two fit calls of
  one epoch equal one fit of two epochs, and the order is not the
  unshuffled one."""
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  once = _model("default", 2, "lookahead")
  once.fit(x, y, batch_size=8, epochs=2, verbose=0)
  twice = _model("default", 2, "lookahead")
  twice.fit(x, y, batch_size=8, epochs=1, verbose=0)
  twice.fit(x, y, batch_size=8, epochs=1, verbose=0)
  assert int(twice.optimizer.iterations.numpy()) == 2 * STEPS
  assert _max_difference(_weights(once), _weights(twice)) == 0
  ordered = _model("default", 2, "lookahead")
  ordered.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
  assert _max_difference(_weights(once), _weights(ordered)) > 1e-4


@pytest.mark.parametrize("options", [
    {"steps_per_execution": 3}, {"jit_compile": True},
    {"jit_compile": True, "steps_per_execution": 4},
    {"policy": "mixed_bfloat16"}])
def test_lookahead_equals_delayed_compiled(options):
  """Several steps per call, XLA (the queue is filled by an XLA-compiled
  attack too: XLA draws other random numbers than plain TF on CPU) and
  bfloat16: still bitwise equal to the delayed schedule (tau 2)."""
  options = dict(options)
  policy = options.pop("policy", None)
  x, y = cmt._data(STEPS)  # pylint: disable=protected-access
  previous = keras.mixed_precision.global_policy()
  if policy:
    keras.mixed_precision.set_global_policy(policy)
  try:
    weights = {}
    for schedule in conadv_model.SCHEDULES:
      backbone = cmt._backbone()  # pylint: disable=protected-access
      model = conadv_model.ConAdvModel(backbone,
                                       adversary=_adversary(2, schedule))
      model.compile(optimizer=keras.optimizers.SGD(cmt.LR),
                    loss=keras.losses.SparseCategoricalCrossentropy(
                        from_logits=True), **options)
      model.fit(_dataset(x, y), epochs=2, verbose=0)
      weights[schedule] = _weights(model)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert _max_difference(weights["delayed"], weights["lookahead"]) == 0
