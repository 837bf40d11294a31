"""The lookahead schedule on 2 worker processes (MultiWorkerMirroredStrategy).

1. `official_conadv/testing/lookahead_worker.py` on 2 workers: for tau 1 and
   2, `model.fit` of 7 (>= 2 * tau + 3) global batches with PGD-2.
   * With random starts, lookahead equals delayed, every weight (BN
     statistics included) bit for bit, on both workers.
   * From the clean image (random starts are drawn per replica, which a
     one-replica loop cannot repeat), lookahead equals conadv_model_test's
     hand-written reference loop run here in one process on the whole global
     batches, within 1e-5.
2. The trainer (`testing/trainer_worker.py`, `adversary.schedule=lookahead`,
   tau 2) on 2 workers: SIGTERM reaches worker 0 only, after step 6; both
   workers stop at the same step inside a loop, with batches of the next
   steps still in their queues, and save (the chief to checkpoints/, the
   other worker to its scratch dir: each queue holds its own replica's
   half). A relaunch of the same command ends with exactly the
   checkpoints of an uninterrupted 2-worker run: every tensor, both
   workers' queues included. With worker 1's checkpoints then deleted, a
   relaunch is refused on both workers (they would restore different steps).
"""

import shutil

import numpy as np
import pytest
import tensorflow as tf

import experiments
from official_conadv import configs
from official_conadv import rehearse
from official_conadv import train_session
from official_conadv.data import input_pipeline
from official_conadv.modeling import replica_statistics
from official_conadv.modeling import conadv_model_test as cmt
from official_conadv.testing import lookahead_worker as problem
from official_conadv.testing import multi_worker

TIMEOUT_S = 240  # Per launch; the fit launch takes about 60 s here.
TAUS = (1, 2)


def _load(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files)]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
  """{(task, run name): final backbone weights} of the 2-worker launch."""
  root = tmp_path_factory.mktemp("mwms_lookahead")
  results = multi_worker.run_workers(
      "official_conadv/testing/lookahead_worker.py",
      ["--out", str(root / "{run}_worker{task_index}.npz"),
       "--taus", ",".join(map(str, TAUS))],
      num_workers=2, timeout=TIMEOUT_S)
  infos = [r.result for r in results]
  assert all(i is not None for i in infos), [r.stderr[-3000:]
                                            for r in results]
  assert [i["replicas"] for i in infos] == [2, 2]
  names = [problem.run_name(tau, s, r) for tau in TAUS
           for s, r in problem.RUNS]
  for info in infos:
    assert info["runs"] == {n: problem.NUM_STEPS for n in names}, info
  return {(task, name): _load(root / f"{name}_worker{task}.npz")
          for task in range(2) for name in names}


def _assert_equal(got, want, what):
  assert len(got) == len(want), what
  for i, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(a, b, err_msg=f"{what}: weight {i}")


@pytest.mark.parametrize("tau", TAUS)
def test_two_worker_lookahead_equals_delayed(fits, tau):
  delayed = problem.run_name(tau, "delayed", True)
  lookahead = problem.run_name(tau, "lookahead", True)
  for task in range(2):
    _assert_equal(fits[task, lookahead], fits[task, delayed],
                  f"worker {task}, tau {tau}")
  _assert_equal(fits[1, lookahead], fits[0, lookahead], "worker 1 vs 0")
  # Not trivially equal: the random start changes the weights.
  plain = fits[0, problem.run_name(tau, "lookahead", False)]
  assert max(float(np.abs(a - b).max())
             for a, b in zip(plain, fits[0, lookahead])) > 1e-5


@pytest.mark.parametrize("tau", TAUS)
def test_two_worker_lookahead_equals_the_reference_loop(fits, tau):
  x, y = problem.data()
  backbone = problem.backbone()
  initial = [v.numpy() for v in backbone.weights]
  cmt._reference_run(  # pylint: disable=protected-access
      backbone, problem.adversary(tau, "delayed", False), x, y,
      batch=problem.GLOBAL_BATCH)
  want = [v.numpy() for v in backbone.weights]
  assert max(float(np.abs(a - b).max())
             for a, b in zip(want, initial)) > 1e-2  # It trained.
  for task in range(2):
    got = fits[task, problem.run_name(tau, "lookahead", False)]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5,
                                 err_msg=f"worker {task}, weight {i}")


def _checkpoints(model_dir):
  """Every tensor of the chief's latest checkpoint and of worker 1's."""
  return (rehearse.checkpoint_tensors(model_dir),
          rehearse.checkpoint_tensors(f"{model_dir}/tmp_worker_checkpoints/1",
                                      subdir=""))


