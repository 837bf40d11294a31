"""JAX primitives of `official_conadv.backends` (see there). Imports no
TensorFlow."""

import jax
import jax.numpy as jnp


def value_and_grad(fn, x, has_aux=False):
  return jax.value_and_grad(fn, has_aux=has_aux)(x)


def attack_keys(seed, step):
  """(key of (seed, step), key of the per-batch draw): the whole global
  batch of one program draws from one key, so every example (and every
  device's shard) gets its own noise."""
  key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.int32))
  return key, jax.random.fold_in(key, 1)


def split(key):
  a, b = jax.random.split(key, 2)
  return a, b


def uniform(shape, key, minval, maxval, dtype):
  return jax.random.uniform(key, tuple(shape), dtype=dtype, minval=minval,
                            maxval=maxval)


def uniform_int(shape, key, minval, maxval):
  return jax.random.randint(key, tuple(shape), minval, maxval,
                            dtype=jnp.int32)
