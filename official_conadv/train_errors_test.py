"""The CLI's file system errors: a --model_dir that is a file, lies under a
file or is not writable, and a --data_dir that is a file, each end with one
`error:` line and exit status 2 (bad input, see train.py), no traceback,
and leave whatever was in model_dir byte for byte as it was; a file system
error in the middle of a run ends with one line and exit status 1.

In process (train.main, fast) for most cases; the real command line in a
subprocess for the unwritable cases (as root, the subprocess drops
CAP_DAC_OVERRIDE from its capability bounding set, so a mode 0o555
directory is unwritable for it too) and for one data_dir case.
"""

import ctypes
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf
from absl import flags

from official_conadv import train
from official_conadv import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PR_CAPBSET_DROP = 24     # <linux/prctl.h>
_CAP_DAC_OVERRIDE = 1     # <linux/capability.h>
# Data sources that read a directory, and an experiment using each.
DATA_CASES = {
    "image_folder": ["--experiment=imagenet_resnet50_lars_1k",
                     "--params_override=data.name=image_folder"],
    "imagenet_tfrecord": ["--experiment=imagenet_resnet50_lars_1k"],
    "imagenet_tfds": ["--experiment=imagenet_resnet50_lars_1k",
                      "--params_override=data.name=imagenet_tfds"],
    "cifar10": ["--experiment=cifar10_resnet18_lars"],
}


