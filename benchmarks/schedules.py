r"""Lookahead vs delayed schedule: memory, step time, overlap on this device.

  python -m benchmarks.schedules --output=experiments/results/schedules_cpu.json
  python -m benchmarks.schedules --image_size=224 --batch_size=128 \
      --jit_compile --output=/tmp/schedules_gpu.json        # on a GPU

Three parts, written to one JSON (--output):

1. Memory, read from the variables the model creates (nothing computed by
   hand; each figure is also checked against its formula). For each tau in
   --memory_taus, per-replica batch B in --memory_batches and label format
   (one-hot float32 [B, num_classes], what the ImageNet trainer feeds with
   label smoothing, and int32 ids [B]):

     queue    `ConAdvModel(ResNet(depth), AdversaryConfig(delay=tau,
              schedule="lookahead"))._create_queue(spec)` with the spec of
              a global batch of B images at --memory_image_size (one
              replica: global batch = per-replica batch); the bytes of its
              tau x (x, x_adv, y) variables;
     buffer   `ConAdvModel(..., AdversaryConfig(delay=tau))` after
              `build((None, S, S, 3))`: the bytes of its `_stale_buffer`
              (tau copies of the backbone's trainable weights, adversarial
              BN included; independent of B).

   Both are per replica (every replica keeps its own slots in either
   schedule). The break-even per-replica batch is buffer bytes / queue
   bytes per example (tau cancels): below it the queue is smaller. The
   queue variables (~1 GB for B=256, tau=2) are dropped after counting.

2. Step time, all candidates built in this one process and timed
   interleaved (`step_time.time_candidates`: round-robin, one call each per
   round, after --warmup untimed calls each, at least 1 so no timed call
   traces), on the same random batch (--image_size, --batch_size):

     baseline    ConAdvModel(ResNet(depth), adversary=None).train_step;
     sequential  ... AdversaryConfig(delay=0): attack with theta_t, then
                 train (two dependent gradient computations);
     delayed     ... AdversaryConfig(delay=1): attack batch t with
                 theta_{t-1} from the ring buffer, train on batch t;
     lookahead   ... AdversaryConfig(delay=1, schedule="lookahead"): attack
                 the incoming batch t+1 with theta_t, train on batch t
                 popped from the queue (created and filled from a dataset
                 of random batches of the same shape before timing);
     attack      `model.adversarial_examples(x, y, step, theta_t)` of the
                 lookahead model alone, in its own tf.function (PGD-1:
                 forward + input gradient);
     train_part  the lookahead step with the attack replaced by the
                 identity (`adversarial_examples` returns its input): queue
                 pop/push, both training branches, the update.

   The first three are `step_time.build_step`'s; all train steps use our
   LARS (lr 0.1, momentum 0.9, weight decay 5e-5) and mean sparse CE.

3. Overlap. In the lookahead step the attack and the training part are
   independent, so a runtime that runs independent ops at the same time
   could finish it in max(attack, train_part) instead of attack +
   train_part. Reported: attack + train_part, max of the two, lookahead,
   lookahead / (attack + train_part) and the realised share of the possible
   saving, (sum - lookahead) / (sum - max), from the medians, the minima
   and paired per round (each round times every candidate once). With
   --inter_op_check the same candidates (minus baseline, sequential) are
   timed again in a subprocess with ONE inter-op thread (TF then runs the
   step's ops one at a time; intra-op threads unchanged): if the default
   run overlapped the two, its lookahead / sum ratio is below the
   one-thread ratio.

The default run took 3.6 minutes on a 2-core CPU VM (load average ~3).

Shares `benchmarks.step_time`'s flags (depth, image_size, batch_size,
num_classes, warmup, repeats, jit_compile, output; `modes` and
`mixed_precision` are not used here).
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from benchmarks import step_time

STEP_CANDIDATES = ("baseline", "sequential", "delayed", "lookahead")
PART_CANDIDATES = ("attack", "train_part")
CANDIDATES = STEP_CANDIDATES + PART_CANDIDATES
# Timed again with one inter-op thread by --inter_op_check.
INTER_OP_CANDIDATES = ("delayed", "lookahead", "attack", "train_part")
LABEL_FORMATS = ("one_hot", "int32")
# FLOP model in units of one forward pass over the batch: forward +
# backward = 3 per training branch, attack (forward + input gradient) = 2.
_FLOPS = {"baseline": 3.0, "sequential": 8.0, "delayed": 8.0,
          "lookahead": 8.0, "attack": 2.0, "train_part": 6.0}
MODES = {"baseline": "baseline", "sequential": "delay0",
          "delayed": "delay1"}
MIB = 1 << 20

flags.DEFINE_list("memory_taus", ["1", "2"], "Delays tau for the memory part.")
flags.DEFINE_list("memory_batches", ["96", "256"],
                  "Per-replica batch sizes for the memory part.")
flags.DEFINE_integer("memory_image_size", 224,
                     "Image size of the memory part's queue and build.")
flags.DEFINE_bool("skip_memory", False, "Skip the memory part.")
flags.DEFINE_list("schedule_candidates", list(CANDIDATES),
                  f"Timed candidates, a subset of {', '.join(CANDIDATES)}.")
flags.DEFINE_bool("inter_op_check", True,
                  "Also time delayed, lookahead, attack and train_part in a "
                  "subprocess with one inter-op thread.")
flags.DEFINE_integer("inter_op_threads", None,
                     "Set TF's inter-op thread count first (None: TF's "
                     "default). The inter-op check's subprocess uses 1.")
flags.adopt_module_key_flags(step_time)
FLAGS = flags.FLAGS


def _nbytes(variables):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                 for v in variables))


def _size(variable):
  size = 1
  for d in variable.shape:
    size *= int(d)
  return size


def _conadv(depth, num_classes, tau, schedule, model_class=None):
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import resnet  # pylint: disable=g-import-not-at-top
  adversary = conadv_model.AdversaryConfig(delay=tau, schedule=schedule)
  cls = model_class or conadv_model.ConAdvModel
  return cls(resnet.ResNet(depth=depth, num_classes=num_classes),
             adversary=adversary)


def _batch_spec(batch, image_size, num_classes, labels):
  """(images, labels) `tf.TensorSpec`s of a global batch."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if labels not in LABEL_FORMATS:
    raise ValueError(f"labels must be one of {LABEL_FORMATS}, got {labels!r}.")
  x = tf.TensorSpec((batch, image_size, image_size, 3), tf.float32)
  if labels == "one_hot":
    return x, tf.TensorSpec((batch, num_classes), tf.float32)
  return x, tf.TensorSpec((batch,), tf.int32)


