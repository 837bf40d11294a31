"""Turns a functional or Sequential Keras model into a dual-BN backbone.

AdvProp (Xie et al., CVPR 2020, Sec. 3.2) and ConAdv (Liu et al., ICLR 2022,
Algorithm 1) need every BN layer of a network to hold two sets of
statistics and affine parameters, `main` (clean images) and `adv`
(adversarial images), with everything else shared. `dual_bn_backbone` gives
any existing Keras architecture (a `keras.applications` model, a model built
by hand) that form, so `conadv_model.ConAdvModel` can train it:

  backbone = convert.dual_bn_backbone(
      keras.applications.EfficientNetB0(weights=None, classes=1000,
                                        classifier_activation=None),
      pixel_scale=255.0)                 # the model takes [0, 255] pixels
  model = conadv_model.ConAdvModel(backbone, adversary=...)

  images [B, H, W, C] float in [0, 1]
    -> images * pixel_scale              (the wrapped model's input range)
    -> the wrapped model, every BatchNormalization replaced by a
       `RoutedBatchNormalization` that normalises with set `bn_route`
    -> its output (logits [B, classes]; a final softmax is refused)

It plays the part of timm's `convert_splitbn_model`, which swaps the BN
modules of a PyTorch model for split BNs that route by chunk of the training
batch (first chunk main, the rest auxiliary), whereas this builds a new Keras
model whose BN set is chosen per call by `bn_route`.

What the conversion keeps (`model` itself is left untouched):

* Layers: a copy of every layer, same class, config, name and weights
  (`keras.models.clone_model`); random-seed states are copied too, so a
  Dropout draws the same masks as the original from the same state.
* Main route = the original network: the same `variable.path`s in the same
  order (e.g. "conv1_bn/gamma", "conv1_conv/kernel"), the same values
  (pretrained weights survive), the same numerics with `fused=False` (bit
  for bit, in both training and inference mode) and float tolerance with
  the default fused kernel.
* Each BN layer `<bn>` gets the adversarial set under `<bn>/adv/` (gamma,
  beta, moving_mean, moving_variance where the original has them), exactly
  the `DualBatchNormalization` layout, so LARS' default exclusions
  (`(^|/)(gamma|beta|bias)$` on `variable.path`) and the export treat it
  like any other dual BN. The adv set starts as a COPY of the main set's
  values (AdvProp's fine-tuning starts that way; with a pretrained model the
  adversarial BN starts from the clean statistics). `augmented_bn=True`
  adds a third set `<bn>/aug/` (route "aug"), a copy as well.

How the route reaches the BN layers: a Keras functional model forwards only
call-context arguments to its layers. `RoutedBatchNormalization` registers
`bn_route` as one (Keras 3's `Layer._register_call_context_args`), and
`DualBNBackbone.call` passes `bn_route=...` explicitly to the functional
model, whose `call` hands it to every layer that registered it. The route is
therefore an ordinary Python argument of each BN call, fixed at trace time:
each route traces its own graph, and nothing depends on thread-local state
(so it is the same under `tf.function`, XLA, `keras.Model.stateless_call`,
rematerialisation and the replica threads of MirroredStrategy).

Export: `DualBNBackbone.inference_model()` (also what
`conadv_model.inference_model(backbone)` and `ConAdvModel.inference_model()`
return for it) rebuilds the ORIGINAL architecture with plain
`keras.layers.BatchNormalization` layers and the main-route weights: a plain
functional `keras.Model` whose `.keras` file loads without this package. It
keeps the original input convention, i.e. it expects images * pixel_scale
(e.g. [0, 255]), not [0, 1].

Limits (each refused with a ValueError that names the model or layer):

* only `keras.Model(inputs, outputs)` functional models and built
  `Sequential` models with one input and one output (a subclassed model's
  graph cannot be rewritten);
* no nested models (a Functional / Sequential / Model used as a layer) and
  no custom layer that holds a BatchNormalization inside: their BN layers
  would not be converted;
* each BN layer used once (a shared BN layer would need a set per call
  site), without a mask (masked moments are not implemented by the dual BN)
  and without `renorm=True` (batch renormalisation is not implemented);
* layers that are already `DualBatchNormalization`s;
* a model without BatchNormalization, or one whose output is a softmax (the
  backbone contract returns logits; build keras.applications models with
  `classifier_activation=None`).

Other normalisation layers (LayerNormalization, GroupNormalization, ...)
do not depend on the batch and stay shared between the routes, as in timm.
`synchronized=True` BN layers map to synchronized dual BN (cross-replica
statistics on both routes); `synchronized_bn=True/False` overrides every
layer's setting. Preprocessing that keras.applications models expect
OUTSIDE the model (ResNet50's "caffe" mean subtraction, MobileNetV2's
[-1, 1]) is not added by `pixel_scale`: build such a model on a
preprocessed input so the preprocessing is part of the converted graph,
e.g. `MobileNetV2(input_tensor=keras.layers.Rescaling(1 / 127.5,
offset=-1.0)(keras.Input((224, 224, 3))), ...)` with pixel_scale=255.
EfficientNet and MobileNetV3 have theirs inside and take [0, 255].
"""

