r"""Are identical training runs in one process bitwise identical? Where do
they first differ? Do several steps per call train what one step per call
trains? (docs/known_issues.md, item 12: why the +AA rows run several
steps per call again.)

  python -m benchmarks.reproducibility \
      --row=imagenet_resnet50_conadv_aa_1k --runs=4 --steps_per_execution=2 \
      --output=experiments/results/reproducibility_aa_cpu.json

Runs one `make rehearse` toy row (`rehearse.toy_config`, `write_toy_data`:
ResNet-10 width 8, 32 px, batch 8, the row's loop shape, 5-11 steps)
`--runs` times in this process through the trainer's own pieces
(`train_plan.make_plan`, `train_session.open_session`, `train_lib.train`:
loops of `fit`, a checkpoint and by default an evaluation after each), with
the plan's `steps_per_execution` replaced by `--steps_per_execution` (the
runs use the default strategy, where Keras' multi-step loop works). Each
configuration is one of

  precision  "float32" (runtime.mixed_precision=none) or "row" (the row's
             own: mixed_bfloat16 for the ImageNet rows);
  feed       "pipeline": the trainer's input pipeline, built per loop as
             the trainer builds it; "materialized": the batches that
             pipeline gives, computed once before the runs and fed from
             `tf.data.Dataset.from_tensor_slices` (the same values every
             run, no pipeline work beside the steps: what remains is
             computation);
  scenario   "repeat": runs 1.. run straight through like run 0; "resume":
             runs 1.. are stopped by a real SIGTERM at
             `rehearse.sigterm_step` and resumed from their checkpoint by a
             second run (what `make rehearse`'s resume check compares).

For each it reports how many runs ended with weights, BN statistics,
optimizer slots or stale-weight buffer (every checkpointed tensor) not
bitwise equal to run 0's, the largest difference, and for each differing
run the first step and tensor at which it differed. In the repeat scenario
one more run with `--compare_steps_per_execution` (default 1) steps per
call is compared with run 0 the same way. To find that, the step
is instrumented (`--record`, on by default; the library's step runs
unchanged inside wrappers of `train_step`, `adversarial_examples` and
`_update_train_metrics`): every step writes, into variables indexed by the
step, in the order the step computes them,

  image, augmented, labels   the input batch the step got;
  theta                      every trainable weight at the step's start;
  stale                      the weights the attack used (theta_{t-tau});
  attack_images, x_adv       the attack's input and output;
  *_logits, *_loss, loss     each branch's logits and loss, the total loss.

so the first tensor that differs is where a run first went another way.

Before the runs it checks the input pipeline alone: the run's training
batches made twice from fresh pipelines, and once loop by loop with
`start_step` as the trainer makes them, must be bitwise equal.

Prints a table and writes JSON (with the CPU model, its vector extensions
and whether TF's oneDNN kernels are on) to --output. Keep it short: a toy
run takes 10-20 s materialized and about a minute through the AutoAugment
pipeline on a 2-core CPU.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS

# Recorded per step, in the order a step computes them (the first of these
# that differs is where a run first differs).
INPUTS = ("image", "augmented", "labels")
COMPUTED = ("theta", "stale", "attack_images", "x_adv", "clean_logits",
            "adv_logits", "aug_logits", "clean_loss", "adv_loss", "aug_loss",
            "loss")
RECORDED = INPUTS + COMPUTED


def define_flags():
  """Defined only when run as a script (importing adds no flags)."""
  flags.DEFINE_string("row", "imagenet_resnet50_conadv_aa_1k",
                      "A rehearse row (an imagenet_resnet50_* experiment).")
  flags.DEFINE_integer("runs", 4, "Runs per configuration (run 0 and the "
                       "runs compared with it).")
  flags.DEFINE_integer("steps_per_execution", 2,
                       "Steps per call for every run (instead of the "
                       "row's).")
  flags.DEFINE_list("precisions", ["float32", "row"],
                    "float32 and/or row (the row's mixed precision).")
  flags.DEFINE_list("feeds", ["pipeline", "materialized"],
                    "pipeline (the trainer's input pipeline) and/or "
                    "materialized (precomputed batches).")
  flags.DEFINE_list("scenarios", ["repeat", "resume"],
                    "repeat: runs 1.. straight through like run 0; resume: "
                    "runs 1.. stopped by SIGTERM (rehearse.sigterm_step) "
                    "and resumed from their checkpoint.")
  flags.DEFINE_integer("compare_steps_per_execution", 1,
                       "In the repeat scenario, one more run with this many "
                       "steps per call, compared with run 0 (0: none).")
  flags.DEFINE_bool("evaluate", True, "Evaluate after every loop, as the "
                    "trainer's train_and_eval mode (and make rehearse) do.")
  flags.DEFINE_bool("record", True, "Record per-step tensors (to locate the "
                    "first difference).")
  flags.DEFINE_string("output", None, "Where the results go (JSON).")
  flags.DEFINE_string("work_dir", None, "Scratch directory (default: a new "
                      "temporary one, removed at the end).")


# --------------------------------------------------------------- config
def toy_row_config(row: str, work_dir: str, precision: str):
  """The rehearse toy config of `row` at `precision`, its data written."""
  from official_conadv import configs  # pylint: disable=g-import-not-at-top
  from official_conadv import rehearse  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(work_dir, "data", row)
  config = rehearse.toy_config(row, data_dir)
  if not os.path.isdir(data_dir):
    rehearse.write_toy_data(data_dir, config.data.num_train_examples)
  if precision == "float32":
    config = configs.override(config, "runtime.mixed_precision=none")
  elif precision != "row":
    raise ValueError(f"precision must be float32 or row, got {precision!r}.")
  return config


def plan_with(config, steps_per_execution: int):
  """The trainer's plan of `config` with `steps_per_execution` forced."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv import train_plan  # pylint: disable=g-import-not-at-top
  from official_conadv.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data = input_pipeline.DataSource(config.data)
  plan = train_plan.make_plan(
      config, data.num_examples("train"), data.num_examples("eval"),
      train_plan.StrategyFacts.of(tf.distribute.get_strategy()))
  return data, dataclasses.replace(plan,
                                   steps_per_execution=steps_per_execution,
                                   steps_per_execution_note=None)


