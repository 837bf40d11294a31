"""Learning-rate schedules: MLPerf-style linear warmup + polynomial decay.

Step convention: `schedule(step)` is the rate of the update made when the
optimizer has already done `step` updates (Keras passes
`optimizer.iterations`), so step 0 is the first update.

  step <  warmup_steps: start + (peak - start) * max(step, 1) / warmup_steps
  step >= warmup_steps: (peak - end) * (1 - (step - warmup) / (total - warmup))**power + end
  step >= total_steps : end

This is the composition of tf-models-official's `PolynomialWarmUp` (linear,
its `power=1`) and `PolynomialDecay` with `offset=warmup_steps` and
`decay_steps = total_steps - warmup_steps`; with `warmup_start_lr=0` (the
default) the two agree step by step (`lr_schedules_test.py` checks it).
"""

import math

import keras
from keras import ops


def _non_negative(name, value):
  if not isinstance(value, (int, float)) or isinstance(value, bool) or (
      value < 0 or math.isnan(value)):
    raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")


@keras.saving.register_keras_serializable(package="official_conadv")
class WarmupPolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak_learning_rate`, then polynomial decay to the end.

  Args:
    peak_learning_rate: rate reached at the end of warmup, >= 0.
    total_steps: number of updates of the whole run, > 0.
    warmup_steps: linear warmup length, 0 <= warmup_steps <= total_steps.
    end_learning_rate: final rate, >= 0 (1e-4 in the MLPerf / authors' runs).
    power: decay exponent, > 0 (2 for MLPerf, 1.6 in the authors' 96K run).
    warmup_start_lr: rate at step 0, >= 0.
  """

  def __init__(self, peak_learning_rate, total_steps, warmup_steps=0,
               end_learning_rate=1e-4, power=2.0, warmup_start_lr=0.0):
    _non_negative("peak_learning_rate", peak_learning_rate)
    _non_negative("end_learning_rate", end_learning_rate)
    _non_negative("warmup_start_lr", warmup_start_lr)
    if isinstance(total_steps, bool) or not isinstance(
        total_steps, int) or total_steps <= 0:
      raise ValueError(f"`total_steps` must be an integer > 0, got "
                       f"{total_steps!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(
        warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
      raise ValueError(f"`warmup_steps` must be an integer in [0, "
                       f"total_steps={total_steps}], got {warmup_steps!r}.")
    if not isinstance(power, (int, float)) or power <= 0:
      raise ValueError(f"`power` must be > 0, got {power!r}.")
    self.peak_learning_rate = float(peak_learning_rate)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.end_learning_rate = float(end_learning_rate)
    self.power = float(power)
    self.warmup_start_lr = float(warmup_start_lr)

  def __call__(self, step):
    step = ops.cast(step, "float32")
    peak, end = self.peak_learning_rate, self.end_learning_rate
    warmup = float(self.warmup_steps)
    # max(step, 1): the first update already gets 1/warmup of the peak (as
    # tf-models-official's PolynomialWarmUp), not a wasted zero-LR step.
    warm = self.warmup_start_lr + (peak - self.warmup_start_lr) * ops.maximum(
        step, 1.0) / max(warmup, 1.0)
    decay_steps = max(float(self.total_steps - self.warmup_steps), 1.0)
    frac = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
    decayed = (peak - end) * ops.power(1.0 - frac, self.power) + end
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
  """base_lr * (batch_size / base_batch_size) ("linear") or its sqrt ("sqrt")."""
  _non_negative("base_lr", base_lr)
  for name, v in (("batch_size", batch_size),
                  ("base_batch_size", base_batch_size)):
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f"`{name}` must be an integer > 0, got {v!r}.")
  ratio = batch_size / base_batch_size
  if rule == "linear":
    return base_lr * ratio
  if rule == "sqrt":
    return base_lr * math.sqrt(ratio)
  raise ValueError(f"`rule` must be 'linear' or 'sqrt', got {rule!r}.")
