"""Dual batch normalization: one BN set for clean, one for adversarial images.

AdvProp (Xie et al., CVPR 2020, Sec. 3.2 "auxiliary batch norm") and ConAdv
(Liu et al., ICLR 2022, Sec. 4 and Algorithm 1) keep two sets of BN parameters
and statistics in every BN layer: `main` for clean images and `adv` for
adversarial ones. Convolutions and the classifier are shared. Evaluation and
export use `main` only.

Optionally (`augmented=True`) a third set, `aug`, serves AutoAugment images:
the authors' released code for the paper's "+AA" rows splits BN by thirds
(clean, AutoAugment, adversarial; see `conadv_model.ConAdvModel`'s
`augmented_route="aug"`). It is off by default, so a layer holds two sets and
the variable paths of existing models do not change.

  inputs [..., C] (axis=-1) or [B, C, H, W] (axis=1), any float dtype
    -> gamma_r * (x - mean) / sqrt(var + epsilon) + beta_r,   r = bn_route
  training=True : (mean, var) = biased batch moments; only route r's moving
                  statistics move: m_r <- m_r * momentum + batch * (1 - momentum)
  training=False: (mean, var) = route r's moving statistics

Variable paths (what `variable.path` reports; the LARS exclusions and the
export in `conadv_model` match on them):

  <layer>/gamma, <layer>/beta, <layer>/moving_mean, <layer>/moving_variance
      exactly what a plain `keras.layers.BatchNormalization` would have;
  <layer>/adv/gamma, <layer>/adv/beta, <layer>/adv/moving_mean, ...
      the adversarial set, held by a nested sub-layer named "adv", so a
      checkpoint or `.keras` file of a main-only model (`adversarial=False`,
      see `main_only()`) simply lacks that sub-tree;
  <layer>/aug/gamma, <layer>/aug/beta, <layer>/aug/moving_mean, ...
      the AutoAugment set (only with `augmented=True`), a sub-layer named
      "aug" built after "adv", dropped by `main_only()` the same way.

Numerics follow Keras 3 `BatchNormalization` exactly (its momentum convention,
biased batch variance for the moving update, float32 statistics under mixed
precision, output cast to the layer's compute dtype). On the TF backend Keras 3
never uses the fused kernel: our ResNet-50 training graph (forward, loss,
gradients) has 4,849 ops with it against 2,227 with the fused kernel
(tf-models-official's: 1,640). Here a 4-D input normalised over its channel axis (NHWC axis -1 /
3, NCHW axis 1) goes through `FusedBatchNormV3` in training and inference,
with the kernel's Bessel-corrected batch variance converted back to the
biased one for the moving update, so both paths agree to float tolerance
(see `dual_batch_norm_test.py`). The fused path runs under XLA, under
`keras.Model.stateless_call` (variables are read through `.value` and
written with `assign`, both of which a `StatelessScope` intercepts) and
with bfloat16 / float16 inputs and float32 parameters. The kernel gets the
layer's epsilon unchanged (`tf.compat.v1.nn.fused_batch_norm` would raise it
to 1.001e-5 for old cuDNN versions, whose minimum was 1e-5; cuDNN >= 7.5 has
none).

Under `tf.distribute` the variables keep Keras 3's aggregation ("none"), so
an unsynchronized replica-context update behaves as Keras 3 BN's does; with
synchronized=True every replica computes the same update.
"""

import contextlib
import threading

import keras
from keras import ops

from official_conadv import backends

# The fused kernel is TensorFlow's (used on that backend only); imported on
# first use, so the JAX path never loads TensorFlow.
tf = backends.LazyModule("tensorflow")

MAIN = "main"
ADV = "adv"
AUG = "aug"
# The two routes of every dual BN (paper Algorithm 1).
ROUTES = (MAIN, ADV)
# Every valid `bn_route`: "aug" exists only on layers built with
# augmented=True.
ALL_ROUTES = (MAIN, ADV, AUG)
# Routes served by an auxiliary sub-layer `<layer>/<route>/` (export drops
# every variable under one of them).
AUXILIARY_ROUTES = (ADV, AUG)

_FUSED_DTYPES = ("float16", "bfloat16", "float32")
_local = threading.local()


def validate_route(bn_route):
  """Raises ValueError unless `bn_route` is "main", "adv" or "aug" (a str).

  Whether a given layer has the "aug" set (or, after export, the "adv" one)
  is checked when it is called (`DualBatchNormalization.route_weights`).
  """
  if not isinstance(bn_route, str) or bn_route not in ALL_ROUTES:
    raise ValueError(
        f"`bn_route` must be one of {ALL_ROUTES} ({MAIN!r}: clean images, "
        f"{ADV!r}: adversarial images, {AUG!r}: AutoAugment images with "
        f"a third BN set), got {bn_route!r}.")