# ------------------------------------------------------------- the data
def _train_batches(config, plan, data, first: int, num_steps: int):
  """Batches [first, first + num_steps) as numpy, made as
  `train_session.Session.train_window` makes them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = data.train_dataset(
      tf.distribute.get_strategy(),
      global_batch_size=config.train.global_batch_size,
      num_classes=config.model.num_classes, seed=config.train.seed,
      start_step=first, num_steps=num_steps,
      steps_per_epoch=plan.steps_per_epoch,
      augment_pair=config.adversary.enabled)
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds]


def _stack(batches):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.nest.map_structure(lambda *xs: np.stack(xs), *batches)


def _flat(structure):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.nest.flatten(structure)


def check_pipeline(config, plan, data):
  """The pipeline alone: the run's batches made twice from step 0 and once
  loop by loop (start_step at each loop start) must be bitwise equal.
  Returns (result dict, the batches)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = plan.total_steps
  first = _train_batches(config, plan, data, 0, total)
  second = _train_batches(config, plan, data, 0, total)
  by_loop, begin = [], 0
  for end in plan.loop_ends(0):
    by_loop += _train_batches(config, plan, data, begin, end - begin)
    begin = end

  def differing(a, b):
    return [s for s, (x, y) in enumerate(zip(a, b))
            if not all(np.array_equal(u, v, equal_nan=True)
                       for u, v in zip(_flat(x), _flat(y)))]

  result = {"batches": len(first), "keys": sorted(first[0][0])
            if isinstance(first[0][0], dict) else None,
            "rebuilt_differing_steps": differing(first, second),
            "by_loop_differing_steps": differing(first, by_loop)}
  result["bitwise_equal"] = not (result["rebuilt_differing_steps"] or
                                 result["by_loop_differing_steps"])
  return result, first


