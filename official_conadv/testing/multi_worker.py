"""Runs a Python script or module as N TF worker processes on 127.0.0.1.

For tests of `tf.distribute.MultiWorkerMirroredStrategy` (and anything else
driven by `TF_CONFIG`): picks free loopback ports, gives each process its own
`TF_CONFIG` (`{"cluster": {"worker": [...]}, "task": {"type": "worker",
"index": i}}`), hides GPUs (`CUDA_VISIBLE_DEVICES=""`), puts the repository
root on `PYTHONPATH`, starts every worker in its own process group, waits with
one deadline for all of them, and always kills what is left (`SIGKILL` to the
group) -- on timeout, on the first worker that fails (its peers would block in
a collective forever), on an exception or a Ctrl-C in the caller.

Worker side: report results by printing one line with `emit_result(obj)`
(JSON); the caller reads it back as `WorkerResult.result`. Bigger outputs
(weights, checkpoints) go to files under a directory passed in `args`;
`"{task_index}"` and `"{num_workers}"` in `args` are replaced per worker.
A worker whose main function returned can end with `exit_together()`: it
exits as soon as every worker of the launch got there, without Python's and
TensorFlow's teardown (another 1.5-2.5 s per process, which every launch
would wait for).

    results = multi_worker.run_workers(
        "official_conadv/some_worker.py",  # or a module: "pkg.mod"
        ["--out", str(tmp_path / "w{task_index}.npz")],
        num_workers=2, timeout=120)
    assert results[0].result == results[1].result

Failures raise `WorkersFailedError` (or its subclass `WorkersTimeoutError`)
whose message names each worker's exit status and the tail of its stderr.
"""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

RESULT_PREFIX = "MULTI_WORKER_RESULT: "

# Repository root (parent of the `official_conadv` package), for PYTHONPATH.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Environment variable naming the directory where `exit_together` marks
# arrivals (one per launch, made and removed by `_run_once`).
_DONE_DIR_ENV = "MULTI_WORKER_DONE_DIR"

# stderr of a worker whose gRPC server lost its port to another process.
_PORT_CLASH_MARKERS = ("Address already in use", "Failed to add port")


class WorkersFailedError(RuntimeError):
  """One or more workers exited non-zero (or did not report in time)."""

  def __init__(self, message, results):
    super().__init__(message)
    self.results = results


class WorkersTimeoutError(WorkersFailedError):
  """The workers did not all finish before the deadline."""


@dataclasses.dataclass
class WorkerResult:
  """What one worker process did. `returncode` is negative (-signal) if it
  was killed; `killed` says this module killed it (deadline, failed peer)."""
  task_index: int
  returncode: Optional[int]
  stdout: str
  stderr: str
  killed: bool = False  # Still running when stopped, then SIGKILLed.
  timed_out: bool = False  # Killed because the deadline passed.

  @property
  def ok(self) -> bool:
    return self.returncode == 0

  @property
  def result(self) -> Any:
    """The object of the last `emit_result(...)` line on stdout, or None."""
    for line in reversed(self.stdout.splitlines()):
      if line.startswith(RESULT_PREFIX):
        return json.loads(line[len(RESULT_PREFIX):])
    return None


def emit_result(obj: Any) -> None:
  """Worker side: prints `obj` (JSON-serialisable) for `WorkerResult.result`."""
  sys.stdout.write(RESULT_PREFIX + json.dumps(obj) + "\n")
  sys.stdout.flush()


