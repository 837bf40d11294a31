"""ImageNet-1k ResNet-50 (v1.5, 224 px): every method x batch size of the paper.

Names: imagenet_resnet50_{lars,advprop,conadv,conadv_aa}_{1k,4k,8k,16k,32k,64k,96k}
  lars       plain LARS baseline (no adversary)
  advprop    sequential adversarial training (attack with theta_t, delay 0)
  conadv     ConAdv, 1-step PGD from theta_{t-1} (delay 1)
  conadv_aa  ConAdv + AutoAugment v0 on the clean branch; the adversary
             attacks the un-augmented image of the same crop. The authors'
             released code instead trains AutoAugment images on a third BN
             set and averages the three losses:
             --params_override=model.augmented_route=aug

Command (TPU pod slice, TFRecord shards train-*/validation-* in a bucket):
  python -m official_conadv.train --experiment=imagenet_resnet50_conadv_32k \
      --strategy=tpu --tpu=$TPU_NAME --data_dir=gs://BUCKET/imagenet \
      --model_dir=gs://BUCKET/runs/conadv_32k
Use --params_override=data.name=imagenet_tfds with the two official tars in
--data_dir for tfds' imagenet2012 instead.

Loop structure: one loop = one data epoch (steps_per_loop = 1,281,167 // B),
a checkpoint and an evaluation of all 50,000 validation images after each;
steps_per_execution = min(steps per epoch, 100) steps per device call (the
last call of a loop is shorter when 100 does not divide it); the run stops at
exactly train_steps (or ceil(epochs * 1,281,167 / B)). `make rehearse` runs
every row with its loop shape at toy scale.

Hyperparameters per batch size (peak LR, warmup epochs, momentum, weight
decay, decay power, length) and where each comes from:
  16K, 32K, 96K: the authors' released configs (github.com/conadv/ConAdv):
    16K: peak 25, warmup 5, 7,116 steps; 32K: peak 31.2, warmup 25, 3,558
    steps; 96K (98,304): peak 43, warmup 41, momentum 0.92, weight decay 5e-5,
    power 1.6, 1,301 steps (~100 epochs). Their LARS uses eeta 0.001, label
    smoothing 0.1, BN momentum 0.9, eps 1e-5, bf16. Weight decay 5e-5 and
    momentum 0.9 at 16K/32K are assumed from the shared flags (the sheet only
    lists the 96K values); power 2 there is the MLPerf default.
  64K (65,536): Google's MLPerf v0.7 TPU run (no authors' config exists):
    peak 24.699, warmup 31, momentum 0.951807, weight decay 1e-4, power 2,
    88.9 epochs.
  1K, 4K, 8K: not published; square-root scaling from the authors' 16K
    anchor, peak = 25 * sqrt(B / 16384) (6.25 / 12.5 / 17.7), warmup 5
    epochs, 90 epochs, momentum 0.9, weight decay 5e-5, power 2.
Adversary (all adversarial rows): L-inf PGD-1 with random start, eps = step
= 4/255 in [0, 1] pixels (what the authors' 9*2/255 on normalised images
amounts to), untargeted; their targeted / 20%-clean-start variant is
--params_override=adversary.targeted=true,adversary.prob_start_from_clean=0.2.
Paper's reported top-1 (not ours): LARS 76.9/76.6/76.6/76.6/75.3/74.3 at
4K/8K/16K/32K/64K/96K; ConAdv 75.3 and ConAdv+AA 76.2 at 96K.
"""

from . import register
from official_conadv import configs

TRAIN_EXAMPLES = 1_281_167

# batch: (global batch, peak LR, warmup epochs, momentum, weight decay,
#         power, epochs, train_steps or None, source)
BATCHES = {
    "1k": (1024, 6.25, 5, 0.9, 5e-5, 2.0, 90, None, "sqrt rule from 16K"),
    "4k": (4096, 12.5, 5, 0.9, 5e-5, 2.0, 90, None, "sqrt rule from 16K"),
    "8k": (8192, 17.68, 5, 0.9, 5e-5, 2.0, 90, None, "sqrt rule from 16K"),
    "16k": (16384, 25.0, 5, 0.9, 5e-5, 2.0, 91, 7116, "authors' config"),
    "32k": (32768, 31.2, 25, 0.9, 5e-5, 2.0, 91, 3558, "authors' config"),
    "64k": (65536, 24.699, 31, 0.951807, 1e-4, 2.0, 88.9, None,
            "MLPerf v0.7 TPU run"),
    "96k": (98304, 43.0, 41, 0.92, 5e-5, 1.6, 100, 1301, "authors' config"),
}
METHODS = ("lars", "advprop", "conadv", "conadv_aa")


def imagenet_resnet50(method: str, batch: str) -> configs.ExperimentConfig:
  size, lr, warmup, momentum, wd, power, epochs, steps, source = BATCHES[batch]
  c = configs.ExperimentConfig()
  c.description = (f"ResNet-50 on ImageNet, {method}, global batch {size} "
                   f"(hyperparameters: {source}). See experiments/imagenet.py.")
  c.model = configs.ModelConfig(name="resnet", depth=50, variant="imagenet",
                                num_classes=1000, bn_momentum=0.9,
                                bn_epsilon=1e-5)
  c.adversary = configs.AdversaryConfig(
      enabled=method != "lars", delay=0 if method == "advprop" else 1,
      epsilon=4 / 255, step_size=4 / 255, steps=1, random_init=True)
  # No weight average (optimizer.ema_momentum None): neither the ConAdv
  # paper's ResNet-50 setup nor the LARS sources in BATCHES describe one;
  # --params_override=optimizer.ema_momentum=0.9999 tries one.
  c.optimizer = configs.OptimizerConfig(
      name="lars", learning_rate=lr, warmup_epochs=warmup, power=power,
      momentum=momentum, weight_decay=wd, eeta=0.001, end_learning_rate=1e-4,
      ema_momentum=None)
  c.data = configs.DataConfig(
      name="imagenet_tfrecord", image_size=224, label_smoothing=0.1,
      autoaugment="v0" if method == "conadv_aa" else None,
      num_train_examples=TRAIN_EXAMPLES)
  steps_per_epoch = TRAIN_EXAMPLES // size
  c.train = configs.TrainConfig(
      global_batch_size=size, eval_batch_size=min(size, 8192), epochs=epochs,
      train_steps=steps, steps_per_loop=steps_per_epoch,
      steps_per_execution=min(steps_per_epoch, 100), keep_checkpoints=5)
  c.runtime = configs.RuntimeConfig(strategy="tpu",
                                    mixed_precision="mixed_bfloat16")
  return c


for _m in METHODS:
  for _b in BATCHES:
    _fn = (lambda m=_m, b=_b: imagenet_resnet50(m, b))
    _fn.__doc__ = imagenet_resnet50(_m, _b).description + "\n\n" + __doc__
    register(f"imagenet_resnet50_{_m}_{_b}", _fn)
