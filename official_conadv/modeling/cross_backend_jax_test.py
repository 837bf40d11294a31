"""JAX against TensorFlow: the same runs, compared update for update.

`official_conadv.testing.backend_runs` trains each case of `CASES` (baseline,
tau 0, 1 and 2; PGD-1 from the clean image, LARS with warmup and weight
decay, BN momentum 0.5) from numpy start weights on numpy data, once in a
TensorFlow process (launched here) and once in this JAX process, and records
the backbone's weights (trainable and BN statistics) after every step.

Tolerance 5e-6 (absolute; weights are O(1)): float32 CPU kernels differ
between the backends (TensorFlow's fused BN kernel against XLA's composite
BN, other convolution and reduction orders), a few ulps per op, which the 4
steps carry (measured 2026-12-03, 2-core CPU: worst 8.3e-7 over all cases,
steps and weights). The attack's sign(gradient) could amplify such a
difference for a pixel whose gradient is ~0; the cases are small enough
that none does (a flipped pixel would show as > 1e-3). Different schedules
differ by > 1e-3, so the comparison tells them apart.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from official_conadv.testing import backend_runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TOLERANCE = 5e-6


def _tensorflow_installed():
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(scope="module")
def tensorflow_runs(tmp_path_factory):
  """Every case and the LARS updates, run on the TensorFlow backend."""
  if not _tensorflow_installed():
    pytest.skip("TensorFlow is not installed (a JAX-only machine).")
  out = tmp_path_factory.mktemp("tf") / "runs.npz"
  env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
      [sys.executable, "-m", "official_conadv.testing.backend_runs",
       "--out", str(out)], env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(np.load(out))


def _worst(steps_a, steps_b):
  """Per step, the largest |a - b| over all weights."""
  assert len(steps_a) == len(steps_b)
  worst = []
  for a, b in zip(steps_a, steps_b):
    assert len(a) == len(b)
    worst.append(max(float(np.abs(x - y).max()) for x, y in zip(a, b)))
  return worst


@pytest.mark.parametrize("case", sorted(backend_runs.CASES))
def test_jax_step_equals_tensorflow_step(case, tensorflow_runs):
  delay, schedule = backend_runs.CASES[case]
  jax_steps = backend_runs.train(delay, schedule)
  tf_steps = backend_runs.unflatten(tensorflow_runs, case)
  assert len(jax_steps) == backend_runs.STEPS
  worst = _worst(jax_steps, tf_steps)
  print(f"{case}: worst |JAX - TF| per step {worst}")
  assert max(worst) <= TOLERANCE, worst
  # The runs moved (every step changed the weights).
  assert _worst(jax_steps[1:], jax_steps[:-1]) > [1e-4] * 3


def test_the_comparison_tells_schedules_apart(tensorflow_runs):
  """A JAX step attacking with the wrong weights (tau 1 instead of 2, or the
  current ones) would not pass for the TensorFlow run."""
  tf_runs = {c: backend_runs.unflatten(tensorflow_runs, c)
             for c in ("tau0", "tau1", "tau2", "baseline")}
  jax_tau1 = backend_runs.train(1, "delayed")
  for other in ("tau0", "tau2", "baseline"):
    assert max(_worst(jax_tau1, tf_runs[other])) > 1e-3, other


def test_lars_jax_equals_tensorflow_update_for_update(tensorflow_runs):
  """LARS (momentum, weight decay, trust ratio, a bias and a BN gamma
  excluded by default, warmup schedule): 5 updates from the same numpy
  gradients. Measured equal to the bit (2026-12-03); asserted to 1e-6."""
  jax_updates = backend_runs.lars_updates()
  tf_updates = backend_runs.unflatten(tensorflow_runs, "lars")
  worst = _worst(jax_updates, tf_updates)
  print(f"LARS: worst |JAX - TF| per update {worst}")
  assert max(worst) <= 1e-6, worst
  assert _worst(jax_updates[1:], jax_updates[:-1]) > [1e-3] * 4