import copy
import math
import numbers

import keras
from keras import ops
# No public name for the class of functional models (keras.Model(inputs,
# outputs) returns one); the only way to tell them from subclassed models.
from keras.src.models.functional import Functional

from official_conadv.modeling import dual_batch_norm

MAIN = dual_batch_norm.MAIN
ADV = dual_batch_norm.ADV
AUG = dual_batch_norm.AUG
# The call argument RoutedBatchNormalization takes from the enclosing model.
ROUTE_ARG = "bn_route"
# keras.layers.BatchNormalization config keys that DualBatchNormalization /
# RoutedBatchNormalization take unchanged.
_SHARED_BN_KEYS = (
    "name", "trainable", "dtype", "axis", "momentum", "epsilon", "center",
    "scale", "beta_initializer", "gamma_initializer",
    "moving_mean_initializer", "moving_variance_initializer",
    "beta_regularizer", "gamma_regularizer", "beta_constraint",
    "gamma_constraint", "synchronized")
# keras.layers.BatchNormalization config keys with no dual-BN counterpart;
# any value but these defaults is refused.
_UNSUPPORTED_BN_DEFAULTS = {"renorm": False}
_IGNORED_BN_KEYS = ("renorm_clipping", "renorm_momentum")


@keras.saving.register_keras_serializable(package="official_conadv")
class RoutedBatchNormalization(dual_batch_norm.DualBatchNormalization):
  """A `DualBatchNormalization` made from a `keras.layers.BatchNormalization`.

  The same numerics and variable layout as `DualBatchNormalization`, plus
  what a Keras BN layer can carry that the dual BN does not (gamma / beta
  regularizers and constraints, applied to every set), and `bn_route`
  registered as a Keras call-context argument: a functional model called
  with `bn_route=...` passes it to this layer although the layer's node in
  the graph was created without it.

  Args:
    beta_regularizer, gamma_regularizer: Keras regularizers (or their
      names / configs), applied to the beta / gamma of every set (the
      regularisation loss counts each set).
    beta_constraint, gamma_constraint: Keras constraints, applied to every
      set after each optimizer update.
    **kwargs: `DualBatchNormalization` arguments (axis, momentum, epsilon,
      center, scale, initializers, synchronized, adversarial, augmented,
      fused, name, dtype, trainable).

  Call args:
    inputs: float tensor of any rank >= 2.
    training: Python bool, as `DualBatchNormalization`.
    bn_route: "main", "adv" or "aug"; None (a call without it, e.g. the
      wrapped model called directly) means "main".
  """

  def __init__(self, beta_regularizer=None, gamma_regularizer=None,
               beta_constraint=None, gamma_constraint=None, **kwargs):
    super().__init__(**kwargs)
    self.beta_regularizer = keras.regularizers.get(beta_regularizer)
    self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
    self.beta_constraint = keras.constraints.get(beta_constraint)
    self.gamma_constraint = keras.constraints.get(gamma_constraint)
    # A functional model's `call(..., bn_route=r)` gives r to every layer
    # that registered the argument (pinned by convert_test.py).
    self._register_call_context_args(ROUTE_ARG)

  def build(self, input_shape):
    super().build(input_shape)
    for owner in (self, self.adv, self.aug):
      if owner is None:
        continue
      # What `add_weight(regularizer=..., constraint=...)` would have set.
      if owner.gamma is not None:
        owner.gamma.regularizer = self.gamma_regularizer
        owner.gamma.constraint = self.gamma_constraint
      if owner.beta is not None:
        owner.beta.regularizer = self.beta_regularizer
        owner.beta.constraint = self.beta_constraint

  def call(self, inputs, training=None, bn_route=None):
    return super().call(inputs, training=training,
                        bn_route=MAIN if bn_route is None else bn_route)

  @classmethod
  def from_keras(cls, layer, synchronized=None, fused=None,
                 augmented=False):
    """A dual BN with `layer`'s config (name included), weights not copied.

    Args:
      layer: a built or unbuilt `keras.layers.BatchNormalization`.
      synchronized: None keeps `layer.synchronized`; True / False sets it.
      fused: the `DualBatchNormalization` option.
      augmented: add the "aug" set.

    Raises:
      ValueError: a setting with no dual-BN counterpart (renorm=True).
    """
    config = layer.get_config()
    for key, default in _UNSUPPORTED_BN_DEFAULTS.items():
      if config.get(key, default) != default:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} has {key}="
            f"{config[key]!r}, which DualBatchNormalization does not "
            "implement; it cannot be converted faithfully.")
    unknown = set(config) - set(_SHARED_BN_KEYS) - set(
        _UNSUPPORTED_BN_DEFAULTS) - set(_IGNORED_BN_KEYS)
    if unknown:
      raise ValueError(
          f"BatchNormalization layer {layer.name!r} has config keys "
          f"{sorted(unknown)} that the converter does not know how to map.")
    kwargs = {k: config[k] for k in _SHARED_BN_KEYS if k in config}
    if synchronized is not None:
      kwargs["synchronized"] = bool(synchronized)
    return cls(fused=fused, augmented=augmented, **kwargs)

  def keras_config(self):
    """The config of the equivalent `keras.layers.BatchNormalization`."""
    config = self.get_config()
    return {k: config[k] for k in _SHARED_BN_KEYS if k in config}

  def get_config(self):
    config = super().get_config()
    config.update(
        beta_regularizer=keras.regularizers.serialize(self.beta_regularizer),
        gamma_regularizer=keras.regularizers.serialize(
            self.gamma_regularizer),
        beta_constraint=keras.constraints.serialize(self.beta_constraint),
        gamma_constraint=keras.constraints.serialize(self.gamma_constraint),
    )
    return config


