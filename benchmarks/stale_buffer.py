r"""Memory and time cost of ConAdv's stale-weight ring buffer.

  python -m benchmarks.stale_buffer --image_size=64 --batch_size=16 \
      --repeats=10 --output=experiments/results/stale_buffer_cpu.json

Memory: for each tau in --taus, builds ConAdvModel(resnet.ResNet(depth),
AdversaryConfig(delay=tau)) and sums the bytes of its buffer variables
(size x dtype size). One slot holds a copy of every trainable backbone
variable (main and adversarial BN gamma/beta included), so a slot is the
backbone's trainable bytes and the buffer is tau slots; both are checked
against the model's actual buffer variables. Fractions are of the
backbone's own parameter bytes (all its weights: trainable, BN moving
statistics of both routes) and of its main-route parameters (what an
exported ResNet holds).

Time: candidates built in one process and timed interleaved (round-robin, one
call each per round, after `--warmup` untimed calls each):

  step_delay1   the full ConAdv train step, delay 1 (`step_time.build_step`);
  stale_tauN    `model.schedule.attack_weights(model, step)` alone in a tf.function: the
                buffer read of theta_{t - tau} and the write of theta_t, for
                each tau in --taus (tau 1 is the step_delay1 model's own
                buffer), at a step t > 0 (the steady state, no fill);
  step_delay0   (--compare_delay0) the same step reading the current weights
                instead of a buffer; step_delay1 - step_delay0 is the buffer's
                in-step cost (noisier, a difference of two step times).

Prints the memory table and the timing table (median, min, max seconds;
share of the delay-1 step) and writes JSON to --output. Shares
`benchmarks.step_time`'s flags (depth, image_size, batch_size, num_classes,
warmup, repeats, jit_compile, output; `modes`, `mixed_precision` unused).
"""

import os
import statistics

from absl import app
from absl import flags

from benchmarks import step_time

flags.DEFINE_list("taus", ["1", "2", "4"], "Buffer depths (delays) to size.")
flags.DEFINE_bool("compare_delay0", True,
                  "Also time the delay-0 step (same step, no buffer).")
flags.adopt_module_key_flags(step_time)
FLAGS = flags.FLAGS

MIB = 1 << 20


def _nbytes(variables):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                 for v in variables))


def buffer_memory(model):
  """Bytes of a built ConAdvModel's stale buffer and of its backbone."""
  from official_conadv.modeling import dual_batch_norm  # pylint: disable=g-import-not-at-top
  tau = model.delay
  backbone = model.backbone
  slot_bytes = _nbytes(backbone.trainable_variables)
  buffer_bytes = _nbytes(model.schedule.variables)
  if buffer_bytes != tau * slot_bytes:
    raise AssertionError(f"tau={tau}: buffer holds {buffer_bytes} bytes, "
                         f"expected {tau} x {slot_bytes}.")
  for slot in range(tau):
    if _nbytes(model.schedule.slot(slot)) != slot_bytes:
      raise AssertionError(f"tau={tau}: slot {slot} size mismatch.")
  model_bytes = _nbytes(backbone.weights)
  main_bytes = _nbytes(
      [v for v in backbone.weights
       if dual_batch_norm.route_of(v) != dual_batch_norm.ADV])
  return {
      "tau": tau,
      "slot_bytes": slot_bytes,
      "buffer_bytes": buffer_bytes,
      "buffer_mib": buffer_bytes / MIB,
      "num_buffer_variables": len(model.schedule.variables),
      "model_param_bytes": model_bytes,
      "main_route_param_bytes": main_bytes,
      "fraction_of_model_params": buffer_bytes / model_bytes,
      "fraction_of_main_route_params": buffer_bytes / main_bytes,
  }


def build_model(tau, depth, image_size, num_classes):
  """An uncompiled ConAdvModel(ResNet) with a tau-slot buffer, built."""
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import resnet  # pylint: disable=g-import-not-at-top
  model = conadv_model.ConAdvModel(
      resnet.ResNet(depth=depth, num_classes=num_classes),
      adversary=conadv_model.AdversaryConfig(delay=tau))
  model.build((None, image_size, image_size, 3))
  return model


