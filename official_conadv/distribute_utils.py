"""tf.distribute helpers: pick a strategy by name, read TF_CONFIG, batch checks.

    strategy = distribute_utils.get_strategy("tpu", tpu="local")
    with strategy.scope():
      model = ...
    per_replica = distribute_utils.check_global_batch_size(4096, strategy)
    if distribute_utils.is_chief():
      ...  # write exports / summaries

Strategy names (`STRATEGY_NAMES`):

* "tpu": `TPUClusterResolver(tpu)` -> `experimental_connect_to_cluster`
  (skipped for "local") -> `initialize_tpu_system` -> `TPUStrategy`. `tpu` is
  "local" on a TPU VM, a TPU name or "grpc://host:port" for a TPU node, or
  None to let the resolver find it (Colab, `TPU_NAME`). Any failure becomes
  a one-line `ValueError` naming the TPU.
* "mirrored": `MirroredStrategy` over `devices`, else the first `num_gpus`
  GPUs, else all GPUs, else (no GPU, or `num_gpus=0`) all logical CPUs (one
  unless split with `tf.config.set_logical_device_configuration`).
* "multi_worker_mirrored": `MultiWorkerMirroredStrategy` from TF_CONFIG
  (validated first: malformed JSON, missing cluster/task, unknown task type or
  index out of range give a one-line `ValueError`). No TF_CONFIG = one local
  worker. Also applies `keras_mwms_fix` so Keras 3 `fit`/`evaluate` work
  across workers (keras-team/keras#20585) unless `patch_keras_fit=False`.
* "one_device": `OneDeviceStrategy` on GPU:0 if there is a GPU, else CPU:0.
* "default": `tf.distribute.get_strategy()` (the no-op default strategy, or
  the strategy whose scope is active).
"""

import itertools
import json
import numbers
import os
import threading
from typing import Any, Dict, Optional, Sequence

import tensorflow as tf

STRATEGY_NAMES = ("tpu", "mirrored", "multi_worker_mirrored", "one_device",
                  "default")

# Job types MultiWorkerMirroredStrategy accepts in a cluster ("evaluator" is
# a task outside the cluster, see `parse_tf_config`).
_MWMS_JOBS = ("chief", "worker")


def one_line(text: Any) -> str:
  """The first non-empty line of `text` (an error or a message), stripped."""
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  return lines[0] if lines else ""


# ------------------------------------------------------------------ TF_CONFIG
def parse_tf_config(tf_config: Any = None) -> Optional[Dict[str, Any]]:
  """Validates TF_CONFIG and returns it as a dict (None if unset/empty).

  Args:
    tf_config: a dict or JSON string; None reads `os.environ["TF_CONFIG"]`.

  Returns:
    {"cluster": {job: [addresses]}, "task": {"type": str, "index": int}, ...}
    or None when there is no TF_CONFIG (or it has neither cluster nor task).

  Raises:
    ValueError (one line): not JSON, not an object, missing or empty
    `cluster`, a job that is not a list of "host:port" strings, missing
    `task`, task type not in the cluster, index not an int in range.
  """
  if tf_config is None:
    tf_config = os.environ.get("TF_CONFIG", "")
  if isinstance(tf_config, str):
    if not tf_config.strip():
      return None
    try:
      tf_config = json.loads(tf_config)
    except json.JSONDecodeError as e:
      raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
  if not isinstance(tf_config, dict):
    raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and "
                     f"'task', got {type(tf_config).__name__}")
  if not tf_config.get("cluster") and not tf_config.get("task"):
    return None  # e.g. "{}": TF treats it as no cluster.

  cluster = tf_config.get("cluster")
  if not isinstance(cluster, dict) or not cluster:
    raise ValueError("TF_CONFIG has no 'cluster' (a non-empty object mapping "
                     "job names to lists of 'host:port')")
  for job, addresses in cluster.items():
    if isinstance(addresses, dict):  # Sparse form {"0": "host:port"}.
      addresses = list(addresses.values())
    if (not isinstance(addresses, list) or not addresses or not all(
        isinstance(a, str) and a.rpartition(":")[2].isdigit()
        for a in addresses)):
      raise ValueError(f"TF_CONFIG cluster job {job!r} must be a non-empty "
                       f"list of 'host:port' strings, got {addresses!r}")

  task = tf_config.get("task")
  if not isinstance(task, dict):
    raise ValueError("TF_CONFIG has no 'task' (an object with 'type' and "
                     "'index')")
  task_type_ = task.get("type")
  if not isinstance(task_type_, str) or not task_type_:
    raise ValueError(f"TF_CONFIG task has no 'type', got {task!r}")
  index = task.get("index", 0)
  if isinstance(index, bool) or not isinstance(index, int):
    raise ValueError(f"TF_CONFIG task index must be an int, got {index!r}")
  if task_type_ != "evaluator":  # The evaluator runs outside the cluster.
    if task_type_ not in cluster:
      raise ValueError(f"TF_CONFIG task type {task_type_!r} is not a job in "
                       f"the cluster {sorted(cluster)}")
    size = len(cluster[task_type_])
    if not 0 <= index < size:
      raise ValueError(f"TF_CONFIG task index {index} is out of range for "
                       f"job {task_type_!r} with {size} task(s)")
  out = dict(tf_config)
  out["task"] = dict(task, type=task_type_, index=index)
  return out


