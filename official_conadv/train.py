r"""Command-line entry point: train / evaluate one named experiment.

  python -m official_conadv.train --experiment=mnist_resnet_conadv \
      --model_dir=runs/mnist_resnet_conadv
  python -m official_conadv.train --experiment=imagenet_resnet50_conadv_32k \
      --strategy=tpu --tpu=$TPU_NAME --data_dir=gs://BUCKET/imagenet \
      --model_dir=gs://BUCKET/runs/conadv_32k \
      --params_override=adversary.delay=2

`--experiment=list` prints every experiment. Bad input (unknown experiment,
missing data, bad override, incompatible model_dir, a --model_dir that is a
file or not writable, a --data_dir that is a file, ...) ends with a one-line
`error:` message and exit status 2, before anything is written; a stopped
run (non-finite loss, corrupt record, a file system error mid-run) with
exit status 1. Checkpoints in model_dir are never overwritten by a failing
run. SIGTERM (a preemption notice) saves a checkpoint at the next step
boundary, prints one `preempted:` line and exits with status 143; rerun the
same command to resume.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("experiment", "mnist_resnet_conadv",
                    "Name of a registered experiment (experiments/); 'list' "
                    "prints them.")
flags.DEFINE_string("model_dir", None,
                    "Where checkpoints, TensorBoard logs, config.json and the "
                    "export go. A rerun with the same model_dir resumes.")
flags.DEFINE_string("data_dir", None,
                    "Dataset location (overrides data.data_dir). ImageNet: "
                    "TFRecord shards or the two official tars (docs/tpu.md).")
flags.DEFINE_enum("strategy", None,
                  ["tpu", "mirrored", "multi_worker_mirrored", "one_device",
                   "default"],
                  "tf.distribute strategy (overrides runtime.strategy).")
flags.DEFINE_string("tpu", None, "TPU name, grpc address or 'local'.")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                  "What to run.")
flags.DEFINE_string("params_override", "",
                    "Comma-separated dotted overrides, e.g. "
                    "'adversary.delay=2,train.global_batch_size=4096'.")
flags.DEFINE_bool("export", True, "Export the main-BN inference model at the "
                  "end of training (SavedModel + .keras).")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume although the run length, global batch, seed, "
                  "data order or training-set size (train.epochs, "
                  "train.train_steps, train.global_batch_size, train.seed, "
                  "data.shuffle_buffer, data.deterministic, "
                  "data.num_train_examples) differ from the model_dir's "
                  "config: the schedule is rebuilt and the change logged.")
flags.DEFINE_integer("verbose", 1, "Keras progress output: 0 silent, 1 bar, "
                     "2 one line per loop.")

FLAGS = flags.FLAGS
PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM, what schedulers expect.


def _fail(message, status):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _gist(message):
  """The informative line of a TF runtime error (not "Graph execution")."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  for line in lines:
    if "Corrupt or unreadable" in line:
      return line[line.index("Corrupt or unreadable"):].rstrip("]")
  for line in lines:
    if not line.startswith(("Graph execution error", "Detected at node",
                            "File ", "[[", "Traceback")):
      return line
  return lines[0] if lines else "unknown error"


def main(argv):
  del argv
  # Imported here so `--help` is fast and flag errors come before TF starts.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv import configs  # pylint: disable=g-import-not-at-top
  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
  from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.verbosity <= 0:
    # TF's savers and exporters log at INFO; keep the console to the progress
    # bar and our own lines unless --verbosity=1 or more is given.
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("WARNING")

  experiments = configs.named_experiments()
  if FLAGS.experiment == "list":
    for name in experiments.names():
      print(f"{name}: {experiments.describe(name).splitlines()[0]}")
    return
  try:
    if not FLAGS.model_dir:
      raise ValueError("--model_dir is required.")
    config = experiments.get(FLAGS.experiment)
    extra = []
    if FLAGS.data_dir:
      extra.append(f"data.data_dir={FLAGS.data_dir}")
    if FLAGS.strategy:
      extra.append(f"runtime.strategy={FLAGS.strategy}")
    if FLAGS.tpu:
      extra.append(f"runtime.tpu={FLAGS.tpu}")
    config = configs.override(config, ",".join(
        [FLAGS.params_override] + extra))
    strategy = distribute_utils.get_strategy(config.runtime.strategy,
                                             tpu=config.runtime.tpu)
    summary = train_lib.run(config, FLAGS.model_dir, mode=FLAGS.mode,
                            strategy=strategy, verbose=FLAGS.verbose,
                            export=FLAGS.export,
                            allow_config_change=FLAGS.allow_config_change)
  except ValueError as e:
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e), 2)
  except train_lib.TrainingError as e:
    _fail(str(e), 1)
  except train_lib.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_STATUS)
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
          tf.errors.NotFoundError) as e:
    _fail(f"stopped by the input pipeline or a file: {_gist(e.message)} "
          f"(checkpoints in {FLAGS.model_dir} are intact)", 1)
  except (tf.errors.PermissionDeniedError, tf.errors.AlreadyExistsError,
          tf.errors.FailedPreconditionError, OSError) as e:
    # Mostly a file system failing mid-run (permissions changed, disk full):
    # model_dir and data_dir themselves are checked before the run starts.
    message = (_gist(e.message) if isinstance(e, tf.errors.OpError) else
               distribute_utils.one_line(e) or type(e).__name__)
    _fail(f"stopped: {message} (checkpoints saved before in "
          f"{FLAGS.model_dir} are kept)", 1)

  ev = summary.get("eval", {})
  ips = summary.get("images_per_second")
  # With a weight average (optimizer.ema_momentum) top1/top5 are the
  # average's, top1_raw the raw weights'.
  raw = summary.get("eval_raw")
  raw_part = ("" if raw is None else
              f"top1_raw={raw.get('accuracy', float('nan')):.4f} ")
  print(f"FINAL experiment={FLAGS.experiment} step={summary['step']} "
        f"top1={ev.get('accuracy', float('nan')):.4f} "
        f"top5={ev.get('top5', float('nan')):.4f} {raw_part}"
        f"examples={ev.get('examples', 0)} "
        f"wall_s={summary['wall_seconds']:.1f} "
        f"images_per_s={ips if ips is None else round(ips, 1)} "
        f"model_dir={os.path.abspath(FLAGS.model_dir)}", flush=True)
  logging.info("Summary: %s", summary)


if __name__ == "__main__":
  app.run(main)
