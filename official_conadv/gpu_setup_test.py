"""GPU setup checked on CPU: install pins, Makefile GPU visibility, devices.

No GPU is needed: the pins are compared with the installed tensorflow's own
metadata, the Makefile's recipes are run with a stand-in python that reports
the CUDA_VISIBLE_DEVICES it was given, and device selection is fed GPU names.
"""

import importlib.metadata
import os
import stat
import subprocess

import pytest
import tensorflow as tf
from packaging.requirements import Requirement

from official_conadv import distribute_utils

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXTRA = "and-cuda"


# --------------------------------------------------------------- requirements
def _read(name):
  with open(os.path.join(_REPO_ROOT, name)) as f:
    return f.read()


def _requirements(text):
  """(Requirements, included files) of a requirements file's text."""
  reqs, includes = [], []
  for line in text.splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    if line.startswith(("-r ", "--requirement ")):
      includes.append(line.split(None, 1)[1].strip())
    else:
      reqs.append(Requirement(line))
  return reqs, includes


def _pin(req):
  """The version of an exact `==` pin, else None."""
  specs = list(req.specifier)
  if len(specs) == 1 and specs[0].operator == "==":
    return specs[0].version
  return None


def _cuda_extra(tf_requires):
  """{name: Requirement} of the `and-cuda` extra in tensorflow's Requires."""
  extra = {}
  for line in tf_requires:
    req = Requirement(line)
    if (req.marker is not None and req.marker.evaluate({"extra": _EXTRA}) and
        not req.marker.evaluate({"extra": ""})):
      extra[req.name.lower()] = req
  return extra


def pin_problems(gpu_text, cpu_text, tf_requires, tf_version):
  """What is wrong with requirements-gpu.txt, as a list of messages.

  Args:
    gpu_text: requirements-gpu.txt.
    cpu_text: requirements.txt.
    tf_requires: tensorflow's `Requires-Dist` lines.
    tf_version: the installed tensorflow's version.
  """
  problems = []
  gpu, includes = _requirements(gpu_text)
  cpu, _ = _requirements(cpu_text)
  cpu_pins = {r.name.lower(): _pin(r) for r in cpu}
  if includes != ["requirements.txt"]:
    problems.append(f"includes {includes}, not ['requirements.txt']")
  if cpu_pins.get("tensorflow") != tf_version:
    problems.append(f"requirements.txt pins tensorflow "
                    f"{cpu_pins.get('tensorflow')}, installed {tf_version}")
  extra = _cuda_extra(tf_requires)
  if not extra:
    problems.append(f"tensorflow {tf_version} has no {_EXTRA!r} extra")
  nvidia = {}
  for req in gpu:
    name, pin = req.name.lower(), _pin(req)
    if pin is None:
      problems.append(f"{req} is not an exact == pin")
    elif name == "tensorflow":
      if _EXTRA not in req.extras or pin != tf_version:
        problems.append(f"{req}: want tensorflow[{_EXTRA}]=={tf_version}")
    elif name in extra:
      nvidia[name] = pin
      lower = [s.version for s in extra[name].specifier if s.operator == ">="]
      if pin not in extra[name].specifier or [pin] != lower:
        problems.append(f"{req}: tensorflow asks for {extra[name].specifier}, "
                        f"pin its lower bound {lower}")
    else:  # Anything else must come from requirements.txt, unchanged.
      problems.append(f"{req} is pinned here, not in requirements.txt")
    if name in cpu_pins and pin != cpu_pins[name]:
      problems.append(f"{req} differs from requirements.txt's "
                      f"{cpu_pins[name]}")
  for name in sorted(set(extra) - set(nvidia)):
    problems.append(f"{name} ({extra[name].specifier}) is not pinned")
  if not any(r.name.lower() == "tensorflow" for r in gpu):
    problems.append(f"no tensorflow[{_EXTRA}] line")
  return problems


def _tf_metadata():
  return (importlib.metadata.requires("tensorflow"),
          importlib.metadata.version("tensorflow"))