def route_of(variable) -> str:
  """The BN route a variable serves: "adv" or "aug" for a variable of an
  auxiliary BN set (under `<bn>/adv/` or `<bn>/aug/` in its path), "main"
  for every other variable (shared ones included)."""
  path = f"/{variable.path}/"
  for route in AUXILIARY_ROUTES:
    if f"/{route}/" in path:
      return route
  return MAIN


def is_auxiliary(variable) -> bool:
  """True for a variable of an auxiliary BN set (dropped by export)."""
  return route_of(variable) != MAIN


@contextlib.contextmanager
def main_only():
  """Every `DualBatchNormalization` constructed inside gets adversarial=False
  and augmented=False (main set only).

  Rebuilds a backbone without the adversarial BN from its config, e.g. for
  export:

    with dual_batch_norm.main_only():
      clone = resnet.ResNet.from_config(backbone.get_config())

  Nested uses are fine; the setting is per thread.
  """
  _local.depth = getattr(_local, "depth", 0) + 1
  try:
    yield
  finally:
    _local.depth -= 1


def main_only_active():
  """True inside a `main_only()` block (backbones use it to report config)."""
  return getattr(_local, "depth", 0) > 0


def _add_bn_weights(layer, dim, owner):
  """Creates gamma/beta/moving_mean/moving_variance [dim] on `layer`.

  Mirrors `keras.layers.BatchNormalization.build`: float32 (variable dtype)
  weights with autocast disabled, gamma/beta only with scale/center.
  Returns the tuple (gamma or None, beta or None, moving_mean,
  moving_variance).
  """
  shape = (dim,)
  gamma = beta = None
  if owner.scale:
    gamma = layer.add_weight(shape=shape, name="gamma",
                             initializer=owner.gamma_initializer,
                             trainable=True, autocast=False)
  if owner.center:
    beta = layer.add_weight(shape=shape, name="beta",
                            initializer=owner.beta_initializer,
                            trainable=True, autocast=False)
  moving_mean = layer.add_weight(shape=shape, name="moving_mean",
                                 initializer=owner.moving_mean_initializer,
                                 trainable=False, autocast=False)
  moving_variance = layer.add_weight(
      shape=shape, name="moving_variance",
      initializer=owner.moving_variance_initializer, trainable=False,
      autocast=False)
  return gamma, beta, moving_mean, moving_variance


class _BatchNormSet(keras.layers.Layer):
  """Holds an auxiliary BN set ("adv" or "aug"; never called, read by its
  parent).

  A sub-layer, rather than more weights on the parent, so the variables get
  the path `<parent>/<route>/<name>` and the `.keras`/checkpoint tree of the
  parent keeps the main set where a plain BN keeps it.
  """

  def __init__(self, owner, **kwargs):
    super().__init__(**kwargs)
    # Not an attribute: the owner is the parent layer (no tracking cycle).
    self._owner_ref = lambda: owner
    self.gamma = self.beta = self.moving_mean = self.moving_variance = None

  def build(self, param_shape):
    (self.gamma, self.beta, self.moving_mean,
     self.moving_variance) = _add_bn_weights(self, param_shape[0],
                                             self._owner_ref())

  def call(self, inputs):  # pragma: no cover - never called.
    raise NotImplementedError("Read by DualBatchNormalization only.")


