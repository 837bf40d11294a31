"""The pip package: pyproject.toml builds a wheel whose only top-level
package is `official_conadv`, with the repo's experiments/ inside it as
`official_conadv.experiments`, and the installed wheel works from any
directory (imports, `--experiment=list`) without the checkout on the path.

The wheel is built offline from a copy of the repo's packaged files (so no
build/ or *.egg-info lands in the checkout) with the venv's setuptools, and
installed without dependencies into a temporary target; the venv supplies
TensorFlow and the rest.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(_ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins():
  """name -> version of requirements.txt's exact pins."""
  pins = {}
  with open(os.path.join(_ROOT, "requirements.txt")) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
  return pins


def test_packages_are_every_package_of_the_repo():
  """A new subpackage cannot be left out of the wheel."""
  want = {"official_conadv.experiments"}
  for dirpath, _, files in os.walk(os.path.join(_ROOT, "official_conadv")):
    if "__init__.py" in files and "__pycache__" not in dirpath:
      want.add(os.path.relpath(dirpath, _ROOT).replace(os.sep, "."))
  tool = _pyproject()["tool"]["setuptools"]
  assert set(tool["packages"]) == want
  assert tool["package-dir"] == {"official_conadv.experiments": "experiments"}


def test_dependency_ranges_admit_the_pinned_versions():
  """pyproject's ranges hold what make and CI install (requirements.txt)."""
  pins = _pins()
  project = _pyproject()["project"]
  requirements = [Requirement(r) for r in project["dependencies"]]
  for extra in project["optional-dependencies"].values():
    requirements += [Requirement(r) for r in extra]
  for req in requirements:
    name = req.name.lower().replace("_", "-")
    assert name in pins, f"{req} is not pinned in requirements.txt"
    assert req.specifier.contains(pins[name]), (str(req), pins[name])
  # The library's own imports are dependencies, not extras.
  core = {Requirement(r).name for r in project["dependencies"]}
  assert {"tensorflow", "keras", "tensorflow-datasets", "absl-py", "numpy",
          "mlxtend"} <= core
  assert project["optional-dependencies"]["gcs"] == [
      "tensorflow[gcs-filesystem]>=2.20,<2.21"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """Path of the wheel built from a copy of the packaged files."""
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(_ROOT, name), src / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results",
                                  "*.ipynb")
  for name in ("official_conadv", "experiments"):
    shutil.copytree(os.path.join(_ROOT, name), src / name, ignore=ignore)
  out = tmp_path_factory.mktemp("dist")
  done = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps",
       "--no-build-isolation", "--quiet", "-w", str(out), str(src)],
      capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
  assert done.returncode == 0, done.stderr[-3000:]
  wheels = list(out.glob("official_conadv-*.whl"))
  assert len(wheels) == 1, os.listdir(out)
  return wheels[0]


def test_wheel_holds_one_top_level_package(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  top = {n.split("/", 1)[0] for n in names}
  assert top == {"official_conadv",
                 re.sub(r"-py3.*", "", wheel.name) + ".dist-info"}, top
  assert "official_conadv/experiments/imagenet.py" in names
  assert "official_conadv/experiments/__init__.py" in names
  assert "official_conadv/modeling/conadv_model.py" in names
  assert not any(n.startswith(("experiments/", "benchmarks/", "testdata/"))
                 for n in names)
  with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
  assert "Name: official-conadv" in meta
  assert "Provides-Extra: autoaugment" in meta


def test_installed_wheel_works_from_any_directory(wheel, tmp_path):
  target = tmp_path / "site"
  done = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
       "--target", str(target), str(wheel)],
      capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
  assert done.returncode == 0, done.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # Only the installed copy on the path: no checkout, no PYTHONPATH to it.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(target), CUDA_VISIBLE_DEVICES="",
             TF_CPP_MIN_LOG_LEVEL="2")
  check = (
      "import official_conadv, sys\n"
      f"assert official_conadv.__file__.startswith({str(target)!r}), "
      "official_conadv.__file__\n"
      "from official_conadv import configs\n"
      "m = configs.named_experiments()\n"
      "assert m.__name__ == 'official_conadv.experiments', m.__name__\n"
      "assert 'experiments' not in sys.modules\n"
      "c = m.get('imagenet_resnet50_conadv_96k')\n"
      "print(c.train.global_batch_size)\n")
  done = subprocess.run([sys.executable, "-c", check], cwd=elsewhere,
                        env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["98304"]
  listed = subprocess.run(
      [sys.executable, "-m", "official_conadv.train", "--experiment=list"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert listed.returncode == 0, listed.stderr[-3000:]
  names = [line.split(":", 1)[0] for line in listed.stdout.splitlines()]
  from official_conadv import configs  # pylint: disable=g-import-not-at-top
  assert names == configs.named_experiments().names()
  assert "mnist_resnet_conadv" in names and len(names) > 30
