"""Tests for keras_mwms_fix: the guard, the patch in-process, 2 real workers.

This file is also the worker script: `run_workers(__file__, ["--mode", ...])`
runs `_worker_main` in two processes with TF_CONFIG on 127.0.0.1.
"""

import argparse
import os
import sys
import warnings

if __name__ == "__main__":  # Worker process: quiet, CPU only, one device.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ["CUDA_VISIBLE_DEVICES"] = ""

import keras  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

# conftest.py splits the CPU into two logical devices for Mirrored tests.

from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
from official_conadv import keras_mwms_fix  # pylint: disable=g-import-not-at-top
from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top

GLOBAL_BATCH = 16
NUM_EXAMPLES = 64  # 4 steps per epoch.
EPOCHS = 2
WORKER_TIMEOUT_S = 90


# ----------------------------------------------------------- shared problem
def _data():
  rng = np.random.RandomState(0)
  x = rng.uniform(-1.0, 1.0, size=(NUM_EXAMPLES, 4)).astype("float32")
  y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32") + 0.25 +
       0.1 * rng.normal(size=(NUM_EXAMPLES, 1)).astype("float32"))
  return x, y


def _build_model():
  """Dense -> synchronized BN -> ReLU -> Dense, compiled, fixed init.

  Synchronized BN computes batch statistics over the global batch, so two
  workers with half a batch each match one process with the whole batch.
  """
  model = keras.Sequential([
      keras.Input((4,)),
      keras.layers.Dense(8),
      keras.layers.BatchNormalization(synchronized=True),
      keras.layers.ReLU(),
      keras.layers.Dense(1),
  ])
  rng = np.random.RandomState(1)
  model.set_weights([
      rng.normal(scale=0.5, size=w.shape).astype("float32")
      if w.ndim == 2 else w.numpy() for w in model.weights])
  model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss="mse", metrics=["mae"])
  return model


def _sharded_dataset(strategy):
  """Worker i of n gets examples i, i+n, ...: step t's global batch is
  examples [16t, 16t+16), as in the one-process run."""
  x, y = _data()

  def dataset_fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds.batch(ctx.get_per_replica_batch_size(GLOBAL_BATCH),
                    drop_remainder=True)

  return strategy.distribute_datasets_from_function(dataset_fn)


def _summary(model, history, eval_logs, predictions):
  return {
      "weights": [w.tolist() for w in model.get_weights()],
      "loss": history["loss"],
      "val_loss": history["val_loss"],
      "eval": eval_logs,
      "predict": np.asarray(predictions).ravel().tolist(),
  }


def _reference():
  """One process, default strategy, whole global batch."""
  x, y = _data()
  model = _build_model()
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
  history = model.fit(ds, epochs=EPOCHS, verbose=0, shuffle=False,
                      validation_data=ds).history
  eval_logs = model.evaluate(ds, verbose=0, return_dict=True)
  predictions = model.predict(x, batch_size=GLOBAL_BATCH, verbose=0)
  return _summary(model, history, eval_logs, predictions)


# ------------------------------------------------------------ worker process
def _worker_main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=["patched", "unpatched"],
                      required=True)
  args = parser.parse_args(argv)
  strategy = distribute_utils.get_strategy(
      "multi_worker_mirrored", patch_keras_fit=args.mode == "patched")
  info = {"applied": keras_mwms_fix.is_applied(),
          "is_multi_worker": keras_mwms_fix.is_multi_worker(strategy),
          "replicas": strategy.num_replicas_in_sync,
          "task_index": distribute_utils.task_index(),
          "is_chief": distribute_utils.is_chief()}
  with strategy.scope():
    model = _build_model()
  if args.mode == "unpatched":
    # A plain Keras model: a ConAdvModel would apply the fix by itself.
    info["model_class"] = type(model).__name__
    try:
      model.fit(_sharded_dataset(strategy), epochs=1, verbose=0)
      info["error"] = None
    except Exception as e:  # pylint: disable=broad-except
      info["error"] = f"{type(e).__name__}: {e}"[:2000]
    info["applied_after_fit"] = keras_mwms_fix.is_applied()
    multi_worker.emit_result(info)
    return
  history = model.fit(_sharded_dataset(strategy), epochs=EPOCHS, verbose=0,
                      validation_data=_sharded_dataset(strategy))
  eval_logs = model.evaluate(_sharded_dataset(strategy), verbose=0,
                             return_dict=True)
  x, _ = _data()
  predictions = model.predict(x, batch_size=GLOBAL_BATCH, verbose=0)
  info.update(_summary(model, history.history, eval_logs, predictions))
  multi_worker.emit_result(info)


