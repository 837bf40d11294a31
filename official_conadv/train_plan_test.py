"""Tests for train_plan.py: the sizes of a run from its config, data sizes
and strategy facts, computed without TensorFlow ops or files."""

import dataclasses

import pytest
import tensorflow as tf

import experiments
from official_conadv import configs
from official_conadv import distribute_utils
from official_conadv import train_plan

MIRRORED = train_plan.StrategyFacts(name="MirroredStrategy",
                                    multi_step_loop_works=False)


def _config(overrides=""):
  return configs.override(experiments.get("mnist_smoke"), overrides)


def test_plan_of_a_fresh_run():
  """1,281,167 images at 1,024 per step for 2 epochs, loops of 500, eval
  batch 1,000 over ImageNet's 50,000: every size by hand."""
  config = _config("train.global_batch_size=1024,train.epochs=2,"
                   "train.train_steps=none,train.steps_per_loop=500,"
                   "train.eval_batch_size=1000,train.eval_steps=none,"
                   "train.steps_per_execution=4")
  plan = train_plan.make_plan(config, num_train=1_281_167, num_eval=50_000)
  assert plan == train_plan.Plan(
      num_train=1_281_167, num_eval=50_000, steps_per_epoch=1251,
      total_steps=2503,  # ceil(2 * 1,281,167 / 1,024)
      steps_per_loop=500, eval_pass_steps=50, eval_steps=50,
      steps_per_execution=4, steps_per_execution_note=None)
  assert plan.full_eval
  assert plan.loop_ends(0) == [500, 1000, 1500, 2000, 2500, 2503]
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.total_steps = 3


def test_plan_of_a_resume_mid_loop():
  """A preemption checkpoint at step 7 (loops of 4 over 9 steps): the
  rerun first finishes the loop it was in."""
  plan = train_plan.make_plan(_config("train.train_steps=9,"
                                      "train.steps_per_loop=4"),
                              num_train=4000, num_eval=1000)
  assert plan.loop_ends(0) == [4, 8, 9]
  assert plan.loop_ends(7) == [8, 9]
  assert plan.loop_ends(8) == [9]
  assert plan.loop_ends(9) == []
  # A loop longer than the run is the run.
  plan = train_plan.make_plan(_config("train.train_steps=5,"
                                      "train.steps_per_loop=10"),
                              num_train=4000, num_eval=1000)
  assert plan.steps_per_loop == 5 and plan.loop_ends(0) == [5]


@pytest.mark.parametrize("overrides,strategy,want,why", [
    ("train.steps_per_execution=4", train_plan.StrategyFacts(), 4, None),
    ("train.steps_per_execution=4", MIRRORED, 1,
     "Keras 3's multi-step loop fails under MirroredStrategy "
     "(keras-team/keras#19246)"),
    ("train.steps_per_execution=1", MIRRORED, 1, None),
    # AutoAugment + adversary (the +AA rows) like every other run.
    ("train.steps_per_execution=4,data.autoaugment=v0",
     train_plan.StrategyFacts(), 4, None),
    ("train.steps_per_execution=4,data.autoaugment=v0", MIRRORED, 1,
     "Keras 3's multi-step loop fails under MirroredStrategy "
     "(keras-team/keras#19246)"),
    ("train.steps_per_execution=4,data.autoaugment=v0,"
     "adversary.enabled=false", train_plan.StrategyFacts(), 4, None),
])
def test_reduced_steps_per_execution_says_why(overrides, strategy, want, why):
  plan = train_plan.make_plan(_config(overrides), num_train=4000,
                              num_eval=1000, strategy=strategy)
  assert plan.steps_per_execution == want
  if why is None:
    assert plan.steps_per_execution_note is None
  else:
    assert plan.steps_per_execution_note == (
        f"train.steps_per_execution=4 runs as 1: {why}.")


@pytest.mark.parametrize("eval_steps,pipelines,want_pass,want_steps,full", [
    ("none", 1, 10, 10, True),   # 1,000 digits, batch 100: 10 batches.
    ("2", 1, 10, 2, False),      # A quick partial evaluation.
    ("50", 1, 10, 10, True),     # Capped at one pass.
    ("none", 4, 10, 10, True),   # 250 per pipeline, 25 per step each.
])
def test_eval_steps(eval_steps, pipelines, want_pass, want_steps, full):
  plan = train_plan.make_plan(
      _config(f"train.eval_steps={eval_steps}"), num_train=4000,
      num_eval=1000,
      strategy=train_plan.StrategyFacts(num_input_pipelines=pipelines))
  assert (plan.eval_pass_steps, plan.eval_steps, plan.full_eval) == (
      want_pass, want_steps, full)


def test_eval_pass_of_uneven_shards():
  # 10 images, batch 6 over 3 pipelines: shards of 4, 3, 3 in 2 x 2 slots.
  plan = train_plan.make_plan(
      _config("train.eval_batch_size=6,train.eval_steps=none"),
      num_train=4000, num_eval=10,
      strategy=train_plan.StrategyFacts(num_input_pipelines=3))
  assert plan.eval_pass_steps == plan.eval_steps == 2


def test_strategy_facts():
  assert train_plan.StrategyFacts.of(tf.distribute.get_strategy()) == (
      train_plan.StrategyFacts(name="_DefaultDistributionStrategy"))
  mirrored = distribute_utils.get_strategy("mirrored",
                                           devices=["/cpu:0", "/cpu:1"])
  assert train_plan.StrategyFacts.of(mirrored) == MIRRORED
  assert train_plan.steps_per_execution_for(mirrored, 8) == 1


def test_a_global_batch_larger_than_the_training_split_is_refused():
  config = _config("train.global_batch_size=4001")
  with pytest.raises(ValueError, match=r"^train.global_batch_size=4,001 is "
                     r"larger than the training split \(4,000 examples"):
    train_plan.make_plan(config, num_train=4000, num_eval=1000)
  plan = train_plan.make_plan(_config("train.global_batch_size=4000"),
                              num_train=4000, num_eval=1000)
  assert plan.steps_per_epoch == 1
