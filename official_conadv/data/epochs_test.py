"""Tests for epochs.py: the batch layout and the eval pass size (no data)."""

import types

import pytest
import tensorflow as tf

from official_conadv.data import epochs
from official_conadv.data import input_pipeline as ip


def test_num_eval_steps():
  assert ip.num_eval_steps(50_000, 1024) == 49
  assert ip.num_eval_steps(50_000, 1024, 4) == 49   # 12,500 <= 49 * 256.
  assert ip.num_eval_steps(49_152, 1024) == 48      # Exactly full.
  assert ip.num_eval_steps(10, 6, 3) == 2           # 4 <= 2 * 6 / 3.
  assert ip.num_eval_steps(1, 8, 8) == 1
  with pytest.raises(ValueError, match="num_examples must be > 0"):
    ip.num_eval_steps(0, 8)
  with pytest.raises(ValueError, match="multiple of num_input_pipelines"):
    ip.num_eval_steps(10, 6, 4)


@pytest.mark.parametrize("replicas,pipelines,want", [
    (1, 1, (12, 1, 12)),   # One device: the whole batch.
    (4, 1, (3, 4, 12)),    # Mirrored over 4: one pipeline feeds all four.
    (4, 2, (3, 2, 6)),     # 2 workers of 2 replicas each.
])
def test_layout_splits_the_global_batch(replicas, pipelines, want):
  context = tf.distribute.InputContext(pipelines, 0, replicas)
  assert epochs.layout(12, context) == want


def test_layout_errors():
  with pytest.raises(ValueError, match="not divisible by the number of "
                     "replicas"):
    epochs.layout(10, tf.distribute.InputContext(1, 0, 4))
  with pytest.raises(ValueError, match="multiple of num_input_pipelines"):
    epochs.layout(6, tf.distribute.InputContext(2, 0, 3))
  with pytest.raises(ValueError, match="global_batch_size must be > 0"):
    epochs.check_batch_size(0, 1)


def test_a_window_starts_mid_epoch_at_its_first_position():
  """start_step s starts at element k = s * E of the epoch stream: 12
  records, 4 per step, 3 steps per epoch; step 4 is position 4 of epoch 1."""
  records = lambda context, file_seed: tf.data.Dataset.from_tensor_slices(
      {"index": tf.range(12, dtype=tf.int64)})
  plan = types.SimpleNamespace(
      source=types.SimpleNamespace(num_examples=12, fallible=False,
                                   records=records),
      steps_per_epoch=3, global_batch_size=4, start_step=4, seed=0,
      shuffle_buffer=1, num_steps=2, skip_corrupt=False)
  ds, first = epochs.train_positions(plan, tf.distribute.InputContext(),
                                     per_step=4)
  assert first == 16
  got = [(int(k), int(r["index"])) for k, r in ds]
  assert got == [(k, k % 12) for k in range(16, 24)]