def _snapshot(path):
  """{relative path: bytes, or "dir"} of everything at `path` (a file or a
  tree), to compare before and after a run."""
  if not os.path.isdir(path):
    with open(path, "rb") as f:
      return {".": f.read()}
  out = {}
  for dirpath, dirnames, filenames in os.walk(path):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), path)] = "dir"
    for name in filenames:
      p = os.path.join(dirpath, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = f.read()
  return out


def _fill(model_dir):
  """A model_dir holding a previous run's files; returns its snapshot."""
  os.makedirs(os.path.join(model_dir, "checkpoints"))
  files = {"notes.txt": b"precious\n",
           "checkpoints/checkpoint": b'model_checkpoint_path: "ckpt-3"\n',
           "checkpoints/ckpt-3.index": bytes(range(256)),
           "checkpoints/ckpt-3.data-00000-of-00001": b"\x00\x01" * 100}
  for rel, data in files.items():
    with open(os.path.join(model_dir, rel), "wb") as f:
      f.write(data)
  snapshot = _snapshot(model_dir)
  assert len(snapshot) == 5
  return snapshot


def _main(argv, capsys):
  """train.main in process; (exit code, non-empty stderr lines). Stdout may
  hold progress lines (e.g. `devices: ...`) but no error and no result."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["train", "--strategy=default", "--verbose=0"] + argv)
  code = 0
  try:
    train.main([])
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  _check_stdout(out.out)
  return code, [l for l in out.err.splitlines() if l.strip()]


def _check_stdout(stdout):
  for line in stdout.splitlines():
    assert not line.startswith(("error", "FINAL", "Traceback")), stdout


def _cli(argv, preexec_fn=None):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(
      [sys.executable, "-m", "official_conadv.train", "--strategy=default",
       "--verbose=0"] + argv, cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=300, preexec_fn=preexec_fn)


# TensorFlow's C++ log lines ("2026-01-01 00:00:00.000000: E ...] failed
# call to cuInit ..." on a machine without GPUs, "W0000 00:00:..." from
# absl C++), which TF_CPP_MIN_LOG_LEVEL=2 lets through.
_TF_CPP_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |"
                         r"[IWEF]\d{4} \d\d:\d\d:\d\d)")


def _one_error_line(result):
  """The `error:` line of a CLI run that must fail with status 2: besides
  TensorFlow's C++ log lines it must be the only output."""
  assert "Traceback" not in result.stderr + result.stdout, result.stderr
  lines = [l for l in result.stderr.splitlines()
           if l.strip() and not _TF_CPP_LOG.match(l)]
  assert result.returncode == 2 and len(lines) == 1, (
      result.returncode, result.stderr[-3000:])
  assert lines[0].startswith("error: "), lines
  _check_stdout(result.stdout)
  return lines[0]


def _drop_dac_override():
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.prctl(_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _make_unwritable(directory):
  """chmod 0o555 `directory`; returns the preexec_fn under which a
  subprocess cannot write there (skips if this machine allows no such
  setup, e.g. root without CAP_SETPCAP)."""
  os.chmod(directory, 0o555)
  preexec = _drop_dac_override if os.geteuid() == 0 else None
  probe = os.path.join(directory, "probe")
  try:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", probe],
        preexec_fn=preexec, capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError) as e:
    pytest.skip(f"cannot make a directory unwritable for a subprocess: {e}")
  if result.returncode == 0:
    os.remove(probe)
    pytest.skip("a mode 0o555 directory stays writable for a subprocess "
                "here (root with CAP_DAC_OVERRIDE it cannot drop?)")
  assert "Permission denied" in result.stderr, result.stderr
  return preexec


# ----------------------------------------------------------- model_dir
@pytest.mark.parametrize("under", [False, True])
def test_model_dir_that_is_a_file(under, tmp_path, capsys):
  target = tmp_path / "run"
  target.write_bytes(b"a file, not a run\n")
  model_dir = target / "sub" if under else target
  before = _snapshot(str(tmp_path))
  code, lines = _main(["--experiment=mnist_smoke",
                       f"--model_dir={model_dir}"], capsys)
  assert code == 2
  where = f"{model_dir}: {target}" if under else f"{target}"
  assert lines == [f"error: --model_dir {where} is a file, not a directory; "
                   "point it at a new or existing directory."]
  assert _snapshot(str(tmp_path)) == before


def test_unwritable_model_dir_is_one_line_and_untouched(tmp_path):
  model_dir = str(tmp_path / "run")
  before = _fill(model_dir)
  try:
    preexec = _make_unwritable(model_dir)
    result = _cli(["--experiment=mnist_smoke", f"--model_dir={model_dir}"],
                  preexec_fn=preexec)
    line = _one_error_line(result)
    assert line.startswith(f"error: --model_dir {model_dir} is not writable "
                           "("), line
    assert "Permission denied" in line and line.endswith(
        "use a directory this job can write to."), line
    assert _snapshot(model_dir) == before
    assert oct(os.stat(model_dir).st_mode & 0o777) == oct(0o555)
  finally:
    os.chmod(model_dir, 0o755)


def test_model_dir_in_an_unwritable_parent_is_one_line(tmp_path):
  parent = str(tmp_path / "readonly")
  before = _fill(parent)  # Another run's files, next to the new model_dir.
  model_dir = os.path.join(parent, "runs", "new")
  try:
    preexec = _make_unwritable(parent)
    result = _cli(["--experiment=mnist_smoke", f"--model_dir={model_dir}"],
                  preexec_fn=preexec)
    line = _one_error_line(result)
    assert line.startswith(f"error: --model_dir {model_dir} cannot be "
                           f"created: {parent} is not writable ("), line
    assert "Permission denied" in line, line
    assert _snapshot(parent) == before  # Nothing created, nothing changed.
  finally:
    os.chmod(parent, 0o755)


def test_check_model_dir_creates_nothing(tmp_path):
  before = _snapshot(str(tmp_path))
  train_lib.check_model_dir(str(tmp_path / "a" / "b"))  # New: allowed.
  train_lib.check_model_dir(str(tmp_path))  # Existing: allowed.
  assert _snapshot(str(tmp_path)) == before
  with pytest.raises(ValueError, match="--model_dir is required"):
    train_lib.check_model_dir("")


def test_check_model_dir_on_a_remote_file_system():
  # ram:// stands in for gs://: no directories, only objects.
  root = "ram://check_model_dir_test"
  train_lib.check_model_dir(f"{root}/new/run")  # Probed in place.
  assert not tf.io.gfile.exists(f"{root}/new/run")
  with tf.io.gfile.GFile(f"{root}/run/keep.txt", "w") as f:
    f.write("precious")
  train_lib.check_model_dir(f"{root}/run")
  assert tf.io.gfile.listdir(f"{root}/run") == ["keep.txt"]
  with pytest.raises(ValueError, match=f"--model_dir {root}/run/keep.txt is "
                     "a file, not a directory"):
    train_lib.check_model_dir(f"{root}/run/keep.txt")
  # An object store may hold "a/b" beside an object "a": not refused.
  train_lib.check_model_dir(f"{root}/run/keep.txt/sub")
  with tf.io.gfile.GFile(f"{root}/run/keep.txt") as f:
    assert f.read() == "precious"


def test_file_system_error_mid_run_is_one_line_with_status_1(tmp_path,
                                                              capsys):
  # A file where the export directory goes: training and its checkpoints
  # succeed, the export at the end fails.
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "export").write_bytes(b"in the way\n")
  code, lines = _main(["--experiment=mnist_smoke",
                       f"--model_dir={model_dir}"], capsys)
  assert code == 1, lines
  assert lines == [
      f"error: stopped: {model_dir}/export is not a directory (checkpoints "
      f"saved before in {model_dir} are kept)"]
  assert (model_dir / "export").read_bytes() == b"in the way\n"
  assert tf.train.latest_checkpoint(str(model_dir / "checkpoints"))


