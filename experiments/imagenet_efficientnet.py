"""ImageNet EfficientNet-B0 (keras.applications, 224 px): LARS/AdvProp/ConAdv.

Names: imagenet_efficientnet_b0_{lars,advprop,conadv}_{4k,64k}
  lars     plain LARS baseline (no adversary)
  advprop  sequential adversarial training (attack with theta_t, delay 0)
  conadv   ConAdv, 1-step PGD from theta_{t-1} (delay 1)

Command (TPU pod slice, TFRecord shards train-*/validation-* in a bucket):
  python -m official_conadv.train \
      --experiment=imagenet_efficientnet_b0_conadv_64k \
      --strategy=tpu --tpu=$TPU_NAME --data_dir=gs://BUCKET/imagenet \
      --model_dir=gs://BUCKET/runs/effnet_b0_conadv_64k
Use --params_override=data.name=imagenet_tfds with the two official tars in
--data_dir for tfds' imagenet2012 instead. Cost: not measured here (no TPU).

Model: model.name="keras.applications.EfficientNetB0" (weights=None,
include_top=True, 1000 classes, logits), converted to a dual-BN backbone by
official_conadv.modeling.convert.dual_bn_backbone with pixel_scale=255: the
pipeline's [0, 1] pixels become the [0, 255] the application takes; its own
Rescaling(1/255) then gives [0, 1] again, and with weights=None its
Normalization layer holds mean 0 / variance 1 (identity). Architecture values
are keras.applications' defaults for B0 (the tensorflow/tpu ones, PAPER.md):
dropout 0.2 before the classifier, drop-connect 0.2 scaled linearly over the
blocks (0 to 0.1875 in block 7a), BN momentum 0.99 / epsilon 1e-3 (the
config's bn_momentum / bn_epsilon do not apply to keras.applications models),
5,330,571 parameters. BN is per replica, as in the ResNet rows; the
tensorflow/tpu EfficientNet main.py (commit 01b67067) has a
`batch_norm_batch_size` flag ("Per-group batch size for distributed batch
normalization", default 128), which per-replica BN equals when each replica
holds 128 images (4,096 on 32 cores, 65,536 on 512).

What carries over from the original EfficientNet recipe, and what does not.
The original (Tan & Le 2019; tensorflow/tpu models/official/efficientnet/
main.py read at commit 01b67067, utils.py at 139e1f48) is RMSProp (decay
0.9, momentum 0.9, epsilon 1e-3), lr 0.016 x batch / 256 (0.256 at the
paper's batch 4,096), 5 warmup epochs, x0.97 every 2.4 epochs (staircase
exponential decay), 350 epochs, L2 1e-5 on non-BN weights, label smoothing
0.1, and evaluation with a 0.9999 exponential moving average of the
weights. This project implements
LARS or momentum SGD with linear warmup + polynomial decay only: no RMSProp,
no exponential decay. The weight average is carried over:
optimizer.ema_momentum=0.9999 (main.py's `moving_average_decay` default,
with its `num_updates=global_step` warmup, min(0.9999, (1 + t) / (10 + t));
official_conadv/optimization/ema.py); evaluation and export use the average,
and summary.json's `eval_raw` holds the raw weights' evaluation. Their
`utils.get_ema_vars` also averages the BN moving statistics; here they are
not averaged a second time (ema.py says why). Carried over: 224 px, label
smoothing 0.1, weight decay 1e-5 (here inside LARS, added to the gradient
before the trust ratio: the same wd * w gradient term as their L2 loss; BN
gamma/beta and every bias are excluded from decay and from layer adaptation by
`variable.path`, lars.DEFAULT_EXCLUDE, where their L2 excluded only BN), 350
epochs, 5 warmup epochs at 4K, bfloat16, and the preprocessing: the
project's ImageNet crops (official_conadv/data/preprocessing.py) match
tensorflow/tpu efficientnet/preprocessing.py (commit 22d5cab9) at 224 px:
Inception-style random crop (area 0.08-1, aspect 3/4-4/3, 10 attempts, center
crop on failure), bicubic resize, flip; eval center crop with 32 px padding
(their CROP_FRACTION 0.875).
AutoAugment is off, as in main.py's default (`augment_name=None`); the
paper's 77.1% B0 top-1 used AutoAugment: --params_override=data.autoaugment=v0.

Batch sizes: those with a published EfficientNet recipe.
  4k  (4,096): the EfficientNet paper's batch (RMSProp; no LARS value exists).
  64k (65,536): Wongpanich et al. 2020 (arXiv 2011.00071) trained EfficientNet
      at 65,536 on 1,024 TPU-v3 cores with LARS to 83% top-1 in 1 h 4 min
      (abstract). 83% is above B0's published 77.1%, so that figure is for a
      larger variant. Their LARS learning rate, warmup, decay, epochs and B0
      settings could not be read: not published (as far as readable).
LARS values, with sources (quoted only where read):
  peak LR and warmup: not published for EfficientNet + LARS at either batch.
      Rule used: the LARS schedule of the same repository,
      tensorflow/tpu models/official/resnet/lars_util.py
      (`poly_rate_schedule`, read at commit 11a028bf; written for ResNet-50):
      batch <= 16,384 -> peak 25.0, warmup 5 epochs; 32,768 -> 34.0, 12;
      larger -> 41.0, 16; then polynomial decay with power 2.0 over the
      remaining steps. So 4k: 25.0 / 5 (5 warmup epochs is also the
      EfficientNet default, `lr_warmup_epochs` 5 in main.py); 64k: 41.0 / 16.
      The ConAdv authors' own ResNet-50 16K config (peak 25, warmup 5) agrees
      with the first branch. Another stored copy of the same function (an
      MLPerf submission) uses a peak of 10.0 below 16,384, so the 4k peak is
      the less certain of the two.
  end LR 1e-4: lars_util.py passes no end rate to tf.train.polynomial_decay,
      whose default end_learning_rate is 0.0001. (PAPER.md reports an end rate
      of 0.1 for the EfficientNet code's LARS branch; the utils.py versions
      that could be read, 139e1f48 and 76d0c677, predate that branch, so it
      could not be checked.)
  momentum 0.9, eeta 0.001, LARS epsilon 0: tensorflow/tpu
      models/official/efficientnet/lars_optimizer.py defaults (momentum=0.9,
      eeta=0.001, epsilon=0.0) and main.py `lars_epsilon` 0.0. This project's
      LARS has no epsilon.
  weight decay 1e-5: main.py `weight_decay` and `lars_weight_decay`, both 1e-5.
  epochs 350: main.py (`train_steps` 218,949 "approximately 350 epochs at
      batch size 2048"); for 64k the large-batch work's length could not be
      read (not published), so the original 350 is kept.

Table (B = global batch, LR = peak LR, wu = warmup epochs, mom = momentum,
wd = weight decay, pow = decay power, end = end LR; steps/ep = 1,281,167 // B
is one loop; total = ceil(epochs * 1,281,167 / B); exec = steps_per_execution
= min(steps/ep, 100)):
  name B      LR wu mom wd    pow end    epochs steps/ep total   exec
  4k   4,096  25 5  0.9 1e-05 2   0.0001 350    312      109,475 100
  64k  65,536 41 16 0.9 1e-05 2   0.0001 350    19       6,843   19

Adversary (advprop and conadv): AdvProp's PGD epsilon and steps for
EfficientNet could not be read (its training code was never released), so the
ResNet rows' setting is used for comparability: L-inf PGD-1 with random start,
eps = step = 4/255 in [0, 1] pixels (roughly what the ConAdv authors'
9*2/255 on normalised images amounts to, PAPER.md), untargeted; advprop delay
0, conadv delay 1. (A PyTorch AdvProp reproduction used PGD-1 with eps 1/255
for ResNet-50, PAPER.md: --params_override=adversary.epsilon=1/255,
adversary.step_size=1/255.)

Loop structure (as experiments/imagenet.py): one loop = one data epoch
(steps_per_loop = 1,281,167 // B), a checkpoint and an evaluation of all 50,000
validation images after each; steps_per_execution = min(steps per epoch, 100);
the run stops at exactly ceil(epochs * 1,281,167 / B) steps.
Published top-1 (not ours): B0 77.1 (paper, AutoAugment); AdvProp + AutoAugment
B0 77.6 against 77.3 for its AutoAugment baseline (tensorflow/tpu README, per
PAPER.md).
"""