def lookahead_model(depth, num_classes, tau, image_size):
  """A built `ConAdvModel(ResNet(depth), lookahead, tau)` (no queue yet)."""
  model = _conadv(depth, num_classes, tau, "lookahead")
  model.build((None, image_size, image_size, 3))
  return model


def queue_memory(depth, num_classes, tau, batch, image_size, labels,
                 model=None):
  """Bytes of the lookahead queue for one replica's batch of `batch`.

  Creates the queue variables (`schedule.make_queue`) of `model` (a
  `lookahead_model` of this depth, tau and image size; None: a new one),
  counts them, checks the count against tau x (2 image tensors + 1 label
  tensor) of the spec, and drops them (the model keeps no queue). The
  queue's size depends on the spec only, so one model serves every batch
  and label format.

  Returns:
    A dict: tau, per_replica_batch, labels, queue_bytes,
    queue_bytes_per_example, num_queue_variables.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  own_model = model is None
  if own_model:
    model = lookahead_model(depth, num_classes, tau, image_size)
  if model.schedule.variables:
    raise ValueError("queue_memory needs a model without a queue.")
  spec = _batch_spec(batch, image_size, num_classes, labels)
  model.schedule.make_queue(spec)
  queue = model.schedule.variables
  model.schedule.queue = None  # Dropped below (the model holds no queue).
  nbytes = _nbytes(queue)
  per_part = [int(np.prod(s.shape)) * s.dtype.size for s in spec]
  expected = tau * (2 * per_part[0] + per_part[1])
  if nbytes != expected or len(queue) != 3 * tau:
    raise AssertionError(f"tau={tau}, batch={batch}: queue holds {nbytes} "
                         f"bytes in {len(queue)} variables, expected "
                         f"{expected} in {3 * tau}.")
  count = len(queue)
  del queue  # Frees the queue; a model of our own needs gc (cycles).
  if own_model:
    del model
    gc.collect()
  return {"tau": tau, "per_replica_batch": batch, "labels": labels,
          "queue_bytes": nbytes,
          "queue_bytes_per_example": nbytes / (tau * batch),
          "num_queue_variables": count}


def buffer_memory(depth, num_classes, tau, image_size):
  """Bytes of the delayed schedule's ring buffer (built at `image_size`).

  Returns:
    A dict: tau, buffer_bytes, num_buffer_variables,
    backbone_trainable_params (checked: buffer = tau x 4 x params).
  """
  model = _conadv(depth, num_classes, tau, "delayed")
  model.build((None, image_size, image_size, 3))
  buffer = model.schedule.variables
  nbytes = _nbytes(buffer)
  params = sum(_size(v) for v in model.backbone.trainable_variables)
  if nbytes != tau * 4 * params:
    raise AssertionError(f"tau={tau}: buffer holds {nbytes} bytes, expected "
                         f"{tau} x 4 x {params}.")
  result = {"tau": tau, "buffer_bytes": nbytes,
            "num_buffer_variables": len(buffer),
            "backbone_trainable_params": params}
  del buffer, model
  gc.collect()
  return result


def memory(depth=50, num_classes=1000, taus=(1, 2), batches=(96, 256),
           image_size=224, label_formats=LABEL_FORMATS):
  """The memory part (module docstring); returns its JSON dict."""
  taus = sorted({int(t) for t in taus})
  batches = sorted({int(b) for b in batches})
  if not taus or taus[0] < 1:
    raise ValueError(f"memory taus must be >= 1, got {taus}.")
  if not batches or batches[0] < 1:
    raise ValueError(f"memory batches must be >= 1, got {batches}.")
  buffers = {tau: buffer_memory(depth, num_classes, tau, image_size)
             for tau in taus}
  # One built lookahead model per tau serves all its queues.
  models = {tau: lookahead_model(depth, num_classes, tau, image_size)
            for tau in taus}
  rows = []
  for labels in label_formats:
    for tau in taus:
      for batch in batches:
        row = queue_memory(depth, num_classes, tau, batch, image_size, labels,
                           model=models[tau])
        row["buffer_bytes"] = buffers[tau]["buffer_bytes"]
        row["queue_mib"] = row["queue_bytes"] / MIB
        row["buffer_mib"] = row["buffer_bytes"] / MIB
        row["queue_over_buffer"] = row["queue_bytes"] / row["buffer_bytes"]
        rows.append(row)
  del models
  gc.collect()
  break_even = {}
  for labels in label_formats:
    per_example = {r["queue_bytes_per_example"] for r in rows
                   if r["labels"] == labels}
    per_buffer_slot = {b["buffer_bytes"] / b["tau"] for b in buffers.values()}
    if len(per_example) != 1 or len(per_buffer_slot) != 1:
      raise AssertionError(f"bytes not linear in tau and batch: "
                           f"{per_example}, {per_buffer_slot}.")
    (example,), (slot,) = per_example, per_buffer_slot
    equal = slot / example
    break_even[labels] = {
        "queue_bytes_per_example_per_tau": example,
        "buffer_bytes_per_tau": slot,
        "equal_at_per_replica_batch": equal,
        # Smallest integer batch whose queue is larger than the buffer.
        "queue_larger_from_batch": int(equal) + 1,
    }
  return {"rows": rows, "buffers": [buffers[t] for t in taus],
          "break_even": break_even,
          "config": {"depth": depth, "num_classes": num_classes,
                     "image_size": image_size, "taus": taus,
                     "per_replica_batches": batches,
                     "label_formats": list(label_formats), "replicas": 1}}


def _random_batches(n, batch_size, image_size, num_classes, seed):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.random.stateless_uniform((n * batch_size, image_size, image_size, 3),
                                  seed=(seed, 1))
  y = tf.random.stateless_uniform((n * batch_size,), (seed, 2), 0,
                                  num_classes, tf.int32)
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(
      batch_size, drop_remainder=True)


def build_lookahead(depth, image_size, batch_size, num_classes, jit_compile,
                    without_attack=False, tau=1):
  """A compiled lookahead train step with its queue filled.

  Args:
    depth: ResNet depth.
    image_size: square image size.
    batch_size: global batch size (one replica here).
    num_classes: classes.
    jit_compile: XLA-compile the step.
    without_attack: replace the attack by the identity (the `train_part`
      candidate).
    tau: the delay.

  Returns:
    (model, fn): fn(x, y) runs `model.train_step((x, y))` and returns the
    loss; the queue holds tau batches (a dataset of random batches of the
    same shape, `schedule.fill`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top

  class NoAttack(conadv_model.ConAdvModel):
    """The lookahead step with the attack replaced by the identity."""

    def adversarial_examples(self, images, labels, step, weights=None):
      del labels, step, weights
      return tf.identity(images)

  model = _conadv(depth, num_classes, tau, "lookahead",
                  NoAttack if without_attack else None)
  fn = step_time.compiled_train_step(model, image_size, jit_compile)
  dataset = _random_batches(tau, batch_size, image_size, num_classes, seed=7)
  model.schedule.fill(dataset)
  return model, fn


def attack_fn(model, jit_compile):
  """tf.function (x, y) -> x_adv: `model`'s attack alone with theta_t."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv.adversarial import schedules  # pylint: disable=g-import-not-at-top
  step = tf.constant(1, tf.int64)

  @tf.function(jit_compile=jit_compile)
  def fn(x, y):
    return model.adversarial_examples(
        x, y, step, weights=schedules.trainable_weights(model.backbone))

  return fn


def build_candidates(candidates, depth, image_size, batch_size, num_classes,
                     jit_compile):
  """{name: compiled fn(x, y)} for `candidates` (module docstring)."""
  unknown = set(candidates) - set(CANDIDATES)
  if unknown:
    raise ValueError(f"Unknown candidates {sorted(unknown)}; known: "
                     f"{CANDIDATES}.")
  steps = {}
  lookahead_model = None
  for name in candidates:
    if name in MODES:
      steps[name] = step_time.build_step(MODES[name], depth, image_size,
                                         num_classes, jit_compile)[1]
    elif name == "lookahead":
      lookahead_model, steps[name] = build_lookahead(
          depth, image_size, batch_size, num_classes, jit_compile)
    elif name == "train_part":
      steps[name] = build_lookahead(depth, image_size, batch_size,
                                    num_classes, jit_compile,
                                    without_attack=True)[1]
  if "attack" in candidates:
    if lookahead_model is None:
      lookahead_model = _conadv(depth, num_classes, 1, "lookahead")
      lookahead_model.build((None, image_size, image_size, 3))
    steps["attack"] = attack_fn(lookahead_model, jit_compile)
  return {name: steps[name] for name in candidates}


def _overlap(attack, train, lookahead):
  total, ideal = attack + train, max(attack, train)
  return {"attack_plus_train_s": total, "max_attack_train_s": ideal,
          "lookahead_s": lookahead, "lookahead_over_sum": lookahead / total,
          "realised_share_of_possible_saving": (total - lookahead) /
                                               (total - ideal)}


def overlap_summary(times):
  """Lookahead against attack + train_part (module docstring, part 3).

  Args:
    times: {candidate: [seconds per round]} from `time_candidates`.

  Returns:
    The overlap figures, or None without attack, train_part and lookahead.
  """
  if not {"attack", "train_part", "lookahead"} <= set(times):
    return None
  a, t, l = times["attack"], times["train_part"], times["lookahead"]
  summary = {
      "from_medians": _overlap(statistics.median(a), statistics.median(t),
                               statistics.median(l)),
      "from_minima": _overlap(min(a), min(t), min(l)),
      "paired_rounds_median_lookahead_over_sum": statistics.median(
          li / (ai + ti) for ai, ti, li in zip(a, t, l)),
  }
  if "delayed" in times:
    d = times["delayed"]
    summary["lookahead_over_delayed_medians"] = (statistics.median(l) /
                                                 statistics.median(d))
    summary["lookahead_over_delayed_minima"] = min(l) / min(d)
    summary["delayed_over_sum_medians"] = statistics.median(d) / (
        statistics.median(a) + statistics.median(t))
    summary["paired_rounds_median_delayed_over_sum"] = statistics.median(
        di / (ai + ti) for ai, ti, di in zip(a, t, d))
  return summary


def summarize(times, batch_size):
  """Table rows: median, min, max seconds, images/s, ratios to baseline
  (of the medians and of the minima) and the FLOP model's ratio."""
  base = statistics.median(times["baseline"]) if "baseline" in times else None
  base_min = min(times["baseline"]) if "baseline" in times else None
  rows = []
  for name, ts in times.items():
    row = step_time.timing_stats(name, ts, batch_size)
    row["ratio_to_baseline"] = row["median_s"] / base if base else None
    row["ratio_to_baseline_of_minima"] = (row["min_s"] / base_min
                                          if base_min else None)
    row["flop_model_ratio"] = _FLOPS[name] / _FLOPS["baseline"]
    rows.append(row)
  return rows


def thread_settings():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {"inter_op_parallelism_threads":
              tf.config.threading.get_inter_op_parallelism_threads(),
          "intra_op_parallelism_threads":
              tf.config.threading.get_intra_op_parallelism_threads(),
          "cpu_count": os.cpu_count()}


def inter_op_check(depth, image_size, batch_size, num_classes, warmup,
                   repeats, jit_compile, timeout=None):
  """Times INTER_OP_CANDIDATES in a subprocess with one inter-op thread.

  Returns:
    That run's JSON dict (timing, overlap, threads).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "inter_op_1.json")
    cmd = [sys.executable, "-m", "benchmarks.schedules",
           "--inter_op_threads=1", "--skip_memory", "--nointer_op_check",
           f"--schedule_candidates={','.join(INTER_OP_CANDIDATES)}",
           f"--depth={depth}", f"--image_size={image_size}",
           f"--batch_size={batch_size}", f"--num_classes={num_classes}",
           f"--warmup={warmup}", f"--repeats={repeats}",
           f"--jit_compile={jit_compile}", f"--output={out}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode:
      raise RuntimeError(f"inter-op check failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    with open(out) as f:
      result = json.load(f)
  return {k: result[k] for k in ("header", "timing", "overlap", "threads",
                                 "raw_seconds")}


def run(depth=50, image_size=64, batch_size=16, num_classes=1000, warmup=2,
        repeats=10, candidates=CANDIDATES, memory_taus=(1, 2),
        memory_batches=(96, 256), memory_image_size=224, skip_memory=False,
        inter_op=True, inter_op_threads=None, jit_compile=False, output=None,
        verbose=True):
  """Runs the three parts (module docstring); returns the JSON dict.

  Args:
    depth: ResNet depth of every model (memory and timing).
    image_size: image size of the timed steps.
    batch_size: batch of the timed steps.
    num_classes: classes (also the one-hot label width of the memory part).
    warmup: untimed calls per candidate (at least 1).
    repeats: timed rounds.
    candidates: timed candidates (subset of CANDIDATES).
    memory_taus: taus of the memory part.
    memory_batches: per-replica batches of the memory part.
    memory_image_size: image size of the memory part.
    skip_memory: skip the memory part ("memory" is None).
    inter_op: run the one-inter-op-thread check in a subprocess.
    inter_op_threads: set TF's inter-op threads first (needs TF not yet
      initialised in this process); None keeps TF's default.
    jit_compile: XLA-compile the timed functions.
    output: JSON path (None: not written).
    verbose: print the tables.

  Returns:
    {"header", "memory", "timing", "overlap", "inter_op_1", "threads",
    "raw_seconds", "config", "load_average"}.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if inter_op_threads is not None:
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  candidates = list(candidates)
  warmup = max(warmup, 1)
  load_before = os.getloadavg()
  mem = None if skip_memory else memory(
      depth, num_classes, memory_taus, memory_batches, memory_image_size)

  keras.utils.set_random_seed(0)
  x = tf.random.uniform((batch_size, image_size, image_size, 3))
  y = tf.random.uniform((batch_size,), 0, num_classes, tf.int32)
  steps = build_candidates(candidates, depth, image_size, batch_size,
                           num_classes, jit_compile)
  times = step_time.time_candidates(steps, (x, y), warmup, repeats)
  rows = summarize(times, batch_size)
  overlap = overlap_summary(times)
  inter_op_1 = None
  if inter_op and overlap is not None:
    inter_op_1 = inter_op_check(depth, image_size, batch_size, num_classes,
                                warmup, repeats, jit_compile)

  device = (tf.config.list_logical_devices("GPU") or
            tf.config.list_logical_devices("CPU"))[0].name
  threads = thread_settings()
  header = (f"ConAdvModel(ResNet-{depth}) schedules, {image_size}px, batch "
            f"{batch_size}, {device}, jit={jit_compile}, {os.cpu_count()} "
            f"CPUs, inter-op threads "
            f"{threads['inter_op_parallelism_threads'] or 'default'}, "
            f"{repeats} interleaved rounds after {warmup} warm-up")
  result = {"header": header, "memory": mem, "timing": rows,
            "overlap": overlap, "inter_op_1": inter_op_1, "threads": threads,
            "raw_seconds": times,
            "config": {"depth": depth, "image_size": image_size,
                       "batch_size": batch_size, "num_classes": num_classes,
                       "warmup": warmup, "repeats": repeats,
                       "candidates": candidates, "jit_compile": jit_compile},
            "load_average": {"before": load_before,
                             "after": os.getloadavg()}}
  if verbose:
    print_tables(result)
  step_time.write_json(result, output)
  return result


