"""ConAdvModel against computations written out in this file.

Nothing of the algorithm comes from the library: PGD is sign-gradient
steps with `tf.GradientTape` on the backbone (route "adv", BN in training
mode), projected to the eps ball and clipped to [0, 1]; losses are
cross-entropies of the backbone's logits plus the L2 regularisation
recomputed from the weights (sum_l c_l * ||W_l||^2); the update is plain
SGD, or SGD behind a dynamic loss scale. The backbone is the function being
trained; its forward pass is the only model code a reference calls.

Under 2-replica MirroredStrategy every replica gets different images (the
two halves of the global batch) and the reference is the global-batch
computation: mean CE over the global batch, regularisation once (BN
statistics over the global batch too: synchronized BN). This pins how the
losses are scaled for a strategy, which a one-device test cannot see.

Tolerances: float32 results differ from the references only by rounding
(graph vs eager kernels, all-reduce order): observed <= 3e-7 on weights of
size ~1 that the step moves by >= 1e-2; ATOL + RTOL * |w| (>= 5e-6) leaves
more than 15x, and the bugs these tests are for move weights by >= 3e-2.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv.modeling import conadv_model
from official_conadv.modeling import dual_batch_norm
from official_conadv.modeling import small_cnn
from official_conadv.testing import strategies

NUM_CLASSES = 5
SHAPE = (6, 6, 3)
BATCH = 8  # Global batch: 4 images per replica under Mirrored.
LR = 0.5
L2_CONV, L2_HEAD = 0.05, 0.02
ATOL = 5e-6
RTOL = 5e-5


# ------------------------------------------------------------ backbones
class RegularisedCNN(keras.Model):
  """A backbone of the contract with L2 on its conv and dense kernels.

  images [B, 6, 6, 3] in [0, 1] -> conv3x3 (L2_CONV) -> dual BN
  (synchronized) -> ReLU -> global average pool -> dense (L2_HEAD) ->
  logits [B, NUM_CLASSES] float32.
  """

  def __init__(self, augmented_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.augmented_bn = augmented_bn
    self.conv = keras.layers.Conv2D(
        4, 3, padding="same", use_bias=False,
        kernel_regularizer=keras.regularizers.L2(L2_CONV), name="conv")
    self.bn = dual_batch_norm.DualBatchNormalization(
        synchronized=True, augmented=augmented_bn, name="bn")
    self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
    self.head = keras.layers.Dense(
        NUM_CLASSES, kernel_regularizer=keras.regularizers.L2(L2_HEAD),
        name="logits")

  def call(self, images, training=None, bn_route="main"):
    x = self.bn(self.conv(images), training=training, bn_route=bn_route)
    return keras.ops.cast(self.head(self.pool(keras.ops.relu(x))), "float32")


def _routes(augmented_bn):
  return ("main", "adv", "aug") if augmented_bn else ("main", "adv")


def _build_backbone(net, augmented_bn=False, shape=SHAPE):
  for route in _routes(augmented_bn):
    net(tf.zeros((2,) + shape), training=False, bn_route=route)
  return net


def _known_values(net, seed):
  """Seeded values for every weight: every BN set (main, adv, aug) gets
  its own gamma, beta and moving statistics, so the routes differ."""
  rng = np.random.default_rng(seed)
  values = []
  for v in net.weights:
    leaf = v.path.rsplit("/", 1)[-1]
    if leaf in ("gamma", "moving_variance"):
      value = rng.uniform(0.5, 1.5, v.shape)
    elif leaf in ("beta", "moving_mean", "bias"):
      value = rng.normal(0.0, 0.3, v.shape)
    else:
      value = rng.normal(0.0, 0.5, v.shape)
    values.append(value.astype("float32"))
  return values


def _assign(net, values):
  assert len(net.weights) == len(values)
  for v, value in zip(net.weights, values):
    v.assign(value)


def _data(seed=0, n=BATCH, shape=SHAPE):
  rng = np.random.default_rng(seed)
  # Many pixels exactly at 0 or 1, where the [0, 1] clip bites.
  x = np.clip(rng.uniform(-0.2, 1.2, (n,) + shape), 0.0, 1.0)
  y = rng.integers(0, NUM_CLASSES, n)
  return x.astype("float32"), y.astype("int32")


# ---------------------------------------------------- reference maths
def pgd(net, x, labels, epsilon, step_size, steps):
  """Untargeted L-inf PGD from x (no random start): x_{i+1} =
  clip_[0,1](proj_eps(x_i + step_size * sign(grad_x sum_j CE_j))), logits
  of `net` on route "adv" with batch statistics. `net` is a throwaway copy
  (its moving statistics move)."""
  x0 = tf.constant(x)
  xi = x0
  for _ in range(steps):
    with tf.GradientTape() as tape:
      tape.watch(xi)
      loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=labels, logits=net(xi, training=True, bn_route="adv")))
    xi = xi + step_size * tf.sign(tape.gradient(loss, xi))
    xi = tf.minimum(tf.maximum(xi, x0 - epsilon), x0 + epsilon)
    xi = tf.minimum(tf.maximum(xi, 0.0), 1.0)
  return xi.numpy()


def cross_entropy(labels, logits):
  """Per-example CE, float32 [B], written out: logsumexp(z) - z_y."""
  logits = tf.cast(logits, tf.float32)
  picked = tf.gather(logits, labels, axis=1, batch_dims=1)
  return tf.reduce_logsumexp(logits, axis=-1) - picked


def regularisation(net):
  """sum_l c_l ||W_l||^2 over the two regularised kernels."""
  return (L2_CONV * tf.reduce_sum(tf.square(net.conv.kernel)) +
          L2_HEAD * tf.reduce_sum(tf.square(net.head.kernel)))


def _copy(values, augmented_bn=False):
  net = _build_backbone(RegularisedCNN(augmented_bn=augmented_bn),
                        augmented_bn)
  _assign(net, values)
  return net


def reference_step(values, x, y, adversary, augmented=None):
  """One hand-written SGD step from weights `values` on the global batch.

  Two-branch (augmented None): L = CE_main(x) [+ CE_adv(x_adv)] + reg.
  Three-branch (augmented given): L = (CE_main(x) + CE_aug(augmented)
  [+ CE_adv(x_adv)]) / (2 or 3) + reg. Each CE the mean over the batch,
  x_adv PGD from `values` (step 0: tau >= 1 attacks with theta_0).

  Returns (weights after the step, in backbone order; L).
  """
  three = augmented is not None
  net = _copy(values, three)
  if adversary is not None:
    x_adv = pgd(_copy(values, three), x, y, adversary.epsilon,
                adversary.step_size, adversary.steps)
  with tf.GradientTape() as tape:
    branches = [tf.reduce_mean(cross_entropy(
        y, net(x, training=True, bn_route="main")))]
    if three:
      branches.append(tf.reduce_mean(cross_entropy(
          y, net(augmented, training=True, bn_route="aug"))))
    if adversary is not None:
      branches.append(tf.reduce_mean(cross_entropy(
          y, net(x_adv, training=True, bn_route="adv"))))
    data_loss = tf.add_n(branches)
    if three:
      data_loss = data_loss / len(branches)
    loss = data_loss + regularisation(net)
  variables = net.trainable_variables
  for g, v in zip(tape.gradient(loss, variables), variables):
    if g is not None:
      v.assign_sub(LR * g)
  return [v.numpy() for v in net.weights], float(loss)


def _assert_weights(model_weights, want, start):
  """Every weight equals the reference; the step moved them."""
  moved = 0.0
  for v, w, w0 in zip(model_weights, want, start):
    np.testing.assert_allclose(v.numpy(), w, atol=ATOL, rtol=RTOL,
                               err_msg=v.path)
    moved = max(moved, float(np.abs(w - w0).max()))
  assert moved > 1e-2


ADVERSARY = conadv_model.AdversaryConfig(
    epsilon=0.1, step_size=0.06, steps=2, random_init=False, delay=1)


# ------------------------------------------------------------- 3. PGD
@pytest.mark.parametrize("steps", [1, 2])
def test_adversarial_examples_equal_hand_written_pgd(steps):
  """`ConAdvModel.adversarial_examples` (tau=1, step 0: theta_0) equals
  PGD written out on the backbone's adv route in training mode, and does
  not move the model's moving statistics."""
  backbone = _build_backbone(
      small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8)))
  values = _known_values(backbone, seed=11)
  adversary = conadv_model.AdversaryConfig(
      epsilon=0.1, step_size=0.06, steps=steps, random_init=False, delay=1)
  model = conadv_model.ConAdvModel(backbone, adversary=adversary)
  model.build((None,) + SHAPE)
  model.compile(optimizer=keras.optimizers.SGD(LR),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  _assign(backbone, values)
  x, y = _data(seed=2, n=16)
  stats = [v.numpy() for v in backbone.non_trainable_variables]

  got = model.adversarial_examples(tf.constant(x), tf.constant(y),
                                   tf.constant(0, tf.int64)).numpy()

  for v, before in zip(backbone.non_trainable_variables, stats):
    np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
  reference = _build_backbone(
      small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8)))
  _assign(reference, values)
  want = pgd(reference, x, y, 0.1, 0.06, steps)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)

  # The cases that tell a right attack from a wrong one all occur: pixels
  # clipped at 0 and 1 after moving outward, and (PGD-2) pixels projected
  # back onto the eps ball; elsewhere |x_adv - x| is the step (or 2 steps'
  # worth of opposite signs: 0).
  delta = want - x
  assert ((x == 0.0) & (want == 0.0)).sum() > 0
  assert ((x == 1.0) & (want == 1.0)).sum() > 0
  inside = (x > 0.1) & (x < 0.9)
  if steps == 2:
    assert np.isclose(np.abs(delta[inside]), 0.1, atol=1e-6).mean() > 0.3
  else:
    np.testing.assert_allclose(np.abs(delta[inside]), 0.06, atol=1e-6)
  # And the known weights tell the routes and BN modes apart: the input
  # gradient's signs on "main", or with moving statistics, are not those on
  # "adv" with batch statistics.
  adv = _input_gradient_signs(reference, x, y, "adv", training=True)
  assert (_input_gradient_signs(reference, x, y, "main", True) != adv).any()
  assert (_input_gradient_signs(reference, x, y, "adv", False) != adv).any()