# --------------------------------------------------------------------- tests
def test_upstream_source_is_what_the_patch_expects():
  """Fails when Keras' trainer changes: re-check the bug, update or drop."""
  assert keras_mwms_fix.check_upstream() == []
  verified = keras_mwms_fix.VERIFIED_SOURCE_SHA256.get(keras.__version__)
  assert verified is not None, (
      f"keras_mwms_fix was not verified on Keras {keras.__version__}: run "
      "test_unpatched_two_worker_fit_still_fails; if it fails upstream fixed "
      "keras-team/keras#20585, else add this version's source_sha256().")
  assert keras_mwms_fix.source_sha256() == verified


def test_unpatched_two_worker_fit_still_fails():
  """If this fails, upstream fixed fit under MWMS: drop keras_mwms_fix."""
  results = multi_worker.run_workers(__file__, ["--mode", "unpatched"],
                                     num_workers=2, timeout=WORKER_TIMEOUT_S)
  for r in results:
    info = r.result
    assert info is not None, r.stderr[-3000:]
    # Keras itself, untouched: a plain Sequential, never patched.
    assert info["model_class"] == "Sequential"
    assert not info["applied"]
    assert not info["applied_after_fit"]
    assert info["is_multi_worker"] is True
    assert info["replicas"] == 2
    assert info["error"] is not None, (
        "Keras fit under 2-worker MWMS now works without keras_mwms_fix: "
        "keras-team/keras#20585 looks fixed upstream; drop the patch.")
    assert "PerReplica" in info["error"], info["error"]


def test_two_worker_fit_matches_one_process():
  results = multi_worker.run_workers(__file__, ["--mode", "patched"],
                                     num_workers=2, timeout=WORKER_TIMEOUT_S)
  infos = [r.result for r in results]
  assert all(i is not None for i in infos), [r.stdout for r in results]
  assert [i["applied"] for i in infos] == [True, True]
  assert [i["is_multi_worker"] for i in infos] == [True, True]
  assert [i["replicas"] for i in infos] == [2, 2]
  assert [i["task_index"] for i in infos] == [0, 1]
  assert [i["is_chief"] for i in infos] == [True, False]

  # Both workers hold identical weights (mirrored variables).
  for a, b in zip(infos[0]["weights"], infos[1]["weights"]):
    np.testing.assert_array_equal(np.array(a), np.array(b))

  want = _reference()
  assert len(infos[0]["weights"]) == len(want["weights"]) == 8
  for got, ref in zip(infos[0]["weights"], want["weights"]):
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5)
  # Training really moved the weights.
  assert np.abs(np.array(want["weights"][0]) -
                _build_model().get_weights()[0]).max() > 1e-2
  for info in infos:
    for key in ("loss", "val_loss"):
      np.testing.assert_allclose(info[key], want[key], rtol=1e-5)
    for key in ("loss", "mae"):
      np.testing.assert_allclose(info["eval"][key], want["eval"][key],
                                 rtol=1e-5)
    np.testing.assert_allclose(info["predict"], want["predict"], atol=1e-5)


@pytest.fixture
def restore_patch_state():
  was_applied = keras_mwms_fix.is_applied()
  yield
  if was_applied:
    keras_mwms_fix.apply()
  else:
    keras_mwms_fix.revert()


