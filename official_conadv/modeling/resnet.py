"""ResNet v1.5 backbones with dual batch norm (clean / adversarial routes).

The backbone of ConAdv (Liu et al., ICLR 2022, Sec. 5: ResNet-50 on ImageNet)
and of AdvProp-style training (Xie et al., CVPR 2020): every BN is a
`dual_batch_norm.DualBatchNormalization`, convolutions and the classifier are
shared, `call(..., bn_route=...)` picks the BN set.

  images [B, H, W, C] float in [0, 1], C = len(input_mean)
    -> (x - input_mean) / input_std                          (float32)
    -> stem -> stages of residual blocks -> global average pool
    -> Dense(num_classes) -> logits [B, num_classes] float32

Architecture (He et al., CVPR 2016, Table 1, with the "v1.5" change of
NVIDIA / tf-models-official / torchvision: the stride of a downsampling
bottleneck sits on its 3x3 conv, not on the first 1x1):

* variant="imagenet", depth in 10/18/34 (basic blocks) or 26/50/101/152/200
  (bottleneck blocks): 7x7/2 conv stem + 3x3/2 max pool, four stages of
  width * (1, 2, 4, 8) channels (x4 at a bottleneck's output), strides
  (1, 2, 2, 2). Input 224 px on ImageNet -> 7x7 final feature map.
* variant="cifar", same depths: 3x3/1 conv stem, no max pool (28-32 px
  inputs keep a 4x4 final map). For MNIST / CIFAR sized images.
* variant="cifar", depth in 20/32/44/56/110 (= 6n + 2): the classic CIFAR
  ResNets of He et al. Sec. 4.2 (basic blocks, three stages of
  width * (1/4, 1/2, 1) = 16/32/64 channels at width=64, strides (1, 2, 2),
  3x3/1 stem of width/4 channels), except that shape-changing shortcuts are
  projections (option B) instead of zero padding (option A), which adds
  ~3k parameters to ResNet-20.

Every conv is bias-free ('same' padding, TF style: asymmetric for stride 2)
and followed by a dual BN (momentum 0.9, epsilon 1e-5 as tf-models-official);
kernels are He-normal with fan_out (VarianceScaling(2, "fan_out",
"truncated_normal")), the last BN gamma of every residual branch starts at 0
when `zero_init_residual` (Goyal et al. 2017, Sec. 5.1), shortcuts are
identities unless the shape changes (then 1x1 conv + BN). The head is a
Dense layer initialised N(0, 0.01) (as tf-models-official's classifier).

ResNet-50 at width=64, num_classes=1000 has exactly as many main-route
parameters as tf-models-official's ResNet-50 + 2048x1000 dense head
(25,610,152 = 25,557,032 trainable + 53,120 BN moving statistics;
`keras.applications.ResNet50` has 25,636,712 because its convs have biases).
The adversarial BN adds 53,120 trainable + 53,120 non-trainable values.
tf-models-official's basic-block stages always start with a projection;
here ResNet-18/34 use an identity shortcut in stage 1 (as torchvision), so
they have 2 x (64x64 conv + BN) fewer parameters than its ResNet-18/34.

Variable paths, e.g. `resnet/stage3_block2/conv2/kernel`,
`resnet/stage3_block2/bn2/gamma` (main) and
`resnet/stage3_block2/bn2/adv/gamma` (adversarial); with
`augmented_bn=True` also `resnet/stage3_block2/bn2/aug/gamma` (the third BN
set for AutoAugment images, as in the authors' released code; another
53,120 trainable + 53,120 non-trainable values on ResNet-50).
"""

import keras
from keras import ops

from official_conadv.modeling import dual_batch_norm

