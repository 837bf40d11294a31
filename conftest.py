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

import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpus = tf.config.list_physical_devices("CPU")
try:
  tf.config.set_logical_device_configuration(
      _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # Runtime already started (e.g. a plugin ran TF ops).
  pass


# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`:
# xdist hands out whole files, in collection order, to whichever worker runs
# low. Sorted here longest first, the short files fill the end and both
# workers finish together. (xdist's own order, by number of tests, left the
# 2-test README and notebook files, minutes each, for last: one worker
# idled while the other ran them.) Seconds per file, 2 workers on the
# 2-core VM under load, 2026-12-03; a file not listed counts 2 s per test.
# List a file here when it takes more than about 20 s.
FILE_SECONDS = {
    "official_conadv/modeling/keras_contract_test.py": 960,
    "official_conadv/train_test.py": 740,
    "official_conadv/modeling/lookahead_test.py": 640,
    "official_conadv/modeling/conadv_model_test.py": 500,
    "official_conadv/modeling/precision_test.py": 320,
    "official_conadv/readme_test.py": 200,
    "official_conadv/multi_worker_lookahead_test.py": 180,
    "benchmarks/benchmarks_test.py": 150,
    "official_conadv/modeling/convert_test.py": 140,
    "experiments/notebook_test.py": 110,
    "official_conadv/modeling/resnet_test.py": 100,
    "official_conadv/multi_worker_test.py": 100,
    "benchmarks/mwms_overlap_test.py": 55,
    "official_conadv/data/input_pipeline_resume_test.py": 50,
    "official_conadv/data/preprocessing_test.py": 50,
    "official_conadv/distribute_utils_test.py": 50,
    "official_conadv/keras_mwms_fix_test.py": 50,
    "official_conadv/train_lib_test.py": 45,
    "official_conadv/optimization/lars_test.py": 40,
    "official_conadv/train_errors_test.py": 40,
    "official_conadv/data/input_pipeline_test.py": 35,
    "official_conadv/train_reference_test.py": 35,
    "official_conadv/modeling/replica_statistics_test.py": 30,
    "official_conadv/optimization/ema_test.py": 30,
    "official_conadv/modeling/reference_test.py": 25,
    "official_conadv/data/input_pipeline_integration_test.py": 25,
    "benchmarks/batch_study_test.py": 25,
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
