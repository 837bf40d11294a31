"""Makes Keras 3 `fit`/`evaluate` work under MultiWorkerMirroredStrategy.

Upstream bug: keras-team/keras#20585 and tensorflow/tensorflow#72388
(https://github.com/keras-team/keras/issues/20585,
https://github.com/tensorflow/tensorflow/issues/72388). With Keras 3 on the
TensorFlow backend, `model.fit` under `tf.distribute.MultiWorkerMirroredStrategy`
with two or more worker processes fails before the first step, even for a
one-layer model, with

    ValueError: Attempt to convert a value (PerReplica:{...}) with an
    unsupported type (<class '...values.PerReplica'>) to a Tensor.

Two places in `keras/src/backend/tensorflow/trainer.py` are at fault, and
`apply()` changes exactly those two, process-wide, and only for a strategy in
multi-worker mode (`keras/src/backend/tensorflow/trainer.py`'s own
`_collective_all_reduce_multi_worker(strategy)` is true); every other strategy
(default, OneDevice, Mirrored, TPU, single-worker MWMS) goes through the
unchanged Keras code.

1. `TensorFlowTrainer._maybe_symbolic_build` (called by `fit` and `evaluate`
   before the first step, to build the model, optimizer and metrics
   symbolically). Upstream it takes the first distributed batch and reduces
   the whole `(x, y, sample_weight)` structure across replicas:

       data_batch = self.distribute_strategy.reduce(
           "MEAN", maybe_distributed_data_batch, axis=None)

   Under multi-worker MWMS that is an eager cross-worker collective over a
   nested structure of `PerReplica` values, which raises the error above (and
   would average integer labels if it did run). The build only needs shapes
   and dtypes, so the patched method takes the first local replica's batch
   instead (`strategy.experimental_local_results(value)[0]` for every leaf)
   and hands it to the original method as `data_batch=`; no collective runs.

2. `reduce_per_replica(values, strategy, reduction)` (module function, looked
   up by `_make_function` at trace time for the train and test steps with
   `reduction="auto"`, i.e. "mean" off TPU). Upstream its multi-worker branch
   reduces every logged value with

       strategy.reduce("MEAN", v, axis=0)

   The logs are scalar (rank 0) loss/metric results, and `axis=0` on a
   rank-0 value is invalid ("Invalid reduction dimension 0 for input with 0
   dimensions"; this is the second error, once change 1 is in). The patched
   function reduces rank-0 values with `axis=None`: the mean over replicas of
   each replica's scalar, which is what the single-worker branch of the same
   function computes (`tf.reduce_mean(local_results, axis=0)`). Every other
   case (rank >= 1 keeps upstream's `axis=0`; "concat", "sum", "first"; other
   strategies) goes to the original function.

`predict` does not go through either change: it has no symbolic build and
uses `reduction="concat"`, whose multi-worker branch (`strategy.gather`)
already works. `evaluate` needs both changes, exactly like `fit`.

Guard: `apply()` patches only when the Keras backend is TensorFlow, the Keras
version is in `[KNOWN_MIN_VERSION, KNOWN_MAX_VERSION)`, the source of both
functions still contains the upstream code quoted above, and
`TensorFlowTrainer._make_function` still calls the module-level
`reduce_per_replica(..., reduction="auto")` (`_FINGERPRINTS`, compared with
all whitespace removed). Otherwise it warns (or raises with `strict=True`)
and changes nothing. `VERIFIED_SOURCE_SHA256` records the exact source of
these three functions for the Keras versions this fix was tested on;
`keras_mwms_fix_test.py` fails when that source changes, and also checks that
an unpatched two-worker `fit` still fails, so an upstream fix is noticed and
this module can be dropped.

Nothing to call for a `ConAdvModel`: its `fit`, `evaluate`,
`train_on_batch` and `test_on_batch` call `apply_for(strategy)`, which
applies the fix the first time the model's strategy is a multi-worker MWMS,
whoever made the strategy; `distribute_utils.get_strategy(
"multi_worker_mirrored")` applies it too. For other Keras models under MWMS
(idempotent):

    from official_conadv import keras_mwms_fix
    keras_mwms_fix.apply()
"""

import hashlib
import inspect
import re
import threading
import warnings

import tensorflow as tf

__all__ = [
    "KNOWN_MIN_VERSION",
    "KNOWN_MAX_VERSION",
    "VERIFIED_SOURCE_SHA256",
    "apply",
    "apply_for",
    "is_applied",
    "is_multi_worker",
    "revert",
    "check_upstream",
    "source_sha256",
]

# Keras versions with the bug and the code the patch expects ([min, max)).
KNOWN_MIN_VERSION = (3, 0, 0)
KNOWN_MAX_VERSION = (3, 16, 0)

