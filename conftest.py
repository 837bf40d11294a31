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
