"""The trainer (`train_lib.run`) as one worker of a MultiWorkerMirrored run.

Run by `official_conadv/multi_worker_lookahead_test.py` through
`multi_worker.run_workers` (TF_CONFIG set per process). Every worker trains
the offline `mnist_smoke` experiment, shrunk by `--params_override`, under
`distribute_utils.get_strategy("multi_worker_mirrored")`, with model_dir
`--model_dir`. With `--sigterm_at=N`, worker 0 only sends itself SIGTERM once
it has passed step N: every worker must stop at the same step (the trainer
sums the preemption flag across workers), save it and raise `Preempted`.

Prints (`multi_worker.emit_result`): {"status": "done" | "preempted",
"step": global step reached}.
"""

import argparse
import os
import sys

if __name__ == "__main__":  # Worker process: quiet, CPU only.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ["CUDA_VISIBLE_DEVICES"] = ""

import experiments  # pylint: disable=g-import-not-at-top
from official_conadv import configs  # pylint: disable=g-import-not-at-top
from official_conadv import distribute_utils  # pylint: disable=g-import-not-at-top
from official_conadv import train_lib  # pylint: disable=g-import-not-at-top
from official_conadv.testing import multi_worker  # pylint: disable=g-import-not-at-top
from official_conadv.testing.preemption import SigtermAt  # pylint: disable=g-import-not-at-top


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--params_override", default="")
  parser.add_argument("--sigterm_at", type=int, default=None)
  args = parser.parse_args(argv)
  strategy = distribute_utils.get_strategy("multi_worker_mirrored")
  config = configs.override(experiments.get("mnist_smoke"),
                            args.params_override)
  callbacks = []
  if args.sigterm_at is not None and distribute_utils.task_index() == 0:
    callbacks.append(SigtermAt(args.sigterm_at))
  try:
    summary = train_lib.run(config, args.model_dir, mode="train",
                            strategy=strategy, verbose=0, export=False,
                            callbacks=callbacks)
    multi_worker.emit_result({"status": "done", "step": summary["step"]})
  except train_lib.Preempted as e:
    step = int(str(e).split("checkpoint of step ")[1].split(" ")[0])
    multi_worker.emit_result({"status": "preempted", "step": step})


if __name__ == "__main__":
  main(sys.argv[1:])
  multi_worker.exit_together()  # No 2 s teardown; outputs written.