# -------------------------------------------------------- instrumenting
class Recorder:
  """Variables [T, ...] the instrumented step writes its tensors into, at
  row `step` (float32; bfloat16 tensors are cast, exactly)."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self.variables = {}

  def _variable(self, name, value):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if name not in self.variables:
      with tf.init_scope():
        self.variables[name] = tf.Variable(
            tf.zeros((self.total_steps,) + tuple(value.shape), tf.float32),
            trainable=False, name=f"record_{name}")
    return self.variables[name]

  def write(self, name, step, value):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if isinstance(value, (list, tuple)):
      value = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1])
                         for v in value], 0)
    value = tf.cast(value, tf.float32)
    var = self._variable(name, value)
    var.scatter_nd_update(tf.reshape(tf.cast(step, tf.int64), [1, 1]),
                          value[tf.newaxis])

  def numpy(self):
    return {k: v.numpy() for k, v in self.variables.items()}


def instrument(model, recorder: Recorder):
  """Wraps `model.train_step` and `model.adversarial_examples` (instance
  attributes; the library's code runs unchanged inside) to record."""
  import keras  # pylint: disable=g-import-not-at-top
  from official_conadv.adversarial import schedules  # pylint: disable=g-import-not-at-top
  train_step = model.train_step
  adversarial_examples = model.adversarial_examples
  update_train_metrics = model._update_train_metrics  # pylint: disable=protected-access
  tracing = {}  # The step counter of the step being traced.

  def recorded_train_step(data):
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    step = schedules.micro_step(model.optimizer)
    tracing["step"] = step
    if isinstance(x, dict):
      for key in ("image", "augmented"):
        recorder.write(key, step, x[key])
    else:
      recorder.write("image", step, x)
    recorder.write("labels", step, y)
    recorder.write("theta", step, model.backbone.trainable_variables)
    return train_step(data)

  def recorded_update_train_metrics(loss, branches, y, sample_weight):
    # The step's own losses and logits (not the trackers' running means).
    step = tracing["step"]
    for name, (logits, branch_loss) in branches.items():
      recorder.write(f"{name}_logits", step, logits)
      recorder.write(f"{name}_loss", step, branch_loss)
    recorder.write("loss", step, loss)
    return update_train_metrics(loss, branches, y, sample_weight)

  def recorded_adversarial_examples(images, labels, step, weights=None):
    if weights is None:
      weights = model.schedule.attack_weights(model, step)
    recorder.write("stale", step, weights)
    recorder.write("attack_images", step, images)
    x_adv = adversarial_examples(images, labels, step, weights=weights)
    recorder.write("x_adv", step, x_adv)
    return x_adv

  model.train_step = recorded_train_step
  model.adversarial_examples = recorded_adversarial_examples
  model._update_train_metrics = recorded_update_train_metrics  # pylint: disable=protected-access


# ------------------------------------------------------------------ run
def _final_state(session):
  """name -> numpy of every checkpointed tensor of the session's model and
  optimizer (weights, BN statistics, slots, stale buffer)."""
  from official_conadv import rehearse  # pylint: disable=g-import-not-at-top
  return rehearse.checkpoint_tensors(session.model_dir)


def one_run(config, steps_per_execution: int, model_dir: str,
            batches=None, record: bool = True, sigterm_at=None,
            evaluate: bool = True):
  """One training run as the trainer runs it (loops of fit, a checkpoint
  after each) from the newest checkpoint in model_dir, with
  `steps_per_execution` steps per call; `batches` (numpy, one per step)
  replace the input pipeline; `sigterm_at`: a real SIGTERM once the run
  passes that step (it then saves and stops, as a preempted run does);
  `evaluate`: an evaluation after every loop (the trainer's train_and_eval
  mode, what `make rehearse` runs).

  Returns (final state or None if stopped, records, first step, last step).
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
  from official_conadv import train_session  # pylint: disable=g-import-not-at-top
  from official_conadv.testing import preemption  # pylint: disable=g-import-not-at-top
  keras.backend.clear_session()
  keras.mixed_precision.set_global_policy("float32")
  strategy = tf.distribute.get_strategy()
  data, plan = plan_with(config, steps_per_execution)
  session = train_session.open_session(config, plan, data, strategy,
                                       model_dir, "train", is_chief=True)
  first = session.step
  recorder = Recorder(plan.total_steps)
  if record:
    instrument(session.model, recorder)
  if batches is not None:
    stacked = _stack(batches)

    def window(begin, num_steps):
      part = tf.nest.map_structure(lambda a: a[begin:begin + num_steps],
                                   stacked)
      return strategy.distribute_datasets_from_function(
          lambda ctx: tf.data.Dataset.from_tensor_slices(part))

    session.train_window = window
  callbacks = [] if sigterm_at is None else [
      preemption.SigtermAt(sigterm_at)]
  stopped = False
  try:
    train_lib.train(session, train_lib.ScalarWriter(model_dir, enabled=False),
                    evaluate_each_loop=evaluate, verbose=0,
                    callbacks=callbacks,
                    say=lambda *a, **k: None)
  except train_lib.Preempted:
    stopped = True
  if not stopped and session.step != plan.total_steps:
    raise AssertionError(f"run ended at step {session.step}, not "
                         f"{plan.total_steps}")
  return (None if stopped else _final_state(session), recorder.numpy(),
          first, session.step)


def _max_abs(a, b) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b), initial=0.0))


def first_difference(reference, records):
  """The first (step, tensor) at which `records` differ from `reference`
  (bitwise), in step order and RECORDED order within a step; with the
  largest difference and the number of differing elements there. None if
  every recorded tensor is equal."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = [n for n in RECORDED if n in reference]
  steps = next(iter(reference.values())).shape[0]
  for step in range(steps):
    for name in names:
      a, b = reference[name][step], records[name][step]
      if not np.array_equal(a, b):
        return {"step": step, "tensor": name,
                "max_abs_difference": _max_abs(a, b),
                "elements_differing": int(np.sum(a != b)),
                "elements": int(a.size)}
  return None


SCENARIOS = ("repeat", "resume")


def _resumed_run(config, steps_per_execution, model_dir, batches, record,
                 evaluate):
  """A run stopped by SIGTERM at `rehearse.sigterm_step` and resumed from
  its checkpoint by a second run in the same model_dir (what `make
  rehearse`'s resume check does). Its records: the stopped run's steps
  before the resume, the resumed run's from there."""
  from official_conadv import rehearse  # pylint: disable=g-import-not-at-top
  _, plan = plan_with(config, steps_per_execution)
  stop = rehearse.sigterm_step(plan.loop_ends(0))
  state, rec1, _, saved = one_run(config, steps_per_execution, model_dir,
                                  batches=batches, record=record,
                                  sigterm_at=stop, evaluate=evaluate)
  if state is not None:
    raise AssertionError("SIGTERM did not stop the run")
  state, rec2, first, _ = one_run(config, steps_per_execution, model_dir,
                                  batches=batches, record=record,
                                  evaluate=evaluate)
  if first != saved:
    raise AssertionError(f"resumed at {first}, the checkpoint was {saved}")
  merged = {k: v.copy() for k, v in rec2.items()}
  for k, v in rec1.items():
    if k in merged:
      merged[k][:first] = v[:first]
  return state, merged, first


def run_configuration(config, steps_per_execution, runs, work_dir, tag,
                      batches=None, record=True, scenario="repeat",
                      evaluate=True, compare_steps_per_execution=0,
                      log=print):
  """`runs` runs of `config`: run 0 straight through, the others the same
  ("repeat") or stopped by SIGTERM and resumed ("resume"); how many end
  different from run 0, and where they first differ. In the repeat
  scenario with `compare_steps_per_execution` (> 0), one more run with that
  many steps per call is compared with run 0 the same way
  ("other_steps_per_execution")."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if scenario not in SCENARIOS:
    raise ValueError(f"scenario must be one of {SCENARIOS}, got "
                     f"{scenario!r}.")
  states, records, seconds, resumed_at = [], [], [], []
  for i in range(runs):
    t0 = time.perf_counter()
    model_dir = os.path.join(work_dir, "runs", tag, str(i))
    if i and scenario == "resume":
      state, rec, first = _resumed_run(config, steps_per_execution,
                                       model_dir, batches, record, evaluate)
      resumed_at.append(first)
    else:
      state, rec, _, _ = one_run(config, steps_per_execution, model_dir,
                                 batches=batches, record=record,
                                 evaluate=evaluate)
    seconds.append(time.perf_counter() - t0)
    states.append(state)
    records.append(rec)
  ref = states[0]
  per_run = []
  for i in range(1, runs):
    diff = max(_max_abs(ref[k], states[i][k]) for k in ref)
    equal = all(np.array_equal(ref[k], states[i][k]) for k in ref)
    entry = {"run": i, "equal": equal, "max_abs_difference": diff}
    if scenario == "resume":
      entry["resumed_at"] = resumed_at[i - 1]
    if record:
      entry["first_difference"] = first_difference(records[0], records[i])
      if not equal and entry["first_difference"] is None:
        entry["first_difference"] = {"step": None,
                                     "tensor": "after the last step"}
    per_run.append(entry)
  other = None
  if scenario == "repeat" and compare_steps_per_execution > 0:
    state, rec, _, _ = one_run(
        config, compare_steps_per_execution,
        os.path.join(work_dir, "runs", tag, "other"), batches=batches,
        record=record, evaluate=evaluate)
    other = {"steps_per_execution": compare_steps_per_execution,
             "equal": all(np.array_equal(ref[k], state[k]) for k in ref),
             "max_abs_difference": max(_max_abs(ref[k], state[k])
                                       for k in ref)}
    if record:
      other["first_difference"] = first_difference(records[0], rec)
  differing = [e for e in per_run if not e["equal"]]
  result = {"tag": tag, "scenario": scenario, "runs": runs,
            "steps_per_execution": steps_per_execution,
            "differing_runs": len(differing),
            "max_abs_difference": max([e["max_abs_difference"]
                                       for e in per_run], default=0.0),
            "seconds_per_run": round(sum(seconds) / len(seconds), 1),
            "per_run": per_run, "other_steps_per_execution": other}
  if record and batches is None:
    # Did the pipeline give every run the same batches? (recorded inputs)
    result["runs_with_other_inputs"] = sum(
        any(not np.array_equal(records[0][n], r[n])
            for n in INPUTS if n in r) for r in records[1:])
  log(json.dumps({k: v for k, v in result.items() if k != "per_run"}),
      flush=True)
  return result


def machine():
  """The CPU (model, cores, the vector extensions that pick TF's kernels),
  whether TF's oneDNN kernels are on, and the versions."""
  import platform  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  model, extensions = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model in ("", "x86_64"):
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
          flags_ = set(line.split(":", 1)[1].split())
          extensions = sorted(e for e in flags_ if e.startswith(
              ("avx512", "amx")) or e in ("avx2", "fma", "avx_vnni"))
          break
  except OSError:
    pass
  return {"cpu": model, "cpus": os.cpu_count(), "extensions": extensions,
          "onednn": bool(_pywrap_util_port.IsMklEnabled()),
          "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
          "tensorflow": tf.__version__, "keras": keras.__version__,
          "load_average": os.getloadavg()}


def run(row="imagenet_resnet50_conadv_aa_1k", runs=4, steps_per_execution=2,
        precisions=("float32", "row"), feeds=("pipeline", "materialized"),
        scenarios=("repeat", "resume"), record=True, evaluate=True,
        compare_steps_per_execution=1, output=None,
        work_dir=None, log=print):
  """Every (precision, feed, scenario) configuration; returns (and writes)
  the results."""
  own_dir = work_dir is None
  work_dir = work_dir or tempfile.mkdtemp(prefix="reproducibility_")
  started = time.perf_counter()
  results = {"row": row, "runs": runs, "evaluate": evaluate,
             "steps_per_execution": steps_per_execution,
             "machine": machine(),
             "date": time.strftime("%Y-%m-%d"), "pipeline": None,
             "configurations": []}
  try:
    for precision in precisions:
      config = toy_row_config(row, work_dir, precision)
      data, plan = plan_with(config, steps_per_execution)
      batches = None
      if results["pipeline"] is None or "materialized" in feeds:
        check, batches = check_pipeline(config, plan, data)
        if results["pipeline"] is None:
          results["pipeline"] = check
          log(json.dumps({"pipeline": check}), flush=True)
      for scenario in scenarios:
        for feed in feeds:
          tag = f"{precision}/{feed}/{scenario}/k{steps_per_execution}"
          result = run_configuration(
              config, steps_per_execution, runs, work_dir, tag,
              batches=batches if feed == "materialized" else None,
              record=record, scenario=scenario, evaluate=evaluate,
              compare_steps_per_execution=compare_steps_per_execution,
              log=log)
          result.update(
              precision=config.runtime.mixed_precision or "float32",
              feed=feed, total_steps=plan.total_steps,
              steps_per_loop=plan.steps_per_loop)
          results["configurations"].append(result)
  finally:
    if own_dir:
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(work_dir, ignore_errors=True)
  results["wall_seconds"] = round(time.perf_counter() - started, 1)
  from benchmarks import results as results_io  # pylint: disable=g-import-not-at-top
  results_io.write_json(results, output, indent=1)
  return results


def print_table(results):
  print(f"{results['row']}: {results['runs']} runs per configuration, "
        f"{results['steps_per_execution']} steps per call")
  p = results["pipeline"]
  print(f"pipeline alone: {p['batches']} batches made twice and loop by "
        f"loop: {'bitwise equal' if p['bitwise_equal'] else 'DIFFERENT'}")
  print(f"{'precision':>15} {'feed':>12} {'scenario':>8} {'steps':>5} "
        f"{'differ':>7} {'max diff':>9} {'vs k':>11}  first differences "
        "(run: step/tensor)")
  for c in results["configurations"]:
    firsts = "; ".join(
        f"{e['run']}: {e['first_difference']['step']}/"
        f"{e['first_difference']['tensor']}"
        for e in c["per_run"] if e.get("first_difference")) or "-"
    other = c.get("other_steps_per_execution")
    versus = "-" if not other else (
        f"k={other['steps_per_execution']}: " +
        ("equal" if other["equal"] else f"{other['max_abs_difference']:.3g}"))
    print(f"{c['precision']:>15} {c['feed']:>12} {c['scenario']:>8} "
          f"{c['total_steps']:>5} "
          f"{c['differing_runs']:>3}/{c['runs'] - 1:<3} "
          f"{c['max_abs_difference']:>9.3g} {versus:>11}  {firsts}")


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel("WARNING")
  if FLAGS.runs < 2:
    print("error: --runs must be at least 2", file=sys.stderr)
    sys.exit(2)
  results = run(row=FLAGS.row, runs=FLAGS.runs,
                steps_per_execution=FLAGS.steps_per_execution,
                precisions=FLAGS.precisions, feeds=FLAGS.feeds,
                scenarios=FLAGS.scenarios, record=FLAGS.record,
                evaluate=FLAGS.evaluate,
                compare_steps_per_execution=FLAGS.compare_steps_per_execution,
                output=FLAGS.output,
                work_dir=FLAGS.work_dir)
  print_table(results)


if __name__ == "__main__":
  define_flags()
  app.run(main)
