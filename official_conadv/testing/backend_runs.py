"""The same small training runs on whichever Keras backend is active.

The cross-backend tests (`*_jax_test.py`) run these functions in the JAX test
process and, through `python -m official_conadv.testing.backend_runs`, in a
TensorFlow process, and compare the arrays. Imports keras and numpy only.

Every run starts from weights drawn with numpy (`set_start_weights`: the
backends' own initializers draw different numbers) and trains on numpy data
with `shuffle=False`, so both backends see the same start, batches and order.
The attack starts from the clean image (`random_init=False`, untargeted): the
backends' random numbers differ by design (`official_conadv.backends`).

CLI: `KERAS_BACKEND=tensorflow python -m official_conadv.testing.backend_runs
--out runs.npz` writes every case of `CASES` and the LARS updates.
"""

import argparse
import json
import os
import subprocess
import sys

import keras
import numpy as np

from official_conadv.adversarial import schedules
from official_conadv.modeling import conadv_model
from official_conadv.modeling import small_cnn
from official_conadv.optimization import lars
from official_conadv.optimization import lr_schedules

IMAGE_SHAPE = (8, 8, 3)
CLASSES = 5
BATCH = 8
STEPS = 4
# name -> (delay or None, schedule)
CASES = {
    "baseline": (None, "delayed"),
    "tau0": (0, "delayed"),
    "tau1": (1, "delayed"),
    "tau2": (2, "delayed"),
}


def data(n=BATCH * STEPS, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.random((n,) + IMAGE_SHAPE, dtype=np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  return x, y


def set_start_weights(model, seed=1):
  """Draws every trainable backbone weight with numpy (kernels N(0, 0.3),
  biases and BN betas 0.05 * N, BN gammas 1 + 0.1 * N)."""
  rng = np.random.default_rng(seed)
  for v in model.backbone.trainable_variables:
    shape = tuple(v.shape)
    if v.name == "gamma":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
      value = 0.05 * rng.standard_normal(shape)
    else:
      value = 0.3 * rng.standard_normal(shape)
    v.assign(value.astype("float32"))


def make_model(delay, schedule="delayed", epsilon=2.0 / 255, steps=1,
               random_init=False, filters=(4, 8), seed=0):
  adversary = None if delay is None else schedules.AdversaryConfig(
      epsilon=epsilon, step_size=epsilon, steps=steps,
      random_init=random_init, delay=delay, schedule=schedule, seed=seed)
  model = conadv_model.ConAdvModel(
      small_cnn.SmallCNN(CLASSES, filters=filters, bn_momentum=0.5),
      adversary=adversary)
  model.compile(
      optimizer=lars.LARS(
          learning_rate=lr_schedules.WarmupPolynomialDecay(
              0.5, total_steps=STEPS, warmup_steps=2), momentum=0.9,
          weight_decay_rate=1e-3),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"])
  model.build((None,) + IMAGE_SHAPE)
  set_start_weights(model)
  return model


class _Record(keras.callbacks.Callback):
  """The backbone's weights (trainable and BN statistics) after every
  step."""

  def __init__(self):
    super().__init__()
    self.steps = []

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append([np.array(w) for w in self.model.backbone.get_weights()])


def train(delay, schedule="delayed", steps=STEPS, **kwargs):
  """[step][weight] arrays (backbone weights after every step) of a run
  of `steps` steps of BATCH images, in order."""
  model = make_model(delay, schedule, **kwargs)
  x, y = data(BATCH * steps)
  record = _Record()
  model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[record])
  return record.steps


def lars_updates(updates=5, seed=2):
  """[update][variable] values of LARS (momentum, weight decay, a
  trust-ratio-excluded bias, the warmup schedule) applied to numpy
  gradients."""
  rng = np.random.default_rng(seed)
  shapes = {"dense/kernel": (6, 4), "dense/bias": (4,), "bn/gamma": (4,)}
  variables = [keras.Variable(rng.standard_normal(s).astype("float32"),
                              name=n.split("/")[1])
               for n, s in shapes.items()]
  optimizer = lars.LARS(
      learning_rate=lr_schedules.WarmupPolynomialDecay(
          1.0, total_steps=updates, warmup_steps=2), momentum=0.9,
      weight_decay_rate=1e-2)
  out = []
  for _ in range(updates):
    grads = [rng.standard_normal(tuple(v.shape)).astype("float32")
             for v in variables]
    optimizer.apply_gradients(zip(grads, variables))
    out.append([np.array(v) for v in variables])
  return out


def flatten(prefix, steps):
  return {f"{prefix}/{s}/{i}": w for s, ws in enumerate(steps)
          for i, w in enumerate(ws)}


def unflatten(arrays, prefix):
  steps = {}
  for key, value in arrays.items():
    if key.startswith(prefix + "/"):
      s, i = map(int, key[len(prefix) + 1:].split("/"))
      steps.setdefault(s, {})[i] = value
  return [[ws[i] for i in sorted(ws)] for _, ws in sorted(steps.items())]


def run_jax_script(code, xla_flags=None, timeout=900):
  """Runs `code` in a new Python on Keras' JAX backend (the repository on
  PYTHONPATH, XLA_FLAGS set to `xla_flags` or unset) and returns the JSON
  it printed after "RESULT " (its last such line). AssertionError with the
  end of its stderr if it fails."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env = dict(os.environ, KERAS_BACKEND="jax",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  done = subprocess.run([sys.executable, "-c", code], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False, cwd=root)
  assert done.returncode == 0, done.stderr[-4000:]
  lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, done.stdout[-2000:]
  return json.loads(lines[-1][len("RESULT "):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="npz file to write")
  args = parser.parse_args()
  arrays = {}
  for name, (delay, schedule) in CASES.items():
    arrays.update(flatten(name, train(delay, schedule)))
  arrays.update(flatten("lars", lars_updates()))
  np.savez(args.out, **arrays)


if __name__ == "__main__":
  main()
