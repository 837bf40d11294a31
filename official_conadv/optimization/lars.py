"""LARS (You, Gitman, Ginsburg 2017, arXiv 1708.03888) as a Keras 3 optimizer.

ConAdv (Liu et al., ICLR 2022) trains every large-batch ResNet-50 row of its
experiments, adversarial or not, with LARS + momentum, L2 weight decay and a
warmup / polynomial-decay schedule (`lr_schedules.py`).

This is tf-models-official's `official.modeling.optimization.lars.LARS`
(same constructor arguments, same update to float tolerance; see
`lars_test.py`) rebuilt on Keras 3's `keras.optimizers.Optimizer`, because
theirs subclasses tf_keras' legacy optimizer and Keras 3 `compile` rejects it.

Update of one variable w (any shape) with gradient g, learning rate lr (the
float or `schedule(optimizer.iterations)`), momentum m, momentum slot v
(zeros at start), `||.||` the L2 norm over the whole tensor:

  g' = g + weight_decay_rate * w          if w is not excluded from decay
       g                                  otherwise

  classic_momentum=True (default; lr inside the momentum buffer):
    trust = eeta * ||w|| / ||g'||         if ||w|| > 0 and ||g'|| > 0
            1                             otherwise, or w excluded from
                                          layer adaptation
    v <- m * v + lr * trust * g'
    w <- w - v                            (nesterov=False)
    w <- w - (m * v_new + lr * trust * g') (nesterov=True)

  classic_momentum=False (lr applied after the momentum buffer):
    v <- m * v + g'
    u  = v_new                            (nesterov=False)
       = m * v_new + g'                   (nesterov=True)
    trust = eeta * ||w|| / ||u||          (same fall-backs, ||u|| for ||g'||)
    w <- w - lr * trust * u

With a constant lr, an excluded variable (trust 1, no decay) therefore gets
exactly `keras.optimizers.SGD(lr, momentum=m, nesterov=...)`'s update.

Exclusions are regular expressions, each tried with `re.search` on the Keras 3
`variable.path` (the scoped name: "resnet/stage1_block1/bn1/gamma",
"resnet/stage1_block1/bn1/adv/gamma" for the adversarial BN set of
`DualBatchNormalization`, "resnet/logits/bias"; `variable.name` is only the
leaf). `exclude_from_weight_decay=None` means `DEFAULT_EXCLUDE`:

  r"(^|/)(gamma|beta|bias)$"

i.e. every normalization scale/offset and every bias, from both weight decay
and layer adaptation. Why: these are 1-D per-channel parameters; decaying them
only shrinks what BN just normalised (You et al. 2017 and the MLPerf ResNet-50
LARS reference, `skip_list=['batch_normalization', 'bias']`, exclude them too),
and their norms say nothing about a layer's scale, so a trust ratio built on
them is noise (a zero-initialised beta gets trust 1 at first, then
eeta * ||beta|| / ||g||, which all but freezes it). Matching the leaf instead of a scope name
such as "bn"/"batch_norm" catches every Keras 3 normalization layer
(BatchNormalization, its synchronized form, LayerNormalization,
GroupNormalization, `DualBatchNormalization`'s main and `adv` sets) whatever
the layer is called, and does not catch a convolution kernel that merely sits
under a scope whose name contains "bn". Pass `[]` to exclude nothing;
extend with `list(lars.DEFAULT_EXCLUDE) + [...]`.
`exclude_from_layer_adaptation=None` means "the same list as
`exclude_from_weight_decay`" (as in tf-models-official).

Differences from tf-models-official's LARS, all deliberate:
  * defaults: theirs excludes nothing when both lists are None;
  * `exclude_from_layer_adaptation=[]` excludes nothing here; theirs treats an
    empty list like None (falls back to the weight-decay list);
  * theirs matches on `variable.name` ("dense/bias:0" in TF 2); ours on
    `variable.path` ("dense/bias", no ":0" suffix);
  * theirs drops both exclusion lists from `get_config()` (a round trip
    silently loses them); ours keeps them;
  * sparse (`tf.IndexedSlices`) gradients are densified here (the trust ratio
    needs the norm of the whole gradient); theirs raises NotImplementedError;
  * the base optimizer's decoupled `weight_decay` is refused here (theirs has
    no such argument): LARS' decay is `weight_decay_rate`, inside the trust
    ratio.

Distribution: under `tf.distribute` Keras calls `update_step` once per device
with that device's component `tf.Variable`, which has no Keras `.path` (its TF
name is e.g. "bn/gamma/replica_1:0", so even a name-based match would differ
between replicas), so the per-variable decisions are taken once in `build()`
from the Keras variables and looked up by `self._get_variable_index(variable)`,
which maps a component back to its distributed container.

Learning-rate schedules see `optimizer.iterations` before the increment (0 for
the first update). With `gradient_accumulation_steps=N` Keras 3 hands the
schedule the micro-step counter instead (documented upstream), so the first
real update uses `schedule(N - 1)`; express schedule lengths in micro-steps
then.
"""