def exit_together(code: int = 0, timeout: float = 60.0) -> None:
  """Worker side: ends this process with `code` once every worker of the
  launch has called this, without Python's and TensorFlow's teardown (1.5-2.5
  s per process: the MWMS runtime, its gRPC server, ...).

  Call it last, when every file the caller reads is written and closed.
  Waiting for the others matters: a worker back from its last collective can
  still be asked for its part by a peer finishing that collective. Each
  worker marks its arrival in a directory `run_workers` makes per launch.
  Outside `run_workers`, or if a peer has not arrived after `timeout` s (a
  failed peer gets the launch killed anyway), it exits the ordinary way.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  done_dir = os.environ.get(_DONE_DIR_ENV)
  config = json.loads(os.environ.get("TF_CONFIG") or "{}")
  if not done_dir or "task" not in config:
    sys.exit(code)
  tasks = [f"{job}{i}" for job, hosts in config["cluster"].items()
           for i in range(len(hosts))]
  task = config["task"]
  with open(os.path.join(done_dir, f"{task['type']}{task['index']}"), "w"):
    pass
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if all(os.path.exists(os.path.join(done_dir, t)) for t in tasks):
      os._exit(code)  # pylint: disable=protected-access
    time.sleep(0.02)
  sys.exit(code)


def pick_unused_ports(n: int, host: str = "127.0.0.1") -> List[int]:
  """`n` distinct ports free on `host` right now (bound together, then freed;
  another process can still take one before the workers do -- `run_workers`
  retries once with new ports if that happens)."""
  socks = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def make_tf_config(ports: Sequence[int], task_index: int,
                   task_type: str = "worker",
                   host: str = "127.0.0.1") -> Dict[str, Any]:
  """A TF_CONFIG dict: one `worker` job on `host:port` for each port."""
  return {
      "cluster": {"worker": [f"{host}:{p}" for p in ports]},
      "task": {"type": task_type, "index": task_index},
  }


def _command(script: str) -> List[str]:
  """`python path.py` for a `.py` file, else `python -m module`."""
  if not script.endswith(".py"):
    return [sys.executable, "-m", script]
  if not os.path.isabs(script) and not os.path.exists(script):
    script = os.path.join(_REPO_ROOT, script)
  if not os.path.exists(script):
    raise FileNotFoundError(f"worker script not found: {script}")
  return [sys.executable, os.path.abspath(script)]


def _kill_group(proc: subprocess.Popen) -> None:
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    pass


def _tail(text: str, lines: int) -> str:
  return "\n".join(text.rstrip().splitlines()[-lines:])


def _format_failure(results: List[WorkerResult], headline: str,
                    tail_lines: int) -> str:
  parts = [headline]
  for r in results:
    if r.timed_out:
      status = "killed at the deadline"
    elif r.killed:
      status = "killed after another worker failed"
    else:
      status = f"exit status {r.returncode}"
    parts.append(f"--- worker {r.task_index}: {status}; stderr tail:\n"
                 f"{_tail(r.stderr, tail_lines) or '(empty)'}")
    if r.stdout.strip():
      parts.append(f"--- worker {r.task_index} stdout tail:\n"
                   f"{_tail(r.stdout, 10)}")
  return "\n".join(parts)


def _run_once(cmd, args, num_workers, timeout, env, cwd, poll_interval):
  ports = pick_unused_ports(num_workers)
  procs, files = [], []
  base_env = dict(os.environ)
  base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  base_env["CUDA_VISIBLE_DEVICES"] = ""
  base_env["PYTHONPATH"] = os.pathsep.join(
      [_REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  base_env["PYTHONUNBUFFERED"] = "1"
  done_dir = tempfile.mkdtemp(prefix="multi_worker_done_")
  base_env[_DONE_DIR_ENV] = done_dir
  base_env.update(env or {})
  results = []
  timed_out = False
  try:
    for i in range(num_workers):
      worker_env = dict(base_env)
      worker_env["TF_CONFIG"] = json.dumps(make_tf_config(ports, i))
      out = tempfile.TemporaryFile(mode="w+")
      err = tempfile.TemporaryFile(mode="w+")
      files.append((out, err))
      worker_args = [str(a).replace("{task_index}", str(i))
                     .replace("{num_workers}", str(num_workers)) for a in args]
      procs.append(subprocess.Popen(
          cmd + worker_args, env=worker_env, cwd=cwd or _REPO_ROOT,
          stdin=subprocess.DEVNULL, stdout=out, stderr=err,
          start_new_session=True))  # Own process group, killed as a whole.
    deadline = time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        break
      if any(c not in (None, 0) for c in codes):
        break  # A failed worker leaves its peers waiting on collectives.
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(poll_interval)
  finally:
    # Who was still running when we stopped waiting (timeout, a failed peer,
    # or an exception/KeyboardInterrupt in this process).
    running = [p.poll() is None for p in procs]
    for p in procs:
      _kill_group(p)
    for i, (out, err) in enumerate(files):
      out.seek(0)
      err.seek(0)
      stdout, stderr = out.read(), err.read()
      out.close()
      err.close()
      if i >= len(procs):
        continue
      results.append(WorkerResult(
          task_index=i, returncode=procs[i].returncode, stdout=stdout,
          stderr=stderr, killed=running[i],
          timed_out=timed_out and running[i]))
    shutil.rmtree(done_dir, ignore_errors=True)
  return results, timed_out


def run_workers(script: str,
                args: Sequence[Any] = (),
                num_workers: int = 2,
                timeout: float = 120.0,
                env: Optional[Mapping[str, str]] = None,
                cwd: Optional[str] = None,
                check: bool = True,
                tail_lines: int = 40,
                poll_interval: float = 0.1) -> List[WorkerResult]:
  """Runs `script` as `num_workers` TF workers on 127.0.0.1 and waits.

  Args:
    script: a `.py` path (relative paths are taken from the repository root)
      or a module name run with `python -m`.
    args: command-line arguments; "{task_index}" / "{num_workers}" inside
      them are replaced per worker.
    num_workers: how many worker processes (ports, TF_CONFIG entries).
    timeout: seconds for all of them together; then all are killed.
    env: extra environment variables (override the defaults set here).
    cwd: working directory (default: the repository root).
    check: raise `WorkersFailedError` if any worker failed or timed out;
      with False, return the results anyway (a timeout still raises).
    tail_lines: stderr lines per worker in the error message.
    poll_interval: seconds between liveness checks.

  Returns:
    One `WorkerResult` per worker, in task-index order.

  Raises:
    WorkersTimeoutError: not all workers finished within `timeout`.
    WorkersFailedError: with `check=True`, some worker exited non-zero.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  cmd = _command(script)
  start = time.monotonic()
  results, timed_out = _run_once(cmd, args, num_workers, timeout, env, cwd,
                                 poll_interval)
  clash = any(m in r.stderr for r in results for m in _PORT_CLASH_MARKERS)
  if clash and not all(r.ok for r in results):
    # A port picked as free was taken before the worker bound it: retry once.
    remaining = max(1.0, timeout - (time.monotonic() - start))
    results, timed_out = _run_once(cmd, args, num_workers, remaining, env,
                                   cwd, poll_interval)
  if timed_out:
    raise WorkersTimeoutError(_format_failure(
        results, f"{' '.join(cmd)}: workers did not finish within "
        f"{timeout:g} s; all were killed.", tail_lines), results)
  if check and not all(r.ok for r in results):
    failed = [r for r in results if not r.ok and not r.killed]
    killed = sum(r.killed for r in results)
    raise WorkersFailedError(_format_failure(
        results, f"{' '.join(cmd)}: {len(failed)} of {num_workers} workers "
        f"failed" + (f", {killed} killed after that." if killed else "."),
        tail_lines), results)
  return results
