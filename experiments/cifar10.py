"""CIFAR-10 (tfds `cifar10`, downloaded on first use: needs the network once,
or a data_dir that already holds the prepared dataset)."""

from . import register
from official_conadv import configs


def _cifar(method):
  c = configs.ExperimentConfig()
  c.model = configs.ModelConfig(
      name="resnet", depth=18, variant="cifar", width=64, num_classes=10,
      input_mean=(0.4914, 0.4822, 0.4465), input_std=(0.2470, 0.2435, 0.2616))
  c.adversary = configs.AdversaryConfig(
      enabled=method != "lars", delay=0 if method == "advprop" else 1,
      epsilon=2 / 255, step_size=2 / 255)
  # LARS at batch 4096 on CIFAR-10: peak LR 8 after 5 warmup epochs; a
  # standard large-batch CIFAR setting (linear scaling from 0.1 at 128 is
  # too high for LARS' trust ratio, which already normalises per layer).
  c.optimizer = configs.OptimizerConfig(name="lars", learning_rate=8.0,
                                        warmup_epochs=5, power=2.0,
                                        weight_decay=5e-4, momentum=0.9)
  c.data = configs.DataConfig(name="cifar10", image_size=32,
                              label_smoothing=0.1,
                              autoaugment="v0" if method == "conadv_aa"
                              else None)
  c.train = configs.TrainConfig(global_batch_size=4096, eval_batch_size=1000,
                                epochs=100, steps_per_loop=12)
  c.description = (
      f"CIFAR-10 ResNet-18 ({method}) at batch 4096, 100 epochs, LARS.\n"
      f"Command: python -m official_conadv.train --experiment=cifar10_resnet18_"
      f"{method} --data_dir=$HOME/tensorflow_datasets --model_dir=runs/"
      f"cifar10_{method}\nCost: 1,200 steps; about 1 GPU-hour for lars, "
      "about 2.7x that with an adversary (FLOP model). Result: not yet "
      "measured here.")
  return c


for _m in ("lars", "advprop", "conadv", "conadv_aa"):
  _fn = (lambda m=_m: _cifar(m))
  _fn.__doc__ = _cifar(_m).description
  register(f"cifar10_resnet18_{_m}", _fn)