def _input_gradient_signs(net, x, y, route, training):
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    loss = tf.reduce_sum(cross_entropy(y, net(xt, training=training,
                                              bn_route=route)))
  return np.sign(tape.gradient(loss, xt).numpy())


# ---------------------------------------------------- 4./5. train step
def _train_one_step(strategy_name, adversary, augmented_bn, inputs, y,
                    values):
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    backbone = _build_backbone(RegularisedCNN(augmented_bn=augmented_bn),
                               augmented_bn)
    model = conadv_model.ConAdvModel(
        backbone, adversary=adversary,
        augmented_route="aug" if augmented_bn else "main")
    model.build((None,) + SHAPE)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    _assign(backbone, values)
  assert len(model.losses) == 2  # The regulariser is really there.
  history = model.fit(tf.data.Dataset.from_tensor_slices((inputs, y)).batch(
      BATCH), epochs=1, verbose=0, shuffle=False).history
  assert int(model.optimizer.iterations.numpy()) == 1
  return model, history


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
@pytest.mark.parametrize("mode", ["baseline", "conadv"])
def test_three_branch_step_equals_reference(strategy_name, mode):
  """augmented_route="aug", regularised backbone: one step of fit equals
  L = (CE_main(image) + CE_aug(aa) [+ CE_adv(x_adv)]) / (3 or 2) + reg,
  one SGD update, also with the global batch split over 2 replicas."""
  adversary = ADVERSARY if mode == "conadv" else None
  x, y = _data(seed=3)
  aa = np.clip(1.0 - x + 0.1 * np.sin(7.0 * x), 0.0, 1.0).astype("float32")
  values = _known_values(_build_backbone(RegularisedCNN(augmented_bn=True),
                                         True), seed=5)
  model, history = _train_one_step(strategy_name, adversary, True,
                                   {"image": x, "augmented": aa}, y, values)
  want, loss = reference_step(values, x, y, adversary, augmented=aa)
  _assert_weights(model.backbone.weights, want, values)
  np.testing.assert_allclose(history["loss"], [loss], rtol=1e-5)


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
@pytest.mark.parametrize("mode", ["baseline", "conadv"])
def test_two_branch_step_equals_reference(strategy_name, mode):
  """Default route, regularised backbone: one step of fit equals
  L = CE_main(x) [+ CE_adv(x_adv)] + reg and one SGD update, also with the
  global batch split over 2 replicas (regularisation counted once)."""
  adversary = ADVERSARY if mode == "conadv" else None
  x, y = _data(seed=4)
  values = _known_values(_build_backbone(RegularisedCNN()), seed=6)
  model, history = _train_one_step(strategy_name, adversary, False, x, y,
                                   values)
  want, loss = reference_step(values, x, y, adversary)
  _assert_weights(model.backbone.weights, want, values)
  np.testing.assert_allclose(history["loss"], [loss], rtol=1e-5)