def _routed_layers(model):
  return [layer for layer in model.layers
          if isinstance(layer, RoutedBatchNormalization)]


@keras.saving.register_keras_serializable(package="official_conadv")
class DualBNBackbone(keras.Model):
  """A converted model as a backbone of the ConAdv contract.

  Made by `dual_bn_backbone`; construct it directly only with a functional
  model whose BN layers are `RoutedBatchNormalization`s (that is what
  `from_config` does).

  Args:
    model: the converted functional `keras.Model` (built).
    pixel_scale: images are multiplied by it before `model` (255 for a model
      that takes [0, 255] pixels), > 0.
    **kwargs: `keras.Model` arguments (name, ...).

  Call args:
    images: float [B, H, W, C] (whatever `model` takes) in [0, 1].
    training: BN batch statistics and a moving-statistics update of the
      chosen set only (and dropout etc. in training mode).
    bn_route: "main" (clean), "adv" (adversarial) or "aug" (needs
      augmented_bn).

  Returns:
    `model`'s output (logits [B, classes]) on the chosen BN set.
  """

  def __init__(self, model, pixel_scale=1.0, **kwargs):
    super().__init__(**kwargs)
    _check_pixel_scale(pixel_scale)
    bns = _routed_layers(model)
    if not bns or not model.built:
      raise ValueError(
          "DualBNBackbone wraps a built functional model with "
          "RoutedBatchNormalization layers; make it with "
          "convert.dual_bn_backbone(model).")
    self.model = model
    self.pixel_scale = float(pixel_scale)
    self.adversarial_bn = all(bn.adversarial for bn in bns)
    self.augmented_bn = all(bn.augmented for bn in bns)
    self.built = True

  def call(self, images, training=None, bn_route=MAIN):
    dual_batch_norm.validate_route(bn_route)
    if bn_route == AUG and not self.augmented_bn:
      raise ValueError(
          f"Backbone {self.name!r} has no 'aug' BN set; convert with "
          "dual_bn_backbone(..., augmented_bn=True).")
    x = images
    if self.pixel_scale != 1.0:
      x = ops.multiply(x, ops.cast(self.pixel_scale, x.dtype))
    # Functional.call gives bn_route to every layer that registered it as a
    # call-context argument (the RoutedBatchNormalization layers).
    return self.model(x, training=training, **{ROUTE_ARG: bn_route})

  def inference_model(self):
    """The original architecture with the main-route weights.

    Every `RoutedBatchNormalization` becomes the
    `keras.layers.BatchNormalization` it was made from (same name and
    config, main set's gamma / beta / moving statistics); every other layer
    is a copy (same config and weights). The result is a plain functional
    `keras.Model` of Keras built-in classes only (a `.keras` file of it
    loads without official_conadv), with the same variable paths, in order,
    as the backbone's variables outside `/adv/` and `/aug/`.

    Its input is the ORIGINAL model's: images * pixel_scale (e.g. [0, 255]
    for pixel_scale=255), not [0, 1]. `exported(images * pixel_scale,
    training=False)` equals `backbone(images, training=False)`.
    """
    pairs = []

    def clone(layer):
      if not isinstance(layer, keras.layers.Layer):
        return layer  # A stateless op of the graph (e.g. keras.ops.add).
      if isinstance(layer, RoutedBatchNormalization):
        new = keras.layers.BatchNormalization.from_config(
            layer.keras_config())
      else:
        new = layer.__class__.from_config(layer.get_config())
      pairs.append((layer, new))
      return new

    exported = keras.models.clone_model(self.model, clone_function=clone)
    for src, dst in pairs:
      if isinstance(src, RoutedBatchNormalization):
        values = [v for v in src.route_weights(MAIN) if v is not None]
      else:
        values = src.variables
      _assign(values, dst.variables, dst.name)
    return exported

  def get_config(self):
    config = super().get_config()
    config.update(model=keras.saving.serialize_keras_object(self.model),
                  pixel_scale=self.pixel_scale)
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    # Deserialization consumes parts of the dict it is given: copy, so one
    # config can build several models.
    config["model"] = keras.saving.deserialize_keras_object(
        copy.deepcopy(config["model"]))
    return cls(**config)


