"""Tests for the backbone registry (`model.name` -> backbone)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv import configs
from official_conadv.modeling import backbones
from official_conadv.modeling import dual_batch_norm
from official_conadv.modeling import resnet
from official_conadv.modeling import small_cnn


def test_names_list_the_registered_builders_and_every_application():
  names = backbones.names()
  assert names[:2] == ["resnet", "small_cnn"]
  for app in ("EfficientNetB0", "ResNet50", "MobileNetV2", "DenseNet121"):
    assert backbones.KERAS_APPLICATIONS + app in names
  # Only model functions: no modules, helpers or lower-case attributes.
  apps = backbones.application_names()
  assert "imagenet_utils" not in apps and "efficientnet" not in apps
  assert all(callable(getattr(keras.applications, a)) for a in apps)


@pytest.mark.parametrize("name, message", [
    ("resnt", r"Unknown model.name 'resnt'; valid: resnet, small_cnn or "
              r"keras.applications.<Name> with Name one of .*EfficientNetB0"),
    ("keras.applications.EfficientNetB9",
     r"keras.applications has no model 'EfficientNetB9'; valid: .*"
     r"keras.applications.EfficientNetB0"),
    ("keras.applications.__class__", r"has no model '__class__'"),
    ("keras.applications.imagenet_utils", r"has no model 'imagenet_utils'"),
    ("os.system", r"Unknown model.name 'os.system'"),
])
def test_bad_names_list_the_valid_ones(name, message):
  with pytest.raises(ValueError, match=message):
    backbones.validate(name)
  config = configs.ExperimentConfig()
  config.model.name = name
  with pytest.raises(ValueError, match=message):
    config.validate()


def test_register_refuses_taken_names():
  with pytest.raises(ValueError, match="taken"):
    backbones.register("resnet")
  with pytest.raises(ValueError, match="taken"):
    backbones.register("keras.applications.Mine")


def test_resnet_and_small_cnn_take_their_arguments_from_the_config():
  c = configs.ModelConfig(name="resnet", depth=18, variant="cifar", width=16,
                          num_classes=7, bn_momentum=0.8, bn_epsilon=1e-3,
                          synchronized_bn=True, zero_init_residual=False,
                          input_mean=(0.5,), input_std=(0.25,))
  model = backbones.build(c, (8, 8, 1))
  assert isinstance(model, resnet.ResNet)
  got = model.get_config()
  for key, want in [("depth", 18), ("variant", "cifar"), ("width", 16),
                    ("num_classes", 7), ("bn_momentum", 0.8),
                    ("bn_epsilon", 1e-3), ("synchronized_bn", True),
                    ("zero_init_residual", False), ("augmented_bn", False)]:
    assert got[key] == want, key
  assert tuple(got["input_mean"]) == (0.5,)
  assert backbones.build(c, (8, 8, 1), augmented_bn=True).augmented_bn

  c = dataclasses.replace(c, name="small_cnn", width=4)
  model = backbones.build(c, (8, 8, 1))
  assert isinstance(model, small_cnn.SmallCNN)
  assert model.filters == (4, 8) and model.num_classes == 7
  assert model.synchronized_bn and model.bn_momentum == 0.8
  logits = model(tf.zeros((2, 8, 8, 1)), training=False, bn_route="adv")
  assert logits.shape == (2, 7)


def test_keras_application_is_converted_with_config_arguments():
  c = configs.ModelConfig(name="keras.applications.MobileNetV2",
                          num_classes=6, pixel_scale=255.0)
  backbone = backbones.build(c, (32, 32, 3))
  x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
  main = backbone(x, training=False, bn_route="main")
  assert main.shape == (2, 6)
  # Logits (classifier_activation=None), not probabilities.
  assert not np.allclose(np.sum(main, axis=-1), 1.0, atol=1e-3)
  assert backbone(x, training=False, bn_route="adv").shape == (2, 6)
  paths = [v.path for v in backbone.weights]
  assert any(p.endswith("/adv/gamma") for p in paths)
  assert not any(isinstance(l, keras.layers.BatchNormalization)
                 for l in backbone._flatten_layers())  # pylint: disable=protected-access
  assert any(isinstance(l, dual_batch_norm.DualBatchNormalization)
             for l in backbone._flatten_layers())  # pylint: disable=protected-access
  assert not any(p.endswith("/aug/gamma") for p in paths)
  augmented = backbones.build(c, (32, 32, 3), augmented_bn=True)
  assert augmented(x, training=False, bn_route="aug").shape == (2, 6)


def test_application_bn_momentum_replaces_every_bn_momentum():
  """None keeps keras.applications' own BN momentum (MobileNetV2: 0.999);
  a value replaces it in every converted BN layer (both sets share it)."""
  c = configs.ModelConfig(name="keras.applications.MobileNetV2",
                          num_classes=3)
  bns = lambda m: [l for l in m._flatten_layers()  # pylint: disable=protected-access
                   if isinstance(l, dual_batch_norm.DualBatchNormalization)]
  kept = bns(backbones.build(c, (32, 32, 3)))
  assert kept and {l.momentum for l in kept} == {0.999}
  c = dataclasses.replace(c, application_bn_momentum=0.9)
  changed = bns(backbones.build(c, (32, 32, 3)))
  assert len(changed) == len(kept)
  assert {l.momentum for l in changed} == {0.9}
  config = configs.ExperimentConfig()
  config.model = dataclasses.replace(c, application_bn_momentum=1.0)
  with pytest.raises(ValueError, match=r"application_bn_momentum must be "
                     r"null or in \[0, 1\), got 1.0"):
    config.validate()