# depth -> (bottleneck?, blocks per stage)
_IMAGENET_SPECS = {
    10: (False, (1, 1, 1, 1)),
    18: (False, (2, 2, 2, 2)),
    26: (True, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}
# depth = 6n + 2 -> n basic blocks in each of three stages (CIFAR variant).
_CIFAR_SPECS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
VARIANTS = ("imagenet", "cifar")
SUPPORTED_DEPTHS = {
    "imagenet": tuple(sorted(_IMAGENET_SPECS)),
    "cifar": tuple(sorted(list(_IMAGENET_SPECS) + list(_CIFAR_SPECS))),
}


def _conv_initializer():
  """He-normal with fan_out (a fresh object per conv, so no shared seed)."""
  return keras.initializers.VarianceScaling(
      scale=2.0, mode="fan_out", distribution="truncated_normal")


def _conv(filters, kernel_size, strides, name, dtype):
  return keras.layers.Conv2D(
      filters, kernel_size, strides=strides, padding="same", use_bias=False,
      kernel_initializer=_conv_initializer(), name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="official_conadv")
class ResidualBlock(keras.layers.Layer):
  """One residual block, basic or bottleneck (v1.5), with dual batch norm.

  basic:      3x3/s (filters) -> BN -> ReLU -> 3x3 (filters) -> BN
  bottleneck: 1x1 (filters) -> BN -> ReLU -> 3x3/s (filters) -> BN -> ReLU
              -> 1x1 (4 * filters) -> BN
  out = ReLU(branch + shortcut); shortcut = 1x1/s conv + BN if
  `use_projection` else the identity.

  Args:
    filters: bottleneck / basic width.
    strides: stride of the 3x3 conv (and of the projection), 1 or 2.
    bottleneck: bottleneck (True) or basic (False) block.
    use_projection: projection shortcut (needed when the shape changes).
    zero_init_residual: the branch's last BN gamma starts at 0.
    bn_momentum, bn_epsilon, synchronized_bn, adversarial_bn, fused_bn,
      augmented_bn: `DualBatchNormalization`'s momentum, epsilon,
      synchronized, adversarial, fused and augmented.

  Call args: inputs [B, H, W, C_in]; training; bn_route ("main" / "adv" /
  "aug").
  Returns: [B, ceil(H / s), ceil(W / s), out_channels].
  """

  def __init__(self, filters, strides=1, bottleneck=True,
               use_projection=False, zero_init_residual=True, bn_momentum=0.9,
               bn_epsilon=1e-5, synchronized_bn=False, adversarial_bn=True,
               fused_bn=None, augmented_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.strides = int(strides)
    self.bottleneck = bool(bottleneck)
    self.use_projection = bool(use_projection)
    self.zero_init_residual = bool(zero_init_residual)
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon
    self.synchronized_bn = synchronized_bn
    self.adversarial_bn = (bool(adversarial_bn)
                           and not dual_batch_norm.main_only_active())
    self.augmented_bn = (bool(augmented_bn)
                         and not dual_batch_norm.main_only_active())
    self.fused_bn = fused_bn
    self.out_channels = self.filters * (4 if self.bottleneck else 1)

    dtype = self.dtype_policy
    if self.bottleneck:
      specs = [(self.filters, 1, 1), (self.filters, 3, self.strides),
               (self.out_channels, 1, 1)]
    else:
      specs = [(self.filters, 3, self.strides), (self.filters, 3, 1)]
    self.convs, self.bns = [], []
    for i, (f, k, s) in enumerate(specs, start=1):
      last = i == len(specs)
      self.convs.append(_conv(f, k, s, f"conv{i}", dtype))
      self.bns.append(self._bn(f"bn{i}", zero=last and zero_init_residual))
    self.shortcut_conv = self.shortcut_bn = None
    if self.use_projection:
      self.shortcut_conv = _conv(self.out_channels, 1, self.strides,
                                 "shortcut_conv", dtype)
      self.shortcut_bn = self._bn("shortcut_bn")

  def _bn(self, name, zero=False):
    return dual_batch_norm.DualBatchNormalization(
        momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        gamma_initializer="zeros" if zero else "ones",
        synchronized=self.synchronized_bn, adversarial=self.adversarial_bn,
        augmented=self.augmented_bn, fused=self.fused_bn, name=name,
        dtype=self.dtype_policy)

  def build(self, input_shape):
    shape = tuple(input_shape)
    for conv, bn in zip(self.convs, self.bns):
      conv.build(shape)
      shape = conv.compute_output_shape(shape)
      bn.build(shape)
    if self.use_projection:
      self.shortcut_conv.build(tuple(input_shape))
      self.shortcut_bn.build(
          self.shortcut_conv.compute_output_shape(tuple(input_shape)))
    elif input_shape[-1] != self.out_channels or self.strides != 1:
      raise ValueError(
          f"Block {self.name!r}: an identity shortcut needs stride 1 and "
          f"{self.out_channels} input channels, got {input_shape} and "
          f"strides={self.strides}; use use_projection=True.")

  def compute_output_shape(self, input_shape):
    shape = tuple(input_shape)
    for conv in self.convs:
      shape = conv.compute_output_shape(shape)
    return shape

  def call(self, inputs, training=None, bn_route=dual_batch_norm.MAIN):
    x = inputs
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = bn(conv(x), training=training, bn_route=bn_route)
      if i < len(self.convs) - 1:
        x = ops.relu(x)
    shortcut = inputs
    if self.use_projection:
      shortcut = self.shortcut_bn(self.shortcut_conv(inputs),
                                  training=training, bn_route=bn_route)
    return ops.relu(x + shortcut)

  def get_config(self):
    config = super().get_config()
    config.update(
        filters=self.filters, strides=self.strides,
        bottleneck=self.bottleneck, use_projection=self.use_projection,
        zero_init_residual=self.zero_init_residual,
        bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
        synchronized_bn=self.synchronized_bn,
        adversarial_bn=self.adversarial_bn, fused_bn=self.fused_bn,
        augmented_bn=self.augmented_bn)
    return config


def stage_layout(depth, variant="imagenet", width=64):
  """[(filters, num_blocks, first_stride)] per stage, bottleneck?, stem width.

  Raises ValueError for an unsupported (variant, depth) or width.
  """
  if variant not in VARIANTS:
    raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
  if depth in _IMAGENET_SPECS:
    bottleneck, blocks = _IMAGENET_SPECS[depth]
    stages = [(width * m, n, 1 if i == 0 else 2)
              for i, (m, n) in enumerate(zip((1, 2, 4, 8), blocks))]
    return stages, bottleneck, width
  if variant == "cifar" and depth in _CIFAR_SPECS:
    if width % 4:
      raise ValueError(f"CIFAR ResNet-{depth} needs width % 4 == 0 (stages "
                       f"are width/4, width/2, width), got width={width}.")
    n = _CIFAR_SPECS[depth]
    stages = [(width // 4, n, 1), (width // 2, n, 2), (width, n, 2)]
    return stages, False, width // 4
  raise ValueError(
      f"Unsupported depth={depth} for variant={variant!r}; supported: "
      f"{SUPPORTED_DEPTHS[variant]}.")


@keras.saving.register_keras_serializable(package="official_conadv")
class ResNet(keras.Model):
  """ResNet v1.5 with dual batch norm; see the module docstring.

  Args:
    depth: see `SUPPORTED_DEPTHS` (18/34/50/101 ... ; cifar also 20/32/56).
    num_classes: logits per image.
    variant: "imagenet" (7x7/2 stem + max pool) or "cifar" (3x3/1 stem).
    width: channels of the first stage (64 = standard); scales every conv,
      so tests can build tiny ResNets (width=8).
    bn_momentum, bn_epsilon: BN moving-average momentum (Keras convention)
      and epsilon.
    synchronized_bn: cross-replica BN statistics under tf.distribute.
    zero_init_residual: zero-init the last BN gamma of every residual branch.
    input_mean, input_std: per-channel normalisation of [0, 1] pixels
      (ImageNet RGB statistics by default; their length fixes the number of
      input channels, e.g. (0.1307,) / (0.3081,) for MNIST).
    adversarial_bn: create the `adv` BN set (False or `main_only()` for an
      inference/export model).
    fused_bn: `DualBatchNormalization.fused` (None = fused kernel where
      possible).
    augmented_bn: also create a third BN set, route "aug", for AutoAugment
      images (`ConAdvModel(..., augmented_route="aug")`, the authors'
      three-way split). False by default; dropped by `main_only()` and
      `conadv_model.inference_model` like the `adv` set.
    name, **kwargs: keras.Model arguments (e.g. dtype).

  Call args:
    images: [B, H, W, C] float in [0, 1] (any float/int dtype; used as
      float32 even under a mixed-precision policy).
    training: BN batch statistics and moving-statistics update.
    bn_route: "main" (clean), "adv" (adversarial) or "aug" (AutoAugment,
      only with augmented_bn=True); ValueError otherwise.

  Returns:
    logits [B, num_classes] float32.
  """

  def __init__(self, depth=50, num_classes=1000, variant="imagenet", width=64,
               bn_momentum=0.9, bn_epsilon=1e-5, synchronized_bn=False,
               zero_init_residual=True, input_mean=(0.485, 0.456, 0.406),
               input_std=(0.229, 0.224, 0.225), adversarial_bn=True,
               fused_bn=None, augmented_bn=False, name="resnet", **kwargs):
    super().__init__(name=name, **kwargs)
    stages, bottleneck, stem_width = stage_layout(depth, variant, width)
    if len(input_mean) != len(input_std):
      raise ValueError(f"input_mean {input_mean} and input_std {input_std} "
                       "must have one value per channel.")
    self.depth = int(depth)
    self.num_classes = int(num_classes)
    self.variant = variant
    self.width = int(width)
    self.bn_momentum = float(bn_momentum)
    self.bn_epsilon = float(bn_epsilon)
    self.synchronized_bn = bool(synchronized_bn)
    self.zero_init_residual = bool(zero_init_residual)
    self.input_mean = tuple(float(m) for m in input_mean)
    self.input_std = tuple(float(s) for s in input_std)
    self.adversarial_bn = (bool(adversarial_bn)
                           and not dual_batch_norm.main_only_active())
    self.augmented_bn = (bool(augmented_bn)
                         and not dual_batch_norm.main_only_active())
    self.fused_bn = fused_bn

    dtype = self.dtype_policy
    bn_kwargs = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                     synchronized_bn=self.synchronized_bn,
                     adversarial_bn=self.adversarial_bn,
                     augmented_bn=self.augmented_bn, fused_bn=fused_bn,
                     dtype=dtype)
    imagenet = variant == "imagenet"
    self.stem_conv = _conv(stem_width, 7 if imagenet else 3,
                           2 if imagenet else 1, "stem_conv", dtype)
    self.stem_bn = dual_batch_norm.DualBatchNormalization(
        momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        synchronized=self.synchronized_bn, adversarial=self.adversarial_bn,
        augmented=self.augmented_bn, fused=fused_bn, name="stem_bn",
        dtype=dtype)
    self.stem_pool = (keras.layers.MaxPooling2D(3, 2, padding="same",
                                                name="stem_pool", dtype=dtype)
                      if imagenet else None)
    self.blocks = []
    channels = stem_width
    for s, (filters, num_blocks, stride) in enumerate(stages, start=1):
      for b in range(1, num_blocks + 1):
        strides = stride if b == 1 else 1
        out_channels = filters * (4 if bottleneck else 1)
        self.blocks.append(ResidualBlock(
            filters, strides=strides, bottleneck=bottleneck,
            use_projection=strides != 1 or channels != out_channels,
            zero_init_residual=self.zero_init_residual,
            name=f"stage{s}_block{b}", **bn_kwargs))
        channels = out_channels
    self.pool = keras.layers.GlobalAveragePooling2D(name="pool", dtype=dtype)
    self.head = keras.layers.Dense(
        self.num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        name="logits", dtype=dtype)

  @property
  def input_dtype(self):
    """Images stay float32 under mixed precision (normalised, then cast)."""
    return "float32"

  def build(self, input_shape):
    shape = tuple(input_shape)
    if len(shape) != 4 or shape[-1] != len(self.input_mean):
      raise ValueError(
          f"ResNet expects [B, H, W, {len(self.input_mean)}] images (one "
          f"channel per input_mean value), got {input_shape}.")
    self.stem_conv.build(shape)
    shape = self.stem_conv.compute_output_shape(shape)
    self.stem_bn.build(shape)
    if self.stem_pool is not None:
      shape = self.stem_pool.compute_output_shape(shape)
    for block in self.blocks:
      block.build(shape)
      shape = block.compute_output_shape(shape)
    self.head.build((shape[0], shape[-1]))

  def call(self, images, training=None, bn_route=dual_batch_norm.MAIN):
    dual_batch_norm.validate_route(bn_route)
    x = ops.cast(images, "float32")
    mean = ops.convert_to_tensor(self.input_mean, "float32")
    std = ops.convert_to_tensor(self.input_std, "float32")
    x = ops.cast((x - mean) / std, self.compute_dtype)
    x = self.stem_conv(x)
    x = ops.relu(self.stem_bn(x, training=training, bn_route=bn_route))
    if self.stem_pool is not None:
      x = self.stem_pool(x)
    for block in self.blocks:
      x = block(x, training=training, bn_route=bn_route)
    return ops.cast(self.head(self.pool(x)), "float32")

  def compute_output_shape(self, input_shape):
    return (input_shape[0], self.num_classes)

  def get_config(self):
    config = super().get_config()
    config.update(
        depth=self.depth, num_classes=self.num_classes, variant=self.variant,
        width=self.width, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn,
        zero_init_residual=self.zero_init_residual,
        input_mean=list(self.input_mean), input_std=list(self.input_std),
        adversarial_bn=self.adversarial_bn, fused_bn=self.fused_bn,
        augmented_bn=self.augmented_bn)
    return config

  @classmethod
  def from_config(cls, config):
    return cls(**config)
