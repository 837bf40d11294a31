"""Backward compatibility: checkpoints written by an older commit
(testdata/compat/, see its README.md) restore with today's code and continue
to the weights the old code reached.

For each schedule (delayed, lookahead; tau = 2):

* a tiny ConAdvModel checkpoint (`tf.train.Checkpoint(model, optimizer)`
  after 3 `fit` steps): restored into a freshly built model it holds the
  stored step-3 weights and optimizer state, and a second `fit` ends with the
  stored step-6 ones;
* a trainer model_dir (`train_lib.run`, 6 steps in loops of 3, stopped after
  step 3): a rerun of the same config resumes at step 3 and ends with the
  weights of the uninterrupted run.

Only public entry points (ConAdvModel, compile, fit, tf.train.Checkpoint,
train_lib.run, configs); weights are compared by index in `model.weights`
and `model.optimizer.variables`.
"""

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv import train_lib
from official_conadv.testing import testdata
from testdata import make_compat_fixtures as fixtures

ATOL = 1e-6


def _assert_state(model, stored, prefix, atol=ATOL):
  """model.weights and model.optimizer.variables equal `stored` (an npz of
  `fixtures.state`) under `prefix`, by index."""
  names = {"weights": list(stored["paths/weights"]),
           "optimizer": list(stored["paths/optimizer"])}
  for kind, variables in (("weights", model.weights),
                          ("optimizer", model.optimizer.variables)):
    want = sorted((k for k in stored.files if k.startswith(f"{prefix}{kind}/")),
                  key=lambda k: int(k.rsplit("/", 1)[1]))
    assert len(variables) == len(want), (
        f"{prefix}{kind}: {len(variables)} variables now, {len(want)} in the "
        f"fixture ({[v.path for v in variables]} vs {names[kind]})")
    for i, v in enumerate(variables):
      expected = stored[f"{prefix}{kind}/{i}"]
      got = v.numpy()
      msg = f"{prefix}{kind}/{i}: {v.path} (fixture: {names[kind][i]})"
      assert got.shape == expected.shape, msg
      np.testing.assert_allclose(got, expected, rtol=0, atol=atol,
                                 err_msg=msg)
  assert int(model.optimizer.iterations.numpy()) == int(
      stored[f"{prefix}iterations"])


@pytest.mark.parametrize("schedule", fixtures.SCHEDULES)
def test_model_checkpoint_restores_and_continues(schedule):
  stored = np.load(testdata.compat(f"model_{schedule}.npz"))
  prefix = testdata.compat(f"model_{schedule}_step3.index")[:-len(".index")]
  model = fixtures.build_model(schedule)
  status = tf.train.Checkpoint(model=model,
                               optimizer=model.optimizer).read(prefix)
  status.assert_existing_objects_matched()
  assert int(model.optimizer.iterations.numpy()) == fixtures.STEPS
  # Bit for bit: a restore copies values.
  _assert_state(model, stored, "step3/", atol=0)
  # Step 6 also needs what is not in model.weights: the lookahead queue.
  model.fit(fixtures.dataset(), epochs=1, verbose=0, shuffle=False)
  assert int(model.optimizer.iterations.numpy()) == 2 * fixtures.STEPS
  _assert_state(model, stored, "step6/")


@pytest.mark.parametrize("schedule", fixtures.SCHEDULES)
def test_trainer_model_dir_resumes_and_continues(schedule, tmp_path):
  stored = np.load(testdata.compat(f"cli_{schedule}.npz"))
  model_dir = str(tmp_path / "run")
  shutil.copytree(testdata.compat(f"cli_{schedule}"), model_dir)
  capture = fixtures.capture_model()
  started = []

  class FirstStep(keras.callbacks.Callback):

    def on_train_batch_begin(self, batch, logs=None):
      started.append(int(self.model.optimizer.iterations.numpy()))

  summary = train_lib.run(fixtures.cli_config(schedule), model_dir,
                          mode="train", export=False, verbose=0,
                          callbacks=[capture, FirstStep()])
  assert summary["step"] == 6
  assert started == [3, 4, 5]  # Resumed at step 3, not from scratch.
  state = tf.train.get_checkpoint_state(os.path.join(model_dir,
                                                     "checkpoints"))
  assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
      "ckpt-3", "ckpt-6"]
  model = capture.model
  _assert_state(model, stored, "")
  # The step-6 checkpoint holds the same: zero everything, restore it.
  for v in model.weights + model.optimizer.variables:
    v.assign(tf.zeros_like(v))
  tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(
      state.model_checkpoint_path).assert_existing_objects_matched()
  _assert_state(model, stored, "", atol=0)
