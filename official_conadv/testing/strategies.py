"""Strategies shared by the tests of one process (one instance per kind).

The mirrored one comes from `distribute_utils.get_strategy`, the product's
path, which gives every MirroredStrategy its own collective keys.
"""

import functools

import tensorflow as tf

from official_conadv import distribute_utils

NAMES = ("default", "one_device", "mirrored")


@functools.lru_cache(maxsize=None)
def _mirrored():
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  if len(cpus) < 2:
    raise RuntimeError("Mirrored tests need 2 logical CPUs; conftest.py sets "
                       "them up before TensorFlow starts.")
  return distribute_utils.get_strategy("mirrored", devices=cpus[:2])


@functools.lru_cache(maxsize=None)
def _one_device():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def get(name: str) -> tf.distribute.Strategy:
  """"default", "one_device" (CPU:0) or "mirrored" (2 logical CPUs)."""
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    return _one_device()
  if name == "mirrored":
    return _mirrored()
  raise ValueError(f"Unknown test strategy {name!r}; valid: {NAMES}.")
