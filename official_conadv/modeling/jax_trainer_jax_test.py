"""ConAdvModel on Keras' JAX backend (`jax_trainer.py`): schedules, saving,
evaluation, the input errors, and a JAX path that never imports TensorFlow.
Cross-backend equality: cross_backend_jax_test.py; several devices:
data_parallel_jax_test.py."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from official_conadv.testing import backend_runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


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


# Runs with TensorFlow made unimportable: every model kind through compile,
# fit, evaluate, predict and inference_model on JAX.
NO_TENSORFLOW = textwrap.dedent("""
    import sys

    class Block:
      def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          raise ImportError("TensorFlow is blocked in this test: " + name)

    sys.meta_path.insert(0, Block())
    import json
    import keras
    import numpy as np
    from official_conadv.adversarial import schedules
    from official_conadv.modeling import conadv_model, convert, resnet
    from official_conadv.modeling import small_cnn
    from official_conadv.optimization import lars, lr_schedules

    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 5, 16).astype("int32")
    backbones = {
        "small_cnn": lambda: small_cnn.SmallCNN(5, filters=(4, 8)),
        "resnet": lambda: resnet.ResNet(depth=18, num_classes=5,
                                        variant="cifar", width=8),
        "mobilenet_v3_small": lambda: convert.dual_bn_backbone(
            keras.applications.MobileNetV3Small(
                weights=None, input_shape=(32, 32, 3), classes=5,
                classifier_activation=None, include_preprocessing=False)),
    }
    runs = [("small_cnn", "delayed"), ("small_cnn", "lookahead"),
            ("resnet", "delayed"), ("mobilenet_v3_small", "lookahead")]
    out = {}
    for name, schedule in runs:
      make = backbones[name]
      model = conadv_model.ConAdvModel(
          make(), adversary=schedules.AdversaryConfig(
              delay=1, schedule=schedule, steps=2))
      model.compile(
          optimizer=lars.LARS(lr_schedules.WarmupPolynomialDecay(
              0.1, total_steps=6, warmup_steps=1), momentum=0.9),
          loss=keras.losses.SparseCategoricalCrossentropy(
              from_logits=True), metrics=["accuracy"])
      history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                          verbose=0)
      logs = model.evaluate(x, y, batch_size=8, verbose=0,
                            return_dict=True)
      logits = model.predict(x, batch_size=8, verbose=0)
      export = model.inference_model()
      exported = np.asarray(export(x, training=False))
      # The export holds copies: training on does not free its arrays
      # (JAX's fit donates the model's buffers).
      model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
      again = np.asarray(export(x, training=False))
      out[f"{name}/{schedule}"] = {
          "steps": int(model.optimizer.iterations),
          "loss": history.history["loss"],
          "examples": float(logs["examples"]),
          "export_diff": float(np.abs(exported - logits).max()),
          "export_weights": len(export.weights),
          "finite": bool(np.isfinite(logits).all()),
          "export_kept": bool(np.array_equal(exported, again)),
      }
    out["tensorflow_loaded"] = sorted(
        m for m in sys.modules if m == "tensorflow" or
        m.startswith("tensorflow."))
    print("RESULT " + json.dumps(out))
""")


def test_jax_path_never_imports_tensorflow():
  """SmallCNN (delayed and lookahead), ResNet (delayed) and a converted
  keras.applications model (lookahead), all dual BN with PGD-2 and LARS,
  train, evaluate, predict and export with TensorFlow unimportable, and no
  tensorflow module gets loaded."""
  env = dict(os.environ, KERAS_BACKEND="jax",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-4000:]
  line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  import json  # pylint: disable=g-import-not-at-top
  result = json.loads(line[-1][len("RESULT "):])
  assert result.pop("tensorflow_loaded") == []
  assert len(result) == 4
  for name, run in result.items():
    assert run["steps"] == 6, name
    assert run["export_kept"], name
    assert run["examples"] == 16.0, name
    assert run["finite"], name
    assert all(np.isfinite(run["loss"])), name
    # The export (main BN only) predicts what the model predicts.
    assert run["export_diff"] <= 1e-5, (name, run["export_diff"])
