r"""Gradient all-reduce vs the lookahead attack under 2-worker MWMS (loopback).

  python -m benchmarks.mwms_overlap \
      --output=experiments/results/mwms_overlap_cpu.json
  python -m benchmarks.mwms_overlap --depth=10 --image_size=32 \
      --per_worker_batch=2 --warmup=1 --repeats=2      # a quick look

Question: how much of a distributed training step is the gradient
all-reduce, and does the lookahead schedule's attack hide it? In the
lookahead step (paper Algorithm 1) the attack of batch t + tau and the
update on batch t both depend only on theta_t, so a runtime could run the
attack while the gradient all-reduce is in flight.

Setup. `multi_worker.run_workers` starts this module twice (`--worker`), two
processes on this machine, each with its own TF_CONFIG on 127.0.0.1; each
makes `distribute_utils.get_strategy("multi_worker_mirrored")` (one CPU
replica per process, 2 replicas in sync; TF's collectives over gRPC on
loopback). The parent process (no TensorFlow) collects what both workers
report (`multi_worker.emit_result`), computes the figures and writes the
JSON. Both processes share this machine's cores, and the "network" is
loopback: the all-reduce is CPU work here (gRPC copies and the summing),
not idle waiting as over a real network, so it competes with the attack
for the same cores.

In each worker, in one process, every candidate is built under
`strategy.scope()` and the candidates are timed interleaved
(`step_time.time_candidates`: round-robin, one call each per round, after
--warmup untimed calls each, at least 1 so no timed call traces) on the
same fixed random batch of --per_worker_batch images at --image_size px
(seeded by the task index: the workers' batches differ; global batch = 2 x
per-worker batch). Both workers run the same candidates in the same order,
so their collectives pair up. Before each call of a candidate, each round,
a barrier (an all-reduce of one float) lines the two workers up, so a
candidate's time does not include waiting for the other worker to finish
the previous one (the attack has no collective, and the processes compete
for the cores, so they drift apart); the barriers are timed by the same
loop (entries "sync:<name>" before each candidate) and reported apart as
"barrier_seconds": how long this worker waited for its peer before that
candidate.

  allreduce   one cross-worker all-reduce (SUM) of tensors with the shapes
              and dtypes of every trainable variable of the lookahead
              ConAdvModel (backbone, both BN routes: what an adversarial
              step's gradient holds), in a tf.function: `strategy.run` of
              `tf.distribute.get_replica_context().all_reduce(SUM, ...)`,
              the call Keras' TF optimizer makes for the gradients
              (`_all_reduce_sum_gradients`). The tensors are reads of the
              variables; the function returns a scalar made of the first
              element of each result (no 100 MB copy out). Its byte count
              is reported ("gradient"); it does not depend on the image
              size.
  baseline    ConAdvModel(ResNet(depth), adversary=None): the tf.function
              train step of `step_time.build_step` (`model.train_step`),
              run per replica by `strategy.run` inside an outer tf.function.
              The optimizer call inside `train_step` all-reduces the
              gradient (SUM of the 1 / replicas scaled loss's gradients)
              and applies it on both workers;
  sequential  ... AdversaryConfig(delay=0): attack with theta_t, then train
              (two dependent gradient computations);
  delayed     ... AdversaryConfig(delay=1): attack batch t with theta_{t-1}
              from the ring buffer, train on batch t;
  lookahead   ... AdversaryConfig(delay=1, schedule="lookahead"), built by
              `schedules.build_lookahead`: attack the incoming batch t+1
              with theta_t, train on batch t popped from the per-replica
              queue (filled by `schedule.fill` from a distributed
              dataset of random global batches: each worker's replica holds
              its own half);
  attack      the lookahead model's `adversarial_examples(x, y, step,
              theta_t)` alone (`schedules.attack_fn`), per replica via
              `strategy.run` (PGD-1: forward + input gradient; no
              collective);
  train_part  the lookahead step with the attack replaced by the identity
              (`schedules.build_lookahead(without_attack=True)`),
              distributed like the steps: queue pop/push, both training
              branches, the gradient all-reduce, the update.

All train steps use the benchmarks' LARS (lr 0.1, momentum 0.9, weight
decay 5e-5) and mean sparse CE (`step_time.compiled_train_step`). The steps
are `strategy.run(model.train_step)` in a tf.function rather than Keras'
`model.train_function(iterator)`: the same replica step and the same
gradient all-reduce, without the distributed-iterator fetch and without
Keras' cross-worker reduction of the logged metrics (a few scalar
all-reduces per step), so that every candidate, the attack and the
all-reduce included, is called the same way on the same tensors.

Figures, per worker (the top-level "timing", "ratios" and the conclusion are
worker 0's; worker 1's are under "workers"), from the medians and paired per
round (median over rounds of the per-round ratio; each round times every
candidate once):

  allreduce_over_baseline   allreduce / baseline: the all-reduce's share of a
                            baseline step;
  allreduce_over_lookahead  allreduce / lookahead;
  lookahead_over_sum        lookahead / (attack + train_part): 1 = no
                            overlap at all;
  saving_s                  attack + train_part - lookahead;
  hideable_s                min(allreduce, attack): at most this much of
                            the all-reduce can hide behind the attack;
  hidden_share_of_allreduce saving_s / hideable_s: the share of that
                            maximum the lookahead step saves (<= 0: none;
                            above 1 the step saves more than the all-reduce,
                            i.e. compute overlapped too);
  lookahead_over_sequential, lookahead_over_delayed.

"overlap" adds `schedules.overlap_summary` (lookahead against the max of
attack and train_part, as in the single-process benchmark). The
"conclusion" string is computed from worker 0's figures.

Checks, per worker: the weights of every train-step model before and after
the timing (sum of |w| over the trainable weights, float64; after the
timing equal on both workers only if the gradients were all-reduced, since
the workers' batches differ), and the allreduce candidate's result (2 x the
variables' first elements, the mirrored weights being equal on both
workers).

Shares `benchmarks.step_time`'s flags depth, image_size, num_classes,
warmup, repeats and output; its `batch_size` and `modes` are not used (the
batch is --per_worker_batch), `jit_compile` and `mixed_precision` are
refused.
"""