# ---------------------------------------------------------- 6. evaluate
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_evaluate_loss_is_weighted_mean_ce_plus_regularisation(
    strategy_name):
  """evaluate on (images, labels, weights) with zero-weight padding rows
  (NaN images among them): loss = sum_i w_i CE_i / sum_i w_i + reg."""
  real, total = 19, 24  # 3 batches of 8; the last one 3 real + 5 padding.
  x, y = _data(seed=7, n=total)
  x[real:] = np.nan
  y[real:] = 0
  w = (np.arange(total) < real).astype("float32")
  values = _known_values(_build_backbone(RegularisedCNN()), seed=8)
  strategy = strategies.get(strategy_name)
  with strategy.scope():
    backbone = _build_backbone(RegularisedCNN())
    model = conadv_model.ConAdvModel(backbone, adversary=ADVERSARY)
    model.build((None,) + SHAPE)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    _assign(backbone, values)
  results = model.evaluate(
      tf.data.Dataset.from_tensor_slices((x, y, w)).batch(BATCH), verbose=0,
      return_dict=True)

  reference = _copy(values)
  ce = cross_entropy(y[:real], reference(x[:real], training=False,
                                         bn_route="main")).numpy()
  reg = float(regularisation(reference))
  assert reg > 0.1 * ce.mean()  # Large enough to be seen if mishandled.
  assert results["examples"] == real
  np.testing.assert_allclose(results["loss"], ce.mean() + reg, rtol=1e-5)


