r"""Images/s of the ImageNet training input pipeline, and whether it keeps up.

  python -m benchmarks.input_pipeline --image_size=224 --batch_size=64 \
      --step_time_json=experiments/results/step_time_cpu_r50_64px.json \
      --output=experiments/results/input_pipeline_cpu.json

Writes synthetic ImageNet-format TFRecord shards (JPEG, --source_height x
--source_width, 375x500 by default like a typical ImageNet photo;
--num_distinct distinct images cycled so writing is fast; decoding cost is
the same as distinct images of that size) to a temporary directory, then
reads them through the real training pipeline
(`input_pipeline.build_dataset("imagenet_tfrecord", "train", ...)`: file
interleave, shuffle, decode + random crop, bicubic resize, flip, optionally
AutoAugment, batch, prefetch) for each --augment setting ("none", "v0",
...), and reports images/s (`input_pipeline.measure_throughput`: --batches
timed batches after --warmup_batches) and images/s per core.

Cores: tf.data's threads run on the CPUs this process may use
(`os.sched_getaffinity`, normally `os.cpu_count()`); --threads > 0 limits
tf.data to a private pool of that many threads and divides by that instead.

What a training step consumes (images/s): each row of a
`benchmarks/step_time.py --output` JSON (--step_time_json), and/or
--consumed_images_per_s values. The pipeline keeps up with a consumer when
its images/s >= the consumer's. Caveats: on a CPU-only machine the pipeline
and the training step share the same cores, so the two rates do not simply
combine; and a step-time JSON measured at another image size than
--image_size is flagged (its rate is not what a --image_size step consumes).
"""

import json
import os
import re
import shutil
import tempfile

from absl import app
from absl import flags

from benchmarks import results

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a script: --image_size etc. would clash with
  `benchmarks.step_time`'s flags when both are imported (tests)."""
  flags.DEFINE_integer("image_size", 224, "Output image side (pixels).")
  flags.DEFINE_integer("batch_size", 64, "Batch size read from the pipeline.")
  flags.DEFINE_list("augment", ["none", "v0"],
                    "Augmentations to compare: none, v0 (AutoAugment), "
                    "randaugment, ...")
  flags.DEFINE_integer("num_files", 8, "Synthetic TFRecord shards.")
  flags.DEFINE_integer("per_file", 256, "Records per shard.")
  flags.DEFINE_integer("num_distinct", 32, "Distinct JPEGs encoded.")
  flags.DEFINE_integer("source_height", 375, "Synthetic JPEG height.")
  flags.DEFINE_integer("source_width", 500, "Synthetic JPEG width.")
  flags.DEFINE_integer("batches", 30, "Timed batches per setting.")
  flags.DEFINE_integer("warmup_batches", 5, "Untimed batches per setting.")
  flags.DEFINE_integer("threads", 0,
                       "tf.data private thread pool size; 0: default.")
  flags.DEFINE_string("step_time_json", None,
                      "A benchmarks/step_time.py --output JSON to compare "
                      "with (every row).")
  flags.DEFINE_list("consumed_images_per_s", [],
                    "Images/s a training step consumes (extra consumers).")
  flags.DEFINE_string("data_dir", None,
                      "Write/reuse the synthetic shards here instead of a "
                      "temporary directory.")
  flags.DEFINE_string("output", None, "JSON output path.")


def available_cores():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count()


def consumers_from(step_time_json=None, consumed_images_per_s=(),
                   image_size=None):
  """[{name, images_per_s, note}] from a step-time JSON and raw numbers."""
  out = []
  if step_time_json:
    with open(step_time_json) as f:
      data = json.load(f)
    header = data.get("header", "")
    match = re.search(r"(\d+)px", header)
    size = int(match.group(1)) if match else None
    note = ""
    if image_size is not None and size is not None and size != image_size:
      note = (f"step timed at {size}px, pipeline at {image_size}px: not the "
              "rate of a step at the pipeline's size")
    for row in data["rows"]:
      out.append({"name": f"step_time:{row['mode']}",
                  "images_per_s": float(row["images_per_s"]),
                  "step_image_size": size, "note": note})
  for i, value in enumerate(consumed_images_per_s):
    out.append({"name": f"given[{i}]", "images_per_s": float(value),
                "step_image_size": None, "note": ""})
  return out


def write_data(data_dir, num_files, per_file, num_distinct, height, width):
  """Writes the synthetic shards unless data_dir already has train-*."""
  from official_conadv.data import synthetic  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if tf.io.gfile.glob(os.path.join(data_dir, "train-*")):
    return False
  synthetic.write_imagenet_tfrecords(
      data_dir, prefix="train", num_files=num_files, per_file=per_file,
      size=(height, width), num_distinct=num_distinct)
  return True