def task_type(tf_config: Any = None) -> Optional[str]:
  """TF_CONFIG's task type ("chief", "worker", ...), None without TF_CONFIG."""
  config = parse_tf_config(tf_config)
  return config["task"]["type"] if config else None


def task_index(tf_config: Any = None) -> int:
  """TF_CONFIG's task index, 0 without TF_CONFIG."""
  config = parse_tf_config(tf_config)
  return config["task"]["index"] if config else 0


def num_workers(tf_config: Any = None) -> int:
  """Number of training tasks (chief + worker jobs) in TF_CONFIG, else 1."""
  config = parse_tf_config(tf_config)
  if not config:
    return 1
  return sum(len(config["cluster"].get(job, ())) for job in _MWMS_JOBS) or 1


def is_chief(tf_config: Any = None) -> bool:
  """Whether this process should write exports, summaries, config files.

  True without TF_CONFIG (single process), for task type "chief", and for
  "worker" 0 when the cluster has no "chief" job (MWMS's convention). False
  for every other task (other workers, evaluator, ps). Raises ValueError on
  a malformed TF_CONFIG (see `parse_tf_config`).
  """
  config = parse_tf_config(tf_config)
  if not config:
    return True
  kind, index = config["task"]["type"], config["task"]["index"]
  if kind == "chief":
    return True
  return kind == "worker" and index == 0 and "chief" not in config["cluster"]


# ------------------------------------------------------------------ strategies
def _tpu_strategy(tpu: Optional[str]) -> tf.distribute.TPUStrategy:
  label = "(auto-detected)" if tpu is None else repr(tpu)
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu not in ("", "local"):  # A local TPU needs no remote connection.
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  except Exception as e:  # pylint: disable=broad-except
    # TF raises ValueError, NotFoundError, other OpErrors, RuntimeError or
    # Google API errors here; all mean "no usable TPU".
    raise ValueError(
        f"TPU {label} not found or could not be initialized "
        f"({type(e).__name__}: {one_line(e)[:300]}). Use tpu='local' on a "
        "TPU VM, the TPU name or grpc://host:port for a TPU node, or another "
        "strategy.") from e


def _mirrored_strategy(num_gpus, devices, all_reduce_alg, num_packs):
  devices = mirrored_devices(
      [d.name for d in tf.config.list_logical_devices("GPU")],
      [d.name for d in tf.config.list_logical_devices("CPU")],
      num_gpus=num_gpus, devices=devices)
  cross_device_ops = None
  if all_reduce_alg is not None:
    ops = {
        "nccl": tf.distribute.NcclAllReduce,
        "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
    }
    if all_reduce_alg not in ops:
      raise ValueError(f"all_reduce_alg must be one of {sorted(ops)} or None, "
                       f"got {all_reduce_alg!r}")
    cross_device_ops = ops[all_reduce_alg](num_packs=num_packs)
  return _new_mirrored_strategy(devices=list(devices),
                                cross_device_ops=cross_device_ops)


# Every MirroredStrategy numbers its collective groups from
# 1 + `_collective_key_base` (a class attribute, 0). Two instances over the
# same devices in one process (a notebook that trains twice) then reuse each
# other's collective instances, and the second fails with "Shape mismatch in
# the collective instance ...". TF's own tests avoid it by moving the base
# (tensorflow/python/distribute/strategy_combinations.py); each strategy made
# here gets a base of its own, 100,000 keys apart (TF's spacing), and the first
# one already starts above the base 0 of strategies made directly.
_KEY_BASE_SPACING = 100_000
_key_bases = itertools.count(1)
_key_bases_lock = threading.Lock()


