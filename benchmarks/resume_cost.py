r"""What resuming the training input pipeline costs, and what determinism costs.

  python -m benchmarks.resume_cost \
      --output=experiments/results/resume_cost.json

Writes synthetic ImageNet-format TFRecord shards (--num_files x --per_file
JPEGs of --source_height x --source_width, as `benchmarks/input_pipeline.py`
does) to a temporary directory, then measures, in one process:

(a) Time to first batch: from building the training pipeline to holding its
    first batch (pipeline construction, function tracing, shuffle-buffer
    fill, the skip, decoding one batch), when resuming at step 1 and at step
    --epochs_in * steps_per_epoch (that many data epochs in), for
      new: `input_pipeline.build_dataset(..., start_step=s)` (epochs as a
        flat_map over epoch numbers; skips only inside the epoch), and
      old: the pipeline before it, emulated: the records (file order
        reshuffled per pass), shuffle(--shuffle_buffer), repeat, enumerate,
        skip(s * batch) before decoding, the same guarded decode + crop,
        finish, batch, prefetch.
    --repeats rounds, the four cases interleaved in each round; the median
    is reported (and every sample kept in the JSON).
(b) Steady-state images/s of the new pipeline with deterministic=True (the
    default: ordered parallel map and interleave, exact resume) against
    deterministic=False (AUTOTUNE stages may reorder), interleaved
    (--repeats rounds of True, False), `input_pipeline.measure_throughput`
    (--batches timed batches after --warmup_batches).

Records skipped before decoding are computed, not timed: new = the
positions before step s inside its epoch, old = s * batch.
"""

import os
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import step_time

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a script (names shared with other
  benchmarks would clash when tests import several). --image_size,
  --batch_size, --repeats and --output are `benchmarks.step_time`'s flags
  (imported above), with this script's defaults."""
  flags.DEFINE_integer("num_files", 8, "Synthetic TFRecord shards.")
  flags.DEFINE_integer("per_file", 250, "Records per shard.")
  flags.DEFINE_integer("num_distinct", 64, "Distinct JPEGs encoded.")
  flags.DEFINE_integer("source_height", 120, "Synthetic JPEG height.")
  flags.DEFINE_integer("source_width", 160, "Synthetic JPEG width.")
  flags.DEFINE_integer("shuffle_buffer", 1000, "Record shuffle buffer.")
  flags.DEFINE_integer("epochs_in", 20, "Resume this many epochs in.")
  flags.DEFINE_integer("batches", 30, "Timed batches per throughput run.")
  flags.DEFINE_integer("warmup_batches", 5, "Untimed batches per run.")
  flags.DEFINE_string("data_dir", None, "Write/reuse the shards here "
                      "instead of a temporary directory.")
  FLAGS.set_default("image_size", 96)
  FLAGS.set_default("batch_size", 64)
  FLAGS.set_default("repeats", 3)


