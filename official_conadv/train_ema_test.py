"""The CLI trainer with a weight average (optimizer.ema_momentum).

  * The trainer's average equals one computed by hand from the per-step
    weights of the same run without an average, and the average changes no
    trained weight (bit for bit).
  * summary.json: `eval` is the average's evaluation, `eval_raw` the raw
    weights' (equal to the run without an average); TensorBoard gets an
    eval_raw directory; the exported SavedModel computes the average's
    logits.
  * Loop ends and evaluations change nothing: loops of 2 with an evaluation
    after each end with every checkpoint tensor equal to one loop of 4, and
    so does a resume from the step-2 checkpoint.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from official_conadv import configs
from official_conadv import train_lib
from official_conadv.optimization import ema

TINY = ("model.width=4,data.image_size=12,data.shuffle_buffer=16,"
        "data.num_train_examples=32,train.eval_steps=2,"
        "train.global_batch_size=8,train.eval_batch_size=8,"
        "train.train_steps=4,train.steps_per_execution=1,train.seed=5,"
        "train.keep_checkpoints=3,"
        "optimizer.learning_rate=1.0,optimizer.warmup_epochs=0.5,"
        "adversary.enabled=true,adversary.delay=1,adversary.steps=1,"
        "adversary.random_init=false,runtime.mixed_precision=none,"
        "runtime.jit_compile=false")
MOMENTUM = 0.75


def _config(extra):
  return configs.override(experiments.get("mnist_smoke"), TINY + "," + extra)


class _Recorder(keras.callbacks.Callback):
  """The trainable weights after every step, and the model."""

  def __init__(self):
    super().__init__()
    self.weights = []

  def on_train_batch_end(self, batch, logs=None):
    self.weights.append([v.numpy() for v in self.model.trainable_variables])


def _run(model_dir, extra, mode="train_and_eval"):
  recorder = _Recorder()
  summary = train_lib.run(_config(extra), str(model_dir), mode=mode,
                          verbose=0, callbacks=[recorder])
  return summary, recorder


def _checkpoint_values(model_dir, step):
  reader = tf.train.load_checkpoint(
      os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if not name.startswith("save_counter") and
          name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("ema")
  plain = _run(base / "plain", "train.steps_per_loop=4")
  averaged = _run(base / "ema", f"train.steps_per_loop=4,"
                  f"optimizer.ema_momentum={MOMENTUM}")
  return {"base": base, "plain": plain, "ema": averaged}


def test_the_average_is_the_hand_computed_average_of_the_raw_weights(runs):
  (_, plain), (_, averaged) = runs["plain"], runs["ema"]
  assert len(plain.weights) == len(averaged.weights) == 4
  for step, (want, got) in enumerate(zip(plain.weights, averaged.weights)):
    for w, g in zip(want, got):
      np.testing.assert_array_equal(g, w, err_msg=f"raw weights, step {step}")
  # The first update sets the average to the weights; update t > 0 mixes
  # with min(MOMENTUM, (1 + t) / (10 + t)) (tf.train.ExponentialMovingAverage
  # with num_updates, the EfficientNet recipe): 0.1818, 0.25, 0.3077 here.
  by_hand = [np.array(w) for w in plain.weights[0]]
  for t, weights in enumerate(plain.weights[1:], start=1):
    m = min(MOMENTUM, (1.0 + t) / (10.0 + t))
    by_hand = [m * a + (1.0 - m) * w for a, w in zip(by_hand, weights)]
  model = averaged.model
  pairs = ema.weight_average_pairs(model.optimizer)
  assert len(pairs) == len(by_hand)
  moved = 0.0
  for (variable, average), want, raw in zip(pairs, by_hand,
                                            plain.weights[-1]):
    np.testing.assert_allclose(average.numpy(), want, rtol=1e-6, atol=1e-7,
                               err_msg=variable.path)
    # After the run the model holds the raw weights again.
    np.testing.assert_array_equal(variable.numpy(), raw, err_msg=variable.path)
    moved = max(moved, float(np.max(np.abs(want - raw))))
  assert moved > 1e-3  # The average is not the last weights.


def test_summary_reports_the_average_as_eval_and_the_raw_weights_as_eval_raw(
    runs):
  (plain_summary, _), (summary, recorder) = runs["plain"], runs["ema"]
  assert "eval_raw" not in plain_summary
  assert summary["eval_raw"] == plain_summary["eval"]
  assert summary["eval"]["examples"] == summary["eval_raw"]["examples"] == 16
  assert summary["eval"]["loss"] != summary["eval_raw"]["loss"]
  model_dir = runs["base"] / "ema"
  with open(model_dir / "summary.json") as f:
    assert json.load(f)["eval_raw"] == summary["eval_raw"]
  assert os.listdir(model_dir / "eval_raw")
  assert not os.path.exists(runs["base"] / "plain" / "eval_raw")
  # The export computes the average's logits.
  model = recorder.model
  loaded = tf.saved_model.load(summary["export"]["saved_model"])
  images = tf.random.stateless_uniform((4, 12, 12, 1), seed=(1, 2))
  exported = loaded.serve(images).numpy()
  with ema.averaged_weights(model):
    want = model(images, training=False).numpy()
  raw = model(images, training=False).numpy()
  np.testing.assert_allclose(exported, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(exported - raw)) > 1e-4


def test_loop_ends_evaluations_and_a_resume_change_nothing(runs):
  base = runs["base"]
  one_loop = _checkpoint_values(str(base / "ema"), 4)
  _run(base / "loops", f"train.steps_per_loop=2,"
       f"optimizer.ema_momentum={MOMENTUM}")
  loops = _checkpoint_values(str(base / "loops"), 4)
  assert sorted(loops) == sorted(one_loop)
  # The averages are in the checkpoint: one more optimizer variable per
  # trainable weight than without an average.
  plain = _checkpoint_values(str(base / "plain"), 4)
  assert len(one_loop) - len(plain) == len(runs["ema"][1].weights[0])
  for name, value in one_loop.items():
    np.testing.assert_array_equal(loops[name], value, err_msg=name)
  # Resume from step 2: the step-4 checkpoint's files removed (the trainer
  # names it unreadable and restores the one before), the run continues.
  resumed = base / "resumed"
  shutil.copytree(base / "loops", resumed)
  assert os.path.exists(resumed / "checkpoints" / "ckpt-2.index")
  for name in os.listdir(resumed / "checkpoints"):
    if name.startswith("ckpt-4"):
      os.remove(resumed / "checkpoints" / name)
  summary, recorder = _run(resumed, f"train.steps_per_loop=2,"
                           f"optimizer.ema_momentum={MOMENTUM}")
  assert len(recorder.weights) == 2  # steps 3 and 4 only
  again = _checkpoint_values(str(resumed), 4)
  for name, value in one_loop.items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)
  assert summary["step"] == 4


@pytest.mark.parametrize("value", ["0.0", "1.0", "1.5", "-0.1"])
def test_ema_momentum_out_of_range_is_one_line(value):
  with pytest.raises(ValueError, match=r"optimizer.ema_momentum must be null"):
    _config(f"optimizer.ema_momentum={value}").validate()
