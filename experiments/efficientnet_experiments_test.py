"""Tests for experiments/imagenet_efficientnet.py and mnist_applications.py."""

import math

import numpy as np
import pytest

import experiments
from experiments import imagenet_efficientnet as effnet
from experiments import mnist_applications
from official_conadv.modeling import backbones

EFFNET_NAMES = [f"imagenet_efficientnet_b0_{m}_{b}"
                for m in ("lars", "advprop", "conadv") for b in ("4k", "64k")]
DIGITS_NAMES = ["mnist_mobilenetv2_conadv", "mnist_mobilenetv2_lars"]

def _normalised(text):
  return " ".join(text.split())


def _lars_util_rule(batch):
  """tensorflow/tpu models/official/resnet/lars_util.py poly_rate_schedule:
  (peak LR, warmup epochs) by global batch, the documented rule."""
  if batch <= 16384:
    return 25.0, 5
  if batch == 32768:
    return 34.0, 12
  return 41.0, 16


def test_every_efficientnet_row_is_registered_and_listed():
  names = experiments.names()
  for name in EFFNET_NAMES + DIGITS_NAMES:
    assert name in names
    assert "python -m official_conadv.train" in experiments.describe(name)
  assert sorted(n for n in names if n.startswith("imagenet_efficientnet")) == (
      sorted(EFFNET_NAMES))


@pytest.mark.parametrize("name", EFFNET_NAMES)
def test_efficientnet_row_matches_the_documented_table(name):
  method, batch = name.split("_")[-2:]
  c = experiments.get(name)  # validates
  size, lr, warmup, momentum, wd, power, end, epochs, _ = effnet.BATCHES[batch]
  assert c.name == name
  # Model: a valid registry name, 224 px, 1000 classes, [0, 255] input.
  assert c.model.name == "keras.applications.EfficientNetB0"
  assert c.model.name in backbones.names()
  assert (c.model.num_classes, c.model.pixel_scale) == (1000, 255.0)
  assert (c.data.name, c.data.image_size, c.data.label_smoothing,
          c.data.autoaugment) == ("imagenet_tfrecord", 224, 0.1, None)
  # Optimizer.
  o = c.optimizer
  assert (o.name, o.learning_rate, o.warmup_epochs, o.momentum,
          o.weight_decay, o.power, o.end_learning_rate, o.eeta) == (
              "lars", lr, warmup, momentum, wd, power, end, 0.001)
  assert (lr, warmup) == _lars_util_rule(size)
  assert (momentum, wd, power, end, epochs) == (0.9, 1e-5, 2.0, 1e-4, 350)
  # The recipe's weight average (main.py moving_average_decay), documented.
  assert o.ema_momentum == 0.9999
  assert "moving_average_decay" in experiments.describe(name)
  # Loop shape: one loop = one epoch, min(epoch, 100) steps per call.
  per_epoch = 1_281_167 // size
  assert c.train.global_batch_size == size
  assert c.train.steps_per_loop == per_epoch
  assert c.train.steps_per_execution == min(per_epoch, 100)
  assert c.train.epochs == epochs and c.train.train_steps is None
  assert c.total_steps(1_281_167) == math.ceil(epochs * 1_281_167 / size)
  assert c.train.eval_batch_size == min(size, 8192)
  assert (c.runtime.strategy, c.runtime.mixed_precision) == (
      "tpu", "mixed_bfloat16")
  # Adversary per method.
  a = c.adversary
  if method == "lars":
    assert not a.enabled and c.method == "baseline"
  else:
    assert a.enabled
    assert (a.epsilon, a.step_size, a.steps, a.random_init, a.targeted,
            a.prob_start_from_clean) == (4 / 255, 4 / 255, 1, True, False, 0.0)
    assert a.delay == (0 if method == "advprop" else 1)
    assert c.method == ("sequential" if method == "advprop" else "conadv")


def test_docstring_quotes_the_table():
  doc = _normalised(effnet.__doc__)
  assert _normalised(
      "4k 4,096 25 5 0.9 1e-05 2 0.0001 350 312 109,475 100") in doc
  assert _normalised(
      "64k 65,536 41 16 0.9 1e-05 2 0.0001 350 19 6,843 19") in doc
  rows = effnet.table_rows()
  assert len(rows) == len(effnet.BATCHES)
  for row in rows:
    assert _normalised(row) in doc


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_digits_rows(name):
  c = experiments.get(name)
  assert c.model.name == mnist_applications.MODEL_NAME
  assert c.model.name in backbones.names()
  assert c.model.application_bn_momentum == 0.9
  assert (c.model.num_classes, c.model.pixel_scale) == (10, 1.0)
  assert (c.data.name, c.data.image_size) == ("mnist", 32)
  assert c.adversary.enabled == name.endswith("conadv")
  assert c.total_steps(4000) == 375


def test_efficientnet_b0_backbone_builds_at_a_small_size():
  c = experiments.get("imagenet_efficientnet_b0_conadv_4k")
  backbone = backbones.build(c.model, (32, 32, 3))
  images = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
  for route in ("main", "adv"):
    logits = backbone(images, training=False, bn_route=route)
    assert tuple(logits.shape) == (2, 1000)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_resnet_rows_keep_no_weight_average():
  resnet = [n for n in experiments.names() if n.startswith("imagenet_resnet50")]
  assert resnet
  for name in resnet:
    assert experiments.get(name).optimizer.ema_momentum is None, name
