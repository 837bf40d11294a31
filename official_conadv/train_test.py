"""End-to-end tests of the training program (train.py + train_lib.py).

CLI runs of a few steps for the three modes on generated ImageNet TFRecords
(subprocesses, the real command line) and on tfds' mock ImageNet (in process,
since the mock patches tfds in this process); exact resume after an
interruption; the export reloaded in a process that cannot import
official_conadv; TensorBoard scalars; every bad-input case.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

import experiments
from official_conadv import configs
from official_conadv import train
from official_conadv import train_lib
from official_conadv.data import imagenet
from official_conadv.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A ResNet-50 ImageNet row shrunk to seconds: tiny dual-BN convnet, 32 px.
TINY = ("model.name=small_cnn,model.width=4,data.image_size=32,"
        "train.global_batch_size=4,train.eval_batch_size=4,train.train_steps=2,"
        "train.steps_per_loop=1,train.eval_steps=1,train.steps_per_execution=1,"
        "runtime.mixed_precision=none,data.shuffle_buffer=8,"
        "data.num_train_examples=16,data.num_eval_examples=8")
MODE_OVERRIDES = {
    "baseline": "adversary.enabled=false",
    "sequential": "adversary.delay=0",
    "conadv": "adversary.delay=1",
}


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("imagenet"))
  synthetic.write_imagenet_tfrecords(d, prefix="train", num_files=2,
                                     per_file=8, size=(40, 48), seed=0)
  synthetic.write_imagenet_tfrecords(d, prefix="validation", num_files=1,
                                     per_file=8, size=(40, 48), seed=1)
  return d


def _cli(args, timeout=240):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "official_conadv.train"] + args,
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _error_line(result):
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("mode", sorted(MODE_OVERRIDES))
def test_cli_runs_each_mode_on_tfrecords(mode, tfrecord_dir, tmp_path):
  model_dir = str(tmp_path / "run")
  result = _cli(["--experiment=imagenet_resnet50_conadv_4k",
                 f"--data_dir={tfrecord_dir}", f"--model_dir={model_dir}",
                 "--strategy=default", "--verbose=0",
                 f"--params_override={TINY},{MODE_OVERRIDES[mode]}"])
  assert result.returncode == 0, result.stderr[-3000:]
  final = [l for l in result.stdout.splitlines() if l.startswith("FINAL ")]
  assert len(final) == 1 and "step=2" in final[0]
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["step"] == 2
  assert ("adv_loss" in summary["train"]) == (mode != "baseline")
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
  saved = json.load(open(os.path.join(model_dir, "config.json")))
  assert saved["adversary"]["enabled"] == (mode != "baseline")
  assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))


def _tiny_config(extra=""):
  c = experiments.get("imagenet_resnet50_conadv_4k")
  return configs.override(c, TINY + ("," + extra if extra else ""))


@pytest.mark.parametrize("mode", sorted(MODE_OVERRIDES))
def test_runs_each_mode_on_tfds_mock_imagenet(mode, tmp_path):
  manual = tmp_path / "data"
  manual.mkdir()
  for tar in (imagenet.TRAIN_TAR, imagenet.VAL_TAR):
    (manual / tar).write_bytes(b"")
  config = _tiny_config(f"data.name=imagenet_tfds,data.data_dir={manual},"
                        f"{MODE_OVERRIDES[mode]}")
  with tfds.testing.mock_data(num_examples=16):
    summary = train_lib.run(config, str(tmp_path / "run"),
                            mode="train_and_eval", verbose=0, export=False)
  assert summary["step"] == 2
  assert np.isfinite(summary["train"]["loss"])
  assert ("adv_loss" in summary["train"]) == (mode != "baseline")


class _Preempt(keras.callbacks.Callback):
  """Simulates a preemption right after the checkpoint of loop `at`."""

  def __init__(self, at):
    super().__init__()
    self.at = at

  def on_epoch_end(self, epoch, logs=None):
    if epoch + 1 == self.at:
      raise KeyboardInterrupt("preempted")


def _checkpoint_values(model_dir):
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  return {k: reader.get_tensor(k)
          for k in reader.get_variable_to_shape_map()
          if "save_counter" not in k and "CHECKPOINTABLE" not in k}


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
  config = configs.override(
      experiments.get("mnist_smoke"),
      "train.train_steps=6,train.steps_per_loop=2,data.deterministic=true,"
      "adversary.delay=2")
  full = str(tmp_path / "full")
  train_lib.run(config, full, mode="train", verbose=0, export=False)
  resumed = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    train_lib.run(config, resumed, mode="train", verbose=0, export=False,
                  callbacks=[_Preempt(at=2)])
  assert _checkpoint_values(resumed)  # Step-4 checkpoint is there.
  summary = train_lib.run(config, resumed, mode="train", verbose=0,
                          export=False)
  assert summary["step"] == 6
  want, got = _checkpoint_values(full), _checkpoint_values(resumed)
  assert set(want) == set(got)
  stale = [k for k in want if "stale_buffer" in k]
  assert len(stale) >= 2  # The ring buffer is in the checkpoint.
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7,
                               err_msg=k)


_LOAD_SCRIPT = """
import sys, json
import numpy as np
try:
  import official_conadv
  sys.exit("official_conadv must not be importable here")