def old_pipeline(data_dir, start_step, *, image_size, batch_size,
                 shuffle_buffer, num_examples, seed=0):
  """The pre-epoch training pipeline, emulated: one repeated shuffled
  stream, resumed with skip(start_step * batch) before decoding; the same
  sources, corrupt-record guard and preprocessing as the new one."""
  import types  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv.data import corrupt_records  # pylint: disable=g-import-not-at-top
  from official_conadv.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from official_conadv.data import preprocessing  # pylint: disable=g-import-not-at-top
  src = input_pipeline.make_source(
      "imagenet_tfrecord", "train", data_dir=data_dir, image_size=image_size,
      is_training=True, num_examples=num_examples)
  key = tf.constant([seed, 0], tf.int64)
  ds = src.records(tf.distribute.InputContext(), seed + 1)
  ds = ds.shuffle(shuffle_buffer, seed=seed + 2, reshuffle_each_iteration=True)
  first = start_step * batch_size
  ds = ds.repeat().enumerate().skip(first)

  def seeds(k):
    return preprocessing.split_seed(
        tf.random.experimental.stateless_fold_in(key, k), 2)

  def split_record(record):
    record = dict(record)
    return record.pop("file"), record.pop("index"), record

  guard = types.SimpleNamespace(skip_corrupt=False)
  ds = corrupt_records.guarded_decode(
      ds, guard, src, seeds, split_record, first, False)
  ds = ds.map(lambda k, image, label, file, index: (
      src.finish(image, seeds(k)[1]), label),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def new_pipeline(data_dir, start_step, *, image_size, batch_size,
                 shuffle_buffer, num_examples, deterministic=True, seed=0):
  from official_conadv.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.build_dataset(
      "imagenet_tfrecord", "train", data_dir=data_dir, image_size=image_size,
      global_batch_size=batch_size, is_training=True, seed=seed,
      shuffle_buffer=shuffle_buffer, num_examples=num_examples,
      start_step=start_step, deterministic=deterministic)


def time_to_first_batch(build):
  """Seconds from calling `build()` to the first batch in hand."""
  start = time.perf_counter()
  next(iter(build()))
  return time.perf_counter() - start


def run(num_files=8, per_file=250, num_distinct=64, source_height=120,
        source_width=160, image_size=96, batch_size=64, shuffle_buffer=1000,
        epochs_in=20, repeats=3, batches=30, warmup_batches=5, data_dir=None,
        output=None, verbose=True):
  """Measures (a) and (b) of the module docstring; returns the JSON dict."""
  from benchmarks import input_pipeline as pipeline_bench  # pylint: disable=g-import-not-at-top
  from official_conadv.data import input_pipeline  # pylint: disable=g-import-not-at-top
  for name, value in (("repeats", repeats), ("batches", batches),
                      ("epochs_in", epochs_in)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  num_records = num_files * per_file
  steps_per_epoch = max(1, num_records // batch_size)
  if steps_per_epoch < 2:
    raise ValueError(f"batch_size must be at most half the {num_records} "
                     f"records, got {batch_size}.")
  far = epochs_in * steps_per_epoch
  common = dict(image_size=image_size, batch_size=batch_size,
                shuffle_buffer=shuffle_buffer, num_examples=num_records)
  tmp = None
  if not data_dir:
    tmp = data_dir = tempfile.mkdtemp(prefix="conadv_resume_bench_")
  try:
    wrote = pipeline_bench.write_data(data_dir, num_files, per_file,
                                      num_distinct, source_height,
                                      source_width)
    cases = {
        "new_step_1": lambda: new_pipeline(data_dir, 1, **common),
        "new_epochs_in": lambda: new_pipeline(data_dir, far, **common),
        "old_step_1": lambda: old_pipeline(data_dir, 1, **common),
        "old_epochs_in": lambda: old_pipeline(data_dir, far, **common),
    }
    time_to_first_batch(cases["new_step_1"])  # Untimed: TF warm-up.
    time_to_first_batch(cases["old_step_1"])
    first_batch = {name: [] for name in cases}
    for _ in range(repeats):
      for name, build in cases.items():
        first_batch[name].append(time_to_first_batch(build))
    throughput = {"deterministic": [], "nondeterministic": []}
    for _ in range(repeats):
      for name, flag in (("deterministic", True), ("nondeterministic", False)):
        ds = new_pipeline(data_dir, 0, deterministic=flag, **common)
        throughput[name].append(input_pipeline.measure_throughput(
            ds, num_batches=batches, warmup=warmup_batches))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)

  skipped = {"new_step_1": batch_size,
             "new_epochs_in": (far * batch_size) % (steps_per_epoch *
                                                    batch_size),
             "old_step_1": batch_size, "old_epochs_in": far * batch_size}
  resume = [{"case": name, "method": name.split("_")[0],
             "start_step": 1 if name.endswith("step_1") else far,
             "median_s": statistics.median(ts), "min_s": min(ts),
             "max_s": max(ts), "records_skipped_before_decode": skipped[name]}
            for name, ts in first_batch.items()]
  rates = [{"mode": name, "deterministic": name == "deterministic",
            "median_images_per_s": statistics.median(v),
            "min_images_per_s": min(v), "max_images_per_s": max(v)}
           for name, v in throughput.items()]
  med = {r["case"]: r["median_s"] for r in resume}
  det = {r["mode"]: r["median_images_per_s"] for r in rates}
  header = (f"Resume cost and determinism, synthetic {source_height}x"
            f"{source_width} JPEG TFRecords ({num_records} records, "
            f"{num_files} shards), {image_size}px out, batch {batch_size}, "
            f"shuffle buffer {shuffle_buffer}, {steps_per_epoch} steps per "
            f"epoch, far resume at step {far} ({epochs_in} epochs in), "
            f"{repeats} interleaved rounds, "
            f"{pipeline_bench.available_cores()} cores")
  result = {
      "header": header, "resume": resume, "throughput": rates,
      "summary": {
          "new_epochs_in_over_step_1": med["new_epochs_in"] /
                                       med["new_step_1"],
          "old_epochs_in_over_step_1": med["old_epochs_in"] /
                                       med["old_step_1"],
          "old_over_new_epochs_in": med["old_epochs_in"] /
                                    med["new_epochs_in"],
          "deterministic_over_nondeterministic":
              det["deterministic"] / det["nondeterministic"],
      },
      "raw": {"time_to_first_batch_s": first_batch,
              "images_per_s": throughput},
      "config": {"num_files": num_files, "per_file": per_file,
                 "num_distinct": num_distinct,
                 "source_size": [source_height, source_width],
                 "image_size": image_size, "batch_size": batch_size,
                 "shuffle_buffer": shuffle_buffer, "epochs_in": epochs_in,
                 "steps_per_epoch": steps_per_epoch, "far_step": far,
                 "repeats": repeats, "batches": batches,
                 "warmup_batches": warmup_batches, "wrote_data": wrote},
      "load_average": os.getloadavg(),
  }
  if verbose:
    print_tables(result)
  step_time.write_json(result, output)
  return result


def print_tables(result):
  print(result["header"])
  print(f"{'case':<14} {'start step':>10} {'skipped':>8} "
        f"{'first batch s (median [min, max])':>34}")
  for r in result["resume"]:
    print(f"{r['case']:<14} {r['start_step']:>10} "
          f"{r['records_skipped_before_decode']:>8} "
          f"{r['median_s']:>14.3f} [{r['min_s']:.3f}, {r['max_s']:.3f}]")
  print(f"{'mode':<17} {'img/s (median [min, max])':>28}")
  for r in result["throughput"]:
    print(f"{r['mode']:<17} {r['median_images_per_s']:>10.1f} "
          f"[{r['min_images_per_s']:.1f}, {r['max_images_per_s']:.1f}]")
  s = result["summary"]
  print(f"far/step-1 first-batch time: new {s['new_epochs_in_over_step_1']:.2f}"
        f"x, old {s['old_epochs_in_over_step_1']:.2f}x; old/new at the far "
        f"step {s['old_over_new_epochs_in']:.1f}x; deterministic/non "
        f"{s['deterministic_over_nondeterministic']:.3f}")


def main(argv):
  del argv
  run(num_files=FLAGS.num_files, per_file=FLAGS.per_file,
      num_distinct=FLAGS.num_distinct, source_height=FLAGS.source_height,
      source_width=FLAGS.source_width, image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, shuffle_buffer=FLAGS.shuffle_buffer,
      epochs_in=FLAGS.epochs_in, repeats=FLAGS.repeats,
      batches=FLAGS.batches, warmup_batches=FLAGS.warmup_batches,
      data_dir=FLAGS.data_dir, output=FLAGS.output)


if __name__ == "__main__":
  define_flags()
  app.run(main)
