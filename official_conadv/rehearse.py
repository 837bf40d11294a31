r"""Rehearses the paper's rows at toy scale: each one with its own loop shape.

    python -m official_conadv.rehearse                 # all 35 rows (make rehearse)
    python -m official_conadv.rehearse --rows=imagenet_resnet50_conadv_aa_96k

Every `imagenet_resnet50_*` row keeps what decides whether a pod run does what
its config says: its method (adversary, delay, AutoAugment and where it
trains), optimizer, mixed precision, checkpoint policy, and the *shape* of its
loop structure: whether `steps_per_execution` divides `steps_per_loop`, and
whether the run length is a whole number of loops (`toy_loop_shape`). The
network (ResNet-10, width 8), the images (32 px) and the data (standard-format
JPEG TFRecords generated here, unevenly sharded, not a multiple of the batch)
shrink so a row takes about a minute on a CPU: on the default strategy
(`--replicas=1`, the rows' steps_per_execution as configured) or on a
MirroredStrategy over logical CPUs (`--replicas=2`).

Per row it checks, and fails loudly otherwise:
  1. the run ends at exactly its last step; checkpoints exist at the loop ends
     the config implies (the last `keep_checkpoints` of them);
  2. every evaluation scored every validation image exactly once (`examples`);
  3. a copy of the run stopped by a real SIGTERM in the middle of a loop (not
     at a loop end) saved that step, and the rerun of the same call ended with
     the same weights, BN statistics, optimizer slots and stale-weight buffer
     as the uninterrupted run (largest difference reported; must be 0 up to
     float32 rounding).
  4. `<row>+lookahead` (every ConAdv row without AutoAugment, run after the
     rows): the same row with `adversary.schedule=lookahead` (Algorithm 1's
     queue instead of stale weights) passes 1-3, and its final weights and
     optimizer state equal the delayed row's (largest difference reported;
     must be 0 up to float32 rounding).
It writes one JSON line per row and a table to `--output`.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags


def define_flags():
  """Defined only when run as a script, so importing this module (tests use
  its checkpoint helpers) adds no flags that could clash with others'."""
  flags.DEFINE_string("rows", "all", "Comma-separated experiment names, or "
                      "'all' for every imagenet_resnet50_* row.")
  flags.DEFINE_string("output", "runs/rehearse/rehearse.json",
                      "Where the per-row results go (JSON).")
  flags.DEFINE_string("work_dir", None, "Scratch directory for data and runs "
                      "(default: a new temporary directory, removed at the end).")
  flags.DEFINE_bool("resume_check", True, "Also run the SIGTERM + resume check.")
  flags.DEFINE_integer("replicas", 1, "1: the default strategy, which runs the "
                       "rows' steps_per_execution as configured; 2 or more: a "
                       "MirroredStrategy over that many logical CPUs (Keras "
                       "then runs one step per execution, see "
                       "train_lib.steps_per_execution_for).")


FLAGS = flags.FLAGS

TOY_BATCH = 8          # Global batch (per replica 4 on two replicas).
TOY_EVAL_BATCH = 8
TOY_EVAL_SHARDS = (9, 2, 6)   # 17 validation images in uneven shards.
TOY_IMAGE = 32
TOY_EXTRA_TRAIN = 3    # Train images beyond whole batches (like ImageNet's).
LOOKAHEAD = "+lookahead"  # Row suffix: the row with adversary.schedule=lookahead.


def toy_loop_shape(steps_per_loop: int, steps_per_execution: int,
                   total_steps: int):
  """(loop, execution, total) of a few steps with the row's divisibility.

  `steps_per_execution` divides the toy loop iff it divides the row's, and
  the toy run ends with a partial loop iff the row's does:
    1k row (1,251 / 100 / 112,603) -> (5, 2, 11);
    16k row (78 / 78 / 7,116)      -> (2, 2, 5);
    96k row (13 / 13 / 1,301)      -> (2, 2, 5).
  """
  execution = 2 if steps_per_execution > 1 else 1
  chunks, rest = divmod(steps_per_loop, steps_per_execution)
  loop = execution * min(chunks, 2) + (1 if rest else 0)
  loop = max(loop, 1)
  loops, tail = divmod(total_steps, steps_per_loop)
  total = loop * min(loops, 2) + (1 if tail else 0)
  return loop, execution, total