def _new_mirrored_strategy(**kwargs) -> tf.distribute.MirroredStrategy:
  """`tf.distribute.MirroredStrategy(**kwargs)` with its own collective keys."""
  strategy = tf.distribute.MirroredStrategy.__new__(
      tf.distribute.MirroredStrategy)
  with _key_bases_lock:
    base = _KEY_BASE_SPACING * next(_key_bases)
  # Read by MirroredExtended.__init__ (as container_strategy's attribute).
  strategy._collective_key_base = base  # pylint: disable=protected-access
  strategy.__init__(**kwargs)
  return strategy


def _multi_worker_strategy(communication, patch_keras_fit):
  config = parse_tf_config()
  if config:
    other = sorted(set(config["cluster"]) - set(_MWMS_JOBS))
    if other:
      raise ValueError(f"TF_CONFIG cluster has job(s) {other}; "
                       "multi_worker_mirrored supports only 'chief' and "
                       "'worker'")
    if not any(job in config["cluster"] for job in _MWMS_JOBS):
      raise ValueError("TF_CONFIG cluster has no 'worker' or 'chief' job")
  implementations = {
      "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
      "ring": tf.distribute.experimental.CommunicationImplementation.RING,
      "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
  }
  if communication not in implementations:
    raise ValueError(f"communication must be one of {sorted(implementations)}"
                     f", got {communication!r}")
  if patch_keras_fit:
    from official_conadv import keras_mwms_fix  # pylint: disable=g-import-not-at-top
    keras_mwms_fix.apply()
  return tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=tf.distribute.experimental.CommunicationOptions(
          implementation=implementations[communication]))


def get_strategy(name: str = "default",
                 tpu: Optional[str] = None,
                 num_gpus: Optional[int] = None,
                 devices: Optional[Sequence[str]] = None,
                 all_reduce_alg: Optional[str] = None,
                 num_packs: int = 1,
                 communication: str = "auto",
                 patch_keras_fit: bool = True) -> tf.distribute.Strategy:
  """Returns the `tf.distribute.Strategy` called `name` (see module doc).

  Args:
    name: one of `STRATEGY_NAMES` (case-insensitive).
    tpu: "tpu" only: "local", a TPU name, "grpc://host:port", or None.
    num_gpus: "mirrored" only: how many GPUs (None = all; 0 = CPUs).
    devices: "mirrored" only: explicit device list, overrides `num_gpus`.
    all_reduce_alg: "mirrored" only: None (TF's choice), "nccl" or
      "hierarchical_copy".
    num_packs: "mirrored" only: gradient packs for `all_reduce_alg`.
    communication: "multi_worker_mirrored" only: "auto", "ring" or "nccl".
    patch_keras_fit: "multi_worker_mirrored" only: apply `keras_mwms_fix`.

  Raises:
    ValueError (one line): unknown name, bad TF_CONFIG, TPU not found, bad
      device/GPU arguments.
  """
  key = str(name).strip().lower()
  if key == "tpu":
    return _tpu_strategy(tpu)
  if key == "mirrored":
    return _mirrored_strategy(num_gpus, devices, all_reduce_alg, num_packs)
  if key == "multi_worker_mirrored":
    return _multi_worker_strategy(communication, patch_keras_fit)
  if key == "one_device":
    device = one_device_name(
        [d.name for d in tf.config.list_logical_devices("GPU")])
    return tf.distribute.OneDeviceStrategy(device)
  if key == "default":
    return tf.distribute.get_strategy()
  raise ValueError(f"Unknown distribution strategy {name!r}; valid names: "
                   f"{', '.join(STRATEGY_NAMES)}")


# ------------------------------------------------------------------- batching
def num_replicas(strategy: Optional[tf.distribute.Strategy] = None) -> int:
  """Replicas in sync (all workers); `strategy` defaults to the current one."""
  strategy = strategy or tf.distribute.get_strategy()
  return int(strategy.num_replicas_in_sync)


def check_global_batch_size(global_batch_size: int,
                            strategy: Optional[tf.distribute.Strategy] = None
                           ) -> int:
  """Returns the per-replica batch size; ValueError unless it divides evenly.

  Args:
    global_batch_size: examples per step over all replicas (positive int).
    strategy: defaults to the current strategy.
  """
  replicas = num_replicas(strategy)
  if (isinstance(global_batch_size, bool) or
      not isinstance(global_batch_size, numbers.Integral) or
      global_batch_size <= 0):
    raise ValueError("global batch size must be a positive int, got "
                     f"{global_batch_size!r}")
  if global_batch_size % replicas:
    raise ValueError(f"global batch size {global_batch_size} is not divisible "
                     f"by the number of replicas ({replicas})")
  return int(global_batch_size) // replicas