import datetime
import os
import statistics
import sys

from absl import app
from absl import flags

from benchmarks import schedules
from benchmarks import step_time

NUM_WORKERS = 2
TRAIN_CANDIDATES = schedules.STEP_CANDIDATES  # baseline ... lookahead.
CANDIDATES = ("allreduce",) + TRAIN_CANDIDATES + schedules.PART_CANDIDATES
# hidden_share_of_allreduce below this: "does not hide"; from HIDES: "hides".
DOES_NOT_HIDE = 0.1
HIDES = 0.9
MIB = 1 << 20
SYNC = "sync:"  # Prefix of the barrier entries timed before each candidate.

flags.DEFINE_integer("per_worker_batch", 4,
                     "Images per worker (= per replica) and step.")
flags.DEFINE_integer("worker_timeout", 3600,
                     "Seconds for both worker processes together.")
flags.DEFINE_bool("worker", False,
                  "Run as one MWMS worker (run_workers passes it; needs "
                  "TF_CONFIG) and print the result with emit_result.")
flags.adopt_module_key_flags(step_time)
FLAGS = flags.FLAGS


# ------------------------------------------------------------------ worker
def _local(strategy, value):
  """This worker's (only) replica's value of a `strategy.run` result."""
  return strategy.experimental_local_results(value)[0]


def _distributed(strategy, fn, *args):
  """tf.function () -> scalar: `strategy.run(fn, args)`, this replica's
  value; `fn` returns a scalar tensor."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function
  def step():
    return _local(strategy, strategy.run(fn, args=args))

  return step


def _symbolic_build(model, x, y):
  """Builds the compiled loss and metrics (what `fit` does before its first
  step; under MWMS they cannot be made inside the replica step)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model.symbolic_build(
      (tf.TensorSpec.from_tensor(x), tf.TensorSpec.from_tensor(y)))


def allreduce_fn(strategy, variables):
  """tf.function () -> scalar: one all-reduce (SUM) across the workers of
  tensors shaped like `variables` (module docstring)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def replica_fn():
    # Identity: made under the replica's device scope, as the gradients are
    # (a variable read is colocated with the variable and has no device
    # string, which the all-reduce needs as its destination). No copy.
    grads = [tf.identity(v) for v in variables]
    reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, grads)
    return tf.add_n([tf.reshape(r, [-1])[0] for r in reduced])

  return _distributed(strategy, replica_fn)


def barrier_fn(strategy):
  """tf.function () -> scalar: an all-reduce of one float across the
  workers; returns on each worker once both have called it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def replica_fn():
    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.ones([]))

  return _distributed(strategy, replica_fn)


def with_barriers(steps, barrier):
  """`steps` with a `sync:<name>` entry (the barrier) before each one, for
  `step_time.time_candidates`: every candidate then starts at the same
  time on both workers."""
  out = {}
  for name, fn in steps.items():
    out[SYNC + name] = barrier
    out[name] = fn
  return out


