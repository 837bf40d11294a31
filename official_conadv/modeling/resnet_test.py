"""Tests for the dual-BN ResNet backbones (tiny widths, CPU, fast)."""

import collections
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv.modeling import dual_batch_norm
from official_conadv.modeling import resnet
from official_conadv.modeling import small_cnn

# tf-models-official ResNet-50 (23,561,152 incl. BN moving statistics) plus
# a 2048 x 1000 + 1000 dense head.
RESNET50_PARAMS = 25_610_152
MNIST = dict(input_mean=(0.1307,), input_std=(0.3081,))


def _images(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def _is_adv(variable):
  return "/adv/" in variable.path


def _main_weights(model):
  return [w for w in model.weights if not _is_adv(w)]


def _num(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _tiny(depth=18, variant="imagenet", **kwargs):
  kwargs.setdefault("num_classes", 7)
  kwargs.setdefault("width", 8)
  return resnet.ResNet(depth=depth, variant=variant, **kwargs)


def _randomise(model, seed=1):
  """Non-trivial BN statistics/gammas so routes and copies are tested."""
  rng = np.random.default_rng(seed)
  for w in model.weights:
    if w.path.endswith(("gamma", "moving_variance")):
      w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    elif w.path.endswith(("beta", "moving_mean")):
      w.assign(rng.normal(0.0, 0.1, w.shape).astype("float32"))


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_imagenet_variant_output_shape(depth):
  model = _tiny(depth)
  x = _images((2, 32, 32, 3))
  for route in dual_batch_norm.ROUTES:
    logits = model(x, training=True, bn_route=route)
    assert logits.shape == (2, 7) and logits.dtype == "float32"
  assert np.isfinite(np.asarray(model(x))).all()


@pytest.mark.parametrize("depth", [18, 20, 34, 50, 56])
def test_cifar_variant_output_shape(depth):
  model = _tiny(depth, "cifar", **MNIST)
  logits = model(_images((2, 28, 28, 1)), training=True, bn_route="adv")
  assert logits.shape == (2, 7) and logits.dtype == "float32"


def test_architecture_details():
  model = _tiny(50)
  model.build((None, 32, 32, 3))
  assert model.stem_conv.kernel_size == (7, 7)
  assert model.stem_conv.strides == (2, 2) and model.stem_pool is not None
  counts = collections.Counter(b.name.split("_")[0] for b in model.blocks)
  assert [counts[f"stage{i}"] for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
  block = {b.name: b for b in model.blocks}["stage2_block1"]
  # v1.5: the stride sits on the 3x3 conv; projection shortcut.
  assert [c.strides for c in block.convs] == [(1, 1), (2, 2), (1, 1)]
  assert [c.kernel_size for c in block.convs] == [(1, 1), (3, 3), (1, 1)]
  assert block.use_projection and block.shortcut_conv.strides == (2, 2)
  assert not {b.name: b for b in model.blocks}["stage2_block2"].use_projection
  assert all(not c.use_bias for b in model.blocks for c in b.convs)
  # Zero-init of the branch's last BN gamma, both routes.
  for b in model.blocks:
    for route in dual_batch_norm.ROUTES:
      np.testing.assert_array_equal(b.bns[-1].route_weights(route)[0].numpy(),
                                    0.0)
      np.testing.assert_array_equal(b.bns[0].route_weights(route)[0].numpy(),
                                    1.0)
  assert model.layers[-1].kernel.shape == (64 * 4, 7)
  # ResNet-18: identity shortcut in stage 1, projections after.
  r18 = _tiny(18)
  assert [b.use_projection for b in r18.blocks] == [False, False, True,
                                                    False, True, False, True,
                                                    False]
  cifar = _tiny(20, "cifar", width=64)
  assert [b.filters for b in cifar.blocks] == [16] * 3 + [32] * 3 + [64] * 3
  assert cifar.stem_conv.filters == 16 and cifar.stem_pool is None


def test_bad_arguments():
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(depth=20)   # 6n+2 depths are CIFAR only
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(depth=42, variant="cifar")
  with pytest.raises(ValueError, match="variant"):
    resnet.ResNet(depth=18, variant="tiny")
  model = _tiny(18)
  with pytest.raises(ValueError, match="channel"):
    model(_images((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="bn_route"):
    model(_images((1, 32, 32, 3)), bn_route="clean")


def test_route_isolation():
  model = _tiny(18)
  x = _images((4, 32, 32, 3))
  model.build(x.shape)
  _randomise(model)
  for route in ("adv", "main"):
    before = [w.numpy() for w in model.weights]
    model(x, training=True, bn_route=route)
    for w, b in zip(model.weights, before):
      moved = not np.array_equal(w.numpy(), b)
      is_route_stat = ("moving_" in w.path and
                       _is_adv(w) == (route == "adv"))
      assert moved == is_route_stat, (route, w.path)
  main = model(x, training=False, bn_route="main")
  adv = model(x, training=False, bn_route="adv")
  assert not np.allclose(main, adv)


def test_stateless_call_adv_route():
  """What the ConAdv attack does: training-mode adv route, state discarded."""
  model = _tiny(18)
  x = _images((4, 32, 32, 3))
  model.build(x.shape)
  before = [w.numpy() for w in model.weights]
  logits, non_trainable = model.stateless_call(
      [v.value for v in model.trainable_variables],
      [v.value for v in model.non_trainable_variables], x, training=True,
      bn_route="adv")
  assert logits.shape == (4, 7)
  for w, b in zip(model.weights, before):
    np.testing.assert_array_equal(w.numpy(), b)
  for v, new in zip(model.non_trainable_variables, non_trainable):
    changed = not np.array_equal(v.numpy(), np.asarray(new))
    assert changed == _is_adv(v), v.path


def _config_kwargs():
  return dict(depth=34, num_classes=5, variant="cifar", width=12,
              bn_momentum=0.8, bn_epsilon=1e-3, synchronized_bn=True,
              zero_init_residual=False, input_mean=[0.5], input_std=[0.25],
              adversarial_bn=True, fused_bn=False)


def test_config_round_trip():
  kwargs = _config_kwargs()
  model = resnet.ResNet(name="net", **kwargs)
  config = model.get_config()
  assert {k: config[k] for k in kwargs} == kwargs
  params = set(inspect.signature(resnet.ResNet.__init__).parameters)
  assert params - {"self", "kwargs"} <= set(config)
  x = _images((2, 28, 28, 1))
  model.build(x.shape)
  _randomise(model)
  clone = resnet.ResNet.from_config(config)
  clone.build(x.shape)
  assert clone.get_config() == config
  assert [w.path for w in clone.weights] == [w.path for w in model.weights]
  clone.set_weights(model.get_weights())
  for route in dual_batch_norm.ROUTES:
    np.testing.assert_allclose(clone(x, bn_route=route),
                               model(x, bn_route=route), atol=1e-5)


# Keras' own weight saving trips numpy 2's __array__(copy=) deprecation.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_save_load(tmp_path):
  model = _tiny(18, "cifar", **MNIST)
  x = _images((2, 28, 28, 1))
  model(x)
  _randomise(model)
  path = str(tmp_path / "resnet.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert isinstance(loaded, resnet.ResNet)
  assert loaded.get_config() == model.get_config()
  for route in dual_batch_norm.ROUTES:
    np.testing.assert_allclose(loaded(x, bn_route=route),
                               model(x, bn_route=route), atol=1e-5)


def test_main_only_clone():
  model = _tiny(50)
  x = _images((2, 32, 32, 3))
  model(x)
  _randomise(model)
  with dual_batch_norm.main_only():
    clone = resnet.ResNet.from_config(model.get_config())
  clone.build(x.shape)
  assert not clone.adversarial_bn
  assert not clone.get_config()["adversarial_bn"]
  assert not any(_is_adv(w) for w in clone.weights)
  assert [w.path for w in clone.weights] == [
      w.path for w in _main_weights(model)]
  for w, src in zip(clone.weights, _main_weights(model)):
    w.assign(src)
  np.testing.assert_allclose(clone(x, training=False),
                             model(x, training=False, bn_route="main"),
                             atol=1e-5)
  with pytest.raises(ValueError, match="bn_route"):
    clone(x, bn_route="adv")


def test_mixed_precision_and_jit():
  try:
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = _tiny(18, "cifar", **MNIST)
    x = _images((2, 28, 28, 1))
    logits = model(x, training=True, bn_route="adv")
    assert logits.dtype == "float32"
    assert model.stem_conv.compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)
  finally:
    keras.config.set_dtype_policy("float32")
  model = _tiny(18)
  x = _images((2, 32, 32, 3))
  model(x)
  _randomise(model)
  eager = model(x, training=False, bn_route="adv")
  jit = tf.function(lambda t: model(t, training=False, bn_route="adv"),
                    jit_compile=True)
  np.testing.assert_allclose(jit(x), eager, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def resnet50s():
  """Full-width ResNet-50s (fused / unfused BN), built, never run."""
  models = {}
  for fused in (True, False):
    models[fused] = resnet.ResNet(depth=50, num_classes=1000, fused_bn=fused)
    models[fused].build((None, 64, 64, 3))
  return models


def test_resnet50_param_count(resnet50s):
  model = resnet50s[True]
  main = _main_weights(model)
  assert _num(main) == RESNET50_PARAMS
  adv = [w for w in model.weights if _is_adv(w)]
  assert _num(adv) == 2 * 53_120   # gamma/beta + moving mean/variance
  assert _num(model.trainable_weights) == 25_557_032 + 53_120

  tf_keras = pytest.importorskip("tf_keras")
  tfm_resnet = pytest.importorskip("official.vision.modeling.backbones.resnet")
  backbone = tfm_resnet.ResNet(
      model_id=50, input_specs=tf_keras.layers.InputSpec(
          shape=[None, 32, 32, 3]))
  head = 2048 * 1000 + 1000
  assert _num(backbone.weights) + head == RESNET50_PARAMS
  assert _num(backbone.trainable_weights) + head == _num(
      [w for w in main if w.trainable])


def _train_graph_ops(model, batch=8, size=64):
  """Op types of a forward + cross-entropy + gradient tf.function graph."""
  variables = model.trainable_variables

  @tf.function
  def step(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True, bn_route="main")
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    return loss, tape.gradient(loss, variables)

  graph = step.get_concrete_function(
      tf.TensorSpec([batch, size, size, 3], tf.float32),
      tf.TensorSpec([batch], tf.int32)).graph
  return collections.Counter(op.type for op in graph.get_operations())


def test_resnet50_graph_op_count(resnet50s):
  fused = _train_graph_ops(resnet50s[True])
  unfused = _train_graph_ops(resnet50s[False])
  n_fused, n_unfused = sum(fused.values()), sum(unfused.values())
  print(f"\nResNet-50 training graph ops: fused BN {n_fused}, "
        f"unfused BN {n_unfused}")
  assert fused["FusedBatchNormV3"] == 53 and fused["FusedBatchNormGradV3"] == 53
  assert unfused["FusedBatchNormV3"] == 0
  assert n_fused < n_unfused


def _is_aug(variable):
  return "/aug/" in variable.path


@pytest.mark.parametrize("make", [
    lambda **kw: _tiny(18, **kw),
    lambda **kw: small_cnn.SmallCNN(num_classes=7, filters=(4, 8),
                                    name="cnn", **kw),
], ids=["resnet", "small_cnn"])
def test_augmented_bn_third_route(make):
  """augmented_bn=True: an "aug" set beside every main/adv BN set, its own
  statistics, in the config, dropped by main_only(); off by default."""
  x = _images((4, 32, 32, 3))
  plain = make()
  plain(x)
  model = make(augmented_bn=True)
  model(x)
  assert not plain.get_config()["augmented_bn"]
  assert model.get_config()["augmented_bn"]
  assert not any(_is_aug(w) for w in plain.weights)
  # Same variables as the two-set model plus one aug set per BN layer.
  assert [w.path for w in model.weights if not _is_aug(w)] == [
      w.path for w in plain.weights]
  adv = [w.path for w in model.weights if _is_adv(w)]
  aug = [w.path for w in model.weights if _is_aug(w)]
  assert aug == [p.replace("/adv/", "/aug/") for p in adv] and aug
  _randomise(model)
  before = [w.numpy() for w in model.weights]
  model(x, training=True, bn_route="aug")
  for w, b in zip(model.weights, before):
    moved = not np.array_equal(w.numpy(), b)
    assert moved == ("moving_" in w.path and _is_aug(w)), w.path
  outputs = {r: model(x, training=False, bn_route=r)
             for r in dual_batch_norm.ALL_ROUTES}
  assert not np.allclose(outputs["aug"], outputs["main"])
  assert not np.allclose(outputs["aug"], outputs["adv"])
  with pytest.raises(ValueError, match="augmented=True"):
    plain(x, bn_route="aug")
  clone = model.__class__.from_config(model.get_config())
  clone(x)
  assert [w.path.split("/", 1)[1] for w in clone.weights] == [
      w.path.split("/", 1)[1] for w in model.weights]
  clone.set_weights(model.get_weights())
  np.testing.assert_allclose(clone(x, bn_route="aug"), outputs["aug"],
                             atol=1e-5)
  with dual_batch_norm.main_only():
    export = model.__class__.from_config(model.get_config())
  export(x)
  assert not export.get_config()["augmented_bn"]
  assert not any(_is_aug(w) or _is_adv(w) for w in export.weights)
