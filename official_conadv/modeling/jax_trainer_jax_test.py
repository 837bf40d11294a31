"""ConAdvModel on Keras' JAX backend (`jax_trainer.py`): schedules, saving,
evaluation, the input errors. Cross-backend equality:
cross_backend_jax_test.py; several devices: data_parallel_jax_test.py; no
TensorFlow import: no_tensorflow_jax_test.py."""

import keras
import numpy as np
import pytest

from official_conadv.testing import backend_runs

def _worst(steps_a, steps_b):
  return max(float(np.abs(x - y).max())
             for a, b in zip(steps_a, steps_b) for x, y in zip(a, b))


@pytest.mark.parametrize("tau", [1, 2])
def test_lookahead_equals_delayed(tau):
  """Algorithm 1 as written (attack batch t + tau with theta_t, a queue)
  and the ring buffer of stale weights train the same weights from the same
  numpy arrays, step for step (measured bitwise; asserted to 1e-6), with
  the attack's noise on (seeded by the batch's step in both)."""
  steps = 6
  delayed = backend_runs.train(tau, "delayed", steps=steps, random_init=True)
  lookahead = backend_runs.train(tau, "lookahead", steps=steps,
                                 random_init=True)
  assert len(delayed) == len(lookahead) == steps
  assert _worst(delayed, lookahead) <= 1e-6
  # Not trivially equal: tau 1 and tau 2 differ.
  if tau == 2:
    other = backend_runs.train(1, "delayed", steps=steps, random_init=True)
    assert _worst(delayed, other) > 1e-3


def _fit_steps(model, x, y, steps, start=0):
  model.fit(x[start * backend_runs.BATCH:(start + steps) * backend_runs.BATCH],
            y[start * backend_runs.BATCH:(start + steps) * backend_runs.BATCH],
            batch_size=backend_runs.BATCH, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("delay,schedule", [(None, "delayed"),
                                            (2, "delayed"),
                                            (2, "lookahead")])
def test_keras_file_save_and_load_continues_exactly(delay, schedule,
                                                    tmp_path):
  """2 steps, `model.save` (.keras: config, weights with the stale-weight
  buffer or the lookahead queue, optimizer state),
  `keras.saving.load_model`, 2 more steps == 4 steps in one go, bit for
  bit; the loaded model's evaluation too."""
  x, y = backend_runs.data()
  straight = backend_runs.make_model(delay, schedule, random_init=True)
  _fit_steps(straight, x, y, 4)

  first = backend_runs.make_model(delay, schedule, random_init=True)
  if schedule == "lookahead":
    # The lookahead input runs tau batches ahead through the whole arrays:
    # the first 2 steps of the same 4-batch epoch.
    first.fit(x, y, batch_size=backend_runs.BATCH, epochs=1, shuffle=False,
              verbose=0, steps_per_epoch=2)
  else:
    _fit_steps(first, x, y, 2)
  path = str(tmp_path / "model.keras")
  first.save(path)
  loaded = keras.saving.load_model(path)
  assert int(loaded.optimizer.iterations) == 2
  if schedule == "lookahead":
    assert loaded.schedule.filled
    # Stored, not refilled: batches 2 and 3 with theta_0, theta_1 (a refill
    # would attack them with theta_2).
    for a, b in zip(first.schedule.variables, loaded.schedule.variables):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The lookahead input continues from the model's step.
    loaded.fit(x, y, batch_size=backend_runs.BATCH, epochs=1, shuffle=False,
               verbose=0, steps_per_epoch=2)
  else:
    _fit_steps(loaded, x, y, 2, start=2)
  assert int(loaded.optimizer.iterations) == 4
  for a, b in zip(straight.get_weights(), loaded.get_weights()):
    np.testing.assert_array_equal(a, b)
  # The .keras file held the ring buffer (tau slots of the trainable
  # weights) or the queue (tau slots of x, x_adv, y), not only the backbone.
  extra = 0 if delay is None else (
      delay * len(straight.backbone.trainable_weights)
      if schedule == "delayed" else 3 * delay + 1)
  assert len(loaded.get_weights()) == len(
      loaded.backbone.get_weights()) + extra
  np.testing.assert_array_equal(
      straight.evaluate(x, y, verbose=0), loaded.evaluate(x, y, verbose=0))


def test_generator_input_trains_as_numpy_arrays():
  """A Python generator of (images, labels) batches feeds `fit` on JAX and
  trains the same weights as the same batches from numpy arrays."""
  x, y = backend_runs.data()
  arrays = backend_runs.make_model(1, random_init=True)
  _fit_steps(arrays, x, y, 4)
  generated = backend_runs.make_model(1, random_init=True)

  def batches():
    for i in range(4):
      rows = slice(i * backend_runs.BATCH, (i + 1) * backend_runs.BATCH)
      yield x[rows], y[rows]

  generated.fit(batches(), epochs=1, steps_per_epoch=4, verbose=0)
  assert int(generated.optimizer.iterations) == 4
  for a, b in zip(arrays.get_weights(), generated.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_evaluate_scores_weighted_examples_once():
  """Padding rows (weight 0, NaN images) never reach loss or metrics; the
  loss is sum(w * loss_i) / sum(w) over all batches, `examples` sum(w)."""
  model = backend_runs.make_model(1)
  x, y = backend_runs.data(24)
  w = np.ones(24, "float32")
  w[-5:] = 0.0
  x_padded = x.copy()
  x_padded[-5:] = np.nan
  logs = model.evaluate(x_padded, y, sample_weight=w, batch_size=8,
                        verbose=0, return_dict=True)
  logits = model.predict(x[:-5], verbose=0)
  want = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      y[:-5], logits)
  assert logs["examples"] == 19.0
  np.testing.assert_allclose(logs["loss"], float(want), rtol=1e-5)
  np.testing.assert_allclose(
      logs["accuracy"], np.mean(np.argmax(logits, -1) == y[:-5]), rtol=1e-6)


def test_lookahead_input_errors_are_one_line():
  model = backend_runs.make_model(1, "lookahead")
  x, y = backend_runs.data(20)
  with pytest.raises(ValueError, match=r"not a multiple of batch_size=8"):
    model.fit(x, y, batch_size=8, verbose=0)
  with pytest.raises(ValueError, match=r"numpy arrays x, y"):
    model.fit(list(x), list(y), batch_size=4, verbose=0)
  with pytest.raises(ValueError, match=r"does not take `sample_weight`"):
    model.fit(x[:16], y[:16], batch_size=8, verbose=0,
              sample_weight=np.ones(16))


def test_private_keras_names_the_jax_path_relies_on():
  """Pins the Keras internals jax_trainer.py and schedules.py read, so an
  upgrade that moves them fails here, not in a run."""
  model = backend_runs.make_model(1, "lookahead")
  tracker = model._tracker  # pylint: disable=protected-access
  assert tracker.locked  # Built: Keras locks the state; the queue unlocks.
  tracker.unlock()
  assert not tracker.locked
  tracker.lock()
  assert isinstance(model._trainable_variables, list)  # pylint: disable=protected-access
  assert isinstance(model._non_trainable_variables, list)  # pylint: disable=protected-access
  assert callable(model._symbolic_build)  # pylint: disable=protected-access
  assert callable(model._track_variable)  # pylint: disable=protected-access
  scope = keras.StatelessScope(state_mapping=[])
  assert callable(scope.get_current_value)
