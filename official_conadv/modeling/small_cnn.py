"""A tiny dual-BN convnet that follows the backbone contract.

Used by tests, the multi-worker checks and the Colab notebook, and a template
for wrapping your own architecture: every BN is a `DualBatchNormalization`
and `call` forwards `bn_route` to it.

  images [B, H, W, C] in [0, 1]
    -> (conv3x3 -> dual BN -> ReLU) x len(filters), stride 2 after the first
    -> global average pool -> dense -> logits [B, num_classes] (float32)
"""

import keras

from official_conadv.modeling import dual_batch_norm


@keras.saving.register_keras_serializable(package="official_conadv")
class SmallCNN(keras.Model):
  """Small conv net with dual batch norm.

  Args:
    num_classes: number of logits.
    filters: channels of each conv block.
    synchronized_bn: cross-replica BN statistics (makes a Mirrored run equal
      a one-device run with the same global batch).
    bn_momentum, bn_epsilon: as `DualBatchNormalization`.
    adversarial_bn: create the adversarial BN sets (False: main only).
    augmented_bn: also create a third BN set per layer, route "aug", for
      AutoAugment images (`ConAdvModel(..., augmented_route="aug")`, the
      authors' three-way split); variables under `<bn>/aug/`.

  Call args: images [B, H, W, C] in [0, 1]; training; bn_route "main",
  "adv" or "aug" (the latter only with augmented_bn=True).
  Returns: logits [B, num_classes] float32.
  """

  def __init__(self, num_classes=10, filters=(8, 16), synchronized_bn=False,
               bn_momentum=0.9, bn_epsilon=1e-5, adversarial_bn=True,
               augmented_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.filters = tuple(filters)
    self.synchronized_bn = synchronized_bn
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon
    # Inside dual_batch_norm.main_only() (export) the BNs get no adv set, and
    # the config says so, so the exported model reloads without one.
    self.adversarial_bn = bool(
        adversarial_bn) and not dual_batch_norm.main_only_active()
    self.augmented_bn = bool(
        augmented_bn) and not dual_batch_norm.main_only_active()
    self.convs = []
    self.bns = []
    for i, f in enumerate(self.filters):
      self.convs.append(
          keras.layers.Conv2D(f, 3, strides=1 if i == 0 else 2,
                              padding="same", use_bias=False,
                              kernel_initializer="he_normal",
                              name=f"conv{i}"))
      self.bns.append(
          dual_batch_norm.DualBatchNormalization(
              momentum=bn_momentum, epsilon=bn_epsilon,
              synchronized=synchronized_bn, adversarial=self.adversarial_bn,
              augmented=self.augmented_bn, name=f"bn{i}"))
    self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
    self.head = keras.layers.Dense(num_classes, name="logits")

  def call(self, images, training=None, bn_route="main"):
    dual_batch_norm.validate_route(bn_route)
    x = images
    for conv, bn in zip(self.convs, self.bns):
      x = keras.ops.relu(bn(conv(x), training=training, bn_route=bn_route))
    return keras.ops.cast(self.head(self.pool(x)), "float32")

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, filters=list(self.filters),
                  synchronized_bn=self.synchronized_bn,
                  bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                  adversarial_bn=self.adversarial_bn,
                  augmented_bn=self.augmented_bn)
    return config
