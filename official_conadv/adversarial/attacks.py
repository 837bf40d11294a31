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
from keras import ops

from official_conadv import backends


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


def label_ids(labels):
  """Integer class ids (int32 [B]) from int labels [B] or one-hot/smoothed
  labels [B, C]."""
  labels = ops.convert_to_tensor(labels)
  if len(labels.shape) >= 2:
    return ops.cast(ops.argmax(labels, axis=-1), "int32")
  return ops.cast(ops.reshape(labels, [-1]), "int32")


def random_wrong_labels(labels, num_classes: int, key):
  """Uniformly random label != labels[i] for each i; shape [B], int32."""
  if num_classes < 2:
    raise ValueError(
        f"A targeted attack needs `num_classes` >= 2, got {num_classes}.")
  offset = backends.uniform_int(ops.shape(labels), key, 1, num_classes)
  return (labels + offset) % num_classes


def pgd_attack(logits_fn: Callable,
               images,
               labels,
               config: AttackConfig,
               seed,
               batch_seed=None):
  """Returns L-inf PGD adversarial examples for `images`.

  Written in `keras.ops`; the gradient and the random draws come from
  `official_conadv.backends` (TensorFlow or JAX).

  Args:
    logits_fn: maps images [B, H, W, C] in [0, 1] to logits [B, num_classes].
      For ConAdv this is the backbone at theta_{t - tau}, bn_route="adv",
      training mode, without moving-statistics updates.
    images: float [B, H, W, C] clean images in [0, 1].
    labels: int class ids [B] or one-hot [B, num_classes].
    config: `AttackConfig`.
    seed: the key of the per-example noise and the random target labels
      (`backends.attack_keys`; on TensorFlow an int [2] stateless seed, the
      replica id folded in under a strategy).
    batch_seed: the key of the per-batch "start from clean" draw; keep it
      equal on every replica so the whole global batch agrees. Defaults to
      `seed`.

  Returns:
    float [B, H, W, C] in [0, 1] with |x_adv - images|_inf <= epsilon, no
    gradient path back to `images` (stop_gradient).
  """
  images = ops.stop_gradient(ops.convert_to_tensor(images))
  batch_seed = seed if batch_seed is None else batch_seed
  eps = ops.cast(config.epsilon, images.dtype)
  step = ops.cast(config.step_size, images.dtype)
  noise_seed, target_seed = backends.split(seed)
  ids = label_ids(labels)

  x = images
  if config.random_init and config.epsilon > 0:
    noise = backends.uniform(ops.shape(images), noise_seed, -1.0, 1.0,
                             images.dtype) * eps
    x = images + noise
    if config.prob_start_from_clean > 0:
      # One draw per (global) batch: where it is below p, start clean.
      u = backends.uniform([], batch_seed, 0.0, 1.0, "float32")
      x = ops.where(u < config.prob_start_from_clean, images, x)
    x = ops.clip(x, 0.0, 1.0)

  target = None if config.targeted else ids
  direction = -1.0 if config.targeted else 1.0
  for _ in range(config.steps):

    def loss_fn(x, target=target):
      logits = ops.cast(logits_fn(x), "float32")
      if target is None:
        # Targeted: the number of classes is only known once the logits
        # exist (first step); the draw does not depend on x.
        target = random_wrong_labels(ids, logits.shape[-1], target_seed)
      # Sum (not mean) so the per-example gradient does not shrink with B;
      # only its sign is used anyway.
      return ops.sum(ops.sparse_categorical_crossentropy(
          target, logits, from_logits=True)), target

    (_, target), grad = backends.value_and_grad(loss_fn, x, has_aux=True)
    x = x + direction * step * ops.sign(ops.cast(grad, x.dtype))
    x = ops.clip(x, images - eps, images + eps)
    x = ops.clip(x, 0.0, 1.0)
  return ops.stop_gradient(x)
