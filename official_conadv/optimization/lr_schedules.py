"""Learning-rate schedules: MLPerf-style linear warmup + polynomial decay.

ConAdv's large-batch runs (Liu et al., ICLR 2022) and the MLPerf ResNet-50
LARS recipe they build on warm the rate up linearly from 0 for a few epochs,
then decay it polynomially (power 2) to a small end value.

Step convention. `schedule(step)` is the rate of the update made when the
optimizer has already made `step` updates: Keras 3 passes
`optimizer.iterations` before its increment, so step 0 is the first update and
step `total_steps - 1` the last one of a `total_steps`-update run. With
`w = warmup_steps`, `T = total_steps`:

  0 <= step < w : warmup_start_lr + (peak - warmup_start_lr) * step / w
  w <= step < T : (peak - end) * (1 - (step - w) / (T - w)) ** power + end
  step >= T     : end

so lr(0) = warmup_start_lr, lr(w) = peak, lr(T) = end, continuous at w. (With
`warmup_start_lr=0`, the default, the first update has rate 0, as in the MLPerf
reference.) If T == w there is no decay phase: lr = end from step w on.

tf-models-official equivalent (checked step by step in
`lr_schedules_test.py`, for any `warmup_start_lr`):

  official.modeling.optimization.lr_schedule.LinearWarmup(
      PolynomialDecayWithOffset(initial_learning_rate=peak,
                                decay_steps=T - w, end_learning_rate=end,
                                power=power, offset=w),
      warmup_steps=w, warmup_learning_rate=warmup_start_lr)

Its `PolynomialWarmUp` (power 1) in place of `LinearWarmup` differs at step 0
only: it uses max(step, 1), so its first update gets peak / w instead of 0.
The MLPerf TF reference (`lars_util.poly_rate_schedule`) has the same warmup
but starts decaying one step later, over T - w + 1 steps
(`polynomial_decay(peak, max(1, step - w), T - w + 1)`); the difference is one
step's worth of decay.

Gradient accumulation: with `gradient_accumulation_steps=N` Keras 3 passes the
micro-step counter (N per update), so give `total_steps`/`warmup_steps` in
micro-steps there.
"""

import math
import numbers

import keras
from keras import ops


def _number(name, value, minimum=0.0):
  """Finite real >= minimum; ValueError naming `name`."""
  if (not isinstance(value, numbers.Real) or isinstance(value, bool) or
      not math.isfinite(value) or value < minimum):
    raise ValueError(f"`{name}` must be a finite number >= {minimum:g}, got "
                     f"{value!r}.")
  return float(value)


def _integer(name, value, minimum):
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or
      value < minimum):
    raise ValueError(f"`{name}` must be an integer >= {minimum}, got "
                     f"{value!r}.")
  return int(value)


@keras.saving.register_keras_serializable(package="official_conadv")
class WarmupPolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak_learning_rate`, then polynomial decay to the end.

  See the module docstring for the exact formula and step convention.
  Pure tensor arithmetic (`ops.where`/`minimum`/`clip`), so it runs in eager,
  under `tf.function` and XLA, on int or float steps, scalar or batched.

  Args:
    peak_learning_rate: rate at step `warmup_steps`, >= 0.
    total_steps: number of updates T of the run (rate `end` from step T), >= 1.
    warmup_steps: linear warmup length w, 0 <= w <= total_steps.
    end_learning_rate: final rate, >= 0 (1e-4 in MLPerf / the authors' runs).
    power: decay exponent, > 0 (2 for MLPerf, 1.6 in the authors' 96K run).
    warmup_start_lr: rate at step 0, >= 0.

  Returns (when called with `step`): float32 tensor of `step`'s shape.

  Raises:
    ValueError: an argument out of range; the message names it.
  """

  def __init__(self, peak_learning_rate, total_steps, warmup_steps,
               end_learning_rate=1e-4, power=2.0, warmup_start_lr=0.0):
    self.peak_learning_rate = _number("peak_learning_rate", peak_learning_rate)
    self.total_steps = _integer("total_steps", total_steps, 1)
    self.warmup_steps = _integer("warmup_steps", warmup_steps, 0)
    if self.warmup_steps > self.total_steps:
      raise ValueError(f"`warmup_steps` ({warmup_steps}) must be <= "
                       f"`total_steps` ({total_steps}).")
    self.end_learning_rate = _number("end_learning_rate", end_learning_rate)
    self.power = _number("power", power)
    if self.power <= 0:
      raise ValueError(f"`power` must be > 0, got {power!r}.")
    self.warmup_start_lr = _number("warmup_start_lr", warmup_start_lr)

  def __call__(self, step):
    step = ops.cast(step, "float32")
    peak, end = self.peak_learning_rate, self.end_learning_rate
    start = self.warmup_start_lr
    warmup = float(self.warmup_steps)
    decay_steps = float(self.total_steps - self.warmup_steps)
    if decay_steps > 0:
      done = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
      decayed = (peak - end) * ops.power(1.0 - done, self.power) + end
    else:  # No decay phase: `end` from step total_steps == warmup_steps.
      decayed = ops.full_like(step, end)
    if self.warmup_steps == 0:
      return decayed
    # Same operation order as tf-models-official's LinearWarmup.
    warm = start + ops.minimum(step, warmup) / warmup * (peak - start)
    return ops.where(step < warmup, warm, decayed)

  def get_config(self):
    return {
        "peak_learning_rate": self.peak_learning_rate,
        "total_steps": self.total_steps,
        "warmup_steps": self.warmup_steps,
        "end_learning_rate": self.end_learning_rate,
        "power": self.power,
        "warmup_start_lr": self.warmup_start_lr,
    }


def scale_learning_rate(base_lr, batch_size, base_batch_size=256,
                        rule="linear"):
  """Rate for `batch_size` from `base_lr` tuned at `base_batch_size`.

  "linear": base_lr * batch_size / base_batch_size (Goyal et al. 2017);
  "sqrt":   base_lr * sqrt(batch_size / base_batch_size) (Krizhevsky 2014;
            the usual rule for LARS/LAMB at very large batches).

  Raises:
    ValueError: negative `base_lr`, non-positive batch sizes or an unknown
      `rule`; the message names the argument.
  """
  base_lr = _number("base_lr", base_lr)
  batch_size = _integer("batch_size", batch_size, 1)
  base_batch_size = _integer("base_batch_size", base_batch_size, 1)
  ratio = batch_size / base_batch_size
  if rule == "linear":
    return base_lr * ratio
  if rule == "sqrt":
    return base_lr * math.sqrt(ratio)
  raise ValueError(f"`rule` must be 'linear' or 'sqrt', got {rule!r}.")