def _print_memory(mem):
  cfg = mem["config"]
  print(f"Memory per replica, ResNet-{cfg['depth']} "
        f"({mem['buffers'][0]['backbone_trainable_params']:,} trainable "
        f"params incl. adversarial BN), {cfg['image_size']}px")
  print(f"{'labels':<8} {'tau':>3} {'batch':>5} {'queue bytes':>14} "
        f"{'MiB':>8} {'buffer bytes':>13} {'MiB':>7} {'queue/buffer':>12}")
  for r in mem["rows"]:
    print(f"{r['labels']:<8} {r['tau']:>3} {r['per_replica_batch']:>5} "
          f"{r['queue_bytes']:>14,} {r['queue_mib']:8.1f} "
          f"{r['buffer_bytes']:>13,} {r['buffer_mib']:7.1f} "
          f"{r['queue_over_buffer']:12.3f}")
  for labels, b in mem["break_even"].items():
    print(f"{labels}: queue = buffer at per-replica batch "
          f"{b['equal_at_per_replica_batch']:.2f} (queue "
          f"{b['queue_bytes_per_example_per_tau']:,.0f} B/example/tau, "
          f"buffer {b['buffer_bytes_per_tau']:,.0f} B/tau); queue larger "
          f"from batch {b['queue_larger_from_batch']}")


