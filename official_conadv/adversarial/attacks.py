"""L-inf PGD adversary used by ConAdv (paper Sec. 4, Algorithm 1).

The attack is a small pure function of a logits function: it never touches
model variables itself. `ConAdvModel` builds that logits function from the
*stale* weights theta_{t - tau} with `keras.Model.stateless_call`, routed
through the adversarial batch norm in training mode, and throws away the
updated moving statistics, so the attack never changes the model.

Units: images and `epsilon` / `step_size` are in [0, 1] pixel units. The
backbone normalises (mean/std) inside, so the attack never sees normalised
pixels. 4/255 in these units is what the authors' released code amounts to
(their 9 * 2/255 was applied in a [-1, 1]-like space to normalised images).

PGD-k with random start (Madry et al. 2018), k = `steps`:

    x_0     = x + U(-eps, eps)                (x_0 = x for a fraction
                                               `prob_start_from_clean` of
                                               batches, or random_init=False)
    x_{i+1} = clip_[0,1](proj_{|.-x|<=eps}(x_i + s * sign(grad_x CE(f(x_i), y))))

Untargeted attacks ascend the cross entropy of the true label. Targeted
attacks (`targeted=True`, what the authors' code does) descend the cross
entropy of a uniformly random *wrong* label: x_{i+1} uses `- s * sign(...)`.
"""

import dataclasses
from typing import Callable, Optional

import keras
import tensorflow as tf


def _check_probability(name, value):
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


@keras.saving.register_keras_serializable(package="official_conadv")
@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Hyperparameters of the L-inf PGD attack.

  Attributes:
    epsilon: L-inf radius in [0, 1] pixel units (>= 0). Paper row default
      4/255 (see module docstring for the authors' units).
    step_size: size of each signed-gradient step, > 0, pixel units.
    steps: number of PGD steps, >= 1 (ConAdv uses 1).
    random_init: start from x + U(-eps, eps) instead of x.
    prob_start_from_clean: fraction of batches (one draw per global batch and
      step) that start from the clean image even when random_init is on. The
      authors' code uses 0.2; the default 0 always starts at random.
    targeted: attack toward a uniformly random wrong label (authors' code)
      instead of away from the true label (default, the paper's wording).
  """

  epsilon: float = 4.0 / 255.0
  step_size: float = 4.0 / 255.0
  steps: int = 1
  random_init: bool = True
  prob_start_from_clean: float = 0.0
  targeted: bool = False

  def __post_init__(self):
    validate_attack_args(self.epsilon, self.step_size, self.steps,
                         self.prob_start_from_clean)

  def get_config(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, config):
    return cls(**config)


def validate_attack_args(epsilon, step_size, steps, prob_start_from_clean):
  """Raises ValueError naming the first invalid attack argument."""
  if not isinstance(epsilon, (int, float)) or epsilon < 0:
    raise ValueError(f"`epsilon` must be a number >= 0, got {epsilon!r}.")
  if not isinstance(step_size, (int, float)) or step_size <= 0:
    raise ValueError(f"`step_size` must be a number > 0, got {step_size!r}.")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}.")
  _check_probability("prob_start_from_clean", prob_start_from_clean)


def label_ids(labels: tf.Tensor) -> tf.Tensor:
  """Integer class ids from int labels [B] or one-hot/smoothed labels [B, C]."""
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank is not None and labels.shape.rank >= 2:
    return tf.argmax(labels, axis=-1, output_type=tf.int32)
  return tf.cast(tf.reshape(labels, [-1]), tf.int32)


def random_wrong_labels(labels: tf.Tensor, num_classes: int,
                        seed: tf.Tensor) -> tf.Tensor:
  """Uniformly random label != labels[i] for each i; shape [B], int32."""
  if num_classes < 2:
    raise ValueError(
        f"A targeted attack needs `num_classes` >= 2, got {num_classes}.")
  offset = tf.random.stateless_uniform(
      tf.shape(labels), seed=seed, minval=1, maxval=num_classes,
      dtype=tf.int32)
  return (labels + offset) % num_classes


def pgd_attack(logits_fn: Callable[[tf.Tensor], tf.Tensor],
               images: tf.Tensor,
               labels: tf.Tensor,
               config: AttackConfig,
               seed: tf.Tensor,
               batch_seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Returns L-inf PGD adversarial examples for `images`.

  Args:
    logits_fn: maps images [B, H, W, C] in [0, 1] to logits [B, num_classes].
      For ConAdv this is the backbone at theta_{t - tau}, bn_route="adv",
      training mode, without moving-statistics updates.
    images: float [B, H, W, C] clean images in [0, 1].
    labels: int class ids [B] or one-hot [B, num_classes].
    config: `AttackConfig`.
    seed: int32/int64 [2] stateless seed for the per-example noise and the
      random target labels (fold the replica id into it under a strategy).
    batch_seed: [2] stateless seed for the per-batch "start from clean" draw;
      keep it equal on every replica so the whole global batch agrees.
      Defaults to `seed`.

  Returns:
    float [B, H, W, C] in [0, 1] with |x_adv - images|_inf <= epsilon, no
    gradient path back to `images` (stop_gradient).
  """
  images = tf.stop_gradient(tf.convert_to_tensor(images))
  seed = tf.cast(seed, tf.int32)
  batch_seed = seed if batch_seed is None else tf.cast(batch_seed, tf.int32)
  eps = tf.cast(config.epsilon, images.dtype)
  step = tf.cast(config.step_size, images.dtype)
  noise_seed, target_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  ids = label_ids(labels)

  x = images
  if config.random_init and config.epsilon > 0:
    noise = tf.random.stateless_uniform(
        tf.shape(images), seed=noise_seed, minval=-1.0, maxval=1.0,
        dtype=images.dtype) * eps
    x = images + noise
    if config.prob_start_from_clean > 0:
      # One draw per (global) batch: where it is below p, start clean.
      u = tf.random.stateless_uniform([], seed=batch_seed)
      x = tf.where(u < config.prob_start_from_clean, images, x)
    x = tf.clip_by_value(x, 0.0, 1.0)

  target = ids
  direction = 1.0
  for i in range(config.steps):
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = tf.cast(logits_fn(x), tf.float32)
      if config.targeted and i == 0:
        # The number of classes is only known once the logits exist.
        target = random_wrong_labels(ids, logits.shape[-1], target_seed)
        direction = -1.0
      # Sum (not mean) so the per-example gradient does not shrink with B;
      # only its sign is used anyway.
      loss = tf.reduce_sum(
          tf.nn.sparse_softmax_cross_entropy_with_logits(
              labels=target, logits=logits))
    grad = tape.gradient(loss, x)
    x = x + direction * step * tf.sign(tf.cast(grad, x.dtype))
    x = tf.clip_by_value(x, images - eps, images + eps)
    x = tf.clip_by_value(x, 0.0, 1.0)
  return tf.stop_gradient(x)
