"""Backbone registry: `model.name` of a config -> a dual-BN backbone.

Names:

  * "resnet": `resnet.ResNet` (depth, variant, width, BN momentum/epsilon,
    synchronized_bn, zero_init_residual, input_mean/std from the config);
  * "small_cnn": `small_cnn.SmallCNN` (filters (width, 2 * width));
  * "keras.applications.<Name>", e.g. "keras.applications.EfficientNetB0":
    `keras.applications.<Name>(weights=None, include_top=True,
    input_shape=<the data's image shape>, classes=num_classes,
    classifier_activation=None)` (logits), turned into a backbone by
    `convert.dual_bn_backbone(model, pixel_scale=model.pixel_scale,
    synchronized_bn=synchronized_bn)`. Its own BN settings (momentum,
    epsilon) and preprocessing are those of keras.applications, except that
    `application_bn_momentum` (when set) replaces every BN's momentum; the
    config's `bn_momentum`, `bn_epsilon`, `width`, `depth`, `input_mean/std`
    do not apply. `pixel_scale` (255 by default) scales the [0, 1] pixels to the
    range the application expects: EfficientNet rescales inside the model;
    ResNet50 and MobileNetV2 expect their `preprocess_input` (caffe / [-1,
    1]), which a from-scratch run can leave to its first BN.

`<Name>` is looked up among the public model functions of
`keras.applications` (`application_names()`), never evaluated; a bad name
gets one line listing the valid ones. `register(name)` adds a builder.
"""

from typing import Callable, Dict, List, Sequence

import keras

from official_conadv.modeling import resnet
from official_conadv.modeling import small_cnn

KERAS_APPLICATIONS = "keras.applications."

# name -> builder(model_config, input_shape, augmented_bn) -> keras.Model.
_BUILDERS: Dict[str, Callable] = {}


def register(name: str):
  """Decorator: `builder(model_config, input_shape, augmented_bn)` for
  `model.name=name`."""
  if name.startswith(KERAS_APPLICATIONS) or name in _BUILDERS:
    raise ValueError(f"Backbone name {name!r} is taken.")

  def decorator(builder):
    _BUILDERS[name] = builder
    return builder

  return decorator


def application_names() -> List[str]:
  """The model functions of `keras.applications` (ResNet50, EfficientNetB0,
  MobileNetV2, ...): its public callables whose name starts upper-case."""
  return sorted(n for n in dir(keras.applications)
                if n[:1].isupper() and callable(getattr(keras.applications, n)))


def names() -> List[str]:
  """Registered names, then "keras.applications.<Name>" for every Name."""
  return sorted(_BUILDERS) + [KERAS_APPLICATIONS + n
                              for n in application_names()]


def validate(name: str) -> None:
  """ValueError (one line, listing the valid names) unless `name` names a
  backbone."""
  if name in _BUILDERS:
    return
  if isinstance(name, str) and name.startswith(KERAS_APPLICATIONS):
    app = name[len(KERAS_APPLICATIONS):]
    if app in application_names():
      return
    raise ValueError(
        f"model.name={name!r}: keras.applications has no model {app!r}; "
        f"valid: {', '.join(KERAS_APPLICATIONS + n for n in application_names())}.")
  raise ValueError(
      f"Unknown model.name {name!r}; valid: {', '.join(sorted(_BUILDERS))} "
      f"or keras.applications.<Name> with Name one of "
      f"{', '.join(application_names())}.")


def build(model_config, input_shape: Sequence[int],
          augmented_bn: bool = False) -> keras.Model:
  """The backbone `model_config.name` names, for images of `input_shape`
  (H, W, C); `augmented_bn` adds the third BN set ("aug" route)."""
  name = model_config.name
  validate(name)
  if name in _BUILDERS:
    return _BUILDERS[name](model_config, tuple(input_shape), augmented_bn)
  return _keras_application(model_config, tuple(input_shape), augmented_bn)


@register("resnet")
def _resnet(c, input_shape, augmented_bn):
  del input_shape  # Any size: global pooling.
  return resnet.ResNet(
      depth=c.depth, num_classes=c.num_classes, variant=c.variant,
      width=c.width, bn_momentum=c.bn_momentum, bn_epsilon=c.bn_epsilon,
      synchronized_bn=c.synchronized_bn,
      zero_init_residual=c.zero_init_residual, input_mean=c.input_mean,
      input_std=c.input_std, augmented_bn=augmented_bn)


@register("small_cnn")
def _small_cnn(c, input_shape, augmented_bn):
  del input_shape
  return small_cnn.SmallCNN(num_classes=c.num_classes,
                            filters=(c.width, 2 * c.width),
                            synchronized_bn=c.synchronized_bn,
                            bn_momentum=c.bn_momentum, bn_epsilon=c.bn_epsilon,
                            augmented_bn=augmented_bn)


def _keras_application(c, input_shape, augmented_bn):
  from official_conadv.modeling import convert  # pylint: disable=g-import-not-at-top
  constructor = getattr(keras.applications, c.name[len(KERAS_APPLICATIONS):])
  model = constructor(weights=None, include_top=True, input_shape=input_shape,
                      classes=c.num_classes, classifier_activation=None)
  if c.application_bn_momentum is not None:
    # Before the conversion, which copies each layer's config to both sets.
    for layer in model.layers:
      if isinstance(layer, keras.layers.BatchNormalization):
        layer.momentum = float(c.application_bn_momentum)
  return convert.dual_bn_backbone(model, pixel_scale=c.pixel_scale,
                                  synchronized_bn=c.synchronized_bn,
                                  augmented_bn=augmented_bn)