# Upstream code that must be present (whitespace removed) for the patch to
# be valid: the MEAN reduce of the whole batch, the axis=0 scalar reduce, and
# the call through the module-level name that change 2 replaces.
_FINGERPRINTS = {
    "TensorFlowTrainer._maybe_symbolic_build": (
        'data_batch=self.distribute_strategy.reduce("MEAN",'
        "maybe_distributed_data_batch,axis=None,)"),
    "reduce_per_replica": (
        "if_collective_all_reduce_multi_worker(strategy):"
        'ifreduction=="concat":'
        "return_multi_worker_concat(v,strategy)"
        'elifreduction=="sum":'
        'returnstrategy.reduce("SUM",v)'
        'elifreduction=="mean":'
        'returnstrategy.reduce("MEAN",v,axis=0)'),
    # The caller: change 2 works because this looks the name up at trace time.
    "TensorFlowTrainer._make_function": (
        "outputs=reduce_per_replica(outputs,self.distribute_strategy,"
        'reduction="auto",)'),
}

# sha256 of `inspect.getsource(...)` of the fingerprinted functions, per Keras
# version on which the bug and this fix were verified with two workers.
VERIFIED_SOURCE_SHA256 = {
    "3.15.1": {
        "TensorFlowTrainer._maybe_symbolic_build":
            "92a504f5eba9b29f81f1bf26180bdd5bf5186b06b7bda426534b90d2d02bc1c2",
        "reduce_per_replica":
            "2e7d54b1e6edc29a8c6a7e6b66cd4c8be3ba7842412c93753ac3afe169fa7fb8",
        "TensorFlowTrainer._make_function":
            "bb33b7a0da3d27406c70fac54b8e9617156ef225f452b93f6addf8cc34aca0d0",
    },
}

_MARK = "_official_conadv_mwms_fix"
_lock = threading.Lock()
_originals = {}


def _trainer_module():
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top
  return trainer


def _tree():
  from keras.src import tree  # pylint: disable=g-import-not-at-top
  return tree


def _parse_version(version):
  nums = re.findall(r"\d+", version)[:3]
  nums += ["0"] * (3 - len(nums))
  return tuple(int(n) for n in nums)


def _targets(trainer):
  """The functions `apply()` replaces."""
  return {
      "TensorFlowTrainer._maybe_symbolic_build":
          trainer.TensorFlowTrainer._maybe_symbolic_build,  # pylint: disable=protected-access
      "reduce_per_replica": trainer.reduce_per_replica,
  }


def _fingerprinted(trainer):
  """The functions whose source the guard checks (replaced + caller)."""
  return dict(_targets(trainer), **{
      "TensorFlowTrainer._make_function":
          trainer.TensorFlowTrainer._make_function,  # pylint: disable=protected-access
  })


def _unwrap(fn):
  return getattr(fn, "__wrapped__", fn) if getattr(fn, _MARK, False) else fn


def _source(fn):
  return inspect.getsource(_unwrap(fn))


def source_sha256():
  """{name: sha256 of the current upstream source} of the checked functions
  (read through the patch, so the same whether or not it is applied)."""
  return {name: hashlib.sha256(_source(fn).encode("utf-8")).hexdigest()
          for name, fn in _fingerprinted(_trainer_module()).items()}


def check_upstream():
  """Returns a list of reasons the patch cannot be applied ([] = it can)."""
  import keras  # pylint: disable=g-import-not-at-top
  problems = []
  if keras.backend.backend() != "tensorflow":
    problems.append(f"Keras backend is {keras.backend.backend()!r}, "
                    "the fix is for the TensorFlow backend")
    return problems
  version = _parse_version(keras.__version__)
  if not KNOWN_MIN_VERSION <= version < KNOWN_MAX_VERSION:
    problems.append(
        f"Keras {keras.__version__} is outside the range the fix knows "
        f"([{'.'.join(map(str, KNOWN_MIN_VERSION))}, "
        f"{'.'.join(map(str, KNOWN_MAX_VERSION))})); check whether "
        "keras-team/keras#20585 is fixed upstream")
  try:
    targets = _fingerprinted(_trainer_module())
  except (ImportError, AttributeError) as e:
    problems.append(f"Keras' TF trainer changed: {e}")
    return problems
  for name, fn in targets.items():
    try:
      src = "".join(_source(fn).split())
    except (OSError, TypeError) as e:
      problems.append(f"cannot read the source of {name}: {e}")
      continue
    if _FINGERPRINTS[name] not in src:
      problems.append(f"{name} no longer contains the code the fix replaces")
  return problems