import math

from . import register
from official_conadv import configs

TRAIN_EXAMPLES = 1_281_167
MODEL_NAME = "keras.applications.EfficientNetB0"
IMAGE_SIZE = 224
LABEL_SMOOTHING = 0.1
EETA = 0.001
# Weight average: tensorflow/tpu efficientnet main.py `moving_average_decay`.
EMA_MOMENTUM = 0.9999
ADV_EPSILON = 4 / 255

# batch: (global batch, peak LR, warmup epochs, momentum, weight decay,
#         power, end LR, epochs, source)
BATCHES = {
    "4k": (4096, 25.0, 5, 0.9, 1e-5, 2.0, 1e-4, 350,
           "EfficientNet paper batch; LARS LR/warmup: tensorflow/tpu "
           "resnet/lars_util.py rule"),
    "64k": (65536, 41.0, 16, 0.9, 1e-5, 2.0, 1e-4, 350,
            "Wongpanich et al. 2020 batch; LARS LR/warmup: tensorflow/tpu "
            "resnet/lars_util.py rule"),
}
# method: (adversary enabled, delay)
METHODS = {"lars": (False, 1), "advprop": (True, 0), "conadv": (True, 1)}


def loop_shape(size: int, epochs: float):
  """(steps per epoch = steps_per_loop, total steps, steps_per_execution)."""
  steps_per_epoch = TRAIN_EXAMPLES // size
  total = int(math.ceil(epochs * TRAIN_EXAMPLES / size))
  return steps_per_epoch, total, min(steps_per_epoch, 100)


