"""ConAdvModel under XLA and mixed precision, on one device.

Backbones: a small `resnet.ResNet` (depth 10, width 8, CIFAR variant: every
block kind, projection shortcuts, fused dual BN) and `small_cnn.SmallCNN`, on
16x16x3 images. Modes: baseline (adversary=None), sequential (delay=0) and
ConAdv (delay=1), `STEPS` `fit` steps of SGD from the same initial weights.

* XLA: `compile(jit_compile=True)` gives the losses and weights of the
  non-XLA run within `XLA_LOSS_RTOL` / `XLA_ATOL` + `XLA_RTOL` * |w|
  (float32; XLA reorders and fuses reductions, so results are not bitwise
  equal). The attack is deterministic there (random_init=False): stateless
  random numbers differ between XLA and non-XLA kernels on CPU for the same
  seed; `test_xla_random_start` checks the random start under XLA on its
  own. One device only: Mirrored + jit_compile on logical CPUs fails inside
  TF (docs/design.md).
* mixed_bfloat16 (SGD, and `lars.LARS` where it exists): finite losses,
  every step's loss within `LOW_PRECISION_LOSS_RTOL` of the float32 run,
  float32 logits and variables (stale-weight buffer and optimizer
  included), attack output float32 in [0, 1] within epsilon, moving almost
  every pixel (low-precision input gradients do not underflow to 0).
* mixed_float16 with `keras.optimizers.LossScaleOptimizer`: steps run, loss
  finite, first-step loss within `LOW_PRECISION_LOSS_RTOL` of float32,
  weights move, same dtype checks.

The global dtype policy is restored to float32 after every test (fixture).
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv.modeling import conadv_model
from official_conadv.modeling import resnet
from official_conadv.modeling import small_cnn

NUM_CLASSES = 5
SHAPE = (16, 16, 3)
BATCH = 8
STEPS = 3
LR = 0.05
EPSILON = 0.1

# Observed on this CPU: <= 9e-7 absolute weight difference, <= 2e-7 relative
# loss difference after STEPS steps; the bounds leave 20x and more headroom
# for other CPUs' XLA code generation.
XLA_ATOL = 2e-5
XLA_RTOL = 2e-4
XLA_LOSS_RTOL = 1e-4
# Observed: <= 0.08% (bfloat16) and <= 0.06% (float16) relative loss
# difference from float32 on every step.
LOW_PRECISION_LOSS_RTOL = 0.02

BACKBONES = ("resnet", "small_cnn")
# random_init=False: stateless random numbers differ between XLA and non-XLA
# kernels on CPU (same seed, same alg), so only a deterministic attack can be
# compared across the two; `test_xla_random_start` covers the random start.
MODES = {
    "baseline": None,
    "sequential": conadv_model.AdversaryConfig(
        epsilon=EPSILON, step_size=0.05, delay=0, random_init=False),
    "conadv": conadv_model.AdversaryConfig(
        epsilon=EPSILON, step_size=0.05, delay=1, random_init=False),
}


@pytest.fixture
def policy():
  """Sets a global dtype policy for one test and always restores float32."""
  def set_policy(name):
    keras.mixed_precision.set_global_policy(name)

  try:
    yield set_policy
  finally:
    keras.mixed_precision.set_global_policy("float32")


def _data():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (STEPS * BATCH,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, STEPS * BATCH).astype("int32")
  return x, y


def _new_backbone(kind):
  """A fresh backbone under the current global policy (not from_config,
  which would carry the policy of the model it was taken from)."""
  if kind == "resnet":
    return resnet.ResNet(depth=10, width=8, variant="cifar",
                         num_classes=NUM_CLASSES)
  return small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(8, 16))


@functools.lru_cache(maxsize=None)
def _initial_weights(kind):
  """Seeded float32 initial weights of `kind`, shared by every run."""
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    keras.utils.set_random_seed(7)
    model = conadv_model.ConAdvModel(_new_backbone(kind),
                                     adversary=MODES["conadv"])
    model.build((None,) + SHAPE)
    return tuple(v.numpy() for v in model.backbone.weights)
  finally:
    keras.mixed_precision.set_global_policy(previous)


def _optimizer(name):
  if name == "lars":
    from official_conadv.optimization import lars  # pylint: disable=g-import-not-at-top
    return lars.LARS(learning_rate=1.0, momentum=0.9, weight_decay_rate=5e-5)
  return keras.optimizers.SGD(LR, momentum=0.9)


def _model(kind, mode, jit_compile=False, optimizer="sgd", adversary=None):
  if isinstance(optimizer, str):
    optimizer = _optimizer(optimizer)
  model = conadv_model.ConAdvModel(_new_backbone(kind),
                                   adversary=adversary or MODES[mode])
  model.build((None,) + SHAPE)
  for v, value in zip(model.backbone.weights, _initial_weights(kind)):
    v.assign(value)
  model.compile(
      optimizer=optimizer,
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=jit_compile)
  return model


def _fit(model):
  """STEPS steps of fit; returns each step's loss (not the running mean)."""
  x, y = _data()
  means = []

  class Record(keras.callbacks.Callback):

    def on_train_batch_end(self, batch, logs=None):
      means.append(float(logs["loss"]))

  model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
            epochs=1, verbose=0, shuffle=False, callbacks=[Record()])
  # Logs hold the running mean over the epoch's steps: undo it.
  return [means[0]] + [means[i] * (i + 1) - means[i - 1] * i
                       for i in range(1, len(means))]


