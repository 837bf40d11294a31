r"""Writes testdata/compat/: checkpoints of today's code that later code must
keep restoring and continuing exactly (`official_conadv/compat_test.py`).

  cd <a checkout of the commit to pin> && PYTHONPATH=. python \
      testdata/make_compat_fixtures.py --out testdata/compat

Run it with the code whose checkpoints are to be pinned (a `git worktree` of
that commit), never with a half-edited tree. Fixtures, for each schedule in
("delayed", "lookahead"), tau = 2:

* `model_<schedule>_step3.{index,data-00000-of-00001}`: `tf.train.Checkpoint(
  model=model, optimizer=model.optimizer).write(...)` of a tiny ConAdvModel
  (`build_model`: SmallCNN filters (2, 4), 8x8x3 images, 4 classes, LARS)
  after `fit(dataset(), epochs=1)`, 3 steps on `data()`.
  `model_<schedule>.npz`: `model.weights` and `model.optimizer.variables`
  (by index) at step 3 (right after the first fit) and at step 6, after the
  continuation a user writes: a second `fit(dataset(), epochs=1)`, i.e. the
  next epoch of the same dataset. (The lookahead schedule's second fit trains
  first on the tau batches its queue took from "the next pass over x" at the
  end of the first fit, so only the same dataset again continues it the way
  the delayed schedule continues; ConAdvModel's docstring.)
* `cli_<schedule>/`: `config.json` and `checkpoints/` of
  `train_lib.run(cli_config(schedule), ...)`, a 6-step run in loops of 3
  that got SIGTERM in its first loop: it saved step 3 and stopped (what a
  preempted run leaves). `cli_<schedule>.npz`: the weights and optimizer
  variables at step 6 of the same run uninterrupted. (`train.train_steps` is
  a `configs.SCHEDULE_FIELDS` field: a 3-step run cannot be resumed as a
  6-step one without `allow_config_change`, and its LR schedule would differ.)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

SCHEDULES = ("delayed", "lookahead")
TAU = 2
SHAPE = (8, 8, 3)
NUM_CLASSES = 4
BATCH = 4
STEPS = 3  # Steps per fit (batches in `dataset()`); the fixtures stop at 3.
SEED = 0
DATA_SEED = 1234


def data():
  """(x float32 [12, 8, 8, 3] in [0, 1], y int32 [12]): numpy's legacy
  RandomState, whose stream is frozen."""
  rng = np.random.RandomState(DATA_SEED)
  x = rng.uniform(0.0, 1.0, (STEPS * BATCH,) + SHAPE).astype(np.float32)
  y = rng.randint(0, NUM_CLASSES, STEPS * BATCH).astype(np.int32)
  return x, y


def dataset():
  """`data()` in 3 batches of 4 (deterministic, no shuffling)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.Dataset.from_tensor_slices(data()).batch(
      BATCH, drop_remainder=True)


def adversary(schedule):
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  return conadv_model.AdversaryConfig(epsilon=0.1, step_size=0.05, steps=1,
                                      random_init=True, delay=TAU, seed=3,
                                      schedule=schedule)