# ------------------------------------------------------------ data_dir
@pytest.mark.parametrize("dataset", sorted(DATA_CASES))
def test_data_dir_that_is_a_file(dataset, tmp_path, capsys):
  data_file = tmp_path / "imagenet.tar"
  data_file.write_bytes(b"not a directory")
  model_dir = str(tmp_path / "run")
  before = _fill(model_dir)
  code, lines = _main(DATA_CASES[dataset] + [
      f"--data_dir={data_file}", f"--model_dir={model_dir}"], capsys)
  assert code == 2, lines
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"error: data_dir {data_file} is a file, not a "
                             f"directory; {dataset} needs "), lines
  assert _snapshot(model_dir) == before
  assert data_file.read_bytes() == b"not a directory"


def test_cli_data_dir_under_a_file(tmp_path):
  data_file = tmp_path / "folder.zip"
  data_file.write_bytes(b"PK")
  model_dir = str(tmp_path / "run")
  before = _fill(model_dir)
  line = _one_error_line(_cli(
      DATA_CASES["image_folder"] + [f"--data_dir={data_file}/images",
                                    f"--model_dir={model_dir}"]))
  assert line.startswith(f"error: data_dir {data_file}/images: {data_file} "
                         "is a file, not a directory; image_folder needs a "
                         "directory: put one sub-folder per class"), line
  assert _snapshot(model_dir) == before


# ----------------------------------------------------------- sizes
@pytest.mark.parametrize("override, want", [
    # 4,000 training digits: not one full batch.
    ("train.global_batch_size=8000",
     "error: train.global_batch_size=8,000 is larger than the training split "
     "(4,000 examples of data.name='mnist'): not one full batch."),
    # Before: "Training ... for 1 steps", then a failing reshape.
    ("train.global_batch_size=100000000000",
     "error: train.global_batch_size=100000000000 does not fit in int32 (at "
     "most 2,147,483,647 in magnitude)."),
    # Before: an OverflowError traceback.
    ("train.global_batch_size=1e100",
     "error: train.global_batch_size=1e100 does not fit in int32 (at "
     "most 2,147,483,647 in magnitude)."),
    ("train.seed=-3000000000",
     "error: train.seed=-3000000000 does not fit in int32 (at most "
     "2,147,483,647 in magnitude)."),
])
def test_sizes_are_one_line_before_anything_is_written(override, want,
                                                       tmp_path, capsys):
  model_dir = tmp_path / "run"
  code, lines = _main(["--experiment=mnist_smoke", f"--model_dir={model_dir}",
                       f"--params_override={override}"], capsys)
  assert (code, lines) == (2, [want])
  assert not model_dir.exists()