def measure(data_dir, augment, image_size, batch_size, batches,
            warmup_batches, threads, num_records):
  """Images/s of the training pipeline with `augment` (None or a name)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.build_dataset(
      "imagenet_tfrecord", "train", data_dir=data_dir, image_size=image_size,
      global_batch_size=batch_size, is_training=True, augment=augment,
      seed=0, shuffle_buffer=min(10_000, num_records),
      num_examples=num_records)
  if threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = ds.with_options(options)
  return input_pipeline.measure_throughput(ds, num_batches=batches,
                                           warmup=warmup_batches)


def run(image_size=224, batch_size=64, augment=("none", "v0"), num_files=8,
        per_file=256, num_distinct=32, source_height=375, source_width=500,
        batches=30, warmup_batches=5, threads=0, step_time_json=None,
        consumed_images_per_s=(), data_dir=None, output=None, verbose=True):
  """Measures the pipeline for each `augment`; returns the JSON dict."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if batches < 1:
    raise ValueError(f"batches must be >= 1, got {batches}.")
  cores = threads or available_cores()
  consumers = consumers_from(step_time_json, consumed_images_per_s,
                             image_size)
  tmp = None
  if not data_dir:
    tmp = data_dir = tempfile.mkdtemp(prefix="conadv_pipeline_bench_")
  try:
    wrote = write_data(data_dir, num_files, per_file, num_distinct,
                       source_height, source_width)
    files = tf.io.gfile.glob(os.path.join(data_dir, "train-*"))
    shard_bytes = sum(tf.io.gfile.stat(p).length for p in files)
    num_records = sum(1 for p in files for _ in tf.data.TFRecordDataset(p))
    rows = []
    for name in augment:
      ips = measure(data_dir, None if name == "none" else name, image_size,
                    batch_size, batches, warmup_batches, threads,
                    num_records)
      rows.append({
          "augment": name, "images_per_s": ips,
          "images_per_s_per_core": ips / cores,
          "keeps_up": {c["name"]: ips >= c["images_per_s"]
                       for c in consumers},
          "headroom": {c["name"]: ips / c["images_per_s"]
                       for c in consumers},
      })
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  header = (f"ImageNet train pipeline, {image_size}px out, batch {batch_size}, "
            f"synthetic {source_height}x{source_width} JPEG TFRecords "
            f"({num_records} records, {len(files)} shards, "
            f"{shard_bytes / len(files) / (1 << 20):.1f} MiB/shard), "
            f"{cores} cores ({'tf.data pool' if threads else 'available'}), "
            f"{batches} batches after {warmup_batches} warm-up")
  result = {"header": header, "rows": rows, "consumers": consumers,
            "cores": cores,
            "config": {"image_size": image_size, "batch_size": batch_size,
                       "augment": list(augment), "num_files": num_files,
                       "per_file": per_file, "num_distinct": num_distinct,
                       "source_size": [source_height, source_width],
                       "batches": batches, "warmup_batches": warmup_batches,
                       "threads": threads, "step_time_json": step_time_json,
                       "wrote_data": wrote,
                       "mean_record_bytes": shard_bytes / num_records},
            "load_average": os.getloadavg()}
  if verbose:
    print_tables(result)
  results.write_json(result, output)
  return result


def print_tables(result):
  print(result["header"])
  print(f"{'augment':<8} {'img/s':>8} {'img/s/core':>10}")
  for r in result["rows"]:
    print(f"{r['augment']:<8} {r['images_per_s']:8.1f} "
          f"{r['images_per_s_per_core']:10.1f}")
  if not result["consumers"]:
    print("No consumer given (--step_time_json / --consumed_images_per_s).")
    return
  print(f"{'consumer':<22} {'consumes img/s':>14} "
        + " ".join(f"{'keeps up (' + r['augment'] + ')':>18}"
                   for r in result["rows"]))
  for c in result["consumers"]:
    cells = " ".join(
        f"{('yes' if r['keeps_up'][c['name']] else 'NO'):>9} "
        f"({r['headroom'][c['name']]:5.2f}x)" for r in result["rows"])
    print(f"{c['name']:<22} {c['images_per_s']:14.1f} {cells}")
  notes = sorted({c["note"] for c in result["consumers"] if c["note"]})
  for note in notes:
    print(f"note: {note}")


def main(argv):
  del argv
  run(image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
      augment=FLAGS.augment, num_files=FLAGS.num_files,
      per_file=FLAGS.per_file, num_distinct=FLAGS.num_distinct,
      source_height=FLAGS.source_height, source_width=FLAGS.source_width,
      batches=FLAGS.batches, warmup_batches=FLAGS.warmup_batches,
      threads=FLAGS.threads, step_time_json=FLAGS.step_time_json,
      consumed_images_per_s=FLAGS.consumed_images_per_s,
      data_dir=FLAGS.data_dir, output=FLAGS.output)


if __name__ == "__main__":
  define_flags()
  app.run(main)