def test_apply_is_idempotent_and_revertible(restore_patch_state):
  del restore_patch_state
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top
  keras_mwms_fix.revert()
  original_build = trainer.TensorFlowTrainer._maybe_symbolic_build  # pylint: disable=protected-access
  original_reduce = trainer.reduce_per_replica
  assert not keras_mwms_fix.is_applied()
  assert keras_mwms_fix.apply() is True
  assert keras_mwms_fix.is_applied()
  patched_reduce = trainer.reduce_per_replica
  assert patched_reduce is not original_reduce
  assert patched_reduce.__wrapped__ is original_reduce
  assert keras_mwms_fix.apply() is True  # Second call changes nothing.
  assert trainer.reduce_per_replica is patched_reduce
  # The fingerprints are read through the patch, from the upstream source.
  assert keras_mwms_fix.check_upstream() == []
  keras_mwms_fix.revert()
  assert not keras_mwms_fix.is_applied()
  assert trainer.reduce_per_replica is original_reduce
  assert trainer.TensorFlowTrainer._maybe_symbolic_build is original_build  # pylint: disable=protected-access


def _single_worker_mwms(monkeypatch):
  """`tf.distribute.MultiWorkerMirroredStrategy()` without TF_CONFIG: one
  local worker. Made in this process: cheap, no server starts and no
  collective runs (TF may warn that collective ops were not configured at
  startup)."""
  monkeypatch.delenv("TF_CONFIG", raising=False)
  return tf.distribute.MultiWorkerMirroredStrategy()


def test_is_multi_worker_false_off_multi_worker(monkeypatch):
  """Only an MWMS with more than one worker counts (the 2-process True
  cases: test_two_worker_fit_matches_one_process and multi_worker_test)."""
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top
  single = _single_worker_mwms(monkeypatch)
  assert single.num_replicas_in_sync >= 1
  strategies = {
      "default": tf.distribute.get_strategy(),
      "one_device": tf.distribute.OneDeviceStrategy("/cpu:0"),
      "mirrored": distribute_utils.get_strategy("mirrored", num_gpus=0),
      "single_worker_mwms": single,
  }
  for name, strategy in strategies.items():
    assert keras_mwms_fix.is_multi_worker(strategy) is False, name
    # The same call Keras' trainer uses to pick its multi-worker branches.
    assert not trainer._collective_all_reduce_multi_worker(strategy), name  # pylint: disable=protected-access
  assert keras_mwms_fix.is_multi_worker(None) is False
  # The single-worker MWMS is an MWMS: only its worker count decides.
  assert isinstance(single, tf.distribute.MultiWorkerMirroredStrategy)
  monkeypatch.setattr(single.extended, "_num_workers", 2)
  assert keras_mwms_fix.is_multi_worker(single) is True


def test_apply_for_patches_only_for_multi_worker(monkeypatch,
                                                 restore_patch_state):
  del restore_patch_state
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top
  keras_mwms_fix.revert()
  original_reduce = trainer.reduce_per_replica
  single = _single_worker_mwms(monkeypatch)
  others = [tf.distribute.get_strategy(),
            tf.distribute.OneDeviceStrategy("/cpu:0"),
            distribute_utils.get_strategy("mirrored", num_gpus=0), single]
  for strategy in others:
    assert keras_mwms_fix.apply_for(strategy) is False
    assert not keras_mwms_fix.is_applied()
    assert trainer.reduce_per_replica is original_reduce
  # The same object in multi-worker mode (as with TF_CONFIG of 2 workers).
  monkeypatch.setattr(single.extended, "_num_workers", 2)
  assert keras_mwms_fix.apply_for(single) is True
  assert keras_mwms_fix.is_applied()
  patched_reduce = trainer.reduce_per_replica
  assert patched_reduce.__wrapped__ is original_reduce
  # Once applied it stays: other strategies report it and change nothing.
  for strategy in others[:3]:
    assert keras_mwms_fix.apply_for(strategy) is True
    assert trainer.reduce_per_replica is patched_reduce
  keras_mwms_fix.revert()
  assert not keras_mwms_fix.is_applied()
  assert trainer.reduce_per_replica is original_reduce