def _is_rank0(value, strategy):
  if isinstance(value, (int, float)):
    return True
  if _trainer_module()._is_per_replica_instance(value):  # pylint: disable=protected-access
    value = strategy.experimental_local_results(value)[0]
  shape = getattr(value, "shape", None)
  return shape is not None and shape.rank == 0


def _make_patched_reduce_per_replica(original):
  """Change 2: rank-0 "mean" reductions across workers use axis=None."""

  def reduce_per_replica(values, strategy, reduction):
    trainer = _trainer_module()
    mean = reduction == "mean" or (
        reduction == "auto" and not trainer._is_tpu_strategy(strategy))  # pylint: disable=protected-access
    if not (mean and trainer._collective_all_reduce_multi_worker(strategy)):  # pylint: disable=protected-access
      return original(values, strategy, reduction)

    def _reduce(v):
      if _is_rank0(v, strategy):
        return strategy.reduce("MEAN", v, axis=None)
      return original(v, strategy, "mean")  # Upstream: axis=0.

    return _tree().map_structure(_reduce, values)

  reduce_per_replica.__wrapped__ = original
  reduce_per_replica.__doc__ = original.__doc__
  setattr(reduce_per_replica, _MARK, True)
  return reduce_per_replica


def _make_patched_maybe_symbolic_build(original):
  """Change 1: build from the local replica's batch, no cross-worker MEAN."""

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    trainer = _trainer_module()
    strategy = self._distribute_strategy  # pylint: disable=protected-access
    if (iterator is not None and strategy is not None and
        trainer._collective_all_reduce_multi_worker(strategy)):  # pylint: disable=protected-access
      for _, _, it in iterator:
        batch = next(it)
        data_batch = _tree().map_structure(
            lambda x: (strategy.experimental_local_results(x)[0]
                       if isinstance(x, tf.distribute.DistributedValues)
                       else x), batch)
        break
      iterator = None
    return original(self, iterator=iterator, data_batch=data_batch)

  _maybe_symbolic_build.__wrapped__ = original
  _maybe_symbolic_build.__doc__ = original.__doc__
  setattr(_maybe_symbolic_build, _MARK, True)
  return _maybe_symbolic_build


def is_applied():
  """True if `apply()` has patched Keras in this process."""
  try:
    trainer = _trainer_module()
  except ImportError:
    return False
  return all(getattr(fn, _MARK, False) for fn in _targets(trainer).values())


def apply(strict=False):
  """Patches Keras' TF trainer for multi-worker MWMS; idempotent.

  Args:
    strict: if True, raise `RuntimeError` instead of warning when the guard
      refuses (unknown Keras version, changed upstream source, other backend).

  Returns:
    True if the fix is in place after the call, False if it was refused.
  """
  with _lock:
    if is_applied():
      return True
    problems = check_upstream()
    if problems:
      msg = ("official_conadv.keras_mwms_fix not applied: " +
             "; ".join(problems) +
             ". Keras fit under multi-worker MultiWorkerMirroredStrategy may "
             "fail (keras-team/keras#20585).")
      if strict:
        raise RuntimeError(msg)
      warnings.warn(msg, RuntimeWarning, stacklevel=2)
      return False
    trainer = _trainer_module()
    cls = trainer.TensorFlowTrainer
    _originals["_maybe_symbolic_build"] = cls.__dict__["_maybe_symbolic_build"]
    _originals["reduce_per_replica"] = trainer.reduce_per_replica
    cls._maybe_symbolic_build = _make_patched_maybe_symbolic_build(  # pylint: disable=protected-access
        _originals["_maybe_symbolic_build"])
    trainer.reduce_per_replica = _make_patched_reduce_per_replica(
        _originals["reduce_per_replica"])
    return True


def is_multi_worker(strategy) -> bool:
  """True for a MultiWorkerMirroredStrategy in multi-worker mode (TF_CONFIG
  with more than one task): the case Keras' TF trainer mishandles."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return False
  return bool(strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


def apply_for(strategy) -> bool:
  """Applies the fix if `strategy` is multi-worker (see `is_multi_worker`).

  Returns:
    Whether the fix is in place after the call (once applied it stays for
    the process; other strategies go through unchanged Keras code anyway).
  """
  if not is_multi_worker(strategy):
    return is_applied()
  return apply()


def revert():
  """Restores the original Keras functions (for tests); idempotent.

  Functions already traced by `fit`/`evaluate` keep the reduction they were
  traced with; call it before building models that must see upstream Keras.
  """
  with _lock:
    if not _originals:
      return
    trainer = _trainer_module()
    trainer.TensorFlowTrainer._maybe_symbolic_build = _originals.pop(  # pylint: disable=protected-access
        "_maybe_symbolic_build")
    trainer.reduce_per_replica = _originals.pop("reduce_per_replica")