def toy_config(row: str, data_dir: str):
  """The row's config shrunk to toy scale (see the module docstring)."""
  from official_conadv import configs  # pylint: disable=g-import-not-at-top
  experiments = configs.named_experiments()
  base, lookahead = split_row(row)
  c = experiments.get(base)
  loop, execution, total = toy_loop_shape(c.train.steps_per_loop,
                                          c.train.steps_per_execution,
                                          c.total_steps(
                                              c.data.num_train_examples))
  num_train = loop * TOY_BATCH + TOY_EXTRA_TRAIN
  overrides = {
      "model.depth": 10, "model.width": 8,
      "data.data_dir": data_dir, "data.image_size": TOY_IMAGE,
      "data.num_train_examples": num_train,
      "data.num_eval_examples": sum(TOY_EVAL_SHARDS),
      "data.shuffle_buffer": 16,
      "train.global_batch_size": TOY_BATCH,
      "train.eval_batch_size": TOY_EVAL_BATCH,
      "train.train_steps": total, "train.steps_per_loop": loop,
      "train.steps_per_execution": execution,
      "runtime.strategy": "default",
  }
  if lookahead:
    overrides["adversary.schedule"] = "lookahead"
  return configs.override(c, ",".join(f"{k}={v}"
                                      for k, v in overrides.items()))


def split_row(row: str):
  """("imagenet_resnet50_conadv_96k", True) for "..._96k+lookahead"."""
  if row.endswith(LOOKAHEAD):
    return row[:-len(LOOKAHEAD)], True
  return row, False


def weights_and_optimizer(tensors):
  """The backbone weights and optimizer variables of `checkpoint_tensors`
  (what the two schedules share; their queue / ring buffer differ)."""
  return {k: v for k, v in tensors.items()
          if "backbone_weights" in k or k.startswith("optimizer/")}


def sigterm_step(ends):
  """The step after which the resume check sends SIGTERM: inside the second
  loop, not at a loop end (the preemption checkpoint is mid-loop and the
  rerun must finish that loop first), when the loops allow it. `ends`: the
  run's `loop_ends(0, ...)`. With several steps per call the run stops at
  the end of the call that passes this step."""
  return ends[0] + 1 if len(ends) > 1 and ends[1] - ends[0] > 1 else 1


def write_toy_data(data_dir: str, num_train: int):
  from official_conadv.data import synthetic  # pylint: disable=g-import-not-at-top
  # Train: three uneven shards; validation: TOY_EVAL_SHARDS.
  sizes = (num_train // 2, num_train // 3)
  sizes += (num_train - sum(sizes),)
  for i, n in enumerate(sizes):
    synthetic.write_imagenet_tfrecords(
        data_dir, prefix=f"train-{i}", num_files=1, per_file=n,
        size=(40, 48), seed=10 + i)
  for i, n in enumerate(TOY_EVAL_SHARDS):
    synthetic.write_imagenet_tfrecords(
        data_dir, prefix=f"validation-{i}", num_files=1, per_file=n,
        size=(40, 48), seed=20 + i)


def checkpoint_steps(model_dir):
  """Steps of the checkpoints kept in model_dir/checkpoints, ascending."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  state = tf.train.get_checkpoint_state(os.path.join(model_dir,
                                                     "checkpoints"))
  if state is None:
    return []
  return sorted(int(p.rsplit("-", 1)[-1])
                for p in state.all_model_checkpoint_paths)


def checkpoint_tensors(model_dir, subdir="checkpoints"):
  """Every tensor of the latest checkpoint in model_dir/subdir except
  bookkeeping counters."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = tf.train.latest_checkpoint(os.path.join(model_dir, subdir))
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if "save_counter" not in k and "CHECKPOINTABLE" not in k}


def max_difference(a, b) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  if set(a) != set(b):
    raise AssertionError(f"checkpoints hold different tensors: "
                         f"{sorted(set(a) ^ set(b))[:5]}")
  worst = 0.0
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    if x.dtype.kind in "fc":
      worst = max(worst, float(np.max(np.abs(x.astype(np.float64) -
                                             y.astype(np.float64)),
                                      initial=0.0)))
    elif not np.array_equal(x, y):
      worst = max(worst, float("inf"))
  return worst