except ImportError:
  pass
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], loaded.serve(tf.constant(x)).numpy())
"""


def test_export_reloads_without_the_package_and_tensorboard(tmp_path):
  config = experiments.get("mnist_smoke")
  model_dir = str(tmp_path / "run")
  summary = train_lib.run(config, model_dir, mode="train_and_eval",
                          verbose=0, export=True)
  x = np.random.default_rng(0).uniform(0, 1, (5, 28, 28, 1)).astype("float32")
  np.save(tmp_path / "x.npy", x)
  script = tmp_path / "load.py"
  script.write_text(_LOAD_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, str(script), summary["export"]["saved_model"],
       str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  served = np.load(tmp_path / "y.npy")

  # The trained model (rebuilt and restored from its checkpoint) on the main
  # BN gives the same eval logits, and so does the .keras export.
  model = train_lib.build_model(config, (28, 28, 1), total_steps=6,
                                steps_per_epoch=1, jit_compile=False)
  ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
  ckpt.restore(tf.train.latest_checkpoint(
      os.path.join(model_dir, "checkpoints"))).assert_existing_objects_matched()
  want = model.backbone(x, training=False, bn_route="main").numpy()
  np.testing.assert_allclose(served, want, atol=1e-5)
  reloaded = keras.saving.load_model(summary["export"]["keras"])
  np.testing.assert_allclose(reloaded(x, training=False), want, atol=1e-5)
  assert not [w for w in reloaded.weights if "/adv/" in w.path]

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  tags = {}
  for sub in ("train", "eval"):
    acc = event_accumulator.EventAccumulator(
        os.path.join(model_dir, sub),
        size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    tags[sub] = set(acc.Tags()["tensors"])
  assert {"loss", "clean_loss", "adv_loss", "learning_rate",
          "images_per_second"} <= tags["train"]
  assert {"accuracy", "loss", "top5"} <= tags["eval"]


# ------------------------------------------------------------ bad input
def _main(argv, capsys):
  """Runs train.main in process with `argv`; returns (exit code, stderr)."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["train"] + argv)
  code = 0
  try:
    train.main([])
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err
  return code, [l for l in err.splitlines() if l.startswith("error: ")]