def stale_fn(model, jit_compile):
  """A tf.function (x, y) -> scalar running only the buffer read + write.

  Takes the step's (x, y) so it fits `step_time.time_candidates`; uses
  neither. The step index is a constant t = tau + 1 > 0 (no fill).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  step = tf.constant(model.delay + 1, tf.int64)

  @tf.function(jit_compile=jit_compile)
  def fn(x, y):
    del x, y
    stale = model.schedule.attack_weights(model, step)
    # The writes run anyway (stateful); this makes the reads run too.
    with tf.control_dependencies(stale):
      return tf.identity(step)

  return fn


def run(depth=50, image_size=64, batch_size=16, num_classes=1000, warmup=2,
        repeats=10, taus=(1, 2, 4), compare_delay0=True, jit_compile=False,
        output=None, verbose=True):
  """Sizes the buffer for each tau and times it; returns the JSON dict."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  taus = sorted({int(t) for t in taus})
  if not taus or taus[0] < 1:
    raise ValueError(f"taus must be >= 1, got {taus}.")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  warmup = max(warmup, 1)  # The step's first call traces and fills the slots.
  keras.utils.set_random_seed(0)
  x = tf.random.uniform((batch_size, image_size, image_size, 3))
  y = tf.random.uniform((batch_size,), 0, num_classes, tf.int32)

  model1, step1 = step_time.build_step("delay1", depth, image_size,
                                       num_classes, jit_compile)
  models = {1: model1}
  for tau in taus:
    if tau not in models:
      models[tau] = build_model(tau, depth, image_size, num_classes)
  memory = [buffer_memory(models[tau]) for tau in taus]

  candidates = {"step_delay1": step1}
  if compare_delay0:
    candidates["step_delay0"] = step_time.build_step(
        "delay0", depth, image_size, num_classes, jit_compile)[1]
  for tau in sorted(set(taus) | {1}):
    candidates[f"stale_tau{tau}"] = stale_fn(models[tau], jit_compile)
  times = step_time.time_candidates(candidates, (x, y), warmup, repeats)

  full = statistics.median(times["step_delay1"])
  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    rows.append({"candidate": name, "median_s": med, "min_s": min(ts),
                 "max_s": max(ts), "share_of_delay1_step": med / full})
  summary = {"stale_tau1_share_of_step": statistics.median(
      times["stale_tau1"]) / full}
  if compare_delay0:
    diff = full - statistics.median(times["step_delay0"])
    summary["delay1_minus_delay0_s"] = diff
    summary["delay1_minus_delay0_share_of_step"] = diff / full

  device = (tf.config.list_logical_devices("GPU") or
            tf.config.list_logical_devices("CPU"))[0].name
  header = (f"ConAdvModel(ResNet-{depth}) stale-weight buffer, {image_size}px,"
            f" batch {batch_size}, {device}, jit={jit_compile}, "
            f"{os.cpu_count()} CPUs, {repeats} interleaved rounds after "
            f"{warmup} warm-up")
  result = {"header": header, "memory": memory, "timing": rows,
            "summary": summary, "raw_seconds": times,
            "config": {"depth": depth, "image_size": image_size,
                       "batch_size": batch_size, "num_classes": num_classes,
                       "warmup": warmup, "repeats": repeats, "taus": taus,
                       "jit_compile": jit_compile},
            "load_average": os.getloadavg()}
  if verbose:
    print_tables(result)
  step_time.write_json(result, output)
  return result


def print_tables(result):
  print(result["header"])
  print(f"{'tau':>3} {'slot bytes':>12} {'buffer bytes':>13} {'MiB':>8} "
        f"{'x model params':>14} {'x main route':>12}")
  for m in result["memory"]:
    print(f"{m['tau']:>3} {m['slot_bytes']:>12,} {m['buffer_bytes']:>13,} "
          f"{m['buffer_mib']:8.1f} {m['fraction_of_model_params']:14.3f} "
          f"{m['fraction_of_main_route_params']:12.3f}")
  print(f"(model params: {result['memory'][0]['model_param_bytes']:,} bytes,"
        f" main route {result['memory'][0]['main_route_param_bytes']:,})")
  print(f"{'candidate':<12} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'x delay1 step':>13}")
  for r in result["timing"]:
    print(f"{r['candidate']:<12} {r['median_s']:9.4f} {r['min_s']:8.4f} "
          f"{r['max_s']:8.4f} {r['share_of_delay1_step']:13.3f}")
  for k, v in result["summary"].items():
    print(f"{k}: {v:.4f}")


def main(argv):
  del argv
  if FLAGS.mixed_precision:
    raise app.UsageError("--mixed_precision is not supported here.")
  run(depth=FLAGS.depth, image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, num_classes=FLAGS.num_classes,
      warmup=FLAGS.warmup, repeats=FLAGS.repeats, taus=FLAGS.taus,
      compare_delay0=FLAGS.compare_delay0, jit_compile=FLAGS.jit_compile,
      output=FLAGS.output)


if __name__ == "__main__":
  app.run(main)