def build_model(schedule):
  """The fixture's ConAdvModel, compiled, built (model and optimizer), on
  the default strategy."""
  import keras  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import small_cnn  # pylint: disable=g-import-not-at-top
  from official_conadv.optimization import lars  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(SEED)
  backbone = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(2, 4))
  model = conadv_model.ConAdvModel(backbone, adversary=adversary(schedule))
  model.compile(
      optimizer=lars.LARS(learning_rate=0.5, momentum=0.9,
                          weight_decay_rate=1e-3),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.build((None,) + SHAPE)
  model.optimizer.build(model.trainable_variables)
  return model


def cli_config(schedule, train_steps=6):
  """mnist_smoke shrunk: 8x8 digits, SmallCNN width 2, batch 8, 48 train
  examples (warmup 6 steps), loops of 3 steps, tau = 2."""
  import experiments  # pylint: disable=g-import-not-at-top
  from official_conadv import configs  # pylint: disable=g-import-not-at-top
  return configs.override(experiments.get("mnist_smoke"), ",".join([
      "model.width=2", "data.image_size=8", "data.num_train_examples=48",
      "data.num_eval_examples=8", "data.shuffle_buffer=48",
      "train.global_batch_size=8", "train.eval_batch_size=8",
      f"train.train_steps={train_steps}", "train.steps_per_loop=3",
      "train.steps_per_execution=1", "train.eval_steps=1",
      "train.keep_checkpoints=3", "runtime.mixed_precision=none",
      "adversary.delay=2", f"adversary.schedule={schedule}"]))


def state(model, prefix=""):
  """{prefix + "weights/i", prefix + "optimizer/i": array} of model.weights
  and model.optimizer.variables, by index, plus the step."""
  out = {f"{prefix}weights/{i}": v.numpy() for i, v in enumerate(
      model.weights)}
  out.update({f"{prefix}optimizer/{i}": v.numpy() for i, v in enumerate(
      model.optimizer.variables)})
  out[f"{prefix}iterations"] = np.asarray(
      int(model.optimizer.iterations.numpy()), np.int64)
  return out


def _save_npz(path, arrays, model):
  arrays = dict(arrays)
  arrays["paths/weights"] = np.asarray([v.path for v in model.weights])
  arrays["paths/optimizer"] = np.asarray(
      [v.path for v in model.optimizer.variables])
  np.savez_compressed(path, **arrays)


def write_model_fixture(out, schedule):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = build_model(schedule)
  model.fit(dataset(), epochs=1, verbose=0, shuffle=False)
  assert int(model.optimizer.iterations.numpy()) == STEPS
  arrays = state(model, "step3/")
  tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
      os.path.join(out, f"model_{schedule}_step3"))
  model.fit(dataset(), epochs=1, verbose=0, shuffle=False)
  assert int(model.optimizer.iterations.numpy()) == 2 * STEPS
  arrays.update(state(model, "step6/"))
  _save_npz(os.path.join(out, f"model_{schedule}.npz"), arrays, model)
  return [v.numpy() for v in model.backbone.weights]


def capture_model():
  """A Keras callback; after `train_lib.run(..., callbacks=[c])`, `c.model`
  is the trained ConAdvModel."""
  import keras  # pylint: disable=g-import-not-at-top
  return keras.callbacks.Callback()


def write_cli_fixture(out, schedule):
  from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
  from official_conadv.testing.preemption import SigtermAt  # pylint: disable=g-import-not-at-top
  config = cli_config(schedule)
  tmp = tempfile.mkdtemp()
  try:
    full = os.path.join(tmp, "full")
    capture = capture_model()
    summary = train_lib.run(config, full, mode="train", export=False,
                            verbose=0, callbacks=[capture])
    assert summary["step"] == 6, summary
    _save_npz(os.path.join(out, f"cli_{schedule}.npz"),
              state(capture.model), capture.model)
    stopped = os.path.join(tmp, "stopped")
    try:
      train_lib.run(config, stopped, mode="train", export=False, verbose=0,
                    callbacks=[SigtermAt(2)])
      raise AssertionError("the run was not stopped")
    except train_lib.Preempted as e:
      assert "step 3" in str(e), e
    dest = os.path.join(out, f"cli_{schedule}")
    os.makedirs(dest)
    shutil.copy(os.path.join(stopped, "config.json"), dest)
    shutil.copytree(os.path.join(stopped, "checkpoints"),
                    os.path.join(dest, "checkpoints"))
    names = sorted(os.listdir(os.path.join(dest, "checkpoints")))
    assert names == ["checkpoint", "ckpt-3.data-00000-of-00001",
                     "ckpt-3.index"], names
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _commit():
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        check=True, cwd=os.path.dirname(os.path.abspath(__file__))
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="output directory (emptied first)")
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    shutil.rmtree(args.out)
  os.makedirs(args.out)
  steps6 = {}
  for schedule in SCHEDULES:
    steps6[schedule] = write_model_fixture(args.out, schedule)
    write_cli_fixture(args.out, schedule)
  # Same data order => the same weights for both schedules (lookahead_test).
  for a, b in zip(steps6["delayed"], steps6["lookahead"], strict=True):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(args.out, "generated_by.json"), "w") as f:
    json.dump({"commit": _commit(),
               "command": "PYTHONPATH=. python testdata/"
                          "make_compat_fixtures.py --out testdata/compat"},
              f, indent=2, sort_keys=True)
    f.write("\n")
  total = sum(os.path.getsize(os.path.join(d, n))
              for d, _, names in os.walk(args.out) for n in names)
  print(f"Wrote {args.out}: {total} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
