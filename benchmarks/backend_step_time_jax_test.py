"""benchmarks/backend_step_time.py on JAX: flags, summary, and a tiny real
run (ResNet-18, 32 px) of the JAX-only path with TensorFlow unimportable."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import backend_step_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_are_checked_in_one_line(capsys):
  with pytest.raises(SystemExit):
    backend_step_time.parse_args(["--modes=baseline,sideways"])
  assert "unknown ['sideways']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    backend_step_time.parse_args(["--batch_size=0"])
  assert "--batch_size must be >= 1" in capsys.readouterr().err
  args = backend_step_time.parse_args(["--modes=lookahead,baseline"])
  assert args.modes == ["lookahead", "baseline"]


def test_summary_medians_images_and_ratios():
  summary = backend_step_time.summarize(
      {"baseline": [1.0, 3.0, 2.0], "delayed": [4.0, 5.0, 6.0]}, batch_size=8)
  assert summary["baseline"]["median_s"] == 2.0
  assert summary["baseline"]["images_per_s"] == 4.0
  assert summary["delayed"]["ratio_to_baseline"] == 2.5
  assert summary["delayed"]["min_s"] == 4.0
  text = backend_step_time.table("t", summary)
  assert "2.50" in text and "delayed" in text


def test_tiny_jax_run_without_tensorflow(tmp_path):
  out = tmp_path / "r.json"
  code = (
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path, target=None):\n"
      "    if name.split('.')[0] == 'tensorflow':\n"
      "      raise ImportError(name)\n"
      "sys.meta_path.insert(0, Block())\n"
      "from benchmarks import backend_step_time\n"
      "backend_step_time.main(sys.argv[1:])\n"
      "assert 'tensorflow' not in sys.modules\n")
  env = dict(os.environ, KERAS_BACKEND="jax",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
      [sys.executable, "-c", code, "--depth=18", "--image_size=32",
       "--batch_size=2", "--num_classes=10", "--steps=1", "--rounds=1",
       "--modes=baseline,lookahead", "--precision=float32",
       f"--output={out}"], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "jax (1 device(s)), ResNet-18" in done.stdout
  result = json.loads(out.read_text())
  assert result["backend"] == "jax"
  assert "output" not in result["config"]  # No machine path in the data.
  assert set(result["results"]) == {"baseline", "lookahead"}
  assert result["results"]["baseline"]["ratio_to_baseline"] == 1.0
  assert result["results"]["lookahead"]["images_per_s"] > 0
