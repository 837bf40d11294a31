"""Tests of the analytic pod model: hand-computed values, invariants over a
grid, the CPU check against the committed measurements, and the committed
JSON (experiments/results/pod_model.json) against the default command."""

import copy
import itertools
import json
import os
import subprocess
import sys

import pytest

from benchmarks import pod_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "experiments", "results", "pod_model.json")
# Round numbers for hand computation: 1e12 FLOP/s at utilization 0.5, links
# of 1e6 B/s, 1 ms per hop, HBM 1e9 B/s.
HW = {"peak_flops": 2e12, "hbm_bandwidth": 1e9, "link_bandwidth": 1e6,
      "links": 4, "torus_dims": 2, "hop_latency": 1e-3}
HAND = dict(utilization=0.5, forward_flops=1e9, params=9_000,
            adv_bn_params=1_000, grad_bytes=4, weight_bytes=4,
            image_bytes=100, label_bytes=4)


def test_resnet50_macs():
  assert pod_model.resnet50_macs() == 4_089_184_256
  assert round(pod_model.resnet50_macs() / 1e7) * 1e7 == 4.09e9
  assert pod_model.FORWARD_FLOPS == 2 * 4.09e9
  assert pod_model.RESNET50_PARAMS + pod_model.ADV_BN_PARAMS == 25_610_152


def test_torus_shape():
  assert pod_model.torus_shape(1, 2) == (1, 1)
  assert pod_model.torus_shape(4, 2) == (2, 2)
  assert pod_model.torus_shape(8, 2) == (2, 4)
  assert pod_model.torus_shape(128, 2) == (8, 16)
  assert pod_model.torus_shape(512, 2) == (16, 32)
  assert pod_model.torus_shape(1024, 2) == (32, 32)
  assert pod_model.torus_shape(4096, 3) == (16, 16, 16)
  assert pod_model.torus_shape(128, 3) == (4, 4, 8)


def test_allreduce_hand_values():
  # 4 chips, 1e6 bytes. Ring: 2 * 3/4 * 1e6 / (1e6 * 2 links) = 0.75 s,
  # 2 * 3 hops of 1 ms. Torus 2x2: 4 links -> 0.375 s, 2 * (1 + 1) hops.
  t, parts = pod_model.allreduce_time(1e6, 4, HW, "ring")
  assert parts["bandwidth_s"] == pytest.approx(0.75, rel=1e-12)
  assert parts["hops"] == 6 and parts["links_used"] == 2
  assert t == pytest.approx(0.756, rel=1e-12)
  t, parts = pod_model.allreduce_time(1e6, 4, HW, "torus")
  assert parts["bandwidth_s"] == pytest.approx(0.375, rel=1e-12)
  assert parts["hops"] == 4 and parts["shape"] == [2, 2]
  assert t == pytest.approx(0.379, rel=1e-12)
  # 32x32 torus: 2 * 2 * (32 - 1) = 124 hops; a 1024-chip ring 2046.
  assert pod_model.allreduce_time(1, 1024, HW, "torus")[1]["hops"] == 124
  assert pod_model.allreduce_time(1, 1024, HW, "ring")[1]["hops"] == 2046
  with pytest.raises(ValueError, match="topology"):
    pod_model.allreduce_time(1, 4, HW, "tree")


def test_tpu_v3_allreduce_of_resnet50():
  # 25,610,152 float32 gradients on a 32x32 v3 torus: bandwidth
  # 2 * 1023/1024 * 102,440,608 B / (8.3e10 B/s * 4 links), + 124 us.
  hw = pod_model.hardware("tpu_v3")
  t, parts = pod_model.allreduce_time(102_440_608, 1024, hw)
  assert parts["bandwidth_s"] == pytest.approx(
      2 * 1023 / 1024 * 102_440_608 / 3.32e11, rel=1e-12)
  assert parts["latency_s"] == pytest.approx(124e-6, rel=1e-12)
  assert t * 1e3 == pytest.approx(0.7405, abs=1e-4)


