"""The few primitives the algorithm needs that `keras.ops` does not offer.

Everything else in the algorithm (the PGD attack, the branch losses, the
schedules' slot arithmetic) is written in `keras.ops` and runs on every
Keras backend. What is left differs by backend and is kept here, one small
module per backend, picked by `keras.backend.backend()` when first used:

  value_and_grad(fn, x) -> (fn(x), d fn / d x)   (fn: tensor -> scalar)
  attack_keys(seed, step) -> (key, batch_key)     the attack's random keys
  split(key) -> (key_a, key_b)
  uniform(shape, key, minval, maxval, dtype)      stateless float draws
  uniform_int(shape, key, minval, maxval)         stateless int32 draws

Random numbers: TensorFlow draws with `tf.random.stateless_*` from int32
[2] seeds, (seed, step) with the replica id folded in, so every replica of
a `tf.distribute` strategy draws its own noise; JAX draws with `jax.random`
from keys made of (seed, step) for the whole global batch of one program
(under `keras.distribution.DataParallel` every device's shard thus gets its
own noise too). The two backends draw different numbers from the same
seed; the cross-backend tests compare attacks that start from the clean
image.

Importing this package loads neither TensorFlow nor JAX: the backend's module
is imported on the first call (so the JAX path never imports TensorFlow).
"""

import importlib
import types

import keras

_MODULES = {"tensorflow": "tensorflow_ops", "jax": "jax_ops"}
SUPPORTED = tuple(_MODULES)


def name() -> str:
  """The Keras backend in use ("tensorflow" or "jax"); ValueError (one line)
  for any other."""
  backend = keras.backend.backend()
  if backend not in _MODULES:
    raise ValueError(f"official_conadv runs on the Keras backends "
                     f"{SUPPORTED}, not {backend!r}; set KERAS_BACKEND.")
  return backend


def is_tensorflow() -> bool:
  return name() == "tensorflow"


def impl():
  """The primitives module of the current backend."""
  return importlib.import_module(f"{__name__}.{_MODULES[name()]}")


def value_and_grad(fn, x, has_aux=False):
  """(fn(x), gradient of fn at x); with has_aux fn returns (value, aux) and
  the result is ((value, aux), gradient of value)."""
  return impl().value_and_grad(fn, x, has_aux)


def attack_keys(seed, step):
  return impl().attack_keys(seed, step)


def split(key):
  return impl().split(key)


def uniform(shape, key, minval, maxval, dtype):
  return impl().uniform(shape, key, minval, maxval, dtype)


def uniform_int(shape, key, minval, maxval):
  return impl().uniform_int(shape, key, minval, maxval)


class LazyModule(types.ModuleType):
  """A module imported on its first attribute access: lets a module that
  serves both backends name TensorFlow for its TensorFlow-only functions
  without loading it on JAX (`tf = backends.LazyModule("tensorflow")`)."""

  def __init__(self, module_name):
    super().__init__(module_name)
    self._module_name = module_name

  def __getattr__(self, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return getattr(importlib.import_module(self._module_name), attr)
