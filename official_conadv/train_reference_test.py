"""The trainer (`train_lib.run`) against an independent, hand-written loop.

Nothing of the training mathematics is taken from the library here: the
learning rate is the MLPerf formula written out from the config (linear
warmup over round(warmup_epochs * steps_per_epoch) steps from 0, then
polynomial decay), the loss is label-smoothed cross-entropy written out,
the adversarial examples are PGD written out (sign-gradient steps on the
backbone's "adv" BN route in training mode at the stale weights
theta_{t - tau}, projected to the eps ball and clipped to [0, 1]), and LARS
is written out (L2 decay added before the trust ratio eeta * ||w|| / ||g||,
gamma/beta/bias excluded from both, classic momentum). What the test takes
from the trainer: its initial weights (read by a callback at the start of
the first loop), its batches (`input_pipeline.distributed_dataset`, the
trainer's entry point, read from step 0 for the same seed) and its final
checkpoint.

Also: resuming restores the NEWEST checkpoint (not an older one that would
replay to the same weights) and ends with the uninterrupted run's weights.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from official_conadv import configs
from official_conadv import train_lib
from official_conadv.data import input_pipeline
from official_conadv.modeling import conadv_model
from official_conadv.modeling import small_cnn

# mnist_smoke shrunk: 12x12 digits, batch 8, a 2-step data epoch (16
# examples), so warmup_epochs=1 is a 2-step warmup: lr(0) = 0,
# lr(1) = peak / 2, lr(2) = peak, lr(3) decays. tau = 2: steps 0-2 attack
# with theta_0, step 3 with theta_1 (!= theta_0: lr(1) > 0). PGD-2 without
# random start (no RNG to reproduce), a radius the second step exceeds (the
# projection matters). Every optimizer setting (eeta, weight decay,
# momentum, end rate, power) away from its default, so that a trainer
# ignoring one differs.
TINY = ("model.width=4,data.image_size=12,data.label_smoothing=0.1,"
        "data.shuffle_buffer=16,data.num_train_examples=16,"
        "train.global_batch_size=8,train.eval_batch_size=8,train.eval_steps=1,"
        "train.steps_per_execution=1,train.seed=3,"
        "optimizer.name=lars,optimizer.learning_rate=2.0,"
        "optimizer.warmup_epochs=1.0,optimizer.end_learning_rate=0.05,"
        "optimizer.power=1.5,optimizer.momentum=0.8,optimizer.eeta=0.02,"
        "optimizer.weight_decay=0.005,"
        "adversary.enabled=true,adversary.delay=2,adversary.steps=2,"
        "adversary.random_init=false,adversary.epsilon=0.1,"
        "adversary.step_size=0.06,runtime.mixed_precision=none,"
        "runtime.jit_compile=false")
REFERENCE_STEPS = 4

# Final weights of the trainer vs the loop (float32, 4 steps). The two
# differ only by float rounding (graph vs eager kernels, reduction order):
# observed max |diff| 4e-7 on weights of size 0.03-2. The bounds allow 5x
# that; a trainer ignoring one optimizer setting, the label smoothing, or
# with a one-step-longer warmup is off by 7e-4 (end rate) to 8e-2 (eeta).
ATOL = 2e-6
RTOL = 2e-5


def _config(extra=""):
  return configs.override(experiments.get("mnist_smoke"),
                          TINY + ("," + extra if extra else ""))


class _LoopStarts(keras.callbacks.Callback):
  """Records (step, backbone weights) at the start of every loop's `fit`."""

  def __init__(self):
    super().__init__()
    self.starts = []

  def on_train_begin(self, logs=None):
    model = self.model
    self.starts.append((int(model.optimizer.iterations.numpy()),
                        [v.numpy() for v in model.backbone.weights]))


class _CrashAt(keras.callbacks.Callback):
  """Raises (a crash, not a preemption) once `step` steps are done."""

  def __init__(self, step):
    super().__init__()
    self.step = step

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) >= self.step:
      raise RuntimeError(f"crash after step {self.step}")


def _sizes(config):
  num_train = config.data.num_train_examples
  return config.steps_per_epoch(num_train), config.total_steps(num_train)


def _new_backbone(config):
  """The config's small_cnn, built with both BN routes."""
  m = config.model
  shape = input_pipeline.image_shape(config.data.name, config.data.image_size)
  net = small_cnn.SmallCNN(num_classes=m.num_classes,
                           filters=(m.width, 2 * m.width),
                           bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon)
  for route in ("main", "adv"):
    net(tf.zeros((2,) + shape), training=False, bn_route=route)
  return net