def _print_timing(rows):
  print(f"{'candidate':<11} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'img/s':>7} {'x base':>7} {'(of min)':>8} {'FLOP model':>10}")
  for r in rows:
    ratio = ("-" if r["ratio_to_baseline"] is None else
             f"{r['ratio_to_baseline']:.2f}")
    ratio_min = ("-" if r["ratio_to_baseline_of_minima"] is None else
                 f"{r['ratio_to_baseline_of_minima']:.2f}")
    print(f"{r['candidate']:<11} {r['median_s']:9.4f} {r['min_s']:8.4f} "
          f"{r['max_s']:8.4f} {r['images_per_s']:7.1f} {ratio:>7} "
          f"{ratio_min:>8} {r['flop_model_ratio']:10.2f}")


def _print_overlap(overlap, label):
  print(f"Overlap ({label}): {'':<9} {'attack+train':>12} {'max':>8} "
        f"{'lookahead':>9} {'look/sum':>8} {'realised':>8}")
  for key in ("from_medians", "from_minima"):
    o = overlap[key]
    print(f"  {key:<24} {o['attack_plus_train_s']:12.4f} "
          f"{o['max_attack_train_s']:8.4f} {o['lookahead_s']:9.4f} "
          f"{o['lookahead_over_sum']:8.3f} "
          f"{o['realised_share_of_possible_saving']:8.3f}")
  for key, value in overlap.items():
    if not key.startswith("from_"):
      print(f"  {key}: {value:.3f}")