def build_candidates(strategy, depth, image_size, per_worker_batch,
                     num_classes, x, y):
  """{name: fn() -> scalar} for CANDIDATES, their models, and the variables
  the allreduce candidate reduces (module docstring)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  global_batch = per_worker_batch * strategy.num_replicas_in_sync
  steps, models = {}, {}
  for name in TRAIN_CANDIDATES + ("train_part",):
    with strategy.scope():
      if name in ("lookahead", "train_part"):
        model, fn = schedules.build_lookahead(
            depth, image_size, global_batch, num_classes, False,
            without_attack=name == "train_part")
      else:
        model, fn = step_time.build_step(
            schedules.MODES[name], depth, image_size, num_classes,
            False)
        _symbolic_build(model, x, y)
    models[name] = model
    steps[name] = _distributed(strategy, fn, x, y)
  attack = schedules.attack_fn(models["lookahead"], False)
  steps["attack"] = _distributed(
      strategy, lambda a, b: tf.reshape(attack(a, b), [-1])[0], x, y)
  variables = models["lookahead"].trainable_variables
  steps["allreduce"] = allreduce_fn(strategy, variables)
  return {name: steps[name] for name in CANDIDATES}, models, variables


def _weights_checksum(model):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return float(sum(np.abs(np.asarray(v, np.float64)).sum()
                   for v in model.trainable_variables))


def worker(depth, image_size, per_worker_batch, num_classes, warmup,
           repeats):
  """One MWMS worker's part (TF_CONFIG must be set): builds and times the
  candidates; returns its JSON-serialisable report."""
  load_before = os.getloadavg()
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top

  strategy = distribute_utils.get_strategy("multi_worker_mirrored")
  task = distribute_utils.task_index()
  replicas = int(strategy.num_replicas_in_sync)
  keras.utils.set_random_seed(0)
  x = tf.random.stateless_uniform(
      (per_worker_batch, image_size, image_size, 3), seed=(task, 1))
  y = tf.random.stateless_uniform((per_worker_batch,), (task, 2), 0,
                                  num_classes, tf.int32)
  clock = datetime.datetime.now
  start = clock()
  steps, models, variables = build_candidates(
      strategy, depth, image_size, per_worker_batch, num_classes, x, y)
  built = clock()
  before = {name: _weights_checksum(models[name])
            for name in TRAIN_CANDIDATES + ("train_part",)}
  timed_fns = with_barriers(steps, barrier_fn(strategy))
  all_times = step_time.time_candidates(timed_fns, (), max(warmup, 1),
                                        repeats)
  timed = clock()
  times = {name: all_times[name] for name in CANDIDATES}
  waits = {name: all_times[SYNC + name] for name in CANDIDATES}

  # Checks (module docstring). Equal mirrored weights on both workers, so
  # the sum over the workers is 2 x this worker's first elements.
  firsts = float(np.sum([np.asarray(v).reshape(-1)[0] for v in variables],
                        dtype=np.float64))
  got = float(steps["allreduce"]())
  sizes = [int(np.prod(v.shape)) for v in variables]
  itemsizes = [np.dtype(v.dtype).itemsize for v in variables]
  return {
      "task_index": task, "replicas": replicas,
      "tf_version": tf.__version__, "keras_version": keras.__version__,
      "strategy": distribute_utils.describe_devices(strategy),
      "threads": schedules.thread_settings(),
      "gradient": {"num_tensors": len(variables), "num_params": sum(sizes),
                   "bytes": sum(s * i for s, i in zip(sizes, itemsizes)),
                   "dtypes": sorted({str(np.dtype(v.dtype))
                                     for v in variables})},
      "raw_seconds": times,
      "barrier_seconds": waits,
      "weights_checksum": {name: _weights_checksum(models[name])
                           for name in TRAIN_CANDIDATES + ("train_part",)},
      "weights_checksum_before_timing": before,
      "allreduce_check": {"got": got, "want": replicas * firsts},
      "build_s": (built - start).total_seconds(),
      "timing_s": (timed - built).total_seconds(),
      "load_average": {"before": load_before, "after": os.getloadavg()},
  }


# ------------------------------------------------------------------ figures
def _figures(allreduce, baseline, sequential, delayed, lookahead, attack,
             train_part):
  """The ratios (module docstring) of one set of times (medians, or one
  round's)."""
  total = attack + train_part
  saving = total - lookahead
  hideable = min(allreduce, attack)
  return {"allreduce_over_baseline": allreduce / baseline,
          "allreduce_over_lookahead": allreduce / lookahead,
          "lookahead_over_sum": lookahead / total,
          "saving_s": saving, "hideable_s": hideable,
          "hidden_share_of_allreduce": saving / hideable,
          "lookahead_over_sequential": lookahead / sequential,
          "lookahead_over_delayed": lookahead / delayed}


def ratios(times):
  """{"from_medians", "paired_rounds_median", "rounds",
  "rounds_lookahead_below_sum"} of {candidate: [seconds per round]}."""
  names = ("allreduce", "baseline", "sequential", "delayed", "lookahead",
           "attack", "train_part")
  medians = _figures(*(statistics.median(times[n]) for n in names))
  rounds = [_figures(*values) for values in zip(*(times[n] for n in names))]
  paired = {k: statistics.median(r[k] for r in rounds) for k in medians}
  below = sum(l < a + t for a, t, l in zip(
      times["attack"], times["train_part"], times["lookahead"]))
  return {"from_medians": medians, "paired_rounds_median": paired,
          "rounds": len(rounds), "rounds_lookahead_below_sum": below}


def summarize(times, batch):
  """Timing rows: median, min, max seconds (and images/s for the steps)."""
  rows = []
  for name in CANDIDATES:
    row = step_time.timing_stats(name, times[name], batch)
    if name == "allreduce":
      row["images_per_s"] = None
    rows.append(row)
  return rows


def conclusion(ratio, gradient_bytes, other=None):
  """The one-paragraph verdict computed from `ratios(...)` (worker 0's),
  with `other` (worker 1's ratios) for comparison."""
  m, p = ratio["from_medians"], ratio["paired_rounds_median"]
  hidden = m["hidden_share_of_allreduce"]
  if hidden < DOES_NOT_HIDE:
    verdict = "the attack does not hide the all-reduce"
  elif hidden < HIDES:
    verdict = (f"the attack hides part of the all-reduce ({hidden:.0%} of "
               "min(allreduce, attack))")
  else:
    verdict = "the attack hides the all-reduce"
  text = (f"The gradient all-reduce ({gradient_bytes / MIB:.1f} MiB, 2 "
          f"processes on loopback) takes {m['allreduce_over_baseline']:.2f} "
          f"x a baseline step and {m['allreduce_over_lookahead']:.2f} x a "
          f"lookahead step (medians, worker 0); {verdict}: lookahead = "
          f"{m['lookahead_over_sum']:.2f} x (attack + train_part) (paired "
          f"per round {p['lookahead_over_sum']:.2f}; lookahead below attack "
          f"+ train_part in {ratio['rounds_lookahead_below_sum']} of "
          f"{ratio['rounds']} rounds), saving {m['saving_s']:.3f} s of at "
          f"most min(allreduce, attack) = {m['hideable_s']:.3f} s (hidden "
          f"share {hidden:.2f}, paired {p['hidden_share_of_allreduce']:.2f}"
          f"); lookahead = {m['lookahead_over_sequential']:.2f} x "
          f"sequential and {m['lookahead_over_delayed']:.2f} x delayed.")
  if other is not None:
    o = other["from_medians"]
    text += (f" Worker 1: hidden share {o['hidden_share_of_allreduce']:.2f}"
             f", lookahead = {o['lookahead_over_sum']:.2f} x (attack + "
             f"train_part).")
  return text


def _worker_args(depth, image_size, per_worker_batch, num_classes, warmup,
                 repeats):
  return ["--worker", f"--depth={depth}", f"--image_size={image_size}",
          f"--per_worker_batch={per_worker_batch}",
          f"--num_classes={num_classes}", f"--warmup={warmup}",
          f"--repeats={repeats}"]


def run(depth=50, image_size=64, per_worker_batch=4, num_classes=1000,
        warmup=2, repeats=10, timeout=3600, output=None, verbose=True):
  """Runs the 2 workers and returns (and writes to `output`) the JSON dict.

  Args:
    depth: ResNet depth of every model.
    image_size: square image size.
    per_worker_batch: images per worker and step.
    num_classes: classes.
    warmup: untimed calls per candidate (at least 1).
    repeats: timed rounds.
    timeout: seconds for both workers together (then both are killed).
    output: JSON path (None: not written).
    verbose: print the tables and the conclusion.

  Returns:
    {"header", "conclusion", "gradient", "timing", "ratios", "overlap",
    "workers", "config", "machine", "load_average"}.
  """
  from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  warmup = max(warmup, 1)
  load_before = os.getloadavg()
  date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  results = multi_worker.run_workers(
      "benchmarks.mwms_overlap",
      _worker_args(depth, image_size, per_worker_batch, num_classes, warmup,
                   repeats),
      num_workers=NUM_WORKERS, timeout=timeout)
  reports = [r.result for r in results]
  if any(r is None for r in reports):
    raise RuntimeError("a worker reported nothing:\n" + "\n".join(
        r.stderr[-2000:] for r in results))
  for report in reports:
    report["timing"] = summarize(report["raw_seconds"], per_worker_batch)
    report["ratios"] = ratios(report["raw_seconds"])
    report["overlap"] = schedules.overlap_summary(report["raw_seconds"])
    report["barrier_median_s"] = {
        name: statistics.median(ts)
        for name, ts in report["barrier_seconds"].items()}
  first = reports[0]
  gradient = dict(first["gradient"],
                  mib=first["gradient"]["bytes"] / MIB)
  cores = os.cpu_count()
  header = (f"ConAdvModel(ResNet-{depth}) under MultiWorkerMirroredStrategy,"
            f" {NUM_WORKERS} processes on loopback (127.0.0.1) on one "
            f"machine with {cores} CPU cores, no GPU; {image_size}px, batch "
            f"{per_worker_batch} per worker ({per_worker_batch * NUM_WORKERS}"
            f" global); {repeats} interleaved rounds after {warmup} warm-up;"
            f" gradient {gradient['mib']:.1f} MiB in "
            f"{gradient['num_tensors']} tensors; TF {first['tf_version']}, "
            f"Keras {first['keras_version']}; {date}")
  result = {
      "header": header,
      "conclusion": conclusion(first["ratios"], gradient["bytes"],
                               reports[1]["ratios"]),
      "gradient": gradient,
      "timing": first["timing"],
      "ratios": first["ratios"],
      "overlap": first["overlap"],
      "workers": reports,
      "config": {"depth": depth, "image_size": image_size,
                 "per_worker_batch": per_worker_batch,
                 "num_workers": NUM_WORKERS, "num_classes": num_classes,
                 "warmup": warmup, "repeats": repeats,
                 "candidates": list(CANDIDATES)},
      "machine": {"cpu_count": cores, "date": date,
                  "tf_version": first["tf_version"],
                  "keras_version": first["keras_version"],
                  "python": sys.version.split()[0]},
      "load_average": {"before": load_before, "after": os.getloadavg()},
  }
  if verbose:
    print_tables(result)
  step_time.write_json(result, output)
  return result


def print_tables(result):
  """Prints each worker's timing table and ratios, and the conclusion."""
  print(result["header"])
  for report in result["workers"]:
    print(f"worker {report['task_index']} ({report['strategy']}); build "
          f"{report['build_s']:.0f} s, timing {report['timing_s']:.0f} s")
    print(f"{'candidate':<11} {'median s':>9} {'min s':>8} {'max s':>8} "
          f"{'barrier before, median s':>25}")
    for r in report["timing"]:
      wait = report["barrier_median_s"][r["candidate"]]
      print(f"{r['candidate']:<11} {r['median_s']:9.4f} {r['min_s']:8.4f} "
            f"{r['max_s']:8.4f} {wait:25.4f}")
    m = report["ratios"]["from_medians"]
    p = report["ratios"]["paired_rounds_median"]
    print(f"{'ratio':<26} {'medians':>8} {'paired':>8}")
    for key in m:
      print(f"{key:<26} {m[key]:8.3f} {p[key]:8.3f}")
  print(result["conclusion"])
  load = result["load_average"]
  print(f"load average before {load['before']}, after {load['after']}")


def main(argv):
  del argv
  if FLAGS.jit_compile or FLAGS.mixed_precision:
    raise app.UsageError("--jit_compile and --mixed_precision are not "
                         "supported here.")
  kwargs = dict(depth=FLAGS.depth, image_size=FLAGS.image_size,
                per_worker_batch=FLAGS.per_worker_batch,
                num_classes=FLAGS.num_classes, warmup=FLAGS.warmup,
                repeats=FLAGS.repeats)
  if FLAGS.worker:
    from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
    multi_worker.emit_result(worker(**kwargs))
    multi_worker.exit_together()  # No 2 s teardown; report out.
  run(timeout=FLAGS.worker_timeout, output=FLAGS.output, **kwargs)


if __name__ == "__main__":
  app.run(main)