def _trained_backbone_weights(config, model_dir):
  """Backbone weights of the newest checkpoint in model_dir, restored into
  a ConAdvModel made here (the checkpoint holds it under "model")."""
  a = config.adversary
  model = conadv_model.ConAdvModel(
      _new_backbone(config), adversary=conadv_model.AdversaryConfig(
          epsilon=a.epsilon, step_size=a.step_size, steps=a.steps,
          random_init=a.random_init, delay=a.delay))
  model.build((None,) + input_pipeline.image_shape(config.data.name,
                                                   config.data.image_size))
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  tf.train.Checkpoint(model=model).restore(
      path).expect_partial().assert_existing_objects_matched()
  return [v.numpy() for v in model.backbone.weights], [
      v.path.split("/", 1)[1] for v in model.backbone.weights]


def _batches(config, num_steps):
  """The trainer's training batches 0..num_steps-1 (one-hot labels)."""
  steps_per_epoch, _ = _sizes(config)
  ds = input_pipeline.distributed_dataset(
      tf.distribute.get_strategy(), config.data, split="train",
      is_training=True, global_batch_size=config.train.global_batch_size,
      num_classes=config.model.num_classes, seed=config.train.seed,
      start_step=0, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
      augment_pair=config.adversary.enabled)
  out = [(x.numpy(), y.numpy()) for x, y in ds]
  assert len(out) == num_steps
  return out


# ----------------------------------------------------- independent maths
def learning_rate(config, step):
  """MLPerf warmup + polynomial decay, from the config alone."""
  o = config.optimizer
  steps_per_epoch, total = _sizes(config)
  warmup = min(total, int(round(o.warmup_epochs * steps_per_epoch)))
  peak, end = o.learning_rate, min(o.end_learning_rate, o.learning_rate)
  if step < warmup:
    return peak * step / warmup
  if step >= total:
    return end
  return (peak - end) * (1.0 - (step - warmup) / (total - warmup)) ** o.power + end


def smoothed_cross_entropy(one_hot, logits, smoothing):
  """mean_i -sum_c q_ic log softmax(z_i)_c, q = (1 - s) y + s / C."""
  num_classes = one_hot.shape[-1]
  target = one_hot * (1.0 - smoothing) + smoothing / num_classes
  log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
  return -tf.reduce_mean(tf.reduce_sum(target * log_p, axis=-1))


def pgd(net, x, label_ids, epsilon, step_size, steps):
  """Untargeted L-inf PGD without random start on route "adv", BN in
  training mode (the caller's `net` is a throwaway copy: its moving
  statistics are not the model's)."""
  x0 = tf.constant(x)
  xi = x0
  for _ in range(steps):
    with tf.GradientTape() as tape:
      tape.watch(xi)
      logits = tf.cast(net(xi, training=True, bn_route="adv"), tf.float32)
      loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=label_ids, logits=logits))
    xi = xi + step_size * tf.sign(tape.gradient(loss, xi))
    xi = tf.minimum(tf.maximum(xi, x0 - epsilon), x0 + epsilon)
    xi = tf.minimum(tf.maximum(xi, 0.0), 1.0)
  return xi.numpy()


def _excluded(variable):
  """LARS' default exclusion: BN scale/offset and biases, by path leaf."""
  return variable.path.rsplit("/", 1)[-1] in ("gamma", "beta", "bias")


def lars_update(variables, grads, momenta, lr, o):
  for i, (v, g) in enumerate(zip(variables, grads)):
    w = v.numpy().astype(np.float64)
    g = g.numpy().astype(np.float64)
    trust = 1.0
    if not _excluded(v):
      g = g + o.weight_decay * w
      w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
      if w_norm > 0 and g_norm > 0:
        trust = o.eeta * w_norm / g_norm
    momenta[i] = o.momentum * momenta[i] + lr * trust * g
    v.assign((w - momenta[i]).astype(np.float32))


def reference_run(config, theta0, batches):
  """Paper Algorithm 1 with the config's LARS, eagerly; returns the final
  backbone weights (trainable and moving statistics, backbone order)."""
  a = config.adversary
  net, attacker = _new_backbone(config), _new_backbone(config)
  assert len(net.weights) == len(theta0)
  for v, value in zip(net.weights, theta0):
    v.assign(value)
  variables = net.trainable_variables
  momenta = [np.zeros(v.shape, np.float64) for v in variables]
  thetas = []  # theta_t, trainable weights at the start of step t.
  smoothing = config.data.label_smoothing
  for t, (x, y) in enumerate(batches):
    thetas.append([v.numpy() for v in variables])
    for v, value in zip(attacker.trainable_variables,
                        thetas[max(t - a.delay, 0)]):
      v.assign(value)
    x_adv = pgd(attacker, x, np.argmax(y, -1).astype(np.int32), a.epsilon,
                a.step_size, a.steps)
    with tf.GradientTape() as tape:
      loss = (smoothed_cross_entropy(
          y, net(x, training=True, bn_route="main"), smoothing) +
              smoothed_cross_entropy(
                  y, net(x_adv, training=True, bn_route="adv"), smoothing))
    grads = tape.gradient(loss, variables)
    lars_update(variables, grads, momenta, learning_rate(config, t),
                config.optimizer)
  return [v.numpy() for v in net.weights]


