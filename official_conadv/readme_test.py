"""The README's "Using it" examples run as pasted.

Each ```python block under "## Using it" is written to a file in a
temporary directory and run there by a fresh interpreter (its own process:
TensorFlow starts without the test session's CPU split, as on a user's
machine), with no PYTHONPATH: `official_conadv` must come from the install. The first must exit 0 with
`fit` scoring all 1,000 held-out digits; the second (bring your own model)
must give a ConAdvModel that predicts 1,000 logits and has adversarial BN.
"""

import os
import re
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def using_it_examples(readme_text):
  """The python code blocks of the "## Using it" section, in order."""
  section = readme_text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
  assert blocks, "no ```python block under '## Using it'"
  return blocks


def _run(tmp_path, code):
  """Runs `code` as a script in tmp_path, as a user would: the package
  comes from the venv (`make venv` installs this checkout), not from
  PYTHONPATH or the working directory."""
  script = tmp_path / "example.py"
  script.write_text(code)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)


def test_using_it_example_runs_as_pasted(tmp_path):
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    example = using_it_examples(f.read())[0]
  assert ".build(" not in example
  assert "..." not in example
  # One-line progress per epoch, so the held-out scores can be read back.
  done = _run(tmp_path,
              example.replace("epochs=2)", "epochs=2, verbose=2)"))
  assert done.returncode == 0, done.stderr[-3000:]
  examples = re.findall(r"val_examples: ([0-9.]+)", done.stdout)
  assert [float(e) for e in examples] == [1000.0, 1000.0], done.stdout[-2000:]


def test_bring_your_own_model_example_runs_as_pasted(tmp_path):
  """The "Bring your own model" block builds a ConAdvModel around a
  converted EfficientNet-B0 (checked by the lines appended to it)."""
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    example = using_it_examples(f.read())[1]
  assert "dual_bn_backbone" in example and "..." not in example
  check = ("\nimport numpy as np\n"
           "x = np.random.default_rng(0).uniform(size=(2, 224, 224, 3))\n"
           "out = model.predict(x.astype('float32'), verbose=0)\n"
           "assert out.shape == (2, 1000), out.shape\n"
           "assert any(v.path.endswith('/adv/gamma') for v in model.weights)\n"
           "print('ok')\n")
  done = _run(tmp_path, example + check)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")