def test_compute_times_hand_values():
  # b = 10, F = 1e9, 1e12 effective FLOP/s: 3e10 / 2e10 / 6e10 FLOPs.
  c = pod_model.compute_times(10, HW, 0.5, 1e9, pgd_steps=1)
  assert c == pytest.approx({"baseline": 0.03, "attack": 0.02,
                             "train_part": 0.06}, rel=1e-12)
  assert pod_model.compute_times(10, HW, 0.5, 1e9, 3)["attack"] == (
      pytest.approx(0.06, rel=1e-12))
  # TPU v3 at utilization 0.5: 3 x 8.18e9 x 128 / 61.5e12 = 51.08 ms.
  v3 = pod_model.compute_times(128, pod_model.hardware("tpu_v3"))
  assert v3["baseline"] == pytest.approx(3 * 8.18e9 * 128 / 61.5e12,
                                         rel=1e-12)


def test_memory_extras_hand_values():
  nbytes, seconds = pod_model.memory_extras(10, HW, 10_000, 4, 100, 4)
  assert nbytes == {"delayed": 80_000, "lookahead": 2 * 10 * 204}
  assert seconds == pytest.approx({"delayed": 8e-5, "lookahead": 4.08e-6},
                                  rel=1e-12)


def test_step_times_exact():
  # Dyadic values: every sum below is exact in floating point.
  compute = {"baseline": 3.0, "attack": 2.0, "train_part": 6.0}
  extras = {"delayed": 0.125, "lookahead": 0.25}
  hidden = pod_model.step_times(compute, 0.5, 1.0, extras)
  assert hidden == {"baseline": 3.5, "sequential": 9.0, "delayed": 8.125,
                    "lookahead": 8.25}
  exposed = pod_model.step_times(compute, 4.5, 5.0, extras)
  assert exposed == {"baseline": 7.5, "sequential": 13.0, "delayed": 11.125,
                     "lookahead": 11.25}


def test_predict_hand_case():
  row = pod_model.predict(40, 4, HW, topology="torus", **HAND)
  assert row["per_chip_batch"] == 10
  assert row["compute_ms"] == pytest.approx(
      {"baseline": 30.0, "attack": 20.0, "train_part": 60.0}, rel=1e-12)
  ar = row["allreduce"]
  assert ar["bytes_adversarial"] == 40_000 and ar["bytes_baseline"] == 36_000
  # Torus: 1.5 * 40,000 / 4e6 s = 15 ms + 4 hops = 19 ms; baseline 13.5 + 4.
  assert ar["t_ar_ms"] == pytest.approx(19.0, rel=1e-12)
  assert ar["t_ar_baseline_ms"] == pytest.approx(17.5, rel=1e-12)
  # Ring: 1.5 * 40,000 / 2e6 s = 30 ms + 6 hops.
  assert ar["ring_ms"] == pytest.approx(36.0, rel=1e-12)
  assert row["memory_extra_ms"] == pytest.approx(
      {"delayed": 0.08, "lookahead": 0.00408}, rel=1e-12)
  assert row["step_ms"] == pytest.approx(
      {"baseline": 47.5, "sequential": 99.0, "delayed": 80.08,
       "lookahead": 80.00408}, rel=1e-12)
  assert row["attack_hides_allreduce"]
  assert row["saving_vs_sequential_ms"] == pytest.approx(
      {"delayed": 18.92, "lookahead": 18.99592}, rel=1e-12)

  ring = pod_model.predict(40, 4, HW, topology="ring", **HAND)
  assert not ring["attack_hides_allreduce"]
  assert ring["allreduce"]["exposed_after_attack_ms"] == pytest.approx(
      16.0, rel=1e-12)
  assert ring["step_ms"]["sequential"] == pytest.approx(116.0, rel=1e-12)
  assert ring["step_ms"]["delayed"] == pytest.approx(96.08, rel=1e-12)
  assert ring["saving_vs_sequential_ms"]["delayed"] == pytest.approx(
      19.92, rel=1e-12)

  # Half of the all-reduce overlapped with the backward: 9.5 ms exposed.
  half = pod_model.predict(40, 4, HW, backward_overlap=0.5, **HAND)
  assert half["allreduce"]["exposed_ms"] == pytest.approx(9.5, rel=1e-12)
  assert half["step_ms"]["sequential"] == pytest.approx(89.5, rel=1e-12)