import math
import numbers
import re
from typing import Optional, Sequence, Tuple

import keras
from keras import ops

from official_conadv.optimization import ema

# Every normalization scale/offset and every bias, by the leaf of the path.
DEFAULT_EXCLUDE: Tuple[str, ...] = (r"(^|/)(gamma|beta|bias)$",)


def _check_patterns(name: str, patterns) -> Optional[Tuple[str, ...]]:
  """None, or a tuple of valid regex strings; ValueError naming `name`."""
  if patterns is None:
    return None
  if isinstance(patterns, str):
    patterns = [patterns]
  if not isinstance(patterns, (list, tuple)) or not all(
      isinstance(p, str) for p in patterns):
    raise ValueError(f"`{name}` must be None, a regex string or a list of "
                     f"regex strings, got {patterns!r}.")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"`{name}` has an invalid regex {p!r}: {e}.") from None
  return tuple(patterns)


def _as_list(patterns):
  return None if patterns is None else list(patterns)


def _real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and (
      math.isfinite(value))


def _variable_path(variable) -> str:
  """Keras 3 `path`; for a bare tf.Variable its name without ":0"."""
  path = getattr(variable, "path", None)
  if isinstance(path, str):
    return path
  return re.sub(r":\d+$", "", variable.name)


@keras.saving.register_keras_serializable(package="official_conadv")
class LARS(ema.AverageWarmup, keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling with momentum and L2 weight decay.

  See the module docstring for the update equations, the default exclusions
  and the differences from tf-models-official's LARS.

  Args:
    learning_rate: float >= 0, or a `keras.optimizers.schedules.
      LearningRateSchedule` (e.g. `lr_schedules.WarmupPolynomialDecay`), or
      a zero-argument callable.
    momentum: momentum coefficient m in [0, 1).
    weight_decay_rate: L2 coefficient added to the gradient before the trust
      ratio, >= 0.
    eeta: LARS trust coefficient, > 0 (0.001 in You et al. and MLPerf).
    nesterov: Nesterov momentum (bool).
    classic_momentum: bool. True (default, as tf-models-official): lr inside
      the momentum buffer. False: lr and trust ratio applied after it.
    exclude_from_weight_decay: regexes searched in `variable.path`; None
      means `DEFAULT_EXCLUDE` (normalization gamma/beta and biases), [] means
      nothing.
    exclude_from_layer_adaptation: regexes; None means the same patterns as
      `exclude_from_weight_decay`.
    name: optimizer name (scope of its variables).
    **kwargs: base `keras.optimizers.Optimizer` arguments: clipnorm,
      clipvalue, global_clipnorm, use_ema, ema_momentum,
      ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps.
      `weight_decay` (decoupled) must stay None.

  Raises:
    ValueError: a hyperparameter out of range or of the wrong type; the
      message names the argument.
  """

  def __init__(self,
               learning_rate=0.01,
               momentum: float = 0.9,
               weight_decay_rate: float = 0.0,
               eeta: float = 0.001,
               nesterov: bool = False,
               classic_momentum: bool = True,
               exclude_from_weight_decay: Optional[Sequence[str]] = None,
               exclude_from_layer_adaptation: Optional[Sequence[str]] = None,
               name: str = "LARS",
               **kwargs):
    if isinstance(learning_rate, numbers.Real) and not isinstance(
        learning_rate, bool):
      if not _real(learning_rate) or learning_rate < 0:
        raise ValueError("`learning_rate` must be a finite float >= 0 (or a "
                         f"schedule), got {learning_rate!r}.")
      learning_rate = float(learning_rate)  # Keras 3 rejects ints.
    if not _real(momentum) or not 0.0 <= momentum < 1.0:
      raise ValueError(f"`momentum` must be a float in [0, 1), got "
                       f"{momentum!r}.")
    if not _real(weight_decay_rate) or weight_decay_rate < 0:
      raise ValueError("`weight_decay_rate` must be a finite float >= 0, got "
                       f"{weight_decay_rate!r}.")
    if not _real(eeta) or eeta <= 0:
      raise ValueError(f"`eeta` must be a finite float > 0, got {eeta!r}.")
    for arg, value in (("nesterov", nesterov),
                       ("classic_momentum", classic_momentum)):
      if not isinstance(value, bool):
        raise ValueError(f"`{arg}` must be a bool, got {value!r}.")
    if kwargs.get("weight_decay") is not None:
      raise ValueError(
          "`weight_decay` (the base optimizer's decoupled decay) is not "
          "supported by LARS: use `weight_decay_rate`, the L2 term added to "
          f"the gradient before the trust ratio. Got weight_decay="
          f"{kwargs['weight_decay']!r}.")
    wd_patterns = _check_patterns("exclude_from_weight_decay",
                                  exclude_from_weight_decay)
    la_patterns = _check_patterns("exclude_from_layer_adaptation",
                                  exclude_from_layer_adaptation)
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = float(momentum)
    self.weight_decay_rate = float(weight_decay_rate)
    self.eeta = float(eeta)
    self.nesterov = nesterov
    self.classic_momentum = classic_momentum
    # Constructor values (tuples: Keras' attribute tracker would wrap a list);
    # None keeps its meaning.
    self._wd_exclude_arg = wd_patterns
    self._la_exclude_arg = la_patterns
    # Per-variable decisions, by variable index, set in build().
    self._decay_flags: Tuple[bool, ...] = ()
    self._adapt_flags: Tuple[bool, ...] = ()

  @property
  def weight_decay_exclusions(self) -> Tuple[str, ...]:
    """Regexes in effect for weight decay (None resolved to the default)."""
    if self._wd_exclude_arg is None:
      return DEFAULT_EXCLUDE
    return self._wd_exclude_arg

  @property
  def layer_adaptation_exclusions(self) -> Tuple[str, ...]:
    """Regexes in effect for the trust ratio (None: the weight-decay ones)."""
    if self._la_exclude_arg is None:
      return self.weight_decay_exclusions
    return self._la_exclude_arg

  def use_weight_decay(self, path: str) -> bool:
    """Whether L2 decay applies to the variable with this `path`."""
    return self.weight_decay_rate > 0 and not any(
        re.search(p, path) for p in self.weight_decay_exclusions)

  def do_layer_adaptation(self, path: str) -> bool:
    """Whether the trust ratio applies to the variable with this `path`."""
    return not any(
        re.search(p, path) for p in self.layer_adaptation_exclusions)

  def exclude_from_weight_decay(self, var_list=None, var_names=None):
    """Not supported: pass `exclude_from_weight_decay=[regex, ...]` instead.

    The Keras 3 base method configures the decoupled `weight_decay`, which
    LARS does not use; silently accepting it would exclude nothing.
    """
    del var_list, var_names
    raise NotImplementedError(
        "LARS takes its exclusions as constructor arguments "
        "(`exclude_from_weight_decay=[regex, ...]`, matched on variable.path).")

  def build(self, var_list):
    """Creates one momentum slot per variable and fixes its exclusions."""
    if self.built:
      return
    super().build(var_list)
    self.momentums = self.add_optimizer_variables(var_list, "momentum")
    paths = [_variable_path(v) for v in var_list]
    self._decay_flags = tuple(self.use_weight_decay(p) for p in paths)
    self._adapt_flags = tuple(self.do_layer_adaptation(p) for p in paths)

  def _trust_ratio(self, w, u):
    """eeta * ||w|| / ||u||, or 1 where either norm is 0 (scalar)."""
    w_norm = ops.sqrt(ops.sum(ops.square(w)))
    u_norm = ops.sqrt(ops.sum(ops.square(u)))
    safe_u_norm = ops.where(u_norm > 0, u_norm, ops.ones_like(u_norm))
    ratio = ops.cast(self.eeta, w.dtype) * w_norm / safe_u_norm
    return ops.where(ops.logical_and(w_norm > 0, u_norm > 0), ratio,
                     ops.ones_like(ratio))

  def update_step(self, gradient, variable, learning_rate):
    """One LARS update of `variable` (a Keras or per-device TF variable)."""
    index = self._get_variable_index(variable)
    dtype = variable.dtype
    if keras.backend.backend() == "tensorflow":
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    lr = ops.cast(learning_rate, dtype)
    g = ops.cast(gradient, dtype)
    w = ops.convert_to_tensor(variable)
    m = ops.cast(self.momentum, dtype)
    v = self.momentums[index]
    if self._decay_flags[index]:
      g = g + ops.cast(self.weight_decay_rate, dtype) * w
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
    """Constructor kwargs (and the base optimizer's); from_config inverts."""
    config = super().get_config()
    config.update({
        "momentum": self.momentum,
        "weight_decay_rate": self.weight_decay_rate,
        "eeta": self.eeta,
        "nesterov": self.nesterov,
        "classic_momentum": self.classic_momentum,
        "exclude_from_weight_decay": _as_list(self._wd_exclude_arg),
        "exclude_from_layer_adaptation": _as_list(self._la_exclude_arg),
    })
    return config
