r"""Our baseline ResNet-50 train step against peer implementations.

  python -m benchmarks.peers --image_size=64 --batch_size=16 --repeats=10 \
      --output=experiments/results/peers_cpu.json

Candidates, all built in this one process and timed interleaved (round-robin,
one step each per round, after `--warmup` untimed steps each), on the same
batch (float images in [0, 1], int labels), same loss (mean sparse softmax
cross-entropy on logits), one optimizer update per step:

  ours      ConAdvModel(resnet.ResNet(depth), adversary=None) + our LARS, the
            step `step_time.build_step("baseline", ...)` builds (Keras 3).
  keras     keras.applications.ResNet50/101/152(weights=None, logits) +
            keras.optimizers.SGD(momentum=0.9), a tf.function GradientTape
            step (Keras 3).
  tfm       tf-models-official's ResNet backbone
            (`official.vision.modeling.backbones.ResNet(model_id=depth)`) +
            global average pool + tf_keras Dense head (a tf_keras model) +
            tf-models-official's LARS (`official.modeling.optimization.lars`,
            a tf_keras legacy optimizer), a tf.function GradientTape step.

tf_keras (Keras 2) and Keras 3 coexist in one process here (TF 2.20,
tf_keras 2.20, Keras 3.15): tf-models-official's model and optimizer are
tf_keras objects, never mixed with Keras 3 ones, and the tf.function steps are
plain TF, so all three are timed in the same process.

Hyperparameters: LARS lr 0.1, momentum 0.9, weight decay 5e-5 with BN
gamma/beta and biases excluded from decay and trust ratio for both LARS
(ours by default, theirs via `exclude_from_weight_decay`); SGD lr 0.1.
ResNet BN momentum 0.9, epsilon 1e-5 for ours and tfm (keras.applications
uses its own BN settings and conv biases).

Also counts the ops of each step's traced graph: `top_level_ops` (ops of the
concrete function's graph) and `function_library_ops` (ops inside nested
functions of its library, e.g. tf.cond branches), and `total_ops`.

Prints a table (median, min, max seconds per step, images/s, peer time / our
time of the medians and of the minima: >= 1.0 means ours is at least as
fast; on a loaded machine the minima are the steadier estimate) and writes
JSON to --output.
Shares `benchmarks.step_time`'s flags (depth, image_size, batch_size,
num_classes, warmup, repeats, jit_compile, output; its `modes` and
`mixed_precision` are not used here).
"""

import os
import statistics

from absl import app
from absl import flags

from benchmarks import step_time

flags.DEFINE_list("peers", ["keras", "tfm"],
                  "Peers to time against ours: keras, tfm.")
flags.adopt_module_key_flags(step_time)
FLAGS = flags.FLAGS

PEERS = ("keras", "tfm")
OURS = "ours"
_KERAS_APPS = {50: "ResNet50", 101: "ResNet101", 152: "ResNet152"}
# Same hyperparameters for every LARS.
_LR, _MOMENTUM, _WD = 0.1, 0.9, 5e-5
# tf-models-official's LARS matches on variable.name ("dense/bias:0").
_TFM_EXCLUDE = [r"(^|/)(gamma|beta|bias)(:0)?$"]


def build_ours(depth, image_size, num_classes, jit_compile):
  return step_time.build_step("baseline", depth, image_size, num_classes,
                              jit_compile)[1]


def build_keras(depth, image_size, num_classes, jit_compile):
  """keras.applications ResNet + Keras SGD(momentum), a compiled step."""
  import keras  # pylint: disable=g-import-not-at-top
  if depth not in _KERAS_APPS:
    raise ValueError(f"keras.applications has no ResNet-{depth} (has "
                     f"{sorted(_KERAS_APPS)}).")
  model = getattr(keras.applications, _KERAS_APPS[depth])(
      weights=None, input_shape=(image_size, image_size, 3),
      classes=num_classes, classifier_activation=None)
  optimizer = keras.optimizers.SGD(learning_rate=_LR, momentum=_MOMENTUM)
  optimizer.build(model.trainable_variables)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  return _gradient_step(model, loss_fn, optimizer, jit_compile)


