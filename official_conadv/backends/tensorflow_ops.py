"""TensorFlow primitives of `official_conadv.backends` (see there)."""

import tensorflow as tf


def value_and_grad(fn, x, has_aux=False):
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = fn(x)
  return out, tape.gradient(out[0] if has_aux else out, x)


def replica_id():
  """This replica's index in its sync group (0 outside a strategy)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def attack_keys(seed, step):
  """(seed (seed, step) with the replica id folded in, (seed, step) + 1):
  int32 [2] stateless seeds of the per-example and the per-batch draws."""
  step = tf.cast(step, tf.int32)
  batch_seed = tf.stack([tf.constant(seed, tf.int32), step])
  key = tf.random.experimental.stateless_fold_in(batch_seed, replica_id())
  return key, batch_seed + 1


def split(key):
  return tuple(tf.unstack(tf.random.experimental.stateless_split(
      tf.cast(key, tf.int32), num=2)))


def uniform(shape, key, minval, maxval, dtype):
  return tf.random.stateless_uniform(
      shape, seed=tf.cast(key, tf.int32), minval=minval, maxval=maxval,
      dtype=dtype)


def uniform_int(shape, key, minval, maxval):
  return tf.random.stateless_uniform(
      shape, seed=tf.cast(key, tf.int32), minval=minval, maxval=maxval,
      dtype=tf.int32)


def add_n(tensors):
  return tf.add_n(tensors)
