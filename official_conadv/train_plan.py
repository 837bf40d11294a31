"""The sizes of one training run, decided before anything is built: pure.

    plan = make_plan(config, num_train=1_281_167, num_eval=50_000,
                     strategy=StrategyFacts.of(strategy))
    plan.total_steps, plan.loop_ends(step), plan.eval_steps, ...

`make_plan` reads only its arguments (no TF op, no file), so a plan can be
checked for any config and strategy without building either.
"""

import dataclasses
from typing import List, Optional, Tuple

import tensorflow as tf

from official_conadv import configs
from official_conadv.data import input_pipeline


@dataclasses.dataclass(frozen=True)
class StrategyFacts:
  """What the plan needs to know of the tf.distribute strategy."""
  name: str = "default"          # Its class name, for messages.
  num_input_pipelines: int = 1   # One per host / worker.
  # False under MirroredStrategy and MultiWorkerMirroredStrategy, where
  # Keras 3's multi-step loop fails (see `steps_per_execution_for`).
  multi_step_loop_works: bool = True

  @classmethod
  def of(cls, strategy: tf.distribute.Strategy) -> "StrategyFacts":
    return cls(
        name=type(strategy).__name__,
        num_input_pipelines=input_pipeline.num_input_pipelines(strategy),
        multi_step_loop_works=not isinstance(strategy, (
            tf.distribute.MirroredStrategy,
            tf.distribute.MultiWorkerMirroredStrategy)))


def loop_ends(step: int, total_steps: int, steps_per_loop: int):
  """The global steps at which loops end from `step` on: multiples of
  `steps_per_loop` counted from step 0, and `total_steps` (a resume from a
  mid-loop preemption checkpoint first finishes that loop)."""
  ends = []
  while step < total_steps:
    step = min(total_steps, (step // steps_per_loop + 1) * steps_per_loop)
    ends.append(step)
  return ends


def _steps_per_execution(requested: int, strategy: StrategyFacts
                         ) -> Tuple[int, Optional[str]]:
  """(steps per execution, why it is 1 instead of `requested`, or None)."""
  if requested > 1 and not strategy.multi_step_loop_works:
    return 1, (f"Keras 3's multi-step loop fails under {strategy.name} "
               "(keras-team/keras#19246)")
  return requested, None


def steps_per_execution_for(strategy, requested: int) -> int:
  """`requested`, or 1 where several steps per call are broken.

  Keras 3's multi-step loop wraps each step in a `tf.cond` (so an execution
  can stop at the end of the data), and under MirroredStrategy and
  MultiWorkerMirroredStrategy the step's cross-replica `merge_call` inside
  that cond fails with "You must feed a value for placeholder tensor ...",
  even for a one-layer model (keras-team/keras#19246, open;
  `train_test.test_upstream_multi_step_loop_under_mirrored_still_fails`
  notices when that changes). The TPU rows' `steps_per_execution` is for
  TPUStrategy (fewer host round trips); GPU strategies run one step per call.

  AutoAugment + adversary runs (the +AA rows) get `requested` like every
  other run. From 2026-12-01 to 2026-12-03 they ran one step per call
  because a `make rehearse` pass had found three of them not bitwise
  reproducible with two; `benchmarks/reproducibility.py` then found two
  steps per call bitwise equal to one step per call in every recorded
  tensor of every step, and every repeated or preempted-and-resumed run
  equal to the first (docs/known_issues.md, item 12). The rare run-to-run
  difference of CPU kernels under several steps per call that remains is
  not specific to them.
  """
  return _steps_per_execution(requested, StrategyFacts.of(strategy))[0]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The sizes of a run (`make_plan`). Steps are global optimizer steps;
  eval steps are batches per replica of `train.eval_batch_size`."""
  num_train: int                 # Training examples (one data epoch).
  num_eval: int                  # Images in the eval split.
  steps_per_epoch: int
  total_steps: int
  steps_per_loop: int            # Loops end at its multiples (from step 0).
  eval_pass_steps: int           # One whole padded pass over the eval split.
  eval_steps: int                # Those evaluated (train.eval_steps caps).
  steps_per_execution: int       # What the model is compiled with.
  # The line that says why steps_per_execution is 1, not the config's.
  steps_per_execution_note: Optional[str] = None

  @property
  def full_eval(self) -> bool:
    """Whether an evaluation scores every eval image (exactly once)."""
    return self.eval_steps == self.eval_pass_steps

  def loop_ends(self, step: int) -> List[int]:
    """The steps at which the loops from `step` on end (`loop_ends`)."""
    return loop_ends(step, self.total_steps, self.steps_per_loop)


def make_plan(config: configs.ExperimentConfig, num_train: int,
              num_eval: int,
              strategy: StrategyFacts = StrategyFacts()) -> Plan:
  """The plan of `config` on data of `num_train` / `num_eval` examples under
  a strategy with `strategy`'s facts. ValueError if the eval batch does not
  split over the input pipelines."""
  train = config.train
  if train.global_batch_size > num_train:
    # Training batches are whole (drop_remainder): none can be made.
    raise ValueError(
        f"train.global_batch_size={train.global_batch_size:,} is larger than "
        f"the training split ({num_train:,} examples of "
        f"data.name={config.data.name!r}): not one full batch.")
  total_steps = config.total_steps(num_train)
  # The eval pipeline always holds one whole padded pass; train.eval_steps
  # (a quick partial evaluation) only scores its first batches.
  pass_steps = input_pipeline.num_eval_steps(
      num_eval, train.eval_batch_size, strategy.num_input_pipelines)
  per_execution, why = _steps_per_execution(train.steps_per_execution,
                                            strategy)
  return Plan(
      num_train=num_train, num_eval=num_eval,
      steps_per_epoch=config.steps_per_epoch(num_train),
      total_steps=total_steps,
      steps_per_loop=min(train.steps_per_loop, total_steps),
      eval_pass_steps=pass_steps,
      eval_steps=min(train.eval_steps or pass_steps, pass_steps),
      steps_per_execution=per_execution,
      steps_per_execution_note=(
          f"train.steps_per_execution={train.steps_per_execution} runs as "
          f"1: {why}." if why else None))
