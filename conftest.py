"""Test session setup shared by every test file.

TensorFlow can split the host CPU into logical devices only before its runtime
starts, so it happens here, once, before any test module runs a TF op: two
logical CPUs let tests compare MirroredStrategy with one device.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpus = tf.config.list_physical_devices("CPU")
try:
  tf.config.set_logical_device_configuration(
      _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # Runtime already started (e.g. a plugin ran TF ops).
  pass

# Every MirroredStrategy starts its collective group keys at
# 1 + _collective_key_base (0 by default), so a second strategy over the same
# devices in one process reuses the first one's collective instances and fails
# with "Shape mismatch in the collective instance ...". TF documents
# `_collective_key_base` as the knob for tests; give each instance its own.
import itertools  # pylint: disable=g-import-not-at-top,wrong-import-order

_key_bases = itertools.count(1)
_mirrored_init = tf.distribute.MirroredStrategy.__init__


def _mirrored_init_with_own_keys(self, *args, **kwargs):
  self._collective_key_base = 10_000 * next(_key_bases)  # pylint: disable=protected-access
  _mirrored_init(self, *args, **kwargs)


tf.distribute.MirroredStrategy.__init__ = _mirrored_init_with_own_keys