def _check_pixel_scale(pixel_scale):
  if (isinstance(pixel_scale, bool)
      or not isinstance(pixel_scale, numbers.Real)
      or not math.isfinite(pixel_scale) or pixel_scale <= 0):
    raise ValueError("`pixel_scale` must be a finite number > 0 (255 for a "
                     f"model that takes [0, 255] pixels), got {pixel_scale!r}.")


def _assign(values, variables, name):
  """variables[i] <- values[i]; ValueError naming layer `name` on mismatch."""
  values, variables = list(values), list(variables)
  if len(values) != len(variables) or any(
      tuple(a.shape) != tuple(b.shape) for a, b in zip(values, variables)):
    raise ValueError(
        f"Cannot copy the weights of layer {name!r}: its copy has variables "
        f"{[(v.path, tuple(v.shape)) for v in variables]}, the source "
        f"{[tuple(v.shape) for v in values]}. Its class must rebuild the "
        "same variables from its config.")
  for value, variable in zip(values, variables):
    # A copy: on JAX an assigned array is shared, not copied, and `fit`
    # donates (frees) its state's buffers, so two variables must never
    # hold one array.
    variable.assign(ops.copy(ops.convert_to_tensor(value)))


def _is_softmax(activation):
  return activation is keras.activations.softmax or getattr(
      activation, "__name__", None) == "softmax"