def test_gpu_requirements_match_tensorflow_cuda_extra():
  requires, version = _tf_metadata()
  assert version == tf.__version__
  gpu, cpu = _read("requirements-gpu.txt"), _read("requirements.txt")
  assert pin_problems(gpu, cpu, requires, version) == []
  # The pins are the extra, one for one: 12 CUDA libraries for TF 2.20.
  names = {r.name.lower() for r in _requirements(gpu)[0]} - {"tensorflow"}
  assert names == set(_cuda_extra(requires))
  assert "nvidia-cudnn-cu12" in names and len(names) == 12


def test_pin_problems_catches_drift():
  requires, version = _tf_metadata()
  gpu, cpu = _read("requirements-gpu.txt"), _read("requirements.txt")
  cudnn = next(r for r in _requirements(gpu)[0]
               if r.name == "nvidia-cudnn-cu12")
  wrong = gpu.replace(str(cudnn), "nvidia-cudnn-cu12==9.99.0")
  assert any(p.startswith("nvidia-cudnn-cu12==9.99.0: tensorflow asks for")
             for p in pin_problems(wrong, cpu, requires, version))
  missing = gpu.replace(str(cudnn), "")
  wanted = _cuda_extra(requires)["nvidia-cudnn-cu12"].specifier
  assert pin_problems(missing, cpu, requires, version) == [
      f"nvidia-cudnn-cu12 ({wanted}) is not pinned"]
  keras = next(r for r in _requirements(cpu)[0] if r.name == "keras")
  shadowed = gpu + "keras==0.0.1\n"
  assert pin_problems(shadowed, cpu, requires, version) == [
      "keras==0.0.1 is pinned here, not in requirements.txt",
      f"keras==0.0.1 differs from requirements.txt's {_pin(keras)}"]
  old_tf = gpu.replace(f"tensorflow[{_EXTRA}]=={version}",
                       f"tensorflow[{_EXTRA}]==2.19.0")
  assert pin_problems(old_tf, cpu, requires, version) == [
      f"tensorflow[{_EXTRA}]==2.19.0: want tensorflow[{_EXTRA}]=={version}",
      f"tensorflow[{_EXTRA}]==2.19.0 differs from requirements.txt's "
      f"{version}"]
  no_include = gpu.replace("-r requirements.txt", "")
  assert pin_problems(no_include, cpu, requires, version) == [
      "includes [], not ['requirements.txt']"]


# ------------------------------------------------------------------- Makefile
def _fake_venv(tmp_path):
  """A venv dir whose bin/python prints its CUDA_VISIBLE_DEVICES and args."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  python = venv / "bin" / "python"
  python.write_text("#!/bin/sh\n"
                    'echo "CVD=${CUDA_VISIBLE_DEVICES-UNSET} ARGS=$*"\n')
  python.chmod(python.stat().st_mode | stat.S_IXUSR)
  return venv


def _make(args, venv, cuda_visible_devices=None):
  """Runs make in the repo with VENV=venv; returns its stdout lines."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
                      "GPU", "TRAIN_FLAGS", "CUDA_VISIBLE_DEVICES")}
  if cuda_visible_devices is not None:
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
  out = subprocess.run(
      ["make", "--no-print-directory", "-C", _REPO_ROOT, f"VENV={venv}"] +
      args, env=env, capture_output=True, text=True, check=True, timeout=60)
  return out.stdout.splitlines()