# ------------------------------------------------------------------- devices
def mirrored_devices(gpus: Sequence[str],
                     cpus: Sequence[str],
                     num_gpus: Optional[int] = None,
                     devices: Optional[Sequence[str]] = None) -> list[str]:
  """The devices a "mirrored" strategy replicates over (no TF calls).

  Args:
    gpus: names of the visible logical GPUs in order, e.g. "/device:GPU:0".
    cpus: names of the logical CPUs, e.g. "/device:CPU:0".
    num_gpus: None = every GPU (the CPUs when there is none); k = the first k
      GPUs; 0 = the CPUs.
    devices: an explicit device list; wins over `gpus`, `cpus`, `num_gpus`.

  Returns:
    The device names, in order.

  Raises:
    ValueError (one line): `num_gpus` not an int >= 0, more GPUs asked for
      than are visible, an empty `devices` list, no device at all.
  """
  if devices is not None:
    if isinstance(devices, str):
      devices = [devices]
    devices = list(devices)
    if not devices:
      raise ValueError("devices is empty: give at least one device name, or "
                       "None to pick the GPUs (else the CPUs)")
    return devices
  gpus, cpus = list(gpus), list(cpus)
  if num_gpus is None:
    num_gpus = len(gpus)
  if isinstance(num_gpus, bool) or not isinstance(num_gpus, numbers.Integral):
    raise ValueError(f"num_gpus must be an int >= 0 or None, got {num_gpus!r}")
  if num_gpus < 0:
    raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
  if num_gpus > len(gpus):
    raise ValueError(f"num_gpus={num_gpus} but only {len(gpus)} GPU(s) are "
                     "visible")
  chosen = gpus[:num_gpus] if num_gpus else cpus
  if not chosen:
    raise ValueError("no device to mirror over: no GPU and no CPU is visible")
  return chosen


def one_device_name(gpus: Sequence[str]) -> str:
  """The device of "one_device": the first GPU if `gpus` lists one, else CPU:0.

  Args:
    gpus: names of the visible logical GPUs (only whether it is empty counts).
  """
  return "/gpu:0" if len(gpus) else "/cpu:0"


_STRATEGY_LABELS = (  # Public names; MWMS's class is CollectiveAllReduce...
    ("TPUStrategy", tf.distribute.TPUStrategy),
    ("MultiWorkerMirroredStrategy", tf.distribute.MultiWorkerMirroredStrategy),
    ("MirroredStrategy", tf.distribute.MirroredStrategy),
    ("OneDeviceStrategy", tf.distribute.OneDeviceStrategy),
)


def describe_devices(strategy: Optional[tf.distribute.Strategy] = None,
                     gpus: Optional[Sequence[str]] = None) -> str:
  """One line naming the devices a run uses, for the start-up log.

  For example "MirroredStrategy over 2 devices:
  /job:localhost/replica:0/task:0/device:GPU:0, ...; 2 GPU(s) visible" or
  "OneDeviceStrategy on /job:localhost/replica:0/task:0/device:CPU:0; no GPU
  visible". The GPU count tells at a glance whether TensorFlow found the CUDA
  libraries (see docs/gpu.md).

  Args:
    strategy: defaults to the current strategy.
    gpus: names of the visible logical GPUs; None asks TensorFlow.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if gpus is None:
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
  gpus = list(gpus)
  seen = f"{len(gpus)} GPU(s) visible" if gpus else "no GPU visible"
  label = next((n for n, cls in _STRATEGY_LABELS if isinstance(strategy, cls)),
               type(strategy).__name__)
  try:
    local = [str(d) for d in strategy.extended.worker_devices]
  except RuntimeError:  # The default strategy has no device list.
    local = None
  if local is None:
    device = gpus[0] if gpus else "/device:CPU:0"
    return (f"default strategy (no tf.distribute), ops placed on {device}; "
            f"{seen}")
  replicas = int(strategy.num_replicas_in_sync)
  names = ", ".join(local)
  if len(local) == 1 and replicas == 1:
    return f"{label} on {names}; {seen}"
  if replicas == len(local):
    return f"{label} over {replicas} devices: {names}; {seen}"
  return (f"{label} over {replicas} replicas, {len(local)} on this worker: "
          f"{names}; {seen}")