def test_conadv_model_does_not_patch_off_multi_worker(restore_patch_state):
  """ConAdvModel calls apply_for on every fit/evaluate; on the default
  strategy that leaves Keras unpatched."""
  del restore_patch_state
  from official_conadv.testing import conadv_worker as problem  # pylint: disable=g-import-not-at-top
  keras_mwms_fix.revert()
  model = problem.build_model()
  x, y = problem.data()
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
      problem.GLOBAL_BATCH).take(1)
  model.fit(ds, epochs=1, verbose=0, shuffle=False)
  model.evaluate(ds, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 1
  assert not keras_mwms_fix.is_applied()


@pytest.mark.parametrize("version", ["2.15.0", "3.16.0", "4.0.1"])
def test_guard_refuses_unknown_keras_version(monkeypatch, restore_patch_state,
                                             version):
  del restore_patch_state
  keras_mwms_fix.revert()
  monkeypatch.setattr(keras, "__version__", version)
  with pytest.warns(RuntimeWarning, match="outside the range"):
    assert keras_mwms_fix.apply() is False
  assert not keras_mwms_fix.is_applied()
  with pytest.raises(RuntimeError, match="keras-team/keras#20585"):
    keras_mwms_fix.apply(strict=True)
  assert not keras_mwms_fix.is_applied()


def test_guard_refuses_changed_upstream_source(monkeypatch,
                                               restore_patch_state):
  del restore_patch_state
  keras_mwms_fix.revert()
  monkeypatch.setitem(keras_mwms_fix._FINGERPRINTS, "reduce_per_replica",  # pylint: disable=protected-access
                      'returnstrategy.reduce("MEAN",v,axis=None)')
  with pytest.warns(RuntimeWarning, match="reduce_per_replica no longer"):
    assert keras_mwms_fix.apply() is False
  assert not keras_mwms_fix.is_applied()


def _mirrored_fit(strategy):
  with strategy.scope():
    model = _build_model()
  x, y = _data()
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
  history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
  logs = model.evaluate(ds, verbose=0, return_dict=True)
  return model.get_weights(), history.history["loss"], logs


def test_patched_code_paths_in_process(monkeypatch, restore_patch_state):
  """Mirrored over 2 logical CPUs, with Keras told it is multi-worker.

  With `_collective_all_reduce_multi_worker` forced True, upstream Keras
  takes its multi-worker branches (MEAN of the batch, axis=0 on scalars) in
  this process; the patched functions then see real 2-replica `PerReplica`
  values, which one CPU per worker never gives the 2-process test.
  """
  del restore_patch_state
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top
  strategy = distribute_utils.get_strategy("mirrored", num_gpus=0)
  assert strategy.num_replicas_in_sync == 2
  keras_mwms_fix.revert()
  want_weights, want_loss, want_logs = _mirrored_fit(strategy)

  monkeypatch.setattr(trainer, "_collective_all_reduce_multi_worker",
                      lambda s: True)
  with pytest.raises(Exception, match="dimension|PerReplica|rank"):
    _mirrored_fit(strategy)  # Upstream's multi-worker branches fail.
  keras_mwms_fix.apply(strict=True)
  got_weights, got_loss, got_logs = _mirrored_fit(strategy)
  for got, want in zip(got_weights, want_weights):
    np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for key in want_logs:
    np.testing.assert_allclose(got_logs[key], want_logs[key], rtol=1e-6)


def test_patch_is_transparent_off_multi_worker(restore_patch_state):
  """Applied, the fix leaves default and Mirrored training unchanged."""
  del restore_patch_state
  keras_mwms_fix.revert()
  strategies = [tf.distribute.get_strategy(),
                distribute_utils.get_strategy("mirrored", num_gpus=0)]
  want = [_mirrored_fit(s) for s in strategies]
  keras_mwms_fix.apply(strict=True)
  got = [_mirrored_fit(s) for s in strategies]
  for (gw, gl, glogs), (ww, wl, wlogs) in zip(got, want):
    for a, b in zip(gw, ww):
      np.testing.assert_array_equal(a, b)
    assert gl == wl
    assert glogs == wlogs


if __name__ == "__main__":
  warnings.simplefilter("ignore")
  _worker_main(sys.argv[1:])
  multi_worker.exit_together()  # No 2 s teardown; result out.
