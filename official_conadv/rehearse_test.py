"""Tests of the rehearsal's row list and toy configs (the rows themselves run
in `make rehearse`, 40-55 minutes: docs/rehearsal.md)."""

import pytest

from official_conadv import rehearse


def test_every_conadv_row_without_autoaugment_is_also_rehearsed_as_lookahead():
  rows = rehearse.rows_to_run("all")
  plain = [r for r in rows if not r.endswith(rehearse.LOOKAHEAD)]
  lookahead = [r for r in rows if r.endswith(rehearse.LOOKAHEAD)]
  assert len(plain) == 28 and len(lookahead) == 7
  assert rows == plain + lookahead  # Delayed rows first: compared against.
  assert lookahead == [r + rehearse.LOOKAHEAD for r in plain
                       if "_conadv_" in r and "_conadv_aa_" not in r]
  assert rehearse.rows_to_run("imagenet_resnet50_conadv_96k+lookahead") == [
      "imagenet_resnet50_conadv_96k+lookahead"]
  with pytest.raises(ValueError, match="Unknown row"):
    rehearse.rows_to_run("imagenet_resnet50_lars_96k+lookahead")


@pytest.mark.parametrize("row", ["imagenet_resnet50_conadv_96k",
                                 "imagenet_resnet50_conadv_1k"])
def test_lookahead_toy_config_differs_only_in_the_schedule(row, tmp_path):
  delayed = rehearse.toy_config(row, str(tmp_path))
  lookahead = rehearse.toy_config(row + rehearse.LOOKAHEAD, str(tmp_path))
  assert delayed.adversary.schedule == "delayed"
  assert lookahead.adversary.schedule == "lookahead"
  assert lookahead.adversary.delay == delayed.adversary.delay >= 1
  lookahead.adversary.schedule = "delayed"
  assert lookahead == delayed


def test_weights_and_optimizer_keeps_what_both_schedules_share():
  tensors = {"model/backbone_weights.S0/.ATTRIBUTES/VARIABLE_VALUE": 1,
             "optimizer/_variables.S1/.ATTRIBUTES/VARIABLE_VALUE": 2,
             "model/stale_buffer.S0/.ATTRIBUTES/VARIABLE_VALUE": 3,
             "model/lookahead_queue.S0.Sreplica0/.ATTRIBUTES/VARIABLE_VALUE": 4}
  assert sorted(rehearse.weights_and_optimizer(tensors).values()) == [1, 2]


@pytest.mark.parametrize("ends,want", [
    ([5, 10, 11], 6),  # The 1k rows' toy loops: inside the second loop.
    ([2, 4, 5], 3),    # 16k-96k.
    ([1, 2, 3], 1),    # Loops of one step have no inside.
    ([5], 1),          # One loop.
])
def test_sigterm_step_is_inside_the_second_loop(ends, want):
  # The resume check and benchmarks/reproducibility.py stop runs here.
  assert rehearse.sigterm_step(ends) == want
