"""Tests for configs.py and the experiment registry."""

import json

import pytest

import experiments
from official_conadv import configs


def test_every_paper_row_exists_with_its_hyperparameters():
  names = experiments.names()
  for method in ("lars", "advprop", "conadv", "conadv_aa"):
    for batch in ("1k", "4k", "8k", "16k", "32k", "64k", "96k"):
      assert f"imagenet_resnet50_{method}_{batch}" in names
  c96 = experiments.get("imagenet_resnet50_conadv_96k")
  assert c96.train.global_batch_size == 98304
  assert (c96.optimizer.learning_rate, c96.optimizer.warmup_epochs,
          c96.optimizer.momentum, c96.optimizer.weight_decay,
          c96.optimizer.power, c96.train.train_steps) == (43.0, 41, 0.92, 5e-5,
                                                          1.6, 1301)
  c64 = experiments.get("imagenet_resnet50_lars_64k")
  assert (c64.optimizer.learning_rate, c64.optimizer.momentum,
          c64.optimizer.weight_decay) == (24.699, 0.951807, 1e-4)
  assert not c64.adversary.enabled and c64.method == "baseline"
  assert experiments.get("imagenet_resnet50_advprop_16k").method == "sequential"
  aa = experiments.get("imagenet_resnet50_conadv_aa_32k")
  assert aa.data.autoaugment == "v0" and aa.optimizer.learning_rate == 31.2
  assert aa.data.label_smoothing == 0.1 and aa.model.bn_momentum == 0.9
  assert "Command" in experiments.describe("mnist_resnet_conadv")
  assert "python -m official_conadv.train" in experiments.describe(
      "imagenet_resnet50_conadv_96k")


def test_unknown_experiment_lists_valid_names():
  with pytest.raises(ValueError, match="mnist_resnet_conadv"):
    experiments.get("nope")


def test_override_parses_types():
  c = experiments.get("mnist_resnet_conadv")
  c = configs.override(
      c, "adversary.delay=2, train.global_batch_size=64,adversary.epsilon=8/255,"
      "adversary.targeted=true,data.autoaugment=v0,train.train_steps=none,"
      "model.input_mean=0.5,runtime.mixed_precision=mixed_bfloat16")
  assert c.adversary.delay == 2 and c.train.global_batch_size == 64
  assert c.adversary.epsilon == pytest.approx(8 / 255)
  assert c.adversary.targeted is True and c.data.autoaugment == "v0"
  assert c.train.train_steps is None and c.model.input_mean == (0.5,)


@pytest.mark.parametrize("text,match", [
    ("adversary.dealy=2", "Unknown config key 'adversary.dealy'"),
    ("nope=1", "Unknown config key 'nope'"),
    ("adversary.delay=two", "Bad value 'two' for adversary.delay"),
    ("adversary.delay=1.5", "Bad value '1.5' for adversary.delay"),
    ("adversary.targeted=maybe", "adversary.targeted"),
    ("adversary", "expected key=value"),
    ("adversary=1", "is a section"),
    ("adversary.delay=-1", "adversary.delay must be an integer >= 0"),
    ("adversary.epsilon=-1", "epsilon"),
    ("train.global_batch_size=0", "train.global_batch_size must be > 0"),
    ("data.autoaugment=v9", "data.autoaugment"),
    ("optimizer.name=adam", "optimizer.name"),
    ("adversary.schedule=ahead", "adversary.schedule must be one of"),
    ("adversary.schedule=lookahead,data.autoaugment=v0",
     "'lookahead' does not support data.autoaugment"),
])
def test_bad_overrides_name_the_problem(text, match):
  with pytest.raises(ValueError, match=match):
    configs.override(experiments.get("mnist_smoke"), text)


def test_json_round_trip_and_incompatibilities():
  c = experiments.get("imagenet_resnet50_conadv_32k")
  d = json.loads(c.to_json())
  assert configs.ExperimentConfig.from_dict(d) == c
  assert configs.incompatibilities(d, c) == []
  resumable = configs.override(
      c, "runtime.strategy=mirrored,train.steps_per_loop=7,"
      "train.steps_per_execution=3,train.eval_batch_size=512")
  assert configs.incompatibilities(d, resumable) == []
  changed = configs.override(c, "adversary.delay=3,optimizer.learning_rate=2")
  diffs = configs.incompatibilities(d, changed)
  assert [x.field for x in diffs] == ["adversary.delay",
                                      "optimizer.learning_rate"]
  assert str(diffs[0]).startswith("adversary.delay: 1")