@keras.saving.register_keras_serializable(package="official_conadv")
class DualBatchNormalization(keras.layers.Layer):
  """Batch norm with a `main` and an `adv` (and optionally `aug`) set.

  Args:
    axis: the normalised (channel) axis, e.g. -1 for NHWC, 1 for NCHW.
    momentum: moving = moving * momentum + batch * (1 - momentum)
      (Keras convention; tf-models-official's 0.9 by default).
    epsilon: added to the variance, > 0.
    center, scale: learn beta / gamma.
    beta_initializer, gamma_initializer, moving_mean_initializer,
      moving_variance_initializer: Keras initializers (or their names).
    synchronized: cross-replica batch statistics under `tf.distribute`
      (all-reduced sum, sum of squares and count; as Keras 3 BN's option).
      Outside a strategy the same as False. Training then never uses the
      fused kernel.
    adversarial: create the `adv` set. False (export, see `main_only()`)
      makes bn_route="adv" an error.
    augmented: create a third set `aug` (under `<layer>/aug/`) for
      AutoAugment images, as the authors' three-way BN split. False (the
      default, and always under `main_only()`) makes bn_route="aug" an error.
    fused: None = fused kernel where possible (4-D input, channel axis 1 or
      -1/3, float16/bfloat16/float32 input, float32 weights, not a
      synchronized training call); True = require it (ValueError at build if
      impossible); False = never (Keras 3's own composite ops).
    **kwargs: base layer arguments (name, dtype, trainable).

  Call args:
    inputs: float tensor, any rank >= 2 ([B, C], [B, H, W, C], ...).
    training: Python bool; True = batch statistics and a moving-statistics
      update of the chosen route (a layer with trainable=False always runs in
      inference mode, like Keras BN).
    bn_route: "main" (clean images), "adv" (adversarial images) or "aug"
      (AutoAugment images; needs augmented=True).

  Returns:
    Tensor of the input's shape in the layer's compute dtype.
  """

  def __init__(self, axis=-1, momentum=0.9, epsilon=1e-5, center=True,
               scale=True, beta_initializer="zeros", gamma_initializer="ones",
               moving_mean_initializer="zeros",
               moving_variance_initializer="ones", synchronized=False,
               adversarial=True, fused=None, augmented=False, **kwargs):
    super().__init__(**kwargs)
    if fused not in (None, True, False):
      raise ValueError(f"`fused` must be None, True or False, got {fused!r}.")
    if fused and synchronized:
      raise ValueError(
          "fused=True cannot be combined with synchronized=True: the fused "
          "kernel computes per-replica batch statistics. Use fused=None.")
    self.axis = int(axis)
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.center = bool(center)
    self.scale = bool(scale)
    self.beta_initializer = keras.initializers.get(beta_initializer)
    self.gamma_initializer = keras.initializers.get(gamma_initializer)
    self.moving_mean_initializer = keras.initializers.get(
        moving_mean_initializer)
    self.moving_variance_initializer = keras.initializers.get(
        moving_variance_initializer)
    self.synchronized = bool(synchronized)
    self.adversarial = bool(adversarial) and not main_only_active()
    self.augmented = bool(augmented) and not main_only_active()
    self.fused = fused
    self.gamma = self.beta = self.moving_mean = self.moving_variance = None
    # trainable=self.trainable: a layer made frozen (trainable=False, e.g.
    # from a config) must freeze its auxiliary sets too.
    self.adv = (_BatchNormSet(self, name=ADV, dtype=self.dtype_policy,
                              trainable=self.trainable)
                if self.adversarial else None)
    self.aug = (_BatchNormSet(self, name=AUG, dtype=self.dtype_policy,
                              trainable=self.trainable)
                if self.augmented else None)
    self._axis = None
    self._reduction_axes = None
    self._bn_axis = None
    self._fusable = False
    self._data_format = None

  def build(self, input_shape):
    rank = len(input_shape)
    if not -rank <= self.axis < rank:
      raise ValueError(f"axis={self.axis} is out of bounds for input shape "
                       f"{input_shape}.")
    self._axis = self.axis % rank
    dim = input_shape[self._axis]
    if dim is None:
      raise ValueError(f"The channel axis {self.axis} of {input_shape} must "
                       "be known.")
    (self.gamma, self.beta, self.moving_mean,
     self.moving_variance) = _add_bn_weights(self, dim, self)
    if self.adv is not None:
      self.adv.build((dim,))
    if self.aug is not None:
      self.aug.build((dim,))
    self._reduction_axes = [i for i in range(rank) if i != self._axis]
    # -1 for the last axis: the TF backend then broadcasts without reshapes.
    self._bn_axis = -1 if self._axis == rank - 1 else self._axis
    self._fusable = (rank == 4 and self._axis in (1, 3)
                     and keras.backend.backend() == "tensorflow"
                     and self.variable_dtype == "float32")
    self._data_format = "NCHW" if self._axis == 1 else "NHWC"
    if self.fused and not self._fusable:
      raise ValueError(
          "fused=True needs a 4-D input normalised over axis 1 or -1/3, "
          f"float32 weights and the TensorFlow backend; got input shape "
          f"{input_shape}, axis={self.axis}, variable dtype "
          f"{self.variable_dtype}.")
    self.input_spec = keras.layers.InputSpec(ndim=rank,
                                             axes={self._axis: dim})

  def route_weights(self, bn_route=MAIN):
    """(gamma, beta, moving_mean, moving_variance) of `bn_route` (None for
    a disabled gamma/beta)."""
    validate_route(bn_route)
    if bn_route == ADV:
      if self.adv is None:
        raise ValueError(
            f"Layer {self.name!r} has no adversarial BN (adversarial=False, "
            f"e.g. built under main_only()); bn_route must be {MAIN!r}.")
      owner = self.adv
    elif bn_route == AUG:
      if self.aug is None:
        raise ValueError(
            f"Layer {self.name!r} has no AutoAugment BN set (augmented=False "
            f"or built under main_only()); bn_route={AUG!r} needs "
            "augmented=True.")
      owner = self.aug
    else:
      owner = self
    return owner.gamma, owner.beta, owner.moving_mean, owner.moving_variance

  def compute_output_shape(self, input_shape):
    return input_shape

  def call(self, inputs, training=None, bn_route=MAIN):
    gamma_v, beta_v, mean_v, var_v = self.route_weights(bn_route)
    training = bool(training) and self.trainable
    input_dtype = keras.backend.standardize_dtype(inputs.dtype)
    use_fused = (self.fused is not False and self._fusable
                 and input_dtype in _FUSED_DTYPES
                 and not (training and self.synchronized))
    if self.fused and input_dtype not in _FUSED_DTYPES:
      raise ValueError(f"fused=True does not support {input_dtype} inputs.")
    if use_fused:
      return self._fused_call(inputs, training, gamma_v, beta_v, mean_v,
                              var_v)
    return self._keras_call(inputs, training, gamma_v, beta_v, mean_v, var_v)

  def _update_moving(self, mean_v, var_v, moving_mean, moving_variance,
                     batch_mean, batch_variance, variance_factor=1.0):
    """moving <- moving * momentum + batch * (1 - momentum), as Keras 3.

    `variance_factor` rescales `batch_variance` first (folded into the same
    multiply).
    """
    m = self.momentum
    mean_v.assign(moving_mean * m + batch_mean * (1.0 - m))
    var_v.assign(moving_variance * m
                 + batch_variance * (variance_factor * (1.0 - m)))

  def _keras_call(self, inputs, training, gamma_v, beta_v, mean_v, var_v):
    """Exactly `keras.layers.BatchNormalization.call` (no mask, no renorm)."""
    compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
    inputs = ops.cast(inputs, compute_dtype)
    moving_mean = ops.cast(mean_v.value, compute_dtype)
    moving_variance = ops.cast(var_v.value, compute_dtype)
    gamma = None if gamma_v is None else ops.cast(gamma_v.value, compute_dtype)
    beta = None if beta_v is None else ops.cast(beta_v.value, compute_dtype)
    if training:
      mean, variance = ops.moments(inputs, axes=self._reduction_axes,
                                   synchronized=self.synchronized)
      self._update_moving(mean_v, var_v, moving_mean, moving_variance, mean,
                          variance)
    else:
      mean, variance = moving_mean, moving_variance
    outputs = ops.batch_normalization(inputs, mean=mean, variance=variance,
                                      axis=self._bn_axis, offset=beta,
                                      scale=gamma, epsilon=self.epsilon)
    return ops.cast(outputs, self.compute_dtype)

  def _fused_call(self, inputs, training, gamma_v, beta_v, mean_v, var_v):
    """`FusedBatchNormV3`: x in f16/bf16/f32, parameters and stats float32."""
    x = tf.convert_to_tensor(inputs)
    dim = x.shape[self._axis]
    moving_mean = tf.convert_to_tensor(mean_v.value)
    moving_variance = tf.convert_to_tensor(var_v.value)
    gamma = (tf.ones([dim], tf.float32) if gamma_v is None
             else tf.convert_to_tensor(gamma_v.value))
    beta = (tf.zeros([dim], tf.float32) if beta_v is None
            else tf.convert_to_tensor(beta_v.value))
    if training:
      empty = tf.constant([], tf.float32)
      y, batch_mean, batch_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
          epsilon=self.epsilon, exponential_avg_factor=1.0,
          data_format=self._data_format, is_training=True)
      # The kernel reports the Bessel-corrected variance n/(n-1) * biased;
      # Keras 3 moves the biased one. n = elements per channel (for n = 1
      # both are 0 and so is the factor below).
      if x.shape.is_fully_defined():
        n = float(x.shape.num_elements() // dim)
        factor = (n - 1.0) / n if n > 0 else 1.0
      else:
        n = tf.cast(tf.size(x, out_type=tf.int64) // dim, tf.float32)
        factor = tf.math.divide_no_nan(n - 1.0, n)
      self._update_moving(mean_v, var_v, moving_mean, moving_variance,
                          batch_mean, batch_variance, factor)
    else:
      y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=moving_mean,
          variance=moving_variance, epsilon=self.epsilon,
          exponential_avg_factor=1.0, data_format=self._data_format,
          is_training=False)
    return ops.cast(y, self.compute_dtype)

  def get_config(self):
    config = super().get_config()
    config.update(
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        center=self.center,
        scale=self.scale,
        beta_initializer=keras.initializers.serialize(self.beta_initializer),
        gamma_initializer=keras.initializers.serialize(
            self.gamma_initializer),
        moving_mean_initializer=keras.initializers.serialize(
            self.moving_mean_initializer),
        moving_variance_initializer=keras.initializers.serialize(
            self.moving_variance_initializer),
        synchronized=self.synchronized,
        adversarial=self.adversarial,
        fused=self.fused,
        augmented=self.augmented,
    )
    return config