def test_single_chip_has_no_allreduce():
  for preset, topology in itertools.product(pod_model.PRESETS,
                                            pod_model.TOPOLOGIES):
    row = pod_model.predict(128, 1, pod_model.hardware(preset),
                            topology=topology)
    assert row["allreduce"]["t_ar_ms"] == 0.0
    assert row["allreduce"]["ring_ms"] == 0.0
    assert row["allreduce"]["torus_ms"] == 0.0
    steps, mem = row["step_ms"], row["memory_extra_ms"]
    for name in ("delayed", "lookahead"):
      assert steps[name] == pytest.approx(steps["sequential"] + mem[name],
                                          rel=1e-12)
      assert row["saving_vs_sequential_ms"][name] == pytest.approx(
          -mem[name], rel=1e-9)


def _grid():
  for preset, topology, k, overlap, chips, b in itertools.product(
      pod_model.PRESETS, pod_model.TOPOLOGIES, (1, 2, 10), (0.0, 0.5, 1.0),
      (1, 2, 4, 8, 64, 128, 256, 512, 1024), (1, 8, 64, 128, 256)):
    yield pod_model.predict(b * chips, chips, pod_model.hardware(preset),
                            topology=topology, pgd_steps=k,
                            backward_overlap=overlap)


def test_invariants_over_grid():
  n = 0
  for row in _grid():
    n += 1
    c, s, ar = row["compute_ms"], row["step_ms"], row["allreduce"]
    mem = row["memory_extra_ms"]
    exposed, attack = ar["exposed_ms"], c["attack"]
    assert ar["exposed_after_attack_ms"] == max(0.0, exposed - attack)
    assert row["attack_hides_allreduce"] == (attack >= exposed)
    for name in ("sequential", "delayed", "lookahead"):
      assert s["baseline"] <= s[name]
    for name in ("delayed", "lookahead"):
      saving = row["saving_vs_sequential_ms"][name]
      assert saving == pytest.approx(min(exposed, attack) - mem[name],
                                     rel=1e-9, abs=1e-12)
      # Without its memory traffic a decoupled schedule never loses.
      assert s[name] - mem[name] <= s["sequential"] * (1 + 1e-12)
      # With it, it wins exactly when the hidden communication is larger.
      if abs(min(exposed, attack) - mem[name]) > 1e-9:
        assert (s[name] <= s["sequential"]) == (
            min(exposed, attack) >= mem[name])
  assert n == 2 * 2 * 3 * 3 * 9 * 5


def test_lookahead_can_be_slower_than_sequential():
  # 32K on 128 v3 chips (256 per chip): pushing and popping 256 examples
  # (0.69 ms of HBM traffic) costs more than the 0.66 ms of all-reduce the
  # attack hides, so the brief's "lookahead <= sequential" does not hold
  # here; delayed (0.23 ms of traffic) still wins.
  row = pod_model.predict(32768, 128, pod_model.hardware("tpu_v3"))
  assert row["attack_hides_allreduce"]
  assert row["step_ms"]["lookahead"] > row["step_ms"]["sequential"]
  assert row["step_ms"]["delayed"] < row["step_ms"]["sequential"]