def _check_model(model):
  """ValueError unless `model` is a convertible functional / Sequential."""
  kind = type(model).__name__
  if not isinstance(model, keras.Model):
    raise ValueError(f"dual_bn_backbone needs a keras.Model, got {kind}.")
  if not isinstance(model, (keras.Sequential, Functional)):
    raise ValueError(
        f"Model {model.name!r} is a subclassed {kind}; only functional "
        "(keras.Model(inputs, outputs)) and Sequential models can be "
        "converted, because their layer graph can be rewritten. Give a "
        "subclassed model DualBatchNormalization layers and a `bn_route` "
        "call argument instead (see small_cnn.py).")
  if isinstance(model, keras.Sequential) and not (
      model.built and getattr(model, "_functional", None) is not None):
    raise ValueError(
        f"Sequential model {model.name!r} has no input yet; start it with "
        "keras.Input(shape) (or build it) before converting.")
  if len(model.inputs) != 1 or len(model.outputs) != 1:
    raise ValueError(
        f"Model {model.name!r} has {len(model.inputs)} inputs and "
        f"{len(model.outputs)} outputs; a backbone takes one image batch and "
        "returns one logits tensor.")
  has_bn = False
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      raise ValueError(
          f"Model {model.name!r} uses the model {layer.name!r} "
          f"({type(layer).__name__}) as a layer; nested models are not "
          "converted. Build it flat (e.g. keras.applications models with "
          "input_tensor=... instead of calling them on a tensor).")
    if isinstance(layer, dual_batch_norm.DualBatchNormalization):
      raise ValueError(
          f"Layer {layer.name!r} of model {model.name!r} is already a "
          f"{type(layer).__name__}; the model is dual-BN already.")
    if isinstance(layer, keras.layers.BatchNormalization):
      has_bn = True
      continue
    inner = [sub for sub in layer._flatten_layers(include_self=False)  # pylint: disable=protected-access
             if isinstance(sub, (keras.layers.BatchNormalization,
                                 dual_batch_norm.DualBatchNormalization))]
    if inner:
      raise ValueError(
          f"Layer {layer.name!r} ({type(layer).__name__}) of model "
          f"{model.name!r} holds the batch norm {inner[0].name!r} inside; "
          "only top-level BatchNormalization layers are converted.")
  if not has_bn:
    raise ValueError(
        f"Model {model.name!r} has no BatchNormalization layer; there is "
        "nothing to make dual (a backbone without BN would use the same "
        "network for both routes).")
  out = model.outputs[0]
  producer = out._keras_history.operation  # pylint: disable=protected-access
  if isinstance(producer, keras.layers.Softmax) or _is_softmax(
      getattr(producer, "activation", None)):
    raise ValueError(
        f"Model {model.name!r} ends in a softmax (layer {producer.name!r}); "
        "a backbone returns logits. Build it without the final softmax "
        "(keras.applications: classifier_activation=None).")


