"""Runs experiments/conadv_colab_tpu.ipynb headless on CPU with its defaults.

The notebook is executed in memory (the committed file keeps its outputs
cleared) by nbclient with the "python3" kernel. jupyter_client resolves that
kernelspec's `python` to the interpreter running this test (`sys.executable`,
the venv's python, whose ipykernel and packages the kernel then uses), so no
kernelspec has to be installed; the test checks it anyway by asking the
kernel for its `sys.executable`. The kernel's working directory is
experiments/ (as in Jupyter). The venv has the package installed (`make
venv` installs this checkout, editable), so the notebook's setup cell
installs nothing; CONADV_REPO is set too, as a user outside the repository
would, and must go unused.
"""

import os
import re
import sys
import time

import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NOTEBOOK = os.path.join(HERE, "conadv_colab_tpu.ipynb")
# Per-cell limit; the whole notebook takes about a minute on a 2-core CPU.
CELL_TIMEOUT_S = 300
# Safety net only (a loaded machine is slower), not a benchmark.


def _text(cell):
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          "commit the notebook with its outputs cleared")


def test_notebook_runs_headless_on_cpu(monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Set (in os.environ, restored afterwards) before the kernel starts; the
  # kernel inherits this environment.
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv("CONADV_REPO", ROOT)
  # Ask the kernel which python it is, as a last cell.
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys; print('KERNEL_PYTHON=' + sys.executable)"))
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": HERE}})
  start = time.perf_counter()
  client.execute()  # Raises CellExecutionError on the first failing cell.
  wall = time.perf_counter() - start
  print(f"notebook wall time: {wall:.1f} s")

  text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      assert o.get("output_type") != "error", o
  # The package the venv has installed (make venv: editable, this
  # checkout): the notebook imported it without pip or sys.path edits.
  where = re.search(r"official_conadv from (\S+)", text).group(1)
  assert os.path.realpath(where) == os.path.join(os.path.realpath(ROOT),
                                                 "official_conadv"), where
  assert "Strategy: default" in text, text
  assert "No TPU:" in text
  kernel_python = re.search(r"KERNEL_PYTHON=(\S+)", text).group(1)
  assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
  accuracies = dict(re.findall(r"(ConAdv|LARS): held-out loss [\d.]+, "
                               r"accuracy ([\d.]+)", text))
  assert set(accuracies) == {"ConAdv", "LARS"}, text
  for value in accuracies.values():
    assert 0.0 <= float(value) <= 1.0
  plot = re.search(r"Saved plot: (\S+\.png)", text).group(1)
  assert os.path.getsize(plot) > 0
  assert any("image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", [])), "no inline plot"