def test_learning_rate_formula_is_the_one_the_test_means():
  """Pins the test's own formula: the 2-step warmup the test relies on."""
  config = _config(f"train.train_steps={REFERENCE_STEPS}")
  assert _sizes(config) == (2, REFERENCE_STEPS)
  rates = [learning_rate(config, t) for t in range(REFERENCE_STEPS)]
  np.testing.assert_allclose(rates[:3], [0.0, 1.0, 2.0])
  np.testing.assert_allclose(rates[3], (2.0 - 0.05) * 0.5 ** 1.5 + 0.05)


def test_trainer_equals_hand_written_loop(tmp_path):
  """4 steps of `train_lib.run` (2 loops of 2) end with the weights of the
  independent loop: same theta_0, same batches, formula LR with a 2-step
  warmup, hand-written smoothed CE, PGD-2 from theta_{t-2}, LARS."""
  config = _config(f"train.train_steps={REFERENCE_STEPS},"
                   "train.steps_per_loop=2")
  starts = _LoopStarts()
  summary = train_lib.run(config, str(tmp_path / "run"), mode="train",
                          verbose=0, export=False, callbacks=[starts])
  assert summary["step"] == REFERENCE_STEPS
  assert [s for s, _ in starts.starts] == [0, 2]
  theta0 = starts.starts[0][1]

  batches = _batches(config, REFERENCE_STEPS)
  # Real digits, one-hot labels, several classes.
  assert batches[0][0].shape == (8, 12, 12, 1)
  assert 0.0 <= min(b[0].min() for b in batches) < max(
      b[0].max() for b in batches) <= 1.0
  assert len({int(np.argmax(r)) for _, y in batches for r in y}) > 3

  want = reference_run(config, theta0, batches)
  got, paths = _trained_backbone_weights(config, str(tmp_path / "run"))
  assert len(got) == len(want)
  moved = 0.0
  for g, w, w0, path in zip(got, want, theta0, paths):
    np.testing.assert_allclose(g, w, atol=ATOL, rtol=RTOL, err_msg=path)
    moved = max(moved, float(np.abs(w - w0).max()))
  assert moved > 1e-2  # Not a comparison of untrained weights.


# --------------------------------------------------------------- resume
def _checkpoint_values(model_dir):
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if "save_counter" not in k and "CHECKPOINTABLE" not in k}


def _checkpoint_steps(model_dir):
  state = tf.train.get_checkpoint_state(os.path.join(model_dir,
                                                     "checkpoints"))
  return sorted(int(p.rsplit("-", 1)[-1])
                for p in state.all_model_checkpoint_paths)


def test_resume_restores_the_newest_checkpoint(tmp_path):
  """A run that crashed in its third loop (checkpoints at steps 2 and 4)
  resumes at step 4 with step 4's weights, not at the older step 2 (which
  would replay to the same final weights and so must be told apart by its
  step), and ends with the uninterrupted run's checkpoint."""
  config = _config("train.train_steps=6,train.steps_per_loop=2,"
                   "train.keep_checkpoints=3")
  full_dir, crashed_dir = str(tmp_path / "full"), str(tmp_path / "crashed")
  full = _LoopStarts()
  train_lib.run(config, full_dir, mode="train", verbose=0, export=False,
                callbacks=[full])
  assert [s for s, _ in full.starts] == [0, 2, 4]
  assert _checkpoint_steps(full_dir) == [2, 4, 6]

  with pytest.raises(RuntimeError, match="crash after step 5"):
    train_lib.run(config, crashed_dir, mode="train", verbose=0,
                  export=False, callbacks=[_CrashAt(5)])
  assert _checkpoint_steps(crashed_dir) == [2, 4]

  resumed = _LoopStarts()
  summary = train_lib.run(config, crashed_dir, mode="train", verbose=0,
                          export=False, callbacks=[resumed])
  assert summary["step"] == 6
  assert [s for s, _ in resumed.starts] == [4]
  # The weights it resumed with are those of step 4 (bitwise: same
  # computation), and differ from step 2's.
  for got, want in zip(resumed.starts[0][1], full.starts[2][1]):
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b) for a, b in
             zip(full.starts[2][1], full.starts[1][1]))
  assert _checkpoint_steps(crashed_dir) == [2, 4, 6]

  # Every tensor of the final checkpoint (weights, moving statistics,
  # optimizer slots, stale-weight buffer) equals the uninterrupted run's.
  want, got = _checkpoint_values(full_dir), _checkpoint_values(crashed_dir)
  assert set(got) == set(want) and len(want) > 20
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7,
                               err_msg=k)

  # A rerun of the finished run restores step 6 and trains nothing.
  again = _LoopStarts()
  assert train_lib.run(config, crashed_dir, mode="train", verbose=0,
                       export=False, callbacks=[again])["step"] == 6
  assert again.starts == []