def test_min_hiding_batch():
  assert pod_model.min_hiding_batch(0.0, 1.0) == 1
  assert pod_model.min_hiding_batch(3.0, 1.0) == 3
  assert pod_model.min_hiding_batch(3.0001, 1.0) == 4
  hw = pod_model.hardware("tpu_v3")
  rows = pod_model.sweep((8, 1024), (1, 3), hw)
  assert [(r["chips"], r["pgd_steps"]) for r in rows] == [
      (8, 1), (8, 3), (1024, 1), (1024, 3)]
  for r in rows:
    for topology in pod_model.TOPOLOGIES:
      b = r[f"min_per_chip_batch_{topology}"]
      exposed = r[f"exposed_{topology}_ms"] / 1e3
      attack = pod_model.compute_times(b, hw, pgd_steps=r["pgd_steps"])
      assert attack["attack"] >= exposed
      if b > 1:
        smaller = pod_model.compute_times(b - 1, hw,
                                          pgd_steps=r["pgd_steps"])
        assert smaller["attack"] < exposed
  # A 1024-chip ring needs 13 images per chip at PGD-1, the torus 3.
  assert rows[2]["min_per_chip_batch_ring"] == 13
  assert rows[2]["min_per_chip_batch_torus"] == 3


def test_hardware_presets_and_overrides():
  v3 = pod_model.hardware("tpu_v3")
  assert v3 == {"peak_flops": 123e12, "hbm_bandwidth": 900e9,
                "link_bandwidth": 8.3e10, "links": 4, "torus_dims": 2,
                "hop_latency": 1e-6}
  v4 = pod_model.hardware("tpu_v4", hop_latency=None, links=5)
  assert v4["peak_flops"] == 275e12 and v4["hbm_bandwidth"] == 1.2e12
  assert v4["links"] == 5 and v4["hop_latency"] == 1e-6
  with pytest.raises(ValueError, match="Unknown preset"):
    pod_model.hardware("tpu_v9")
  with pytest.raises(ValueError, match="Unknown hardware"):
    pod_model.hardware("tpu_v3", clock=1)
  with pytest.raises(ValueError, match="multiple"):
    pod_model.predict(1000, 3, v3)
  with pytest.raises(ValueError, match="exceed"):
    pod_model.run(rows=["4096x2048"], verbose=False)


def test_cpu_check_against_committed_measurements():
  with open(os.path.join(ROOT, pod_model.SCHEDULES_JSON)) as f:
    measured = json.load(f)
  check = pod_model.cpu_check(measured)
  ratios = {r["ratio"]: r for r in check["ratios"]}
  medians = {r["candidate"]: r["median_s"] for r in measured["timing"]}
  assert ratios["attack / train_part"]["model"] == pytest.approx(1 / 3)
  assert ratios["sequential / baseline"]["model"] == pytest.approx(8 / 3)
  assert ratios["lookahead / sequential"]["model"] == 1.0
  assert ratios["attack / train_part"]["measured_medians"] == (
      medians["attack"] / medians["train_part"])
  assert ratios["sequential / baseline"]["measured_medians"] == pytest.approx(
      2.1328, abs=1e-4)
  memory = {m["quantity"].split(" (")[0]: m for m in check["memory"]}
  for m in memory.values():
    assert m["model"] == m["measured"]
  assert memory["ring buffer bytes per slot"]["model"] == 102_440_608
  assert memory["queue bytes per example"]["model"] == 1_208_224


def _without_date(result):
  result = copy.deepcopy(result)
  del result["header"]["date"]
  return result


def test_default_command_reproduces_committed_json(tmp_path):
  out = tmp_path / "pod_model.json"
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.pod_model", f"--output={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "CPU check" in proc.stdout
  with open(out) as f:
    fresh = json.load(f)
  with open(COMMITTED) as f:
    committed = json.load(f)
  assert _without_date(fresh) == _without_date(committed)
  assert set(committed) == {"header", "rows", "sweep", "cpu_check"}
  # run() with its defaults is the default command.
  result = json.loads(json.dumps(pod_model.run(verbose=False)))
  assert _without_date(result) == _without_date(committed)