def _gradient_step(model, loss_fn, optimizer, jit_compile):
  """A compiled plain training step (forward, loss, gradients, update)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function(jit_compile=jit_compile)
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss

  return step


def build_tfm(depth, image_size, num_classes, jit_compile):
  """tf-models-official ResNet + Dense head (tf_keras) + its LARS."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  from official.modeling.optimization import lars as tfm_lars  # pylint: disable=g-import-not-at-top
  from official.vision.modeling.backbones import resnet as tfm_resnet  # pylint: disable=g-import-not-at-top

  inputs = tf_keras.Input((image_size, image_size, 3))
  backbone = tfm_resnet.ResNet(
      model_id=depth,
      input_specs=tf_keras.layers.InputSpec(
          shape=[None, image_size, image_size, 3]),
      norm_momentum=0.9, norm_epsilon=1e-5)
  endpoints = backbone(inputs)
  features = tf_keras.layers.GlobalAveragePooling2D()(
      endpoints[max(endpoints, key=int)])
  logits = tf_keras.layers.Dense(
      num_classes,
      kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.01))(
          features)
  model = tf_keras.Model(inputs, logits)
  optimizer = tfm_lars.LARS(
      learning_rate=_LR, momentum=_MOMENTUM, weight_decay_rate=_WD,
      exclude_from_weight_decay=_TFM_EXCLUDE)
  loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  return _gradient_step(model, loss_fn, optimizer, jit_compile)


BUILDERS = {OURS: build_ours, "keras": build_keras, "tfm": build_tfm}


def graph_op_counts(fn, data):
  """Op counts of the traced step (after it ran, so no new trace)."""
  graph = fn.get_concrete_function(*data).graph
  graph_def = graph.as_graph_def()
  top = len(graph.get_operations())
  library = sum(len(f.node_def) for f in graph_def.library.function)
  return {"top_level_ops": top, "function_library_ops": library,
          "num_library_functions": len(graph_def.library.function),
          "total_ops": top + library}


def summarize(times, ops, batch_size):
  ours = statistics.median(times[OURS])
  ours_min = min(times[OURS])
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    rows.append({
        "impl": name, "median_s": med, "min_s": min(ts), "max_s": max(ts),
        "images_per_s": batch_size / med,
        "peer_over_ours": med / ours,
        "peer_over_ours_min": min(ts) / ours_min,
        **ops[name],
    })
  return rows


def print_table(rows, header):
  print(header)
  print(f"{'impl':<6} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'img/s':>8} {'peer/ours':>9} {'(of min)':>8} {'graph ops':>9} "
        f"{'(+nested)':>9}")
  for r in rows:
    print(f"{r['impl']:<6} {r['median_s']:9.4f} {r['min_s']:8.4f} "
          f"{r['max_s']:8.4f} {r['images_per_s']:8.1f} "
          f"{r['peer_over_ours']:9.2f} {r['peer_over_ours_min']:8.2f} "
          f"{r['top_level_ops']:9d} "
          f"{r['function_library_ops']:9d}")


def run(depth=50, image_size=64, batch_size=16, num_classes=1000, warmup=2,
        repeats=10, peers=PEERS, jit_compile=False, output=None,
        verbose=True):
  """Builds ours and `peers`, times them interleaved; returns the JSON dict."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  unknown = set(peers) - set(PEERS)
  if unknown:
    raise ValueError(f"Unknown peers {sorted(unknown)}; known: {PEERS}.")
  keras.utils.set_random_seed(0)
  x = tf.random.uniform((batch_size, image_size, image_size, 3))
  y = tf.random.uniform((batch_size,), 0, num_classes, tf.int32)
  steps = {}
  for name in (OURS,) + tuple(peers):
    steps[name] = BUILDERS[name](depth, image_size, num_classes, jit_compile)
  # At least one call each before timing or counting: the first call traces.
  times = step_time.time_candidates(steps, (x, y), max(warmup, 1), repeats)
  ops = {name: graph_op_counts(fn, (x, y)) for name, fn in steps.items()}
  rows = summarize(times, ops, batch_size)
  device = (tf.config.list_logical_devices("GPU") or
            tf.config.list_logical_devices("CPU"))[0].name
  header = (f"ResNet-{depth} train step vs peers, {image_size}px, batch "
            f"{batch_size}, {device}, jit={jit_compile}, {os.cpu_count()} "
            f"CPUs, {repeats} interleaved rounds after {max(warmup, 1)} "
            "warm-up")
  result = {"header": header, "rows": rows, "raw_seconds": times,
            "config": {"depth": depth, "image_size": image_size,
                       "batch_size": batch_size, "num_classes": num_classes,
                       "warmup": max(warmup, 1), "repeats": repeats,
                       "jit_compile": jit_compile, "peers": list(peers)},
            "load_average": os.getloadavg()}
  if verbose:
    print_table(rows, header)
  step_time.write_json(result, output)
  return result


def main(argv):
  del argv
  if FLAGS.mixed_precision:
    raise app.UsageError("--mixed_precision is not supported by peers.py.")
  run(depth=FLAGS.depth, image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, num_classes=FLAGS.num_classes,
      warmup=FLAGS.warmup, repeats=FLAGS.repeats, peers=FLAGS.peers,
      jit_compile=FLAGS.jit_compile, output=FLAGS.output)


if __name__ == "__main__":
  app.run(main)