def dual_bn_backbone(model, pixel_scale=1.0, synchronized_bn=None,
                     fused=None, augmented_bn=False):
  """Converts a functional or Sequential Keras model into a dual-BN backbone.

  See the module docstring for the layout, what is kept and what is
  refused. `model` is not modified; create the result inside the strategy
  scope it will train under (its variables are new), e.g.

    with strategy.scope():
      base = keras.applications.ResNet50(weights="imagenet",
                                         classifier_activation=None)
      backbone = convert.dual_bn_backbone(base, pixel_scale=255.0)

  Args:
    model: a functional `keras.Model` or a built `Sequential` with
      `keras.layers.BatchNormalization` layers, one input (images) and one
      output (logits). Its weights (pretrained or trained) are kept.
    pixel_scale: the backbone multiplies its [0, 1] images by this before
      `model`: 1.0 for a model that takes [0, 1], 255.0 for one that takes
      [0, 255] (keras.applications).
    synchronized_bn: None keeps each BN layer's `synchronized`; True / False
      sets it on every layer (True: cross-replica batch statistics, e.g. so
      a Mirrored run equals a one-device run with the same global batch).
    fused: `DualBatchNormalization`'s option. None (default): the fused
      kernel where possible (faster; equal to Keras BN to float tolerance);
      False: Keras 3 BN's own ops, bit for bit.
    augmented_bn: add a third BN set `<bn>/aug/` (route "aug", for
      `ConAdvModel(augmented_route="aug")`), a copy of the main set.

  Returns:
    A `DualBNBackbone`: `backbone(images, training=None, bn_route="main")`.

  Raises:
    ValueError: a model or layer the converter refuses (module docstring),
      or a bad `pixel_scale`.
  """
  _check_pixel_scale(pixel_scale)
  if synchronized_bn not in (None, True, False):
    raise ValueError("`synchronized_bn` must be None, True or False, got "
                     f"{synchronized_bn!r}.")
  _check_model(model)
  if isinstance(model, keras.Sequential):
    # Its functional form over the same layers (clone_model's call_function
    # needs a functional graph).
    model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)
  pairs = []
  bn_calls = {}

  def clone(layer):
    if not isinstance(layer, keras.layers.Layer):
      return layer  # A stateless op of the graph (e.g. keras.ops.add).
    if isinstance(layer, keras.layers.BatchNormalization):
      new = RoutedBatchNormalization.from_keras(
          layer, synchronized=synchronized_bn, fused=fused,
          augmented=augmented_bn)
    else:
      new = layer.__class__.from_config(layer.get_config())
    pairs.append((layer, new))
    return new

  def call(layer, *args, **kwargs):
    if isinstance(layer, RoutedBatchNormalization):
      bn_calls[layer.name] = bn_calls.get(layer.name, 0) + 1
      if bn_calls[layer.name] > 1:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} of model "
            f"{model.name!r} is called more than once (a shared layer); "
            "each call site would need BN sets of its own. Use one layer "
            "per call.")
      # Keras records the (usually None) mask a BN node was called with.
      mask = kwargs.pop("mask", None)
      extra = set(kwargs) - {"training"}
      if extra:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} of model "
            f"{model.name!r} is called with {sorted(extra)}; the converter "
            "maps only `training`.")
      if mask is not None or any(
          getattr(a, "_keras_mask", None) is not None for a in args):
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} of model "
            f"{model.name!r} is called with a mask; masked batch "
            "statistics are not implemented by the dual BN.")
    return layer(*args, **kwargs)

  converted = keras.models.clone_model(model, clone_function=clone,
                                       call_function=call)
  # One tensor in, one out (a model built as keras.Model([inputs], ...), as
  # keras.applications does with `input_tensor`, would warn at every call
  # with a plain tensor).
  converted = keras.Model(converted.inputs[0], converted.outputs[0],
                          name=converted.name)
  for src, dst in pairs:
    if isinstance(dst, RoutedBatchNormalization):
      values = src.weights
      for route in (MAIN, ADV, AUG):
        if route == AUG and not augmented_bn:
          continue
        _assign(values, [v for v in dst.route_weights(route) if v is not None],
                dst.name)
    else:
      _assign(src.variables, dst.variables, dst.name)
  return DualBNBackbone(converted, pixel_scale=pixel_scale,
                        name=f"{model.name}_dual_bn")
