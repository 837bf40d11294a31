r"""Step time of baseline, sequential (delay 0) and ConAdv (delay 1, 2) steps.

  python -m benchmarks.step_time --image_size=64 --batch_size=16 --repeats=10
  python -m benchmarks.step_time --image_size=224 --batch_size=128 \
      --mixed_precision=mixed_bfloat16 --jit_compile      # on a GPU

All candidates are built in one process and timed interleaved (round-robin,
one step each per round) after `--warmup` untimed steps each, so machine
noise hits them alike. Prints a table (median, min, max seconds per step,
images/s, ratio to the baseline) and the FLOP model's prediction, and writes
JSON to --output.

FLOP model, in units of one forward pass: the baseline does forward +
backward = 3; an adversarial step adds the attack (forward + input gradient
= 2) and a second training branch (3): (2 + 3 + 3) / 3 = 2.67x.
"""

import statistics
import time

from absl import app
from absl import flags

from benchmarks import results

flags.DEFINE_integer("depth", 50, "ResNet depth.")
flags.DEFINE_integer("image_size", 64, "Square image size.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("num_classes", 1000, "Classes.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per candidate.")
flags.DEFINE_integer("repeats", 10, "Timed rounds.")
flags.DEFINE_list("modes", ["baseline", "delay0", "delay1", "delay2"],
                  "Candidates: baseline, delayN.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step.")
flags.DEFINE_string("mixed_precision", None, "Keras mixed precision policy.")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS

FLOP_PREDICTION = {"baseline": 1.0, "adversarial": 8.0 / 3.0}


def build_step(mode, depth, image_size, num_classes, jit_compile):
  """A compiled train step of ConAdvModel(ResNet) for `mode`."""
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import resnet  # pylint: disable=g-import-not-at-top

  adversary = None
  if mode != "baseline":
    adversary = conadv_model.AdversaryConfig(delay=int(mode[len("delay"):]))
  model = conadv_model.ConAdvModel(
      resnet.ResNet(depth=depth, num_classes=num_classes), adversary=adversary)
  return model, compiled_train_step(model, image_size, jit_compile)


def compiled_train_step(model, image_size, jit_compile):
  """Builds `model` (a ConAdvModel) for square images, compiles it with the
  benchmarks' LARS (lr 0.1, momentum 0.9, weight decay 5e-5) and sparse
  cross-entropy, builds the optimizer, and returns its train step as a
  tf.function fn(x, y) -> loss (traced at its first call)."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv.optimization import lars  # pylint: disable=g-import-not-at-top
  model.build((None, image_size, image_size, 3))
  model.compile(optimizer=lars.LARS(learning_rate=0.1, momentum=0.9,
                                    weight_decay_rate=5e-5),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  model.optimizer.build(model.trainable_variables)
  return tf.function(lambda x, y: model.train_step((x, y))["loss"],
                     jit_compile=jit_compile)


def time_candidates(steps, data, warmup, repeats):
  """Interleaved timing: {name: [seconds per step]}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  for fn in steps.values():
    for _ in range(warmup):
      np.asarray(fn(*data))
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      np.asarray(fn(*data))  # Blocks until the step is done.
      times[name].append(time.perf_counter() - t0)
  return times


def timing_stats(name, seconds, batch_size):
  """One candidate's timing row: median, min, max seconds per step and
  images/s of the median (the benchmarks add their own ratios)."""
  med = statistics.median(seconds)
  return {"candidate": name, "median_s": med, "min_s": min(seconds),
          "max_s": max(seconds), "images_per_s": batch_size / med}


def summarize(times, batch_size):
  base = statistics.median(times["baseline"]) if "baseline" in times else None
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    kind = "baseline" if name == "baseline" else "adversarial"
    rows.append({
        "mode": name, "median_s": med, "min_s": min(ts), "max_s": max(ts),
        "images_per_s": batch_size / med,
        "ratio_to_baseline": med / base if base else None,
        "flop_model_ratio": FLOP_PREDICTION[kind],
    })
  return rows


write_json = results.write_json  # The scripts that import step_time call it.


def print_table(rows, header):
  print(header)
  print(f"{'mode':<10} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'img/s':>8} {'x base':>7} {'FLOP model':>10}")
  for r in rows:
    ratio = "-" if r["ratio_to_baseline"] is None else (
        f"{r['ratio_to_baseline']:.2f}")
    print(f"{r['mode']:<10} {r['median_s']:9.4f} {r['min_s']:8.4f} "
          f"{r['max_s']:8.4f} {r['images_per_s']:8.1f} {ratio:>7} "
          f"{r['flop_model_ratio']:10.2f}")


def main(argv):
  del argv
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if FLAGS.mixed_precision:
    keras.mixed_precision.set_global_policy(FLAGS.mixed_precision)
  keras.utils.set_random_seed(0)
  x = tf.random.uniform((FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size,
                         3))
  y = tf.random.uniform((FLAGS.batch_size,), 0, FLAGS.num_classes, tf.int32)
  steps = {}
  for mode in FLAGS.modes:
    _, steps[mode] = build_step(mode, FLAGS.depth, FLAGS.image_size,
                                FLAGS.num_classes, FLAGS.jit_compile)
  times = time_candidates(steps, (x, y), FLAGS.warmup, FLAGS.repeats)
  rows = summarize(times, FLAGS.batch_size)
  device = (tf.config.list_logical_devices("GPU") or
            tf.config.list_logical_devices("CPU"))[0].name
  header = (f"ResNet-{FLAGS.depth} train step, {FLAGS.image_size}px, batch "
            f"{FLAGS.batch_size}, {device}, jit={FLAGS.jit_compile}, "
            f"policy={FLAGS.mixed_precision or 'float32'}, "
            f"{FLAGS.repeats} interleaved rounds after {FLAGS.warmup} warm-up")
  print_table(rows, header)
  write_json({"header": header, "rows": rows, "raw_seconds": times},
             FLAGS.output)


if __name__ == "__main__":
  app.run(main)
