"""Exponential moving average (EMA) of the weights, for evaluation and export.

The average is Keras 3's own: an optimizer made with `use_ema=True,
ema_momentum=m` keeps, for every variable it updates, after every update step
(`optimizer.iterations` = t before the step):

  average = w                                   at t = 0
  average = m_t * average + (1 - m_t) * w       at t > 0

with w the weight after the step and m_t = m (Keras). With `ema_warmup=True`
(`AverageWarmup`: `lars.LARS` and this module's `SGD`; the CLI trainer's
`optimizer.ema_momentum` always uses it) m_t = min(m, (1 + t) / (10 + t)),
the rule of `tf.train.ExponentialMovingAverage(decay=m, num_updates=step)`
that the EfficientNet recipe uses (tensorflow/tpu efficientnet main.py,
`moving_average_decay` 0.9999). Without it, a fixed 0.9999 would keep
0.9999^(T-1) of the first step's weights in the average after T steps: half
of it after the 6,800 steps of the 65,536-image row; with it m_t stays below
m until step 89,990 and the early weights fade. The averages are optimizer
variables, so every checkpoint holds them and a resume continues them
exactly.

What is averaged: the trainable weights (both BN routes' gamma and beta
included). Not the BN moving statistics: they already are exponential
averages (momentum 0.9-0.99 per step), and Keras' EMA and its
`keras.callbacks.SwapEMAWeights` cover trainable variables only. The
EfficientNet recipe (tensorflow/tpu `models/official/efficientnet`,
`utils.get_ema_vars`) averages the moving statistics too; that second
average is not implemented here. Evaluation therefore runs the averaged
weights with the moving statistics of the raw ones.

Training always continues from the raw weights. Keras' `fit` ends by
overwriting the weights with their averages
(`optimizer.finalize_variable_values`): a second `fit` call would continue
from averaged weights. The CLI trainer runs one `fit` per loop inside
`keep_raw_weights`, evaluates and exports inside `averaged_weights`, and so
its loop ends change nothing (a run in loops of 2 and one in a loop of 4 end
with equal checkpoints). `model.fit` users get Keras' behaviour: after `fit`
the model holds the averages, the optimizer still holds the averages too;
use `keep_raw_weights` around `fit` to train on, and
`keras.callbacks.SwapEMAWeights` to evaluate the averages during `fit`
(note: it swaps with additions and subtractions, so the raw weights come
back changed in the last bits, about 1e-7; `averaged_weights` copies them
exactly). Do not combine `SwapEMAWeights(swap_on_epoch=True)` with
`keep_raw_weights` (or pass it to the CLI trainer's `callbacks`): at the last
epoch it copies the swapped-in weights over the averages and counts on
Keras' final overwrite, so the model would keep the averages as its weights.
The stale-weight ring buffer and the lookahead attack read the model's
weights during training steps, i.e. the raw ones.
"""

import contextlib
from typing import List, Optional, Tuple

import keras
from keras import ops


_MISSING = object()


def ema_optimizer(optimizer) -> Optional[keras.optimizers.Optimizer]:
  """The optimizer holding the averages (the inner one of a
  LossScaleOptimizer), or None when `optimizer` keeps none."""
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  if inner is None or not getattr(inner, "use_ema", False):
    return None
  return inner


def enabled(optimizer) -> bool:
  return ema_optimizer(optimizer) is not None


def weight_average_pairs(optimizer) -> List[Tuple]:
  """[(variable, its average)] of an EMA optimizer, built."""
  inner = ema_optimizer(optimizer)
  if inner is None:
    raise ValueError("This optimizer keeps no weight average (use_ema=False).")
  if not inner.built:
    raise ValueError("The optimizer is not built yet: no averages to use.")
  averages = inner._model_variables_moving_average  # pylint: disable=protected-access
  variables = inner._trainable_variables  # pylint: disable=protected-access
  return [(v, a) for v, a in zip(variables, averages) if a is not None]


@contextlib.contextmanager
def averaged_weights(model):
  """Inside: the model's trainable weights are their averages (nothing
  happens without EMA). On exit the raw weights are put back exactly, also
  when the body raises."""
  optimizer = getattr(model, "optimizer", None)
  if not enabled(optimizer):
    yield
    return
  pairs = weight_average_pairs(optimizer)
  # Reads are snapshots: the assigns below do not change these tensors.
  raw = [ops.copy(v.value) for v, _ in pairs]
  for variable, average in pairs:
    variable.assign(average.value)
  try:
    yield
  finally:
    for (variable, _), value in zip(pairs, raw):
      variable.assign(value)


@contextlib.contextmanager
def keep_raw_weights(optimizer):
  """Inside, `optimizer.finalize_variable_values` does nothing, so a
  `model.fit` ends with the raw weights instead of Keras' overwrite with the
  averages."""
  if not enabled(optimizer):
    yield
    return
  previous = vars(optimizer).get("finalize_variable_values", _MISSING)
  optimizer.finalize_variable_values = lambda var_list: None
  try:
    yield
  finally:  # Nested uses restore what the outer one set.
    if previous is _MISSING:
      del optimizer.finalize_variable_values
    else:
      optimizer.finalize_variable_values = previous


class AverageWarmup:
  """Mixin for a Keras optimizer (before it in the bases): the `ema_warmup`
  argument (default False: Keras' fixed momentum). With True, the average's
  momentum at step t > 0 is min(ema_momentum, (1 + t) / (10 + t))
  (module docstring)."""

  def __init__(self, *args, ema_warmup=False, **kwargs):
    super().__init__(*args, **kwargs)
    self.ema_warmup = bool(ema_warmup)

  def _update_model_variables_moving_average(self, trainable_variables):
    """Keras' update (base_optimizer.py) with the warmup momentum."""
    if not (self.use_ema and self.ema_warmup):
      return super()._update_model_variables_moving_average(
          trainable_variables)
    t = ops.cast(self.iterations, "float32")
    warm = ops.minimum(self.ema_momentum, (1.0 + t) / (10.0 + t))
    momentum = ops.where(ops.equal(self.iterations, 0), 0.0, warm)
    for var, average in zip(trainable_variables,
                            self._model_variables_moving_average):
      if average is not None:
        m = ops.cast(momentum, var.dtype)
        average.assign(ops.add(ops.multiply(m, average),
                               ops.multiply(ops.subtract(1, m), var)))
    return None

  def get_config(self):
    config = super().get_config()
    config["ema_warmup"] = self.ema_warmup
    return config


@keras.saving.register_keras_serializable(package="official_conadv")
class SGD(AverageWarmup, keras.optimizers.SGD):
  """`keras.optimizers.SGD` with `ema_warmup` (`AverageWarmup`)."""
