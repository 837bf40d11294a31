"""benchmarks/reproducibility.py without training: where two runs' records
first differ, and the table. (The script's runs are the README's figures;
they take minutes, so the suite checks the comparison they rest on.)"""

import numpy as np

from benchmarks import reproducibility


def _records(steps=3):
  rng = np.random.default_rng(0)
  return {name: rng.normal(size=(steps, 4)).astype("float32")
          for name in reproducibility.RECORDED}


def test_equal_records_have_no_first_difference():
  a = _records()
  b = {k: v.copy() for k, v in a.items()}
  assert reproducibility.first_difference(a, b) is None


def test_first_difference_is_the_earliest_step_then_the_step_order():
  a = _records()
  b = {k: v.copy() for k, v in a.items()}
  b["loss"][2, 0] += 1.0          # Later step.
  b["adv_logits"][1, 3] += 0.25   # Step 1, computed after x_adv ...
  b["x_adv"][1, 1:3] += 0.5       # ... which comes first within the step.
  got = reproducibility.first_difference(a, b)
  assert got == {"step": 1, "tensor": "x_adv",
                 "max_abs_difference": got["max_abs_difference"],
                 "elements_differing": 2, "elements": 4}
  assert abs(got["max_abs_difference"] - 0.5) < 1e-6  # float32 sums.
  # Inputs come before anything computed from them.
  b["image"][1, 0] = np.nextafter(a["image"][1, 0], np.float32(9))
  got = reproducibility.first_difference(a, b)
  assert (got["step"], got["tensor"], got["elements_differing"]) == (
      1, "image", 1)
  assert 0 < got["max_abs_difference"] < 1e-6


def test_records_without_optional_tensors():
  # A run without AutoAugment records no "augmented" and no aug branch.
  a = {k: v for k, v in _records().items() if "aug" not in k}
  b = {k: v.copy() for k, v in a.items()}
  b["stale"][0, 0] -= 1.0
  assert reproducibility.first_difference(a, b)["tensor"] == "stale"


def test_table_names_every_configuration(capsys):
  config = {"precision": "mixed_bfloat16", "feed": "pipeline",
            "scenario": "repeat", "total_steps": 11, "runs": 3,
            "differing_runs": 1, "max_abs_difference": 0.5,
            "per_run": [{"run": 1, "first_difference": None},
                        {"run": 2, "first_difference": {"step": 4,
                                                        "tensor": "x_adv"}}],
            "other_steps_per_execution": {"steps_per_execution": 1,
                                          "equal": True,
                                          "max_abs_difference": 0.0}}
  reproducibility.print_table({
      "row": "imagenet_resnet50_conadv_aa_1k", "runs": 3,
      "steps_per_execution": 2, "configurations": [config],
      "pipeline": {"batches": 11, "bitwise_equal": True}})
  out = capsys.readouterr().out
  assert "pipeline alone: 11 batches made twice and loop by loop: " \
         "bitwise equal" in out
  line = [l for l in out.splitlines() if "mixed_bfloat16" in l][0]
  assert "1/2" in line and "k=1: equal" in line and "2: 4/x_adv" in line
