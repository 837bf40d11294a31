"""Test session setup shared by every test file.

TensorFlow can split the host CPU into logical devices only before its runtime
starts, so it happens here, once, before any test module runs a TF op: two
logical CPUs let tests compare MirroredStrategy with one device.
"""

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One intra-op thread per TensorFlow process (read by TF at start-up, and
# inherited by the worker processes tests launch): `make test` runs two
# pytest workers on a 2-core machine, and each op's own thread pool only
# made them contend (lookahead_test: 112 s instead of 123 s, 2026-12-03).
# Results do not depend on it: tests compare runs of one configuration.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

# Two suites: the TensorFlow one (the default) and the JAX one
# (`KERAS_BACKEND=jax`, files named *_jax_test.py; `make test` runs both, one
# after the other). Keras fixes its backend at import, so a process serves
# one suite; the JAX suite never imports TensorFlow (it is not even
# installed on JAX-only machines).
JAX_SUITE = os.environ.get("KERAS_BACKEND") == "jax"

if not JAX_SUITE:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  _cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  except RuntimeError:  # Runtime already started (e.g. a plugin ran TF ops).
    pass


def pytest_ignore_collect(collection_path, config):
  """Each suite collects its own test files (see JAX_SUITE)."""
  del config
  name = collection_path.name
  if collection_path.suffix == ".py" and name.endswith("_test.py"):
    if name.endswith("_jax_test.py") != JAX_SUITE:
      return True
  return None


# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`:
# xdist hands out whole files, in collection order, to whichever worker runs
# low. Sorted here longest first, the short files fill the end and both
# workers finish together. (xdist's own order, by number of tests, left the
# 2-test README and notebook files, minutes each, for last: one worker
# idled while the other ran them.) Seconds per file (setup + calls), from
# `--durations=0` of a full run on the 2-core VM, 2026-12-03 (docs_test and
# package_test: estimated); a file not listed counts 2 s per test.
# List a file here when it takes more than about 20 s.
FILE_SECONDS = {
    "official_conadv/modeling/keras_contract_test.py": 239,
    "official_conadv/train_test.py": 223,
    "official_conadv/modeling/lookahead_test.py": 199,
    "benchmarks/benchmarks_test.py": 145,
    "official_conadv/multi_worker_lookahead_test.py": 143,
    "official_conadv/modeling/precision_test.py": 122,
    "official_conadv/modeling/conadv_model_test.py": 120,
    "official_conadv/readme_test.py": 96,
    "official_conadv/multi_worker_test.py": 76,
    "official_conadv/modeling/resnet_test.py": 55,
    "benchmarks/mwms_overlap_test.py": 51,
    "official_conadv/modeling/convert_test.py": 47,
    "official_conadv/docs_test.py": 45,
    "experiments/notebook_test.py": 40,
    "official_conadv/keras_mwms_fix_test.py": 40,
    "official_conadv/data/input_pipeline_resume_test.py": 36,
    "official_conadv/modeling/replica_statistics_test.py": 31,
    "official_conadv/package_test.py": 30,
    "official_conadv/train_errors_test.py": 28,
    "official_conadv/data/input_pipeline_integration_test.py": 25,
    "official_conadv/optimization/ema_test.py": 25,
    "official_conadv/distribute_utils_test.py": 23,
    "official_conadv/train_lib_test.py": 21,
    # The JAX suite (KERAS_BACKEND=jax).
    "official_conadv/modeling/no_tensorflow_jax_test.py": 190,
    "official_conadv/modeling/jax_trainer_jax_test.py": 100,
    "benchmarks/backend_step_time_jax_test.py": 70,
    "official_conadv/modeling/data_parallel_jax_test.py": 66,
    "official_conadv/modeling/cross_backend_jax_test.py": 45,
}


def file_order(nodeids):
  """The test files of `nodeids` (pytest node ids), longest first by
  FILE_SECONDS (stable: ties keep their collection order)."""
  counts = collections.Counter(n.split("::", 1)[0] for n in nodeids)
  return sorted(counts, key=lambda f: -FILE_SECONDS.get(f, 2 * counts[f]))


def pytest_collection_modifyitems(config, items):
  """In xdist workers (whose collection order the scheduler follows), the
  longest files first (see FILE_SECONDS); a file's tests keep their order.
  A run without xdist keeps pytest's order."""
  if not hasattr(config, "workerinput"):
    return
  rank = {f: i for i, f in enumerate(file_order([i.nodeid for i in items]))}
  items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])