# --------------------------------------------------------- 7. float16
@pytest.fixture
def float16_policy():
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy("float32")


F16_STEPS = 3
F16_LR = 0.2
# Large enough that step 0's scaled gradients overflow float16 (observed:
# step 0 skipped and the scale halved to 2**18, steps 1 and 2 applied; with
# 2**18 from the start no step overflows).
F16_INITIAL_SCALE = 2 ** 19
# float16 compute: the loop runs the same float16 kernels eagerly that fit
# runs in a graph; observed: bitwise equal. float16 rounding is ~5e-4
# relative, so a kernel summing in another order could move a gradient by
# that much, i.e. a weight by ~lr * |g| * 5e-4 <= 1e-4: the bounds allow
# that, and stay 100x below one step's movement (> 1e-2), which a wrong
# scale step changes by a factor of 2**17 or more.
F16_ATOL = 1e-4
F16_RTOL = 1e-3


def _f16_net():
  return _build_backbone(small_cnn.SmallCNN(num_classes=NUM_CLASSES,
                                            filters=(4, 8)))


def test_mixed_float16_steps_equal_hand_written_loss_scaled_loop(
    float16_policy):
  """mixed_float16 + LossScaleOptimizer(SGD): 3 steps of fit equal the loop
  'loss * scale -> gradients (float16 compute, float32 variables) ->
  / scale -> if all finite: SGD step, else skip and halve the scale', with
  the same final scale."""
  del float16_policy
  backbone = _f16_net()
  assert backbone.convs[0].compute_dtype == "float16"
  values = _known_values(backbone, seed=12)
  _assign(backbone, values)
  optimizer = keras.optimizers.LossScaleOptimizer(
      keras.optimizers.SGD(F16_LR), initial_scale=F16_INITIAL_SCALE)
  model = conadv_model.ConAdvModel(backbone, adversary=None)
  model.build((None,) + SHAPE)
  model.compile(optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  x, y = _data(seed=9, n=F16_STEPS * BATCH)
  model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
            epochs=1, verbose=0, shuffle=False)

  net = _f16_net()
  _assign(net, values)
  scale = float(F16_INITIAL_SCALE)
  applied = skipped = 0
  for t in range(F16_STEPS):
    rows = slice(t * BATCH, (t + 1) * BATCH)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(cross_entropy(
          y[rows], net(x[rows], training=True, bn_route="main")))
      scaled = loss * scale
    # The adversarial BN set gets no gradient in this baseline.
    pairs = [(g / scale, v) for g, v in zip(
        tape.gradient(scaled, net.trainable_variables),
        net.trainable_variables) if g is not None]
    if all(bool(tf.reduce_all(tf.math.is_finite(g))) for g, _ in pairs):
      for g, v in pairs:
        v.assign_sub(F16_LR * g)
      applied += 1
    else:
      scale /= 2.0
      skipped += 1
  # Both cases occur: updates, and a step whose float16 gradients overflow.
  assert applied >= 2 and skipped >= 1, (applied, skipped)

  # Trainable weights only: the loss-scale step does not touch the BN
  # moving statistics.
  moved = 0.0
  for got, want, start in zip(model.backbone.trainable_variables,
                              net.trainable_variables,
                              [v for v, w in zip(values, backbone.weights)
                               if w.trainable]):
    assert got.dtype == "float32"
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=F16_ATOL,
                               rtol=F16_RTOL, err_msg=got.path)
    moved = max(moved, float(np.abs(want.numpy() - start).max()))
  assert moved > 1e-2
  assert float(optimizer.dynamic_scale.numpy()) == scale