def print_tables(result):
  """Prints the memory, timing and overlap tables of a `run` result."""
  print(result["header"])
  if result["memory"] is not None:
    _print_memory(result["memory"])
  _print_timing(result["timing"])
  if result["overlap"] is not None:
    threads = result["threads"]["inter_op_parallelism_threads"] or "default"
    _print_overlap(result["overlap"], f"inter-op threads {threads}")
  if result["inter_op_1"] is not None:
    print(result["inter_op_1"]["header"])
    _print_timing(result["inter_op_1"]["timing"])
    _print_overlap(result["inter_op_1"]["overlap"], "inter-op threads 1")
  load = result["load_average"]
  print(f"load average before {load['before']}, after {load['after']}")


def main(argv):
  del argv
  if FLAGS.mixed_precision:
    raise app.UsageError("--mixed_precision is not supported here.")
  run(depth=FLAGS.depth, image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, num_classes=FLAGS.num_classes,
      warmup=FLAGS.warmup, repeats=FLAGS.repeats,
      candidates=FLAGS.schedule_candidates, memory_taus=FLAGS.memory_taus,
      memory_batches=FLAGS.memory_batches,
      memory_image_size=FLAGS.memory_image_size,
      skip_memory=FLAGS.skip_memory, inter_op=FLAGS.inter_op_check,
      inter_op_threads=FLAGS.inter_op_threads,
      jit_compile=FLAGS.jit_compile, output=FLAGS.output)


if __name__ == "__main__":
  app.run(main)
