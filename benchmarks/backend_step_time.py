r"""Step time of baseline, delayed and lookahead ConAdv on a Keras backend.

Runs where only jax, keras and numpy are installed (`--backend=jax`, the
default; TensorFlow is never imported then), e.g. on a TPU VM or a GPU box:

  python -m benchmarks.backend_step_time --image_size=224 --batch_size=256 \
      --output=jax_step_time.json                   # every local device

Side by side with the TensorFlow backend on one machine (two worker
processes, one per backend, each building every mode once; the rounds
alternate between them so machine noise hits both alike):

  python -m benchmarks.backend_step_time --compare_backends \
      --image_size=64 --batch_size=8 --rounds=5

What is timed: `fit` over `--steps` steps of ResNet-`--depth` (dual BN) on
synthetic images, XLA-compiled on both backends (JAX always; TensorFlow with
jit_compile=True), precision `--precision` (mixed_bfloat16 by default),
LARS, PGD-1. Each mode is compiled by an untimed `fit` first; a round then
times one `fit` of every mode (its wall time / steps, the weights synced to
the host at the end). With several local devices the JAX run shards the
batch with `keras.distribution.DataParallel` (`--batch_size` is global).
Prints median/min/max seconds per step, images/s and the ratio to the
baseline per backend (and JAX / TensorFlow per mode with
--compare_backends), and writes JSON to --output.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import results

MODES = ("baseline", "delayed", "lookahead")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backend", choices=("jax", "tensorflow"),
                      default="jax", help="Keras backend of a single run.")
  parser.add_argument("--compare_backends", action="store_true",
                      help="time JAX and TensorFlow side by side (needs both)")
  parser.add_argument("--modes", default=",".join(MODES),
                      help="comma-separated subset of " + ",".join(MODES))
  parser.add_argument("--delay", type=int, default=1,
                      help="tau of the delayed and lookahead modes (>= 1)")
  parser.add_argument("--depth", type=int, default=50, help="ResNet depth")
  parser.add_argument("--image_size", type=int, default=64,
                      help="square image side")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="global batch size")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--precision", default="mixed_bfloat16",
                      choices=("mixed_bfloat16", "float32"),
                      help="Keras dtype policy")
  parser.add_argument("--steps", type=int, default=3,
                      help="steps per timed fit")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
  parser.add_argument("--output", default=None, help="JSON output path")
  parser.add_argument("--worker", action="store_true",
                      help=argparse.SUPPRESS)  # Driven by --compare_backends.
  args = parser.parse_args(argv)
  args.modes = [m for m in args.modes.split(",") if m]
  unknown = sorted(set(args.modes) - set(MODES))
  if unknown or not args.modes:
    parser.error(f"--modes: unknown {unknown}; choose from {MODES}")
  for name in ("delay", "depth", "image_size", "batch_size", "steps",
               "rounds", "num_classes"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args


# ----------------------------------------------------------------- worker
class Candidates:
  """One compiled model per mode, fed the same synthetic batch."""

  def __init__(self, args):
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from official_conadv.adversarial import schedules  # pylint: disable=g-import-not-at-top
    from official_conadv.modeling import conadv_model  # pylint: disable=g-import-not-at-top
    from official_conadv.modeling import resnet  # pylint: disable=g-import-not-at-top
    from official_conadv.optimization import lars  # pylint: disable=g-import-not-at-top

    self.args = args
    self.backend = keras.backend.backend()
    keras.config.set_dtype_policy(args.precision)
    self.devices = 1
    if self.backend == "jax":
      import jax  # pylint: disable=g-import-not-at-top
      self.devices = jax.local_device_count()
      if self.devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel())
    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    shape = (n, args.image_size, args.image_size, 3)
    self.x = rng.random(shape, dtype=np.float32)
    self.y = rng.integers(0, args.num_classes, n).astype(np.int32)
    self.models = {}
    for mode in args.modes:
      adversary = None if mode == "baseline" else schedules.AdversaryConfig(
          delay=args.delay, schedule=mode)
      model = conadv_model.ConAdvModel(
          resnet.ResNet(depth=args.depth, num_classes=args.num_classes),
          adversary=adversary)
      model.compile(
          optimizer=lars.LARS(0.1, momentum=0.9, weight_decay_rate=1e-4),
          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          jit_compile=True)
      self.models[mode] = model
      self.fit(mode)  # Compiles (untimed).

  def fit(self, mode):
    """Seconds per step of one `fit` of `--steps` steps."""
    start = time.perf_counter()
    self.models[mode].fit(self.x, self.y, batch_size=self.args.batch_size,
                          epochs=1, shuffle=False, verbose=0)
    return (time.perf_counter() - start) / self.args.steps

  def round(self):
    return {mode: self.fit(mode) for mode in self.models}


def summarize(times, batch_size):
  """{mode: {median_s, min_s, max_s, images_per_s, ratio_to_baseline}}."""
  out = {}
  for mode, seconds in times.items():
    median = statistics.median(seconds)
    out[mode] = {"median_s": median, "min_s": min(seconds),
                 "max_s": max(seconds), "images_per_s": batch_size / median,
                 "rounds": len(seconds)}
  if "baseline" in out:
    for mode in out:
      out[mode]["ratio_to_baseline"] = (out[mode]["median_s"] /
                                        out["baseline"]["median_s"])
  return out


def table(title, summary):
  lines = [title, f"{'mode':<10} {'median s':>9} {'min s':>8} {'max s':>8} "
           f"{'img/s':>8} {'x base':>7}"]
  for mode, r in summary.items():
    ratio = r.get("ratio_to_baseline")
    lines.append(f"{mode:<10} {r['median_s']:>9.3f} {r['min_s']:>8.3f} "
                 f"{r['max_s']:>8.3f} {r['images_per_s']:>8.2f} "
                 f"{'' if ratio is None else f'{ratio:.2f}':>7}")
  return "\n".join(lines)


def run_worker(args):
  """--worker: builds the candidates, prints READY, then times one round per
  line read from stdin ("round"), printing it as JSON; ends at EOF."""
  candidates = Candidates(args)
  print("READY " + json.dumps({"backend": candidates.backend,
                               "devices": candidates.devices}), flush=True)
  for line in sys.stdin:
    if line.strip() != "round":
      continue
    print("ROUND " + json.dumps(candidates.round()), flush=True)


def _meta(args):
  import platform  # pylint: disable=g-import-not-at-top
  return {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
          "processor": platform.processor(), "cpus": os.cpu_count(),
          # Not the output path (a machine's own folder).
          "config": {k: v for k, v in vars(args).items()
                     if k not in ("worker", "output")}}


def run_single(args):
  candidates = Candidates(args)
  times = {mode: [] for mode in candidates.models}
  for _ in range(args.rounds):
    for mode, seconds in candidates.round().items():
      times[mode].append(seconds)
  summary = summarize(times, args.batch_size)
  print(table(f"{candidates.backend} ({candidates.devices} device(s)), "
              f"ResNet-{args.depth}, {args.image_size}px, batch "
              f"{args.batch_size}, {args.precision}", summary))
  result = dict(_meta(args), backend=candidates.backend,
                devices=candidates.devices, results=summary, raw=times)
  results.write_json(result, args.output)
  return result


def _read(worker, prefix):
  while True:
    line = worker.stdout.readline()
    if not line:
      raise RuntimeError(f"a worker ended early (exit {worker.wait()}); "
                         "see its messages above")
    if line.startswith(prefix + " "):
      return json.loads(line[len(prefix) + 1:])


def run_compare(args):
  """Two workers (JAX, TensorFlow), rounds alternating between them."""
  argv = [a for a in sys.argv[1:] if a != "--compare_backends"
          and not a.startswith("--backend") and not a.startswith("--output")]
  workers = {}
  for backend in ("jax", "tensorflow"):
    env = dict(os.environ, KERAS_BACKEND=backend,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workers[backend] = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.backend_step_time", "--worker",
         f"--backend={backend}"] + argv, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    # Build (and compile) one backend at a time.
    _read(workers[backend], "READY")
  times = {b: {m: [] for m in args.modes} for b in workers}
  try:
    for _ in range(args.rounds):
      for backend, worker in workers.items():
        worker.stdin.write("round\n")
        worker.stdin.flush()
        for mode, seconds in _read(worker, "ROUND").items():
          times[backend][mode].append(seconds)
  finally:
    for worker in workers.values():
      worker.stdin.close()
      worker.wait(timeout=600)
  summaries = {b: summarize(t, args.batch_size) for b, t in times.items()}
  for backend, summary in summaries.items():
    print(table(f"{backend}, ResNet-{args.depth}, {args.image_size}px, batch "
                f"{args.batch_size}, {args.precision}", summary))
  jax_over_tf = {m: summaries["jax"][m]["median_s"] /
                 summaries["tensorflow"][m]["median_s"] for m in args.modes}
  print("JAX / TensorFlow seconds per step: " + ", ".join(
      f"{m} {r:.2f}" for m, r in jax_over_tf.items()))
  result = dict(_meta(args), results=summaries, raw=times,
                jax_over_tensorflow=jax_over_tf)
  results.write_json(result, args.output)
  return result


def main(argv=None):
  args = parse_args(argv)
  if not args.compare_backends:
    # Before keras is imported (the worker processes get it from the env).
    os.environ["KERAS_BACKEND"] = args.backend
  if args.worker:
    return run_worker(args)
  if args.compare_backends:
    return run_compare(args)
  return run_single(args)


if __name__ == "__main__":
  main()
