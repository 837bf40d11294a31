"""Smoke test of the batch study and its plots: a tiny grid (one batch size,
one seed, one epoch, a 4/8-channel SmallCNN at 14 px), the JSON schema, and
non-empty PNGs from plots.py (batch study and step time)."""

import json
import os

from benchmarks import batch_study
from benchmarks import plots

RUN_KEYS = {"method", "batch_size", "lr_multiplier", "learning_rate", "seed",
            "steps", "steps_per_epoch", "train_eval_accuracy",
            "val_accuracy", "test_accuracy", "gap", "train_logs", "diverged",
            "train_seconds", "wall_seconds"}
SUMMARY_KEYS = {"method", "batch_size", "steps", "selected_lr_multiplier",
                "selected_learning_rate", "n_seeds", "val_top1_mean",
                "test_top1_mean", "test_top1_std", "train_eval_accuracy_mean",
                "gap_mean", "gap_std", "per_lr"}
STEP_TIME = {
    "header": "ResNet-50 train step, 64px, batch 16, /device:CPU:0, test",
    "rows": [
        {"mode": "baseline", "median_s": 0.3, "min_s": 0.25, "max_s": 0.4,
         "images_per_s": 53.3, "ratio_to_baseline": 1.0,
         "flop_model_ratio": 1.0},
        {"mode": "delay1", "median_s": 0.7, "min_s": 0.6, "max_s": 0.9,
         "images_per_s": 22.9, "ratio_to_baseline": 2.33,
         "flop_model_ratio": 8 / 3},
    ],
    "raw_seconds": {"baseline": [0.3], "delay1": [0.7]},
}


def test_tiny_study_schema_and_plots(tmp_path):
  out = str(tmp_path / "study.json")
  result = batch_study.study(
      batch_sizes=[800], seeds=[0], epochs=1,
      methods=["baseline", "conadv"], lr_multipliers=[1.0], output=out,
      model="small_cnn", width=4, image_size=14, command="test",
      log=lambda *_: None)
  with open(out) as f:
    saved = json.load(f)
  assert saved["summary"] == json.loads(json.dumps(result["summary"]))
  for key in ("schema_version", "command", "date", "machine", "trainer",
              "lr_rule", "train_accuracy", "settings", "runs", "summary",
              "wall_seconds"):
    assert key in saved, key
  assert saved["settings"]["num_train"] == 3200
  assert saved["settings"]["num_val"] == 800
  assert saved["settings"]["num_test"] == 1000
  assert len(saved["runs"]) == 2
  for run in saved["runs"]:
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert run["steps"] == 4 and run["steps_per_epoch"] == 4
    assert run["learning_rate"] == batch_study.learning_rate(800, 1.0, 5.0, 64)
    for key in ("train_eval_accuracy", "val_accuracy", "test_accuracy"):
      assert 0.0 <= run[key] <= 1.0
    assert abs(run["gap"] - (run["train_eval_accuracy"] -
                             run["test_accuracy"])) < 1e-9
  assert {s["method"] for s in saved["summary"]} == {"baseline", "conadv"}
  for s in saved["summary"]:
    assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
    assert s["n_seeds"] == 1 and s["test_top1_std"] == 0.0
    assert s["selected_lr_multiplier"] == 1.0

  png = plots.plot_batch_study(out, str(tmp_path / "top1.png"))
  assert os.path.getsize(png) > 1000
  step_json = tmp_path / "step.json"
  step_json.write_text(json.dumps(STEP_TIME))
  png = plots.plot_step_time(str(step_json), str(tmp_path / "step.png"))
  assert os.path.getsize(png) > 1000
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_selects_by_validation_not_test():
  def run(m, seed, val, test):
    return {"method": "conadv", "batch_size": 64, "lr_multiplier": m,
            "learning_rate": 5.0 * m, "seed": seed, "steps": 10,
            "val_accuracy": val, "test_accuracy": test,
            "train_eval_accuracy": 1.0, "gap": 1.0 - test}
  runs = [run(1.0, 0, 0.90, 0.99), run(1.0, 1, 0.92, 0.99),
          run(3.0, 0, 0.95, 0.50), run(3.0, 1, 0.97, 0.60)]
  (s,) = batch_study.summarize(runs)
  assert s["selected_lr_multiplier"] == 3.0
  assert abs(s["test_top1_mean"] - 0.55) < 1e-9
  assert abs(s["gap_mean"] - 0.45) < 1e-9
  assert len(s["per_lr"]) == 2