@pytest.mark.parametrize("caller", [None, "1,0"])
def test_make_test_and_rehearse_hide_gpus_train_sees_them(tmp_path, caller):
  venv = _fake_venv(tmp_path)
  stamp = ["-s", "-o", f"{venv}/.installed"]  # Quiet; no venv build.
  # The TensorFlow suite, then the JAX suite: both without GPUs.
  test_runs = _make(stamp + ["test"], venv, caller)
  assert len(test_runs) == 2
  for test_run in test_runs:
    assert test_run.startswith("CVD= ARGS=-m pytest ")
  rehearsal = _make(stamp + ["rehearse"], venv, caller)
  assert [l.split(" ARGS=")[0] for l in rehearsal] == ["CVD=", "CVD="]
  assert [l.split("--replicas=")[1][0] for l in rehearsal] == ["1", "2"]
  (train_run,) = _make(stamp + ["train"], venv, caller)
  # Unset stays unset (every GPU); the caller's choice of GPUs passes through.
  assert train_run == (f"CVD={caller or 'UNSET'} ARGS=-m official_conadv.train "
                       "--experiment=mnist_resnet_conadv "
                       "--model_dir=runs/mnist_resnet_conadv")
  (mirrored_run,) = _make(stamp + ["train", "TRAIN_FLAGS=--strategy=mirrored"],
                          venv, caller)
  assert mirrored_run.endswith(" --strategy=mirrored")


def _install_lines(lines):
  return [l for l in lines if " -m pip install --quiet -r " in l]


def test_make_venv_gpu_installs_requirements_gpu(tmp_path):
  venv = _fake_venv(tmp_path)
  assert _install_lines(_make(["-n", "venv"], venv)) == [
      f"{venv}/bin/python -m pip install --quiet -r requirements.txt"]
  for flag in ("GPU=1", "GPU=yes"):
    assert _install_lines(_make(["-n", "venv", flag], venv)) == [
        f"{venv}/bin/python -m pip install --quiet -r requirements-gpu.txt"]
  assert _install_lines(_make(["-n", "venv", "GPU=0"], venv)) == [
      f"{venv}/bin/python -m pip install --quiet -r requirements.txt"]
  # Then the checkout itself, editable, without touching the pins.
  for flag in ("GPU=0", "GPU=1"):
    assert _make(["-n", "venv", flag], venv)[-2:] == [
        f"{venv}/bin/python -m pip install --quiet --no-deps "
        "--no-build-isolation -e .", f"touch {venv}/.installed" +
        ("-gpu" if flag == "GPU=1" else "")]
  # Once the GPU venv is installed, plain `make train` keeps it: no reinstall.
  (venv / ".installed-gpu").touch()
  train = _make(["-n", "train"], venv)
  assert not _install_lines(train) and len(train) == 1
  assert train[0].startswith(f"{venv}/bin/python -m official_conadv.train ")
  # ... and `make test` runs on it, still without GPUs.
  assert _make(["-n", "test"], venv) == [
      f"CUDA_VISIBLE_DEVICES= {venv}/bin/python -m pytest -q -n 2 --dist "
      "loadfile --no-loadscope-reorder official_conadv benchmarks "
      "experiments",
      f"CUDA_VISIBLE_DEVICES= KERAS_BACKEND=jax {venv}/bin/python -m pytest "
      "-q -n 2 --dist loadfile --no-loadscope-reorder official_conadv "
      "benchmarks experiments"]


def test_make_test_hands_out_the_longest_files_first():
  import conftest  # pylint: disable=g-import-not-at-top
  for path in conftest.FILE_SECONDS:  # No stale entry.
    assert os.path.isfile(os.path.join(_REPO_ROOT, path)), path
  readme = "official_conadv/readme_test.py"
  ids = ["a_test.py::t1", f"{readme}::t1", "a_test.py::t2", f"{readme}::t2",
         "b_test.py::t[1]", "c_test.py::t", "d_test.py::t"]
  assert conftest.file_order(ids) == [  # Unlisted files: 2 s per test.
      readme, "a_test.py", "b_test.py", "c_test.py", "d_test.py"]


# -------------------------------------------------------------------- devices
_GPUS = [f"/device:GPU:{i}" for i in range(4)]
_CPUS = ["/device:CPU:0", "/device:CPU:1"]


def test_mirrored_devices_choice():
  md = distribute_utils.mirrored_devices
  assert md(_GPUS, _CPUS) == _GPUS  # Every GPU by default.
  assert md(_GPUS, _CPUS, num_gpus=2) == _GPUS[:2]
  assert md(_GPUS, _CPUS, num_gpus=4) == _GPUS
  assert md(_GPUS, _CPUS, num_gpus=0) == _CPUS
  assert md([], _CPUS) == _CPUS  # No GPU: the CPUs.
  assert md(_GPUS, _CPUS, num_gpus=9, devices=["/cpu:0"]) == ["/cpu:0"]
  assert md([], [], devices="/gpu:1") == ["/gpu:1"]