def _moving_statistic_keys(override):
  """Checkpoint keys of the BN moving statistics of trainer_worker's model
  (backbone weights are checkpointed by position)."""
  config = configs.override(experiments.get("mnist_smoke"), override)
  shape = input_pipeline.DataSource(config.data).image_shape
  backbone = train_session.build_backbone(config.model, shape)
  for route in ("main", "adv"):  # ConAdvModel.build's order
    backbone(tf.zeros((1,) + tuple(shape)), bn_route=route)
  return {f"model/backbone_weights.S{i}/.ATTRIBUTES/VARIABLE_VALUE"
          for i, v in enumerate(backbone.weights)
          if v.name in replica_statistics.MOVING_NAMES}


def test_trainer_sigterm_mid_queue_resumes_exactly(tmp_path):
  override = ("adversary.schedule=lookahead,adversary.delay=2,"
              "train.train_steps=9,train.steps_per_loop=4,"
              "train.steps_per_execution=1")
  script = "official_conadv/testing/trainer_worker.py"
  full = str(tmp_path / "full")
  done = multi_worker.run_workers(
      script, ["--model_dir", full, "--params_override", override],
      num_workers=2, timeout=TIMEOUT_S)
  assert [r.result for r in done] == [{"status": "done", "step": 9}] * 2

  resumed = str(tmp_path / "resumed")
  args = ["--model_dir", resumed, "--params_override", override]
  first = multi_worker.run_workers(script, args + ["--sigterm_at", "6"],
                                   num_workers=2, timeout=TIMEOUT_S)
  statuses = [r.result for r in first]
  assert [s["status"] for s in statuses] == ["preempted"] * 2, statuses
  step = statuses[0]["step"]
  assert statuses[1]["step"] == step and 6 < step < 8, statuses  # Mid-loop.
  assert rehearse.checkpoint_steps(resumed)[-1] == step
  second = multi_worker.run_workers(script, args, num_workers=2,
                                    timeout=TIMEOUT_S)
  assert [r.result for r in second] == [{"status": "done", "step": 9}] * 2

  want, got = _checkpoints(full), _checkpoints(resumed)
  moving = _moving_statistic_keys(override)
  assert moving
  for worker in range(2):
    assert set(got[worker]) == set(want[worker])
    assert moving <= set(want[worker])
    for k, value in want[worker].items():
      if k in moving:
        # The preempted run averaged the workers' BN moving statistics at
        # step 7 (ConAdvModel does at the end of every fit), the
        # uninterrupted one at step 8 only: the same mean (the moving
        # average is linear) up to float rounding (4.8e-7 measured).
        np.testing.assert_allclose(got[worker][k], value, rtol=1e-6,
                                   atol=1e-6, err_msg=f"worker {worker}: {k}")
      else:
        np.testing.assert_array_equal(got[worker][k], value,
                                      err_msg=f"worker {worker}: {k}")
  # Each worker saved its own replica's queue, and they hold other images.
  chief_queue = [k for k in want[0] if "lookahead_queue.S" in k]
  other_queue = [k for k in want[1] if "lookahead_queue.S" in k]
  assert len(chief_queue) == len(other_queue) == 6
  assert all(k.endswith("replica0/.ATTRIBUTES/VARIABLE_VALUE")
             for k in chief_queue)
  assert all(k.endswith("replica1/.ATTRIBUTES/VARIABLE_VALUE")
             for k in other_queue)
  x_chief = want[0][[k for k in chief_queue if ".S0.S" in k][0]]
  x_other = want[1][[k for k in other_queue if ".S0.S" in k][0]]
  assert x_chief.shape == x_other.shape and not np.array_equal(x_chief,
                                                               x_other)
  assert tf.train.latest_checkpoint(f"{full}/checkpoints").endswith("ckpt-9")

  # Worker 1's scratch checkpoints lost: it would start from step 0 with an
  # empty queue while the chief restores step 9. Both refuse in one line.
  shutil.rmtree(f"{resumed}/tmp_worker_checkpoints/1")
  lost = multi_worker.run_workers(script, args, num_workers=2,
                                  timeout=TIMEOUT_S, check=False)
  for r in lost:
    assert r.returncode != 0 and r.result is None, r.stdout[-2000:]
    assert "must resume from the same step" in r.stderr, r.stderr[-3000:]
  assert "restored step 0" in lost[1].stderr
  assert "restored step 9" in lost[0].stderr