def table_rows():
  """The docstring's table rows, made from BATCHES (tests check the docstring
  quotes them)."""
  rows = []
  for name, (size, lr, warmup, momentum, wd, power, end, epochs,
             _) in BATCHES.items():
    per_epoch, total, execution = loop_shape(size, epochs)
    rows.append(f"{name} {size:,} {lr:g} {warmup:g} {momentum:g} {wd:g} "
                f"{power:g} {end:g} {epochs:g} {per_epoch:,} {total:,} "
                f"{execution}")
  return rows


def imagenet_efficientnet_b0(method: str,
                             batch: str) -> configs.ExperimentConfig:
  size, lr, warmup, momentum, wd, power, end, epochs, source = BATCHES[batch]
  enabled, delay = METHODS[method]
  c = configs.ExperimentConfig()
  c.description = (f"EfficientNet-B0 (keras.applications) on ImageNet, "
                   f"{method}, global batch {size} ({source}). See "
                   "experiments/imagenet_efficientnet.py.")
  c.model = configs.ModelConfig(name=MODEL_NAME, num_classes=1000,
                                pixel_scale=255.0)
  c.adversary = configs.AdversaryConfig(
      enabled=enabled, delay=delay, epsilon=ADV_EPSILON,
      step_size=ADV_EPSILON, steps=1, random_init=True)
  c.optimizer = configs.OptimizerConfig(
      name="lars", learning_rate=lr, warmup_epochs=warmup, power=power,
      momentum=momentum, weight_decay=wd, eeta=EETA, end_learning_rate=end,
      ema_momentum=EMA_MOMENTUM)
  c.data = configs.DataConfig(
      name="imagenet_tfrecord", image_size=IMAGE_SIZE,
      label_smoothing=LABEL_SMOOTHING, num_train_examples=TRAIN_EXAMPLES)
  steps_per_epoch, _, execution = loop_shape(size, epochs)
  c.train = configs.TrainConfig(
      global_batch_size=size, eval_batch_size=min(size, 8192), epochs=epochs,
      steps_per_loop=steps_per_epoch, steps_per_execution=execution,
      keep_checkpoints=5)
  c.runtime = configs.RuntimeConfig(strategy="tpu",
                                    mixed_precision="mixed_bfloat16")
  return c


for _m in METHODS:
  for _b in BATCHES:
    _fn = (lambda m=_m, b=_b: imagenet_efficientnet_b0(m, b))
    _fn.__doc__ = (imagenet_efficientnet_b0(_m, _b).description + "\n\n" +
                   __doc__)
    register(f"imagenet_efficientnet_b0_{_m}_{_b}", _fn)
