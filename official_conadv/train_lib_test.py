"""Tests for the stages of `train_lib.run` one at a time, in process on the
MNIST smoke config: the session (build + restore), the training loops, the
finish, the scalars. End-to-end runs, the CLI and every bad input:
train_test.py and train_errors_test.py."""

import dataclasses
import json
import os

import keras
import pytest
import tensorflow as tf

import experiments
from official_conadv import configs
from official_conadv import train_lib
from official_conadv import train_plan
from official_conadv import train_session
from official_conadv.data import input_pipeline


def _open(config, model_dir, mode="train"):
  keras.backend.clear_session()
  data = input_pipeline.DataSource(config.data)
  plan = train_plan.make_plan(config, data.num_examples("train"),
                              data.num_examples("eval"))
  return train_session.open_session(config, plan, data,
                                    tf.distribute.get_strategy(), model_dir,
                                    mode, is_chief=True)


def _smoke(overrides=""):
  return configs.override(experiments.get("mnist_smoke"),
                          "train.train_steps=4,train.steps_per_loop=2" +
                          ("," + overrides if overrides else ""))


def test_session_loops_and_finish_one_at_a_time(tmp_path):
  config, model_dir = _smoke(), str(tmp_path / "run")
  with pytest.raises(ValueError, match="No checkpoint in .*checkpoints to "
                     "evaluate"):
    _open(config, model_dir, mode="eval")

  session = _open(config, model_dir)
  assert (session.step, session.restored, session.input_offset) == (0, None,
                                                                     0)
  assert session.ckpt_dir == os.path.join(model_dir, "checkpoints")
  # A callback that stops training after step 1 (as a preemption would,
  # but without one): the short loop is refused.
  stop = keras.callbacks.LambdaCallback(
      on_train_batch_end=lambda batch, logs: setattr(
          session.model, "stop_training", True))
  with pytest.raises(train_lib.TrainingError, match="Loop ended at step 1, "
                     "expected 2"):
    train_lib.train(session, train_lib.ScalarWriter(model_dir, False),
                    evaluate_each_loop=False, callbacks=[stop], verbose=0)
  assert not os.path.exists(session.ckpt_dir)  # Nothing saved.

  session = _open(config, model_dir)
  progress = train_lib.train(session, train_lib.ScalarWriter(model_dir, False),
                             evaluate_each_loop=True, verbose=0)
  assert progress.step == 4 and progress.trained_steps == 4
  assert progress.eval["examples"] == 200  # eval_steps=2 of 100 digits.
  assert "adv_loss" in progress.train and progress.train_seconds > 0
  assert sorted(os.listdir(session.ckpt_dir)) == [
      "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
      "ckpt-4.data-00000-of-00001", "ckpt-4.index"]
  assert not os.path.exists(os.path.join(model_dir, "train"))  # No scalars.

  restored = _open(config, model_dir, mode="eval")
  assert restored.step == 4
  assert restored.restored == os.path.join(restored.ckpt_dir, "ckpt-4")
  summary = train_lib.finish(
      restored, train_lib.Progress(step=restored.step),
      train_lib.ScalarWriter(model_dir, False), mode="eval", export=True,
      started=0.0)
  assert summary["step"] == 4 and summary["eval"]["examples"] == 200
  assert "export" not in summary  # Eval mode exports nothing.
  assert summary["images_per_second"] is None
  assert summary["corrupt_records_skipped"] == 0
  with open(os.path.join(model_dir, "summary.json")) as f:
    assert json.load(f) == summary


def test_a_full_evaluation_must_score_every_image(tmp_path):
  session = _open(_smoke("train.eval_steps=none"), str(tmp_path / "run"))
  assert session.plan.full_eval
  assert train_lib.evaluate(session)["examples"] == 1000
  session.plan = dataclasses.replace(session.plan, num_eval=1001)
  with pytest.raises(train_lib.TrainingError, match="Evaluation scored 1000 "
                     "images, expected 1001"):
    train_lib.evaluate(session)


def test_scalar_writer(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  train_lib.ScalarWriter(str(tmp_path / "worker"), enabled=False).write(
      "train", 1, {"loss": 1.0})
  assert not (tmp_path / "worker").exists()
  writer = train_lib.ScalarWriter(str(tmp_path), enabled=True)
  writer.write("eval", 3, {"accuracy": 0.5, "examples": 7, "note": "x"})
  acc = event_accumulator.EventAccumulator(
      str(tmp_path / "eval"), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  assert sorted(acc.Tags()["tensors"]) == ["accuracy", "examples"]
  assert [e.step for e in acc.Tensors("accuracy")] == [3]
