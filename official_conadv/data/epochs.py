"""Which records each input pipeline reads, and how many.

The layout of a global batch over input pipelines and replicas, the training
stream of data epochs (seeded per epoch, so a pipeline built at any step
reads at most one epoch before its first batch), and the size of the padded
eval pass. pipeline.py (its docstring describes the whole stream) builds the
datasets from these.
"""

import tensorflow as tf

SEED_MOD = 2**31 - 1


def check_batch_size(global_batch_size: int, num_replicas: int):
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be > 0, got "
                     f"{global_batch_size}.")
  if global_batch_size % num_replicas:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the "
        f"number of replicas ({num_replicas}); use a multiple of "
        f"{num_replicas}.")


def num_eval_steps(num_examples: int, global_batch_size: int,
                   num_input_pipelines: int = 1) -> int:
  """Eval batches per replica that score every one of `num_examples` images
  once: the smallest S with ceil(num_examples / P) <= S * global_batch_size
  / P (each of the P pipelines holds at most ceil(N / P) records of a
  by-record shard and yields S * global_batch_size / P elements).

  E.g. ImageNet's 50,000 at 1024: 49 (50,176 slots, 176 padding), with 1,
  2 or 4 pipelines alike; 10 images, batch 6, 3 pipelines: 2 (shards
  of 4, 3, 3 in 2 x 2 slots each).
  """
  if num_examples <= 0:
    raise ValueError(f"num_examples must be > 0, got {num_examples}.")
  if num_input_pipelines <= 0:
    raise ValueError(f"num_input_pipelines must be > 0, got "
                     f"{num_input_pipelines}.")
  if global_batch_size <= 0 or global_batch_size % num_input_pipelines:
    raise ValueError(
        f"global_batch_size must be a positive multiple of "
        f"num_input_pipelines ({num_input_pipelines}), got "
        f"{global_batch_size}.")
  per_pipeline = global_batch_size // num_input_pipelines
  shard = -(-num_examples // num_input_pipelines)
  return -(-shard // per_pipeline)


# Graph-level seed of the per-epoch dataset functions: their shuffles take
# tensor seeds, and a graph seed of our own keeps them independent of
# tf.random.set_seed (and avoids TF's failure on a global seed of 0 with a
# tensor op seed).
_EPOCH_GRAPH_SEED = 1
_EPOCH_KEY = 0x45504F4348  # "EPOCH": per-epoch seeds use their own key.


def end_marker(spec):
  """An element like `spec`'s records with index -1: marks the end of a
  finite pass, so failures among the last records are caught too."""

  def blank(key, s):
    if key == "index":
      return tf.constant(-1, tf.int64)
    shape = [0 if d is None else d for d in s.shape]
    if s.dtype == tf.string:
      return tf.fill(shape, "")
    return tf.zeros(shape, s.dtype)

  return {k: blank(k, s) for k, s in spec.items()}


def layout(global_batch_size: int, context: tf.distribute.InputContext):
  """(per-replica batch B, replicas fed by this pipeline, elements per
  global step E = B * replicas)."""
  check_batch_size(global_batch_size, context.num_replicas_in_sync)
  pipelines = context.num_input_pipelines
  if context.num_replicas_in_sync % pipelines:
    raise ValueError(
        f"num_replicas_in_sync ({context.num_replicas_in_sync}) must be a "
        f"multiple of num_input_pipelines ({pipelines}).")
  batch = context.get_per_replica_batch_size(global_batch_size)
  replicas = context.num_replicas_in_sync // pipelines
  return batch, replicas, batch * replicas


def train_positions(plan, context: tf.distribute.InputContext,
                    per_step: int):
  """The training stream of (k, record) from element start_step * per_step
  on (pipeline.py's docstring), and that first k, for the pipeline's `plan`
  (pipeline.Plan). A finite window (num_steps without skip_corrupt) of a
  fallible source ends with an end marker."""
  src = plan.source
  spe = plan.steps_per_epoch or max(
      1, (src.num_examples or 0) // plan.global_batch_size)
  epoch_len = spe * per_step  # M
  first = plan.start_step * per_step
  e0, j0 = divmod(first, epoch_len)
  epoch_key = tf.constant([plan.seed ^ _EPOCH_KEY,
                           context.input_pipeline_id], tf.int64)

  def epoch(e):
    """Positions [max(first - e * M, 0), M) of epoch e (an int64 scalar)."""
    if not tf.executing_eagerly():  # tf.data debug mode runs eagerly.
      tf.random.set_seed(_EPOCH_GRAPH_SEED)  # This function's graph only.
    file_seed, shuffle_seed = tf.unstack(tf.random.stateless_uniform(
        [2], tf.random.experimental.stateless_fold_in(epoch_key, e),
        minval=1, maxval=SEED_MOD, dtype=tf.int64))
    ds = src.records(context, file_seed)
    if plan.shuffle_buffer > 1:
      ds = ds.shuffle(plan.shuffle_buffer, seed=shuffle_seed,
                      reshuffle_each_iteration=True)
    # Positions, not elements: an unreadable record (an error here) uses up
    # its position, so every epoch spans exactly M values of k.
    ds = ds.repeat().enumerate().take_while(lambda j, _: j < epoch_len)
    if j0:  # Only epoch e0 starts after 0.
      ds = ds.filter(lambda j, _: j >= first - e * epoch_len)
    return ds.map(lambda j, record: (e * epoch_len + j, record))

  # Finite windows end with their last epoch, unless skipped corrupt
  # records must be made up from the records after the window.
  bounded = plan.num_steps is not None and not plan.skip_corrupt
  if bounded:
    total = plan.num_steps * per_step
    epochs = tf.data.Dataset.range(e0, (first + total - 1) // epoch_len + 1)
  else:
    epochs = tf.data.Dataset.counter(e0)
  ds = epochs.flat_map(epoch)
  if bounded:
    ds = ds.take(total)
    if src.fallible:  # So a failure at the window's last position shows.
      ds = ds.concatenate(tf.data.Dataset.from_tensors((
          tf.constant(first + total, tf.int64),
          end_marker(ds.element_spec[1]))))
  return ds, first


def check_first_n(ds, n: int, message: str):
  """The first n elements of `ds` (at least n + 1 long, weights last), and
  fails if element n has a nonzero weight (a real image that does not fit).

  Delays the stream by one element (a scan), so the check has run before
  element n - 1 is out, and a consumer that stops after n elements (Keras
  `steps`) still sees the failure. Tensors are shared, not copied."""
  zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                ds.element_spec)

  def delay(previous, indexed):
    i, element = indexed
    fits = tf.debugging.Assert(
        tf.logical_or(i < n, tf.equal(element[-1], 0.0)), [message])
    with tf.control_dependencies([fits]):
      previous = tf.nest.map_structure(tf.identity, previous)
    return element, previous

  return ds.take(n + 1).enumerate().scan(zeros, delay).skip(1)

