"""One set of BN moving statistics across replicas (replica_statistics.py).

The problem (`testing/replica_statistics_worker.py`): per-replica BN, replica
0 trains on dimmed images, so the replicas' moving statistics drift apart.
Evaluation right after `fit`, after a checkpoint restore into a new model and
of the exported SavedModel must then give the same numbers: in process on
2-replica MirroredStrategy, and in 2 worker processes
(MultiWorkerMirroredStrategy). Without the averaging (patched out) the same
run gives different numbers (the test sees the problem it fixes), and the
averaging changes no trained weight.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_conadv.modeling import convert
from official_conadv.modeling import replica_statistics
from official_conadv.modeling import small_cnn
from official_conadv.testing import multi_worker
from official_conadv.testing import replica_statistics_worker as problem
from official_conadv.testing import strategies

WORKER = "official_conadv/testing/replica_statistics_worker.py"
# Loss and accuracy of one model's evaluations: float32 sums in another
# order (Keras' metrics vs numpy over the whole set).
ATOL = 2e-6


def _mirrored_run(tmp_path, sync=True, monkeypatch=None):
  """fit on Mirrored; the evaluations after fit, after restore, of the
  export; the copies of every moving statistic and the trained weights."""
  if not sync:
    monkeypatch.setattr(replica_statistics, "sync",
                        lambda model, strategy=None: 0)
  strategy = strategies.get("mirrored")
  with strategy.scope():
    model = problem.build_model()
  model.fit(problem.mirrored_train_dataset(), epochs=problem.EPOCHS,
            steps_per_epoch=problem.STEPS_PER_EPOCH, verbose=0)
  copies = problem.local_copies(model)
  weights = [v.numpy() for v in model.backbone.trainable_weights]
  after_fit = problem.evaluation(model)
  path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
  exported = problem.export_evaluation(model, str(tmp_path / "export"))
  with strategy.scope():
    restored = problem.build_model()
  tf.train.Checkpoint(model=restored).restore(path).assert_consumed()
  after_restore = problem.evaluation(restored)
  return {"after_fit": after_fit, "after_restore": after_restore,
          "export": exported, "copies": copies, "weights": weights}


def _assert_same_evaluation(got, want, what):
  assert got["examples"] == want["examples"] == problem.NUM_EVAL, what
  assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-7), what
  assert got["loss"] == pytest.approx(want["loss"], abs=ATOL), what


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
  with pytest.MonkeyPatch.context() as monkeypatch:
    unsynced = _mirrored_run(tmp_path_factory.mktemp("unsynced"), sync=False,
                             monkeypatch=monkeypatch)
  synced = _mirrored_run(tmp_path_factory.mktemp("synced"))
  return synced, unsynced


def test_mirrored_evaluation_equals_restore_and_export(mirrored_runs):
  synced, _ = mirrored_runs
  _assert_same_evaluation(synced["after_restore"], synced["after_fit"],
                          "restored vs after fit")
  _assert_same_evaluation(synced["export"], synced["after_fit"],
                          "export vs after fit")
  for path, copies in synced["copies"].items():
    assert copies.shape[0] == 2, path
    np.testing.assert_array_equal(copies[0], copies[1], err_msg=path)


def test_without_the_average_the_replicas_and_the_evaluations_differ(
    mirrored_runs):
  _, unsynced = mirrored_runs
  spread = max(float(np.max(np.abs(c[0] - c[1])))
               for c in unsynced["copies"].values())
  assert spread > 0.05
  # Evaluation after fit ran on 2 replicas with their own statistics; the
  # checkpoint and the export hold the first replica's.
  assert abs(unsynced["after_fit"]["loss"] -
             unsynced["after_restore"]["loss"]) > 1e-3
  _assert_same_evaluation(unsynced["export"], unsynced["after_restore"],
                          "unsynced export vs restore")


def test_the_average_is_the_mean_of_the_copies_and_training_is_unchanged(
    mirrored_runs):
  synced, unsynced = mirrored_runs
  for got, want in zip(synced["weights"], unsynced["weights"]):
    np.testing.assert_array_equal(got, want)
  assert set(synced["copies"]) == set(unsynced["copies"])
  # Averaged at the end of epoch 1 and of fit vs once here: the moving
  # average is linear, so they differ by float rounding only.
  for path, copies in unsynced["copies"].items():
    np.testing.assert_allclose(synced["copies"][path][0],
                               copies.mean(axis=0), rtol=1e-6, atol=1e-7,
                               err_msg=path)


def test_moving_statistics_lists_every_route_of_dual_and_converted_bn():
  backbone = small_cnn.SmallCNN(num_classes=3, filters=(4, 8),
                                augmented_bn=True)
  backbone(tf.zeros((1,) + problem.SHAPE))
  paths = sorted(v.path for v in
                 replica_statistics.moving_statistics(backbone))
  bn_layers = sorted({p.split("/")[-2] for p in paths
                      if p.split("/")[-2] not in ("adv", "aug")})
  assert bn_layers  # Every BN layer: main, adv and aug sets, mean and var.
  assert len(paths) == 6 * len(bn_layers)
  assert sum("/adv/" in p for p in paths) == 2 * len(bn_layers)
  assert sum("/aug/" in p for p in paths) == 2 * len(bn_layers)

  inputs = keras.Input(problem.SHAPE)
  h = keras.layers.Conv2D(4, 3)(inputs)
  h = keras.layers.BatchNormalization()(h)
  h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
  plain = keras.Model(inputs, keras.layers.Dense(3)(h))
  assert len(replica_statistics.moving_statistics(plain)) == 2
  converted = convert.dual_bn_backbone(plain)
  converted(tf.zeros((1,) + problem.SHAPE), bn_route="adv")
  stats = replica_statistics.moving_statistics(converted)
  assert len(stats) == 4
  assert sum("/adv/" in v.path for v in stats) == 2


def test_converted_backbone_statistics_are_averaged_on_mirrored():
  strategy = strategies.get("mirrored")
  with strategy.scope():
    inputs = keras.Input(problem.SHAPE)
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
    backbone = convert.dual_bn_backbone(
        keras.Model(inputs, keras.layers.Dense(problem.NUM_CLASSES)(h)))
    model = problem.conadv_model.ConAdvModel(backbone,
                                             adversary=problem.ADVERSARY)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(problem.mirrored_train_dataset(), epochs=1,
            steps_per_epoch=problem.STEPS_PER_EPOCH, verbose=0)
  copies = problem.local_copies(model)
  assert len(copies) == 4  # main and adv, mean and variance
  for path, value in copies.items():
    np.testing.assert_array_equal(value[0], value[1], err_msg=path)
  assert sum(":adv/" in p for p in copies) == 2, sorted(copies)


def test_sync_with_one_replica_does_nothing():
  model = problem.build_model()
  assert replica_statistics.sync(model) == 0
  assert model.sync_moving_statistics() == 0


def test_two_workers_evaluation_equals_restore_and_export(tmp_path):
  results = multi_worker.run_workers(
      WORKER, ["--out", str(tmp_path / "w{task_index}.npz"),
               "--ckpt_dir", str(tmp_path / "ckpt"),
               "--export_dir", str(tmp_path / "export")],
      num_workers=2, timeout=180)
  chief, worker = (r.result for r in results)
  for result in (chief, worker):
    _assert_same_evaluation(result["after_restore"], result["after_fit"],
                            f"worker {result['task_index']}: restore")
  _assert_same_evaluation(chief["export"], chief["after_fit"], "export")
  # evaluate aggregates over both workers: the same logs on both.
  assert chief["after_fit"] == worker["after_fit"]
  with np.load(tmp_path / "w0.npz") as w0, np.load(tmp_path / "w1.npz") as w1:
    assert sorted(w0.files) == sorted(w1.files) and w0.files
    for path in w0.files:
      np.testing.assert_array_equal(w0[path], w1[path], err_msg=path)
  assert os.path.isdir(tmp_path / "export" / "export" / "saved_model")
