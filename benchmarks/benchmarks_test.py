"""Smoke tests of the benchmark scripts at tiny sizes (seconds, not numbers).

Each script's `run(**kwargs)` (what its `main` calls) runs on a small
ResNet at 32 px, batch 2, one timed round; the JSON it writes must have the
expected keys and positive numbers. `step_time.py` has no `run`: it runs as
a subprocess, as a user would.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import converted_backbone
from benchmarks import input_pipeline
from benchmarks import peers
from benchmarks import resume_cost
from benchmarks import stale_buffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=32, batch_size=2, num_classes=10, warmup=0, repeats=1)


def _positive(value):
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_step_time_script(tmp_path):
  out = tmp_path / "step_time.json"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", "--depth=10",
       "--image_size=32", "--batch_size=2", "--num_classes=10", "--warmup=0",
       "--repeats=1", "--modes=baseline,delay1", f"--output={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "baseline" in proc.stdout and "delay1" in proc.stdout
  data = _load(out)
  assert set(data) >= {"header", "rows", "raw_seconds"}
  assert [r["mode"] for r in data["rows"]] == ["baseline", "delay1"]
  for row in data["rows"]:
    for key in ("median_s", "min_s", "max_s", "images_per_s",
                "ratio_to_baseline", "flop_model_ratio"):
      assert _positive(row[key]), (key, row)
  assert all(len(v) == 1 for v in data["raw_seconds"].values())


def test_peers_tfm(tmp_path):
  out = tmp_path / "peers.json"
  result = peers.run(depth=10, peers=["tfm"], output=str(out), verbose=False,
                     **TINY)
  assert _load(out) == json.loads(json.dumps(result))
  assert set(result) >= {"header", "rows", "raw_seconds", "config"}
  rows = {r["impl"]: r for r in result["rows"]}
  assert set(rows) == {"ours", "tfm"}
  for row in rows.values():
    for key in ("median_s", "min_s", "max_s", "images_per_s",
                "peer_over_ours", "top_level_ops", "total_ops"):
      assert _positive(row[key]), (key, row)
    assert row["function_library_ops"] >= 0
  assert rows["ours"]["peer_over_ours"] == 1.0
  # Warm-up is at least one call, so no timed call includes the trace.
  assert result["config"]["warmup"] == 1


def test_peers_keras_step():
  # keras.applications has ResNet-50 as its smallest ResNet: build that peer
  # alone (the full run is covered by test_peers_tfm).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="no ResNet-18"):
    peers.build_keras(18, 32, 10, False)
  step = peers.build_keras(50, 32, 10, False)
  x = tf.random.uniform((2, 32, 32, 3))
  y = tf.constant([1, 2])
  assert math.isfinite(float(step(x, y)))
  ops = peers.graph_op_counts(step, (x, y))
  assert ops["top_level_ops"] > 1000 and ops["total_ops"] >= 1000


def test_peers_rejects_unknown():
  with pytest.raises(ValueError, match="Unknown peers"):
    peers.run(depth=10, peers=["torch"], verbose=False, **TINY)


def test_converted_backbone(tmp_path):
  """Schema of the EfficientNet-B0 benchmark, and its candidates train the
  same network: the plain and the converted model (same seed, Keras BN ops:
  fused=False) take the same first step (same loss). (The default fused BN
  kernel differs by float rounding, which batch statistics of 2 images at
  1x1 spatial size in the last blocks amplify.)"""
  out = tmp_path / "converted.json"
  tiny = {k: v for k, v in TINY.items() if k != "warmup"}
  result = converted_backbone.run(candidates=["plain", "converted"],
                                  warmup=1, fused=False, output=str(out),
                                  verbose=False, **tiny)
  assert _load(out) == json.loads(json.dumps(result))
  rows = {r["candidate"]: r for r in result["rows"]}
  assert list(rows) == ["plain", "converted"]
  for row in rows.values():
    for key in ("median_s", "min_s", "max_s", "images_per_s", "over_plain",
                "over_plain_min"):
      assert _positive(row[key]), (key, row)
  assert rows["plain"]["over_plain"] == 1.0
  losses = result["first_step_loss"]
  assert _positive(losses["plain"])
  assert losses["converted"] == pytest.approx(losses["plain"], rel=1e-6)
  with pytest.raises(ValueError, match="Unknown candidates"):
    converted_backbone.run(candidates=["timm"], verbose=False, **TINY)


def test_stale_buffer(tmp_path):
  out = tmp_path / "stale.json"
  result = stale_buffer.run(depth=10, taus=(1, 2), output=str(out),
                            verbose=False, **TINY)
  assert _load(out) == json.loads(json.dumps(result))
  assert set(result) >= {"header", "memory", "timing", "summary",
                         "raw_seconds"}
  memory = {m["tau"]: m for m in result["memory"]}
  assert set(memory) == {1, 2}
  for m in memory.values():
    for key in ("slot_bytes", "buffer_bytes", "buffer_mib",
                "model_param_bytes", "fraction_of_model_params",
                "fraction_of_main_route_params"):
      assert _positive(m[key]), (key, m)
  assert memory[2]["buffer_bytes"] == 2 * memory[1]["buffer_bytes"]
  assert memory[1]["slot_bytes"] == memory[2]["slot_bytes"]
  # One slot: every trainable weight (float32), a bit less than all weights.
  assert 0.9 < memory[1]["fraction_of_model_params"] <= 1.0
  names = {r["candidate"] for r in result["timing"]}
  assert names == {"step_delay1", "step_delay0", "stale_tau1", "stale_tau2"}
  for row in result["timing"]:
    for key in ("median_s", "min_s", "max_s", "share_of_delay1_step"):
      assert _positive(row[key]), (key, row)
  assert _positive(result["summary"]["stale_tau1_share_of_step"])
  assert "delay1_minus_delay0_s" in result["summary"]


def test_input_pipeline(tmp_path):
  step_json = tmp_path / "step_time.json"
  step_json.write_text(json.dumps({
      "header": "ResNet-50 train step, 32px, batch 2, /device:CPU:0",
      "rows": [{"mode": "baseline", "images_per_s": 1e-3},
               {"mode": "delay1", "images_per_s": 1e9}]}))
  out = tmp_path / "pipeline.json"
  result = input_pipeline.run(
      image_size=32, batch_size=2, augment=("none",), num_files=2,
      per_file=4, num_distinct=2, source_height=40, source_width=50,
      batches=2, warmup_batches=1, step_time_json=str(step_json),
      consumed_images_per_s=["0.5"], output=str(out), verbose=False)
  assert _load(out) == json.loads(json.dumps(result))
  assert set(result) >= {"header", "rows", "consumers", "cores"}
  assert _positive(result["cores"])
  (row,) = result["rows"]
  assert _positive(row["images_per_s"])
  assert _positive(row["images_per_s_per_core"])
  assert row["keeps_up"] == {"step_time:baseline": True,
                             "step_time:delay1": False, "given[0]": True}
  assert not any(c["note"] for c in result["consumers"])  # Same size.
  assert result["config"]["wrote_data"]


def test_input_pipeline_flags_size_mismatch():
  consumers = input_pipeline.consumers_from(
      os.path.join(ROOT, "experiments", "results",
                   "step_time_cpu_r50_64px.json"), ["7"], image_size=224)
  assert consumers[-1] == {"name": "given[0]", "images_per_s": 7.0,
                           "step_image_size": None, "note": ""}
  assert all("64px" in c["note"] for c in consumers[:-1])
  assert all(c["step_image_size"] == 64 for c in consumers[:-1])


def test_resume_cost(tmp_path):
  out = tmp_path / "resume.json"
  result = resume_cost.run(
      num_files=2, per_file=8, num_distinct=2, source_height=24,
      source_width=32, image_size=16, batch_size=4, shuffle_buffer=4,
      epochs_in=3, repeats=1, batches=2, warmup_batches=1, output=str(out),
      verbose=False)
  assert _load(out) == json.loads(json.dumps(result))
  assert set(result) >= {"header", "resume", "throughput", "summary", "raw",
                         "config"}
  rows = {r["case"]: r for r in result["resume"]}
  assert set(rows) == {"new_step_1", "new_epochs_in", "old_step_1",
                       "old_epochs_in"}
  for row in rows.values():
    for key in ("median_s", "min_s", "max_s"):
      assert _positive(row[key]), (key, row)
  # 16 records, batch 4: 4 steps per epoch; 3 epochs in is step 12.
  assert result["config"]["far_step"] == 12
  assert rows["new_epochs_in"]["start_step"] == 12
  assert rows["new_epochs_in"]["records_skipped_before_decode"] == 0
  assert rows["old_epochs_in"]["records_skipped_before_decode"] == 48
  assert rows["new_step_1"]["records_skipped_before_decode"] == 4
  assert {r["mode"] for r in result["throughput"]} == {"deterministic",
                                                      "nondeterministic"}
  for row in result["throughput"]:
    assert _positive(row["median_images_per_s"]), row
  for value in result["summary"].values():
    assert _positive(value)
  assert all(len(v) == 1 for v in
             result["raw"]["time_to_first_batch_s"].values())


def test_schedules(tmp_path):
  """Schema of the schedules benchmark at tiny sizes (memory part at 32 px,
  the one-inter-op-thread subprocess included), and its memory figures
  equal the formulas: queue = tau x (2 images + labels) of the spec, ring
  buffer = tau x 4 bytes x the backbone's trainable parameter count."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import schedules  # pylint: disable=g-import-not-at-top
  from official_conadv.modeling import resnet  # pylint: disable=g-import-not-at-top
  out = tmp_path / "schedules.json"
  result = schedules.run(depth=10, memory_taus=(1, 2), memory_batches=(2, 3),
                         memory_image_size=32, output=str(out),
                         verbose=False, **TINY)
  assert _load(out) == json.loads(json.dumps(result))
  assert set(result) >= {"header", "memory", "timing", "overlap",
                         "inter_op_1", "threads", "raw_seconds", "config",
                         "load_average"}
  backbone = resnet.ResNet(depth=10, num_classes=10)
  for route in ("main", "adv"):
    backbone(np.zeros((1, 32, 32, 3), np.float32), training=False,
             bn_route=route)
  params = sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)
  memory = result["memory"]
  assert [b["backbone_trainable_params"] for b in memory["buffers"]] == [
      params, params]
  # Bytes per example: (one image, one label) float32 pixels; one-hot
  # float32 [10] or int32 labels.
  example = {"one_hot": (32 * 32 * 3 * 4, 10 * 4),
             "int32": (32 * 32 * 3 * 4, 4)}
  rows = {(r["labels"], r["tau"], r["per_replica_batch"]): r
          for r in memory["rows"]}
  assert set(rows) == {(l, t, b) for l in ("one_hot", "int32")
                       for t in (1, 2) for b in (2, 3)}
  for (labels, tau, batch), row in rows.items():
    pixels, label = example[labels]
    assert row["queue_bytes"] == tau * batch * (2 * pixels + label)
    assert row["buffer_bytes"] == tau * 4 * params
    assert row["num_queue_variables"] == 3 * tau
    for key in ("queue_mib", "buffer_mib", "queue_over_buffer"):
      assert _positive(row[key]), (key, row)
  for labels, even in memory["break_even"].items():
    pixels, label = example[labels]
    assert even["equal_at_per_replica_batch"] == pytest.approx(
        4 * params / (2 * pixels + label))
  timing = {r["candidate"]: r for r in result["timing"]}
  assert list(timing) == list(schedules.CANDIDATES)
  for row in timing.values():
    for key in ("median_s", "min_s", "max_s", "images_per_s",
                "ratio_to_baseline", "ratio_to_baseline_of_minima",
                "flop_model_ratio"):
      assert _positive(row[key]), (key, row)
  for summary in (result["overlap"], result["inter_op_1"]["overlap"]):
    for key in ("from_medians", "from_minima"):
      for name in ("attack_plus_train_s", "max_attack_train_s",
                   "lookahead_s", "lookahead_over_sum"):
        assert _positive(summary[key][name]), (key, name)
    assert _positive(summary["lookahead_over_delayed_medians"])
  assert result["inter_op_1"]["threads"]["inter_op_parallelism_threads"] == 1
  assert [r["candidate"] for r in result["inter_op_1"]["timing"]] == list(
      schedules.INTER_OP_CANDIDATES)
  assert all(len(v) == 1 for v in result["raw_seconds"].values())
  with pytest.raises(ValueError, match="Unknown candidates"):
    schedules.build_candidates(["fused"], 10, 32, 2, 10, False)