@pytest.mark.parametrize("kwargs,message", [
    ({"num_gpus": 5}, "num_gpus=5 but only 4 GPU(s) are visible"),
    ({"num_gpus": -1}, "num_gpus must be >= 0, got -1"),
    ({"num_gpus": "2"}, "num_gpus must be an int >= 0 or None, got '2'"),
    ({"num_gpus": True}, "num_gpus must be an int >= 0 or None, got True"),
    ({"devices": []}, "devices is empty: give at least one device name, or "
                      "None to pick the GPUs (else the CPUs)"),
])
def test_mirrored_devices_errors(kwargs, message):
  with pytest.raises(ValueError) as e:
    distribute_utils.mirrored_devices(_GPUS, _CPUS, **kwargs)
  assert str(e.value) == message


def test_no_device_at_all():
  with pytest.raises(ValueError, match="^no device to mirror over"):
    distribute_utils.mirrored_devices([], [])


def test_one_device_name():
  assert distribute_utils.one_device_name(_GPUS) == "/gpu:0"
  assert distribute_utils.one_device_name([]) == "/cpu:0"


@pytest.fixture
def four_fake_gpus(monkeypatch):
  """tf.config.list_logical_devices reports 4 GPUs (strategies build lazily)."""
  real = tf.config.list_logical_devices

  def fake(device_type=None):
    if device_type == "GPU":
      return [tf.config.LogicalDevice(name=n, device_type="GPU")
              for n in _GPUS]
    return real(device_type)

  monkeypatch.setattr(tf.config, "list_logical_devices", fake)


def test_get_strategy_uses_every_local_gpu(four_fake_gpus):
  del four_fake_gpus
  local = "/job:localhost/replica:0/task:0/device:"
  mirrored = distribute_utils.get_strategy("mirrored")
  assert list(mirrored.extended.worker_devices) == [
      f"{local}GPU:{i}" for i in range(4)]
  assert distribute_utils.describe_devices(mirrored) == (
      "MirroredStrategy over 4 devices: " +
      ", ".join(f"{local}GPU:{i}" for i in range(4)) + "; 4 GPU(s) visible")
  two = distribute_utils.get_strategy("mirrored", num_gpus=2)
  assert list(two.extended.worker_devices) == [f"{local}GPU:0",
                                               f"{local}GPU:1"]
  one = distribute_utils.get_strategy("one_device")
  assert list(one.extended.worker_devices) == [f"{local}GPU:0"]
  assert distribute_utils.describe_devices(one) == (
      f"OneDeviceStrategy on {local}GPU:0; 4 GPU(s) visible")


def test_describe_devices_on_two_logical_cpus():
  local = "/job:localhost/replica:0/task:0/device:"
  assert [d.name for d in tf.config.list_logical_devices("GPU")] == []
  mirrored = distribute_utils.get_strategy("mirrored")
  assert distribute_utils.describe_devices(mirrored) == (
      f"MirroredStrategy over 2 devices: {local}CPU:0, {local}CPU:1; "
      "no GPU visible")
  one = distribute_utils.get_strategy("one_device")
  assert distribute_utils.describe_devices(one) == (
      f"OneDeviceStrategy on {local}CPU:0; no GPU visible")
  default = distribute_utils.get_strategy("default")
  assert distribute_utils.describe_devices(default) == (
      "default strategy (no tf.distribute), ops placed on /device:CPU:0; "
      "no GPU visible")
  assert distribute_utils.describe_devices(default, gpus=_GPUS[:1]) == (
      "default strategy (no tf.distribute), ops placed on /device:GPU:0; "
      "1 GPU(s) visible")
  with mirrored.scope():  # No argument: the strategy in scope.
    assert distribute_utils.describe_devices().startswith(
        "MirroredStrategy over 2 devices: ")
