r"""Step time of a converted keras.applications EfficientNet-B0.

  python -m benchmarks.converted_backbone --image_size=64 --batch_size=8 \
      --repeats=10 --output=experiments/results/converted_effnet_b0_cpu.json

Candidates, all built in this one process and timed interleaved (round-robin,
one step each per round, after `--warmup` untimed steps each) on the same
batch (float images in [0, 1], int labels), with the same optimizer (our
LARS, lr 0.1, momentum 0.9, weight decay 5e-5, BN and biases excluded by
path) and loss (mean sparse softmax cross-entropy on logits):

  plain            keras.applications.EfficientNetB0(weights=None, logits),
                   fed images * 255, in a tf.function GradientTape step;
  converted        `convert.dual_bn_backbone(that model, pixel_scale=255)`
                   in the same GradientTape step on the main route: what the
                   conversion itself costs;
  conadv_baseline  ConAdvModel(converted, adversary=None).train_step;
  conadv_delay0    ... AdversaryConfig(delay=0) (sequential, AdvProp-style);
  conadv_delay1    ... AdversaryConfig(delay=1) (ConAdv).

Each candidate has its own model (same architecture and seed). Prints a table
(median, min, max seconds per step, images/s, ratio to `plain` of the
medians and of the minima; on a loaded machine the minima are the steadier
estimate) and writes JSON to --output. Shares `benchmarks.step_time`'s
flags (image_size, batch_size, num_classes, warmup, repeats, jit_compile,
output; its depth, modes and mixed_precision are not used here).
"""

import os
import statistics

from absl import app
from absl import flags

from benchmarks import step_time

CANDIDATES = ("plain", "converted", "conadv_baseline", "conadv_delay0",
              "conadv_delay1")
_LR, _MOMENTUM, _WD = 0.1, 0.9, 5e-5


flags.DEFINE_list("candidates", list(CANDIDATES),
                  f"Subset of {', '.join(CANDIDATES)}.")
flags.adopt_module_key_flags(step_time)
FLAGS = flags.FLAGS


def _application(image_size, num_classes):
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  return keras.applications.EfficientNetB0(
      weights=None, input_shape=(image_size, image_size, 3),
      classes=num_classes, classifier_activation=None)


def _lars():
  from official_conadv.optimization import lars  # pylint: disable=g-import-not-at-top
  return lars.LARS(learning_rate=_LR, momentum=_MOMENTUM,
                   weight_decay_rate=_WD)


def _tape_step(forward, variables, jit_compile):
  """A compiled GradientTape step of `forward(x)` -> logits."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  optimizer = _lars()
  optimizer.build(variables)

  @tf.function(jit_compile=jit_compile)
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, forward(x))
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss

  return step


def build(name, image_size, num_classes, jit_compile, fused=None):
  """The compiled step of candidate `name` (see the module docstring);
  `fused` is the converter's option (None: the fused BN kernel)."""
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import dual_batch_norm  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import convert  # pylint: disable=g-import-not-at-top
  if name not in CANDIDATES:
    raise ValueError(f"Unknown candidate {name!r}; known: {CANDIDATES}.")
  original = _application(image_size, num_classes)
  if name == "plain":
    return _tape_step(lambda x: original(x * 255.0, training=True),
                      original.trainable_variables, jit_compile)
  backbone = convert.dual_bn_backbone(original, pixel_scale=255.0,
                                      fused=fused)
  if name == "converted":
    return _tape_step(
        lambda x: backbone(x, training=True, bn_route="main"),
        [v for v in backbone.trainable_variables
         if not dual_batch_norm.is_auxiliary(v)],
        jit_compile)
  mode = name[len("conadv_"):]
  adversary = (None if mode == "baseline" else
               conadv_model.AdversaryConfig(delay=int(mode[len("delay"):])))
  model = conadv_model.ConAdvModel(backbone, adversary=adversary)
  return step_time.compiled_train_step(model, image_size, jit_compile)


def summarize(times, batch_size):
  ref = statistics.median(times["plain"]) if "plain" in times else None
  ref_min = min(times["plain"]) if "plain" in times else None
  rows = []
  for name, ts in times.items():
    row = step_time.timing_stats(name, ts, batch_size)
    row["over_plain"] = row["median_s"] / ref if ref else None
    row["over_plain_min"] = row["min_s"] / ref_min if ref_min else None
    rows.append(row)
  return rows


def print_table(rows, header):
  print(header)
  print(f"{'candidate':<16} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'img/s':>8} {'x plain':>8} {'(of min)':>8}")
  for r in rows:
    ratio = "-" if r["over_plain"] is None else f"{r['over_plain']:.2f}"
    ratio_min = ("-" if r["over_plain_min"] is None else
                 f"{r['over_plain_min']:.2f}")
    print(f"{r['candidate']:<16} {r['median_s']:9.4f} {r['min_s']:8.4f} "
          f"{r['max_s']:8.4f} {r['images_per_s']:8.1f} {ratio:>8} "
          f"{ratio_min:>8}")


def run(image_size=64, batch_size=8, num_classes=1000, warmup=2, repeats=10,
        candidates=CANDIDATES, jit_compile=False, fused=None, output=None,
        verbose=True):
  """Builds the candidates, times them interleaved; returns the JSON dict.

  The JSON also holds each candidate's first-step loss (all start from the
  same weights; "plain" and "converted" train the same network, so with
  `fused=False` their losses are equal)."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  unknown = set(candidates) - set(CANDIDATES)
  if unknown:
    raise ValueError(f"Unknown candidates {sorted(unknown)}; known: "
                     f"{CANDIDATES}.")
  keras.utils.set_random_seed(0)
  x = tf.random.uniform((batch_size, image_size, image_size, 3))
  y = tf.random.uniform((batch_size,), 0, num_classes, tf.int32)
  steps = {name: build(name, image_size, num_classes, jit_compile, fused)
           for name in candidates}
  # The first call of each traces; it is also the first warm-up step.
  first_loss = {name: float(fn(x, y)) for name, fn in steps.items()}
  times = step_time.time_candidates(steps, (x, y), max(warmup - 1, 0),
                                    repeats)
  rows = summarize(times, batch_size)
  device = (tf.config.list_logical_devices("GPU") or
            tf.config.list_logical_devices("CPU"))[0].name
  header = (f"EfficientNet-B0 train step, {image_size}px, batch {batch_size},"
            f" {device}, jit={jit_compile}, {os.cpu_count()} cores, "
            f"{repeats} interleaved rounds after {max(warmup, 1)} warm-up")
  if verbose:
    print_table(rows, header)
  result = {"header": header, "rows": rows, "raw_seconds": times,
            "first_step_loss": first_loss, "fused": fused}
  step_time.write_json(result, output)
  return result


def main(argv):
  del argv
  run(image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
      num_classes=FLAGS.num_classes, warmup=FLAGS.warmup,
      repeats=FLAGS.repeats, candidates=FLAGS.candidates,
      jit_compile=FLAGS.jit_compile, output=FLAGS.output)


if __name__ == "__main__":
  app.run(main)
