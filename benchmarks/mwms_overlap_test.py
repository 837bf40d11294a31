"""Smoke test of benchmarks/mwms_overlap.py: the whole 2-process run, tiny.

One run of `mwms_overlap.run` (2 MultiWorkerMirrored worker processes on
127.0.0.1, ResNet-10 at 32 px, batch 2 per worker, 1 warm-up call and 2
rounds; about 30 s on a 2-core machine), shared by the tests below: the
JSON holds every candidate with positive times for both workers, its ratios
equal their definitions recomputed here from the stored medians and rounds,
the gradient byte count is 4 x the trainable parameters of the model built
here, and the distributed steps really all-reduced (the workers, fed
different batches, end with the same weights). The verdict of the
conclusion is also checked on made-up times (no TensorFlow).
"""

import json
import math
import statistics

import pytest

from benchmarks import mwms_overlap

TINY = dict(depth=10, image_size=32, per_worker_batch=2, num_classes=10,
            warmup=1, repeats=2)
TIMEOUT_S = 240  # The run takes about 30 s here.
NAMES = ("allreduce", "baseline", "sequential", "delayed", "lookahead",
         "attack", "train_part")


def _positive(value):
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(returned dict, the JSON file's content) of one tiny run."""
  out = tmp_path_factory.mktemp("mwms_overlap") / "mwms_overlap.json"
  result = mwms_overlap.run(timeout=TIMEOUT_S, output=str(out),
                            verbose=False, **TINY)
  with open(out) as f:
    return result, json.load(f)


def _definitions(t):
  """The ratios from {candidate: seconds}, written out independently."""
  total = t["attack"] + t["train_part"]
  return {
      "allreduce_over_baseline": t["allreduce"] / t["baseline"],
      "allreduce_over_lookahead": t["allreduce"] / t["lookahead"],
      "lookahead_over_sum": t["lookahead"] / total,
      "saving_s": total - t["lookahead"],
      "hideable_s": min(t["allreduce"], t["attack"]),
      "hidden_share_of_allreduce": (total - t["lookahead"]) /
                                   min(t["allreduce"], t["attack"]),
      "lookahead_over_sequential": t["lookahead"] / t["sequential"],
      "lookahead_over_delayed": t["lookahead"] / t["delayed"],
  }


def test_json_is_what_run_returned(run):
  result, data = run
  assert data == json.loads(json.dumps(result))
  assert set(data) >= {"header", "conclusion", "gradient", "timing",
                       "ratios", "overlap", "workers", "config", "machine",
                       "load_average"}
  assert data["config"]["candidates"] == list(NAMES)
  header = data["header"]
  for part in ("ResNet-10", "2 processes on loopback", "32px",
               "batch 2 per worker", "2 interleaved rounds",
               f"{data['machine']['cpu_count']} CPU cores",
               f"TF {data['machine']['tf_version']}",
               data["machine"]["date"]):
    assert part in header, (part, header)


def test_both_workers_reported_every_candidate(run):
  _, data = run
  workers = data["workers"]
  assert [w["task_index"] for w in workers] == [0, 1]
  assert [w["replicas"] for w in workers] == [2, 2]
  assert data["timing"] == workers[0]["timing"]
  assert data["ratios"] == workers[0]["ratios"]
  for w in workers:
    assert [r["candidate"] for r in w["timing"]] == list(NAMES)
    for row in w["timing"]:
      for key in ("median_s", "min_s", "max_s"):
        assert _positive(row[key]), (w["task_index"], key, row)
      assert row["min_s"] <= row["median_s"] <= row["max_s"]
    for name in NAMES:
      assert len(w["raw_seconds"][name]) == TINY["repeats"]
      assert all(_positive(s) for s in w["raw_seconds"][name])
      assert len(w["barrier_seconds"][name]) == TINY["repeats"]


def test_ratios_equal_their_definitions(run):
  _, data = run
  for w in data["workers"]:
    medians = {r["candidate"]: r["median_s"] for r in w["timing"]}
    raw = w["raw_seconds"]
    assert medians == {n: statistics.median(raw[n]) for n in NAMES}
    ratios = w["ratios"]
    want = _definitions(medians)
    assert set(ratios["from_medians"]) == set(want)
    for key, value in want.items():
      assert ratios["from_medians"][key] == pytest.approx(value, rel=1e-12,
                                                          abs=1e-15), key
    rounds = [_definitions({n: raw[n][i] for n in NAMES})
              for i in range(TINY["repeats"])]
    for key in want:
      assert ratios["paired_rounds_median"][key] == pytest.approx(
          statistics.median(r[key] for r in rounds), rel=1e-12,
          abs=1e-15), key
    assert ratios["rounds"] == TINY["repeats"]
    assert ratios["rounds_lookahead_below_sum"] == sum(
        l < a + t for a, t, l in zip(raw["attack"], raw["train_part"],
                                     raw["lookahead"]))
  m = data["ratios"]["from_medians"]
  assert f"lookahead = {m['lookahead_over_sum']:.2f} x (attack + " in (
      data["conclusion"])
  assert f"takes {m['allreduce_over_baseline']:.2f} x a baseline" in (
      data["conclusion"])


def test_gradient_bytes_are_the_trainable_variables(run):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import resnet  # pylint: disable=g-import-not-at-top
  _, data = run
  model = conadv_model.ConAdvModel(
      resnet.ResNet(depth=TINY["depth"], num_classes=TINY["num_classes"]),
      adversary=conadv_model.AdversaryConfig(delay=1, schedule="lookahead"))
  size = TINY["image_size"]
  model.build((None, size, size, 3))
  variables = model.trainable_variables
  params = sum(int(np.prod(v.shape)) for v in variables)
  for w in data["workers"]:
    gradient = w["gradient"]
    assert gradient["bytes"] == params * 4
    assert gradient["num_params"] == params
    assert gradient["num_tensors"] == len(variables)
    assert gradient["dtypes"] == ["float32"]
  assert data["gradient"]["mib"] == params * 4 / (1 << 20)


def test_steps_all_reduced_across_workers(run):
  _, data = run
  w0, w1 = data["workers"]
  for name, after in w0["weights_checksum"].items():
    # The steps changed the weights, and identically on both workers
    # although each worker fed its own batch.
    assert after != w0["weights_checksum_before_timing"][name], name
    assert w1["weights_checksum"][name] == pytest.approx(after, rel=1e-9)
  for w in (w0, w1):
    check = w["allreduce_check"]
    assert check["got"] == pytest.approx(check["want"], rel=1e-5)


@pytest.mark.parametrize("lookahead, verdict", [
    (1.0, "does not hide the all-reduce"),  # = attack + train_part.
    (0.95, "hides part of the all-reduce (50% of"),
    (0.9, "hides the all-reduce"),
])
def test_conclusion_verdict(lookahead, verdict):
  times = {"allreduce": [0.3], "baseline": [0.5], "sequential": [1.1],
           "delayed": [1.0], "lookahead": [lookahead], "attack": [0.1],
           "train_part": [0.9]}
  ratios = mwms_overlap.ratios(times)
  assert ratios["from_medians"]["hidden_share_of_allreduce"] == (
      pytest.approx((1.0 - lookahead) / 0.1))
  text = mwms_overlap.conclusion(ratios, 1 << 20)
  assert f"the attack {verdict}" in text, text
  assert "1.0 MiB" in text