@functools.lru_cache(maxsize=None)
def _float32_run(kind, mode, optimizer="sgd"):
  """(final backbone weights, per-step losses) without XLA, float32."""
  model = _model(kind, mode, optimizer=optimizer)
  losses = _fit(model)
  return tuple(v.numpy() for v in model.backbone.weights), tuple(losses)


def _is_float32(variable):
  return keras.backend.standardize_dtype(variable.dtype) == "float32"


def _is_floating(variable):
  return keras.backend.is_float_dtype(variable.dtype)


# ------------------------------------------------------------------- XLA
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", BACKBONES)
def test_xla_matches_non_xla(kind, mode):
  model = _model(kind, mode, jit_compile=True)
  assert model.jit_compile is True
  losses = _fit(model)
  want_weights, want_losses = _float32_run(kind, mode)
  np.testing.assert_allclose(losses, want_losses, rtol=XLA_LOSS_RTOL)
  moved = 0.0
  for v, want, init in zip(model.backbone.weights, want_weights,
                           _initial_weights(kind)):
    np.testing.assert_allclose(v.numpy(), want, atol=XLA_ATOL,
                               rtol=XLA_RTOL, err_msg=v.path)
    moved = max(moved, float(np.abs(want - init).max()))
  assert moved > 1e-2  # The comparison is not between untrained models.


def test_xla_random_start():
  """Random-start attack under XLA: trains, examples valid and random."""
  adversary = conadv_model.AdversaryConfig(
      epsilon=EPSILON, step_size=0.05, delay=1, random_init=True, seed=3)
  model = _model("small_cnn", "conadv", jit_compile=True, adversary=adversary)
  losses = _fit(model)
  assert np.isfinite(losses).all(), losses
  x, y = _data()
  attack = tf.function(model.adversarial_examples, jit_compile=True)
  x_adv = attack(tf.constant(x[:BATCH]), tf.constant(y[:BATCH]),
                 tf.constant(STEPS, tf.int64)).numpy()
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = np.abs(x_adv - x[:BATCH])
  assert delta.max() <= EPSILON + 1e-6
  # |x_adv - x| = step_size everywhere without the random start (clipping
  # aside); the noise makes it vary.
  assert len(np.unique(np.round(delta, 4))) > 10


# ------------------------------------------------------------- bfloat16
def _check_mixed(model, kind, compute_dtype):
  """Dtypes of a mixed-precision ConAdvModel after training."""
  backbone = model.backbone
  assert backbone.dtype_policy.name == f"mixed_{compute_dtype}"
  conv = backbone.stem_conv if kind == "resnet" else backbone.convs[0]
  assert conv.compute_dtype == compute_dtype
  not_float32 = [v.path for v in model.weights + model.optimizer.variables
                 if not _is_float32(v) and _is_floating(v)]
  assert not not_float32
  if model.adversary is not None and model.delay:
    assert all(_is_float32(v) for v in model.schedule.slot(0))
  x, y = _data()
  logits = model(x[:BATCH], training=False)
  assert keras.backend.standardize_dtype(logits.dtype) == "float32"
  assert np.isfinite(logits.numpy()).all()
  if model.adversary is not None:
    x_adv = model.adversarial_examples(
        tf.constant(x[:BATCH]), tf.constant(y[:BATCH]),
        model.optimizer.iterations).numpy()
    assert x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x[:BATCH]).max() <= EPSILON + 1e-6
    # Low-precision gradients still give a sign almost everywhere (no
    # underflow to 0, which would leave pixels unattacked).
    assert (x_adv != x[:BATCH]).mean() > 0.9


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", BACKBONES)
def test_mixed_bfloat16(kind, mode, policy):
  _, want_losses = _float32_run(kind, mode)
  policy("mixed_bfloat16")
  model = _model(kind, mode)
  losses = _fit(model)
  assert np.isfinite(losses).all(), losses
  np.testing.assert_allclose(losses, want_losses,
                             rtol=LOW_PRECISION_LOSS_RTOL)
  _check_mixed(model, kind, "bfloat16")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mixed_bfloat16_with_lars(mode, policy):
  pytest.importorskip("official_conadv.optimization.lars")
  kind = "resnet"
  want_weights, want_losses = _float32_run(kind, mode, "lars")
  policy("mixed_bfloat16")
  model = _model(kind, mode, optimizer="lars")
  losses = _fit(model)
  assert np.isfinite(losses).all(), losses
  np.testing.assert_allclose(losses, want_losses,
                             rtol=LOW_PRECISION_LOSS_RTOL)
  _check_mixed(model, kind, "bfloat16")
  assert all(np.isfinite(v.numpy()).all() for v in model.weights)


# -------------------------------------------------------------- float16
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", BACKBONES)
def test_mixed_float16_with_loss_scale_optimizer(kind, mode, policy):
  _, want_losses = _float32_run(kind, mode)
  policy("mixed_float16")
  optimizer = keras.optimizers.LossScaleOptimizer(_optimizer("sgd"))
  model = _model(kind, mode, optimizer=optimizer)
  assert model.optimizer is optimizer
  losses = _fit(model)
  assert np.isfinite(losses).all(), losses
  # The first step's loss is computed before any update (later steps may
  # differ legitimately if the loss scale skips an update).
  np.testing.assert_allclose(losses[0], want_losses[0],
                             rtol=LOW_PRECISION_LOSS_RTOL)
  assert np.isfinite(float(optimizer.dynamic_scale.numpy()))
  assert max(float(np.abs(v.numpy() - init).max())
             for v, init in zip(model.backbone.weights,
                                _initial_weights(kind))) > 1e-4
  _check_mixed(model, kind, "float16")
