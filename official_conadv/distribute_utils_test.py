"""Tests for distribute_utils and the multi-worker test helper.

This file is also a worker script: `run_workers(__file__, ...)` runs
`_worker_main`, which builds "multi_worker_mirrored" from TF_CONFIG.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

if __name__ == "__main__":  # Worker process: quiet, CPU only.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

# conftest.py splits the CPU into two logical devices for Mirrored tests.

from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tf_config(cluster, task):
  return json.dumps({"cluster": cluster, "task": task})


_TWO_WORKERS = {"worker": ["127.0.0.1:1111", "127.0.0.1:2222"]}


# ------------------------------------------------------------------ strategies
def test_default_strategy():
  assert distribute_utils.get_strategy("default") is tf.distribute.get_strategy()
  mirrored = distribute_utils.get_strategy("mirrored")
  with mirrored.scope():
    assert distribute_utils.get_strategy("default") is mirrored
  assert distribute_utils.num_replicas(distribute_utils.get_strategy()) == 1


def test_one_device_strategy_uses_cpu0_without_gpu():
  strategy = distribute_utils.get_strategy("one_device")
  assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
  assert distribute_utils.num_replicas(strategy) == 1
  assert strategy.extended.worker_devices[0].endswith("CPU:0")


def test_mirrored_over_two_logical_cpus():
  strategy = distribute_utils.get_strategy("Mirrored")  # Case-insensitive.
  assert isinstance(strategy, tf.distribute.MirroredStrategy)
  assert distribute_utils.num_replicas(strategy) == 2
  assert [d.rsplit("/", 1)[-1] for d in strategy.extended.worker_devices] == [
      "device:CPU:0", "device:CPU:1"]
  ids = strategy.run(lambda: tf.cast(
      tf.distribute.get_replica_context().replica_id_in_sync_group,
      tf.float32))
  assert strategy.reduce("SUM", ids, axis=None).numpy() == 1.0
  # Explicit devices and num_gpus=0 (CPUs) behave the same way.
  assert distribute_utils.num_replicas(distribute_utils.get_strategy(
      "mirrored", devices=["/cpu:0"])) == 1
  assert distribute_utils.num_replicas(distribute_utils.get_strategy(
      "mirrored", num_gpus=0)) == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"num_gpus": 1}, "num_gpus=1 but only 0 GPU"),
    ({"num_gpus": -1}, "num_gpus must be >= 0"),
    ({"all_reduce_alg": "ring"}, "all_reduce_alg must be one of"),
])
def test_mirrored_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distribute_utils.get_strategy("mirrored", **kwargs)


def test_unknown_strategy_lists_valid_names():
  with pytest.raises(ValueError) as e:
    distribute_utils.get_strategy("parameter_server")
  msg = str(e.value)
  assert "\n" not in msg
  assert "'parameter_server'" in msg
  for name in distribute_utils.STRATEGY_NAMES:
    assert name in msg


def test_tpu_local_without_tpu_fails_fast_with_clear_error():
  # In a child process: a failed TPU initialization must not touch this
  # process' TF context, and a hang is cut off by the timeout.
  code = textwrap.dedent("""
      from official_conadv import distribute_utils
      try:
        distribute_utils.get_strategy("tpu", tpu="local")
        print("NO ERROR")
      except ValueError as e:
        print("ERROR:" + str(e))
      """)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(
                 [_REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                 if p]))
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=_REPO_ROOT,
                        capture_output=True, text=True, timeout=60,
                        check=False)
  assert time.monotonic() - start < 60
  lines = [l for l in proc.stdout.splitlines() if l.startswith("ERROR:")]
  assert proc.returncode == 0 and lines, proc.stdout + proc.stderr[-2000:]
  msg = lines[0]
  assert "TPU 'local' not found or could not be initialized" in msg
  assert "NotFoundError" in msg


@pytest.mark.parametrize("error", [
    ValueError("Please provide a TPU Name to connect to."),
    tf.errors.NotFoundError(None, None, "TPUs not found in the cluster.\nmore"),
    RuntimeError("Could not lookup TPU metadata"),
    KeyError("TPU_NAME"),
])
def test_tpu_errors_are_wrapped_in_one_line(monkeypatch, error):
  def resolver(tpu=None):
    del tpu
    raise error
  monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver",
                      resolver)
  with pytest.raises(ValueError) as e:
    distribute_utils.get_strategy("tpu", tpu="my-tpu")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("TPU 'my-tpu' not found or could not be initialized (")
  assert type(error).__name__ in msg
  assert e.value.__cause__ is error


@pytest.mark.parametrize("tpu,connects", [("local", False),
                                          ("grpc://127.0.0.1:8470", True),
                                          ("my-tpu", True)])
def test_tpu_sequence(monkeypatch, tpu, connects):
  calls = []

  class FakeResolver:

    def __init__(self, tpu=None):
      calls.append(("resolver", tpu))

  monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver",
                      FakeResolver)
  monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                      lambda r: calls.append(("connect", type(r).__name__)))
  monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                      lambda r: calls.append(("init", type(r).__name__)))
  monkeypatch.setattr(tf.distribute, "TPUStrategy",
                      lambda r: ("strategy", type(r).__name__))
  assert distribute_utils.get_strategy("tpu", tpu=tpu) == ("strategy",
                                                           "FakeResolver")
  want = [("resolver", tpu)]
  if connects:
    want.append(("connect", "FakeResolver"))
  want.append(("init", "FakeResolver"))
  assert calls == want


# ------------------------------------------------------------------ TF_CONFIG
@pytest.mark.parametrize("tf_config,match", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ("[1, 2]", "TF_CONFIG must be a JSON object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}),
     "TF_CONFIG has no 'cluster'"),
    (json.dumps({"cluster": _TWO_WORKERS}), "TF_CONFIG has no 'task'"),
    (json.dumps({"cluster": {"worker": "127.0.0.1:1"},
                 "task": {"type": "worker", "index": 0}}),
     "cluster job 'worker' must be a non-empty list"),
    (json.dumps({"cluster": {"worker": []},
                 "task": {"type": "worker", "index": 0}}),
     "cluster job 'worker' must be a non-empty list"),
    (json.dumps({"cluster": {"worker": ["no-port"]},
                 "task": {"type": "worker", "index": 0}}),
     "host:port"),
    (_tf_config(_TWO_WORKERS, {"index": 0}), "task has no 'type'"),
    (_tf_config(_TWO_WORKERS, {"type": "chief", "index": 0}),
     "task type 'chief' is not a job in the cluster"),
    (_tf_config(_TWO_WORKERS, {"type": "worker", "index": 2}),
     "task index 2 is out of range for job 'worker' with 2 task"),
    (_tf_config(_TWO_WORKERS, {"type": "worker", "index": -1}),
     "task index -1 is out of range"),
    (_tf_config(_TWO_WORKERS, {"type": "worker", "index": "1"}),
     "task index must be an int"),
])
def test_malformed_tf_config(monkeypatch, tf_config, match):
  with pytest.raises(ValueError, match=match) as e:
    distribute_utils.parse_tf_config(tf_config)
  assert "\n" not in str(e.value)
  monkeypatch.setenv("TF_CONFIG", tf_config)
  for fn in (distribute_utils.is_chief, distribute_utils.task_index):
    with pytest.raises(ValueError, match=match):
      fn()
  # The strategy is never constructed from a bad TF_CONFIG.
  with pytest.raises(ValueError, match=match) as e:
    distribute_utils.get_strategy("multi_worker_mirrored")
  assert "\n" not in str(e.value)


def test_multi_worker_rejects_parameter_server_cluster(monkeypatch):
  monkeypatch.setenv("TF_CONFIG", _tf_config(
      {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]},
      {"type": "worker", "index": 0}))
  with pytest.raises(ValueError, match=r"job\(s\) \['ps'\]"):
    distribute_utils.get_strategy("multi_worker_mirrored")
  with pytest.raises(ValueError, match="communication must be one of"):
    monkeypatch.delenv("TF_CONFIG")
    distribute_utils.get_strategy("multi_worker_mirrored",
                                  communication="mpi")


def test_parse_tf_config():
  assert distribute_utils.parse_tf_config("") is None
  assert distribute_utils.parse_tf_config("{}") is None
  config = distribute_utils.parse_tf_config(
      _tf_config(_TWO_WORKERS, {"type": "worker", "index": 1}))
  assert config["task"] == {"type": "worker", "index": 1}
  assert config["cluster"] == _TWO_WORKERS
  # A dict is accepted as is; the evaluator may sit outside the cluster.
  assert distribute_utils.parse_tf_config(
      {"cluster": _TWO_WORKERS, "task": {"type": "evaluator", "index": 0}}
  )["task"]["type"] == "evaluator"


@pytest.mark.parametrize("cluster,task,chief,index,workers", [
    (None, None, True, 0, 1),
    (_TWO_WORKERS, {"type": "worker", "index": 0}, True, 0, 2),
    (_TWO_WORKERS, {"type": "worker", "index": 1}, False, 1, 2),
    (dict(_TWO_WORKERS, chief=["127.0.0.1:3333"]),
     {"type": "chief", "index": 0}, True, 0, 3),
    (dict(_TWO_WORKERS, chief=["127.0.0.1:3333"]),
     {"type": "worker", "index": 0}, False, 0, 3),
    (_TWO_WORKERS, {"type": "evaluator", "index": 0}, False, 0, 2),
])
def test_is_chief_task_index_num_workers(monkeypatch, cluster, task, chief,
                                         index, workers):
  if cluster is None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
  else:
    monkeypatch.setenv("TF_CONFIG", _tf_config(cluster, task))
  assert distribute_utils.is_chief() is chief
  assert distribute_utils.task_index() == index
  assert distribute_utils.num_workers() == workers
  assert distribute_utils.task_type() == (task["type"] if task else None)


# ------------------------------------------------------------------ batching
def test_check_global_batch_size():
  mirrored = distribute_utils.get_strategy("mirrored", num_gpus=0)
  assert distribute_utils.check_global_batch_size(8, mirrored) == 4
  assert distribute_utils.check_global_batch_size(np.int64(6), mirrored) == 3
  assert distribute_utils.check_global_batch_size(7) == 7  # Default: 1.
  with pytest.raises(ValueError, match="global batch size 7 is not divisible "
                     r"by the number of replicas \(2\)"):
    distribute_utils.check_global_batch_size(7, mirrored)
  for bad in (0, -4, 2.0, True, "8"):
    with pytest.raises(ValueError, match="must be a positive int"):
      distribute_utils.check_global_batch_size(bad, mirrored)


# ------------------------------------------------- real multi-worker strategy
def _worker_main():
  strategy = distribute_utils.get_strategy("multi_worker_mirrored")
  from official_conadv import keras_mwms_fix  # pylint: disable=g-import-not-at-top
  index = distribute_utils.task_index()
  value = strategy.run(lambda: tf.constant(float(index + 1)))
  multi_worker.emit_result({
      "mwms": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
      "replicas": distribute_utils.num_replicas(strategy),
      "per_replica": distribute_utils.check_global_batch_size(8, strategy),
      "is_chief": distribute_utils.is_chief(),
      "index": index,
      "sum": float(strategy.reduce("SUM", value, axis=None).numpy()),
      "fix_applied": keras_mwms_fix.is_applied(),
  })


def test_multi_worker_mirrored_two_processes():
  results = multi_worker.run_workers(__file__, ["--worker"], num_workers=2,
                                     timeout=90)
  infos = [r.result for r in results]
  for i, info in enumerate(infos):
    assert info == {"mwms": True, "replicas": 2,
                    "per_replica": 4, "is_chief": i == 0, "index": i,
                    "sum": 3.0, "fix_applied": True}


# ------------------------------------------------------- multi_worker helper
def _script(tmp_path, body):
  path = tmp_path / "worker.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


def test_run_workers_passes_tf_config_and_args(tmp_path):
  script = _script(tmp_path, """
      import json, os, sys
      from official_conadv.testing import multi_worker
      multi_worker.emit_result({"tf_config": json.loads(os.environ["TF_CONFIG"]),
                                "argv": sys.argv[1:],
                                "cuda": os.environ["CUDA_VISIBLE_DEVICES"]})
      """)
  results = multi_worker.run_workers(
      script, ["--out", "w{task_index}of{num_workers}"], num_workers=3,
      timeout=30)
  assert [r.task_index for r in results] == [0, 1, 2]
  ports = set()
  for i, r in enumerate(results):
    assert r.ok and not r.killed and not r.timed_out
    info = r.result
    assert info["argv"] == ["--out", f"w{i}of3"]
    assert info["cuda"] == ""
    assert info["tf_config"]["task"] == {"type": "worker", "index": i}
    workers = info["tf_config"]["cluster"]["worker"]
    assert len(workers) == 3 and all(
        w.startswith("127.0.0.1:") for w in workers)
    ports.add(tuple(workers))
  assert len(ports) == 1  # Same cluster everywhere.


def test_run_workers_surfaces_stderr_and_kills_peers(tmp_path):
  script = _script(tmp_path, """
      import json, os, sys, time
      index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
      if index == 1:
        sys.stderr.write("worker one broke: boom\\n")
        sys.exit(3)
      time.sleep(600)  # Like a peer stuck in a collective.
      """)
  start = time.monotonic()
  with pytest.raises(multi_worker.WorkersFailedError) as e:
    multi_worker.run_workers(script, num_workers=2, timeout=60)
  assert time.monotonic() - start < 30
  msg = str(e.value)
  assert "1 of 2 workers failed, 1 killed after that." in msg
  assert "worker one broke: boom" in msg
  assert "worker 1: exit status 3" in msg
  assert "worker 0: killed after another worker failed" in msg
  assert not isinstance(e.value, multi_worker.WorkersTimeoutError)
  assert e.value.results[0].killed and e.value.results[0].returncode < 0
  # check=False returns instead of raising.
  results = multi_worker.run_workers(script, num_workers=2, timeout=60,
                                     check=False)
  assert [r.returncode for r in results][1] == 3


def test_run_workers_timeout_kills_process_group(tmp_path):
  pid_file = tmp_path / "child.pid"
  script = _script(tmp_path, f"""
      import subprocess, sys, time
      child = subprocess.Popen([sys.executable, "-c",
                                "import time; time.sleep(600)"])
      open({str(pid_file)!r} + sys.argv[1], "w").write(str(child.pid))
      print("started", flush=True)
      time.sleep(600)
      """)
  start = time.monotonic()
  with pytest.raises(multi_worker.WorkersTimeoutError) as e:
    multi_worker.run_workers(script, ["{task_index}"], num_workers=2,
                             timeout=3)
  assert time.monotonic() - start < 20
  assert "did not finish within 3 s" in str(e.value)
  assert all(r.timed_out for r in e.value.results)
  assert "started" in e.value.results[0].stdout
  # The grandchildren (same process group) are gone too.
  for i in range(2):
    pid = int((tmp_path / f"child.pid{i}").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        break
      # Reaped by init eventually; a zombie still answers kill(pid, 0).
      if _is_zombie(pid):
        break
      time.sleep(0.1)
    else:
      pytest.fail(f"grandchild {pid} survived the timeout")


def _is_zombie(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] == "Z"
  except OSError:
    return True


def test_exit_together_waits_for_all_then_skips_the_teardown(tmp_path):
  script = _script(tmp_path, f"""
      import atexit, os, sys, time
      from official_conadv.testing import multi_worker
      atexit.register(print, "teardown ran")
      task, code = sys.argv[1:]
      pids = {str(tmp_path)!r}
      open(os.path.join(pids, "pid" + task), "w").write(str(os.getpid()))
      if task == "1":  # Late: worker 0 is already in exit_together.
        time.sleep(1.0)
        peer = int(open(os.path.join(pids, "pid0")).read())
        with open(f"/proc/{{peer}}/stat") as f:
          state = f.read().rsplit(")", 1)[1].split()[0]
        multi_worker.emit_result({{"peer_state": state}})
      else:
        multi_worker.emit_result({{"task": task}})
      sys.stderr.write("last words")  # No newline: still flushed.
      multi_worker.exit_together(int(code))
      """)
  results = multi_worker.run_workers(script, ["{task_index}", "0"],
                                     num_workers=2, timeout=30)
  assert results[0].result == {"task": "0"}
  # Worker 0 waited (sleeping, not exited) for worker 1: a peer can still
  # need its part of their last collective.
  assert results[1].result["peer_state"] in ("S", "R")  # Not a zombie.
  for r in results:
    assert r.ok and "teardown ran" not in r.stdout
    assert r.stderr.endswith("last words")
  assert [r.returncode for r in multi_worker.run_workers(
      script, ["0", "7"], num_workers=1, timeout=30, check=False)] == [7]
  # Outside run_workers: the ordinary exit, teardown included.
  plain = subprocess.run([sys.executable, script, "0", "3"],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=_REPO_ROOT),
                         check=False)
  assert plain.returncode == 3 and "teardown ran" in plain.stdout


def test_pick_unused_ports():
  ports = multi_worker.pick_unused_ports(4)
  assert len(set(ports)) == 4 and all(0 < p < 65536 for p in ports)
  assert multi_worker.make_tf_config([1, 2], 1) == {
      "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
      "task": {"type": "worker", "index": 1}}


if __name__ == "__main__":
  if sys.argv[1:] == ["--worker"]:
    _worker_main()
    multi_worker.exit_together()  # No 2 s teardown; result out.