def rehearse_row(row, work_dir, strategy, resume_check=True, log=print):
  """Runs one row at toy scale; returns its result dict (raises on failure)."""
  import keras  # pylint: disable=g-import-not-at-top
  from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
  from official_conadv.testing import preemption  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(work_dir, "data", row)
  config = toy_config(row, data_dir)
  write_toy_data(data_dir, config.data.num_train_examples)
  loop = config.train.steps_per_loop
  total = config.train.train_steps
  ends = train_lib.loop_ends(0, total, loop)
  result = {"row": row, "method": config.method,
            "autoaugment": config.data.autoaugment,
            "loop": loop, "steps_per_execution":
            train_lib.steps_per_execution_for(
                strategy, config.train.steps_per_execution),
            "total_steps": total}

  def run(model_dir, callbacks=()):
    keras.backend.clear_session()
    return train_lib.run(config, model_dir, mode="train_and_eval",
                         strategy=strategy, verbose=0, export=False,
                         callbacks=callbacks)

  t0 = time.perf_counter()
  full_dir = os.path.join(work_dir, "runs", row, "full")
  summary = run(full_dir)
  result["seconds"] = round(time.perf_counter() - t0, 1)
  result["final_step"] = summary["step"]
  result["eval_examples"] = summary["eval"].get("examples")
  result["checkpoint_steps"] = checkpoint_steps(full_dir)
  want_ckpts = ends[-config.train.keep_checkpoints:]
  problems = []
  if summary["step"] != total:
    problems.append(f"ended at step {summary['step']}, not {total}")
  if result["eval_examples"] != sum(TOY_EVAL_SHARDS):
    problems.append(f"evaluation scored {result['eval_examples']} of "
                    f"{sum(TOY_EVAL_SHARDS)} images")
  if result["checkpoint_steps"] != want_ckpts:
    problems.append(f"checkpoints at {result['checkpoint_steps']}, expected "
                    f"{want_ckpts}")
  if resume_check:
    stop = sigterm_step(ends)
    resumed_dir = os.path.join(work_dir, "runs", row, "resumed")
    try:
      run(resumed_dir, callbacks=[preemption.SigtermAt(stop)])
      problems.append("SIGTERM did not stop the run")
    except train_lib.Preempted:
      pass
    result["preempted_at"] = (checkpoint_steps(resumed_dir) or [None])[-1]
    resumed = run(resumed_dir)
    result["resumed_final_step"] = resumed["step"]
    diff = max_difference(checkpoint_tensors(full_dir),
                          checkpoint_tensors(resumed_dir))
    result["resume_max_abs_difference"] = diff
    if resumed["step"] != total or diff > 1e-6:
      problems.append(f"resume: final step {resumed['step']}, largest "
                      f"difference from the uninterrupted run {diff:.3g}")
  base, lookahead = split_row(row)
  delayed_dir = os.path.join(work_dir, "runs", base, "full")
  if lookahead and checkpoint_steps(delayed_dir):
    diff = max_difference(
        weights_and_optimizer(checkpoint_tensors(delayed_dir)),
        weights_and_optimizer(checkpoint_tensors(full_dir)))
    result["vs_delayed_max_abs_difference"] = diff
    if diff > 1e-6:
      problems.append(f"lookahead differs from the delayed row by {diff:.3g}")
  result["problems"] = problems
  log(json.dumps(result), flush=True)
  return result


def rows_to_run(spec: str):
  from official_conadv import configs  # pylint: disable=g-import-not-at-top
  experiments = configs.named_experiments()
  every = [n for n in experiments.names() if n.startswith("imagenet_resnet50_")]
  every += [n + LOOKAHEAD for n in every
            if "_conadv_" in n and "_conadv_aa_" not in n]
  if spec == "all":
    return every
  rows = [r.strip() for r in spec.split(",") if r.strip()]
  unknown = [r for r in rows if r not in every]
  if unknown:
    raise ValueError(f"Unknown row(s) {unknown}; rows are: {', '.join(every)}.")
  return rows


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
  if FLAGS.verbosity <= 0:  # Checkpoint savers log at INFO: keep it quiet.
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("WARNING")
  try:
    rows = rows_to_run(FLAGS.rows)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.replicas > 1:
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * FLAGS.replicas)
    strategy = distribute_utils.get_strategy(
        "mirrored", devices=[f"/cpu:{i}" for i in range(FLAGS.replicas)])
  else:
    strategy = tf.distribute.get_strategy()
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="rehearse_")
  results, start = [], time.perf_counter()
  print(f"Rehearsing {len(rows)} rows on {strategy.num_replicas_in_sync} "
        f"replica(s) in {work_dir}", flush=True)
  for row in rows:
    results.append(rehearse_row(row, work_dir, strategy,
                                resume_check=FLAGS.resume_check))
  failed = [r for r in results if r["problems"]]
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as f:
    json.dump({"rows": results, "replicas": strategy.num_replicas_in_sync,
               "wall_seconds": round(time.perf_counter() - start, 1)}, f,
              indent=1)
  print(f"{'row':48} {'loop/exec/total':>15} {'step':>5} {'examples':>8} "
        f"{'resume diff':>11} {'vs delayed':>10}  problems")
  for r in results:
    shape = f"{r['loop']}/{r['steps_per_execution']}/{r['total_steps']}"
    diff = r.get("resume_max_abs_difference")
    vs = r.get("vs_delayed_max_abs_difference")
    print(f"{r['row']:48} {shape:>15} {r['final_step']:>5} "
          f"{r['eval_examples']:>8} "
          f"{'-' if diff is None else format(diff, '.2g'):>11} "
          f"{'-' if vs is None else format(vs, '.2g'):>10}  "
          f"{'; '.join(r['problems']) or 'none'}")
  print(f"REHEARSAL {'FAILED' if failed else 'PASSED'}: {len(results)} rows, "
        f"{len(failed)} with problems, "
        f"{time.perf_counter() - start:.0f} s; results in {FLAGS.output}",
        flush=True)
  if not FLAGS.work_dir:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(work_dir, ignore_errors=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
