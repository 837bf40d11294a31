"""The README's "Using it" example runs as pasted.

The first ```python block under "## Using it" is written to a file and run
by a fresh interpreter (its own process: TensorFlow starts without the test
session's CPU split, as on a user's machine). It must exit 0 and its `fit`
must score all 1,000 held-out digits.
"""

import os
import re
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def using_it_example(readme_text):
  """The first python code block of the "## Using it" section."""
  section = readme_text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, "no ```python block under '## Using it'"
  return match.group(1)


def test_using_it_example_runs_as_pasted(tmp_path):
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    example = using_it_example(f.read())
  assert ".build(" not in example
  assert "..." not in example
  script = tmp_path / "example.py"
  # One-line progress per epoch, so the held-out scores can be read back.
  script.write_text(example.replace("epochs=2)", "epochs=2, verbose=2)"))
  env = dict(os.environ, PYTHONPATH=_ROOT, CUDA_VISIBLE_DEVICES="",
             TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  examples = re.findall(r"val_examples: ([0-9.]+)", done.stdout)
  assert [float(e) for e in examples] == [1000.0, 1000.0], done.stdout[-2000:]