def test_a_field_missing_from_a_saved_config_counts_as_its_default():
  """A model_dir written before `adversary.schedule` existed resumes with
  the default ("delayed", the only behaviour then) and is refused with
  "lookahead"; a missing field with a non-default value is flagged too."""
  c = experiments.get("imagenet_resnet50_conadv_32k")
  old = json.loads(c.to_json())
  del old["adversary"]["schedule"]
  assert configs.incompatibilities(old, c) == []
  diffs = configs.incompatibilities(
      old, configs.override(c, "adversary.schedule=lookahead"))
  assert [str(x) for x in diffs] == [
      "adversary.schedule: 'delayed' in model_dir vs 'lookahead' now"]
  del old["data"]["label_smoothing"]  # 0.1 in this row, 0.0 by default.
  assert [x.field for x in configs.incompatibilities(old, c)] == [
      "data.label_smoothing"]


@pytest.mark.parametrize("override,field", [
    ("train.epochs=10", "train.epochs"),
    ("train.train_steps=100", "train.train_steps"),
    ("train.global_batch_size=4096", "train.global_batch_size"),
    ("train.seed=3", "train.seed"),
    ("data.shuffle_buffer=7", "data.shuffle_buffer"),
    ("data.deterministic=false", "data.deterministic"),
])
def test_schedule_and_data_order_changes_are_flagged(override, field):
  c = experiments.get("imagenet_resnet50_conadv_32k")
  d = json.loads(c.to_json())
  diffs = configs.incompatibilities(d, configs.override(c, override))
  assert [x.field for x in diffs] == [field]
  assert field in configs.SCHEDULE_FIELDS


@pytest.mark.parametrize("text,value", [
    ("4/255", 4 / 255), ("0.5", 0.5), ("1e-4", 1e-4), ("-2", -2.0),
    (" 8 / 255 ", 8 / 255)])
def test_parse_number(text, value):
  assert configs.parse_number(text) == value


@pytest.mark.parametrize("text", [
    "__import__('os')", "2**10", "1/0", "1/2/3", "nan", "inf", "(1)", "",
    "4/255+1"])
def test_parse_number_refuses_anything_but_a_number_or_fraction(text):
  with pytest.raises(ValueError):
    configs.parse_number(text)
  with pytest.raises(ValueError, match="adversary.epsilon"):
    configs.override(experiments.get("mnist_smoke"),
                     f"adversary.epsilon={text}")


def test_total_steps():
  c = experiments.get("imagenet_resnet50_lars_4k")
  assert c.total_steps(1_281_167) == 28_151  # ceil(90 * 1281167 / 4096) = ceil(28150.6)
  assert experiments.get("imagenet_resnet50_lars_96k").total_steps(1) == 1301


def test_integers_must_fit_in_int32():
  """Overrides are parsed exactly (not through a float) and bounded; a
  config from JSON is bounded by validate."""
  base = experiments.get("mnist_smoke")
  assert configs.override(base, "train.seed=2147483647").train.seed == (
      2**31 - 1)
  assert configs.override(base, "train.seed=-2147483647").train.seed == (
      -(2**31 - 1))
  with pytest.raises(ValueError, match=r"^train.seed=2147483648 does not "
                     r"fit in int32 \(at most 2,147,483,647 in magnitude\)"):
    configs.override(base, "train.seed=2147483648")
  with pytest.raises(ValueError, match="Bad value 'inf' for train.seed"):
    configs.override(base, "train.seed=inf")
  d = base.to_dict()
  d["train"]["eval_batch_size"] = 2**40
  with pytest.raises(ValueError, match=r"^train.eval_batch_size=1099511627776 "
                     "does not fit in int32"):
    configs.ExperimentConfig.from_dict(d).validate()
