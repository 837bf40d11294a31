"""LARS (You, Gitman, Ginsburg 2017, arXiv 1708.03888) as a Keras 3 optimizer.

Same constructor arguments and the same update as tf-models-official's
`official.modeling.optimization.lars.LARS` (which subclasses tf_keras' legacy
optimizer and is rejected by Keras 3 `compile`). For a variable w with
gradient g, learning rate lr, momentum m, slot v:

  g' = g + wd * w                              (unless excluded from decay)
  classic_momentum=True (default; LR inside the momentum buffer):
    trust = eeta * ||w|| / ||g'||              (1 if either norm is 0, or if
                                                excluded from adaptation)
    v <- m * v + lr * trust * g'
    w <- w - (m * v + lr * trust * g' if nesterov else v)
  classic_momentum=False:
    v <- m * v + g'
    u  = m * v + g' if nesterov else v
    trust = eeta * ||w|| / ||u||               (same fall-backs)
    w <- w - lr * trust * u

Exclusions are regular expressions searched (`re.search`) in the Keras 3
`variable.path` (e.g. "resnet/stage1_block1/bn1/gamma", or ".../bn1/adv/gamma"
for the adversarial BN). By default BN parameters and biases are excluded
from both weight decay and layer adaptation (`DEFAULT_EXCLUDE`), as in the
MLPerf / authors' ResNet-50 LARS runs: their norms are tiny or meaningless for
a trust ratio, and decaying them hurts. `exclude_from_layer_adaptation=None`
means "the same as exclude_from_weight_decay", as in tf-models-official.

Under tf.distribute the variable handed to `update_step` can be the
per-replica TF variable without a usable `.path`, so exclusions are decided
once in `build()` and looked up by the variable's index.
"""

import re
from typing import List, Optional, Sequence

import keras
from keras import ops

# BN scale/offset (gamma, beta) and biases: the leaf of the variable path.
DEFAULT_EXCLUDE = (r"(^|/)gamma$", r"(^|/)beta$", r"(^|/)bias$")


def _check_patterns(name, patterns):
  if patterns is None:
    return None
  if isinstance(patterns, str):
    patterns = [patterns]
  if not isinstance(patterns, (list, tuple)) or not all(
      isinstance(p, str) for p in patterns):
    raise ValueError(f"`{name}` must be a list of regex strings or None, got "
                     f"{patterns!r}.")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"`{name}` has an invalid regex {p!r}: {e}.") from None
  return list(patterns)


@keras.saving.register_keras_serializable(package="official_conadv")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling with momentum and L2 weight decay.

  Args:
    learning_rate: float or `LearningRateSchedule`, >= 0.
    momentum: in [0, 1).
    weight_decay_rate: L2 coefficient added to the gradient, >= 0.
    eeta: LARS trust coefficient, > 0.
    nesterov: Nesterov momentum.
    classic_momentum: learning rate inside the momentum buffer (True, the
      tf-models-official default) or applied after it (False).
    exclude_from_weight_decay: regexes on `variable.path`; None means
      `DEFAULT_EXCLUDE` (BN gamma/beta and biases). Pass [] to exclude nothing.
    exclude_from_layer_adaptation: regexes; None means the same as
      `exclude_from_weight_decay`.
    name: optimizer name.
    **kwargs: base `keras.optimizers.Optimizer` arguments (clipnorm,
      global_clipnorm, loss_scale_factor, gradient_accumulation_steps, ...).
  """

  def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay_rate=0.0,
               eeta=0.001, nesterov=False, classic_momentum=True,
               exclude_from_weight_decay: Optional[Sequence[str]] = None,
               exclude_from_layer_adaptation: Optional[Sequence[str]] = None,
               name="LARS", **kwargs):
    if isinstance(learning_rate, (int, float)) and not isinstance(
        learning_rate, bool) and learning_rate < 0:
      raise ValueError(f"`learning_rate` must be >= 0, got {learning_rate}.")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
      raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
    if not isinstance(weight_decay_rate, (int, float)) or weight_decay_rate < 0:
      raise ValueError("`weight_decay_rate` must be >= 0, got "
                       f"{weight_decay_rate!r}.")
    if not isinstance(eeta, (int, float)) or eeta <= 0:
      raise ValueError(f"`eeta` must be > 0, got {eeta!r}.")
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = float(momentum)
    self.weight_decay_rate = float(weight_decay_rate)
    self.eeta = float(eeta)
    self.nesterov = bool(nesterov)
    self.classic_momentum = bool(classic_momentum)
    self.exclude_from_weight_decay = _check_patterns(
        "exclude_from_weight_decay", exclude_from_weight_decay)
    self.exclude_from_layer_adaptation = _check_patterns(
        "exclude_from_layer_adaptation", exclude_from_layer_adaptation)
    self._decay_flags: List[bool] = []
    self._adapt_flags: List[bool] = []

  # The patterns in effect (the constructor values stay as given for config).
  def _decay_patterns(self):
    if self.exclude_from_weight_decay is None:
      return list(DEFAULT_EXCLUDE)
    return self.exclude_from_weight_decay

  def _adaptation_patterns(self):
    if self.exclude_from_layer_adaptation is None:
      return self._decay_patterns()
    return self.exclude_from_layer_adaptation

  def use_weight_decay(self, path: str) -> bool:
    """Whether L2 decay applies to a variable with this `path`."""
    return bool(self.weight_decay_rate) and not any(
        re.search(p, path) for p in self._decay_patterns())

  def do_layer_adaptation(self, path: str) -> bool:
    """Whether the trust ratio applies to a variable with this `path`."""
    return not any(re.search(p, path) for p in self._adaptation_patterns())

  def build(self, var_list):
    if self.built:
      return
    super().build(var_list)
    self.momentums = self.add_optimizer_variables(var_list, "momentum")
    self._decay_flags = [self.use_weight_decay(v.path) for v in var_list]
    self._adapt_flags = [self.do_layer_adaptation(v.path) for v in var_list]

  def _trust_ratio(self, w, u):
    w_norm = ops.sqrt(ops.sum(ops.square(w)))
    u_norm = ops.sqrt(ops.sum(ops.square(u)))
    ratio = self.eeta * w_norm / ops.where(u_norm > 0, u_norm, 1.0)
    return ops.where((w_norm > 0) & (u_norm > 0), ratio, 1.0)

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    m = ops.cast(self.momentum, variable.dtype)
    v = self.momentums[index]
    w = variable
    if self._decay_flags[index]:
      g = g + ops.cast(self.weight_decay_rate, variable.dtype) * w
    adapt = self._adapt_flags[index]
    if self.classic_momentum:
      scaled_lr = lr * self._trust_ratio(w, g) if adapt else lr
      next_v = m * v + scaled_lr * g
      update = m * next_v + scaled_lr * g if self.nesterov else next_v
      self.assign(v, next_v)
      self.assign_sub(variable, update)
    else:
      next_v = m * v + g
      update = m * next_v + g if self.nesterov else next_v
      scaled_lr = lr * self._trust_ratio(w, update) if adapt else lr
      self.assign(v, next_v)
      self.assign_sub(variable, scaled_lr * update)

  def get_config(self):
    config = super().get_config()
    config.update({
        "momentum": self.momentum,
        "weight_decay_rate": self.weight_decay_rate,
        "eeta": self.eeta,
        "nesterov": self.nesterov,
        "classic_momentum": self.classic_momentum,
        "exclude_from_weight_decay": self.exclude_from_weight_decay,
        "exclude_from_layer_adaptation": self.exclude_from_layer_adaptation,
    })
    return config