@pytest.mark.parametrize("argv,code,match", [
    (["--experiment=nope"], 2, "Unknown experiment 'nope'; valid names: "),
    (["--params_override=adversary.dealy=1"], 2,
     "Unknown config key 'adversary.dealy'"),
    (["--params_override=train.global_batch_size=big"], 2,
     "Bad value 'big' for train.global_batch_size"),
    (["--experiment=imagenet_resnet50_lars_1k", "--data_dir={missing}",
      "--strategy=default"], 2, "train-"),
    (["--experiment=imagenet_resnet50_lars_1k", "--data_dir={empty}",
      "--strategy=default"], 2, "train-"),
    (["--experiment=imagenet_resnet50_lars_1k", "--strategy=tpu",
      "--tpu=nonexistent-tpu"], 2, "nonexistent-tpu"),
    (["--strategy=mirrored", "--params_override=train.global_batch_size=3"],
     2, "3"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, code, match, tmp_path,
                                                  capsys):
  (tmp_path / "empty").mkdir()
  argv = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
          for a in argv]
  model_dir = tmp_path / "run"
  got, errors = _main(argv + [f"--model_dir={model_dir}"], capsys)
  assert got == code and len(errors) == 1, errors
  assert match in errors[0]
  assert not (model_dir / "checkpoints").exists()


def test_incompatible_model_dir_is_refused(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  train_lib.run(experiments.get("mnist_smoke"), model_dir, verbose=0,
                export=False)
  before = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
  code, errors = _main(["--experiment=mnist_smoke", f"--model_dir={model_dir}",
                        "--params_override=adversary.delay=3"], capsys)
  assert code == 2 and "incompatible config" in errors[0]
  assert "adversary.delay: 1 in model_dir vs 3 now" in errors[0]
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == before


def test_corrupt_record_fails_with_location_or_is_skipped(tmp_path, capsys):
  data = str(tmp_path / "data")
  synthetic.write_imagenet_tfrecords(data, prefix="train", num_files=1,
                                     per_file=16, size=(40, 48),
                                     corrupt=[(0, 3)])
  synthetic.write_imagenet_tfrecords(data, prefix="validation", num_files=1,
                                     per_file=8, size=(40, 48))
  base = ["--experiment=imagenet_resnet50_lars_1k", f"--data_dir={data}",
          "--strategy=default", "--verbose=0", "--export=false"]
  tiny = TINY.replace("train.train_steps=2", "train.train_steps=4")
  code, errors = _main(base + [f"--model_dir={tmp_path / 'fail'}",
                               f"--params_override={tiny},"
                               "data.deterministic=true"], capsys)
  assert code == 1, (code, errors)
  assert "train-00000-of-00001" in errors[0] and "record index 3" in errors[0]
  code, errors = _main(base + [f"--model_dir={tmp_path / 'skip'}",
                               f"--params_override={tiny},"
                               "data.skip_corrupt=true"], capsys)
  assert code == 0, errors
  summary = json.load(open(tmp_path / "skip" / "summary.json"))
  # Counted once per pass over the file, read-ahead included.
  assert summary["corrupt_records_skipped"] >= 1
  assert {tuple(l)[1] for l in summary["corrupt_record_locations"]} == {3}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                   capsys):
  # Warmup from 0: step 0 is harmless, the huge rate of step 1 blows up.
  model_dir = tmp_path / "run"
  code, errors = _main([
      "--experiment=mnist_smoke", f"--model_dir={model_dir}", "--verbose=0",
      "--params_override=optimizer.name=sgd,optimizer.learning_rate=1e30,"
      "optimizer.warmup_epochs=1000,train.steps_per_loop=1"], capsys)
  assert code == 1 and "Non-finite loss at step" in errors[0], errors
  ckpts = tf.train.get_checkpoint_state(str(model_dir / "checkpoints"))
  assert ckpts is not None
  last = int(ckpts.model_checkpoint_path.rsplit("-", 1)[-1])
  bad = int(errors[0].split("Non-finite loss at step ")[1].split(";")[0])
  assert last < bad
  values = _checkpoint_values(str(model_dir))
  assert all(np.isfinite(v).all() for v in values.values()
             if np.issubdtype(np.asarray(v).dtype, np.floating))


def test_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  train_lib.run(experiments.get("mnist_smoke"), model_dir, verbose=0,
                export=False)
  os.remove(os.path.join(model_dir, "config.json"))  # Hide the config check.
  code, errors = _main(["--experiment=mnist_smoke", f"--model_dir={model_dir}",
                        "--mode=eval", "--params_override=model.width=6"],
                       capsys)
  assert code == 2 and "does not match this model" in errors[0], errors
