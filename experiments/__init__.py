"""Named experiments: `experiments.get(name)` -> a validated ExperimentConfig.

In a checkout this is the top-level `experiments` package; the installed
wheel maps it to `official_conadv.experiments` (pyproject.toml), so it never
takes a generic top-level name in site-packages. Library code finds it with
`configs.named_experiments()`.

Each module registers its experiments with `register`; every experiment's
docstring gives the exact command, the expected cost and the expected result.
`python -m official_conadv.train --experiment=list` prints them all.
"""

from typing import Callable, Dict

from official_conadv import configs

_REGISTRY: Dict[str, Callable[[], configs.ExperimentConfig]] = {}


def register(name: str, factory: Callable[[], configs.ExperimentConfig]):
  if name in _REGISTRY:
    raise ValueError(f"Experiment {name!r} registered twice.")
  _REGISTRY[name] = factory


def names():
  _load()
  return sorted(_REGISTRY)


def get(name: str) -> configs.ExperimentConfig:
  _load()
  if name not in _REGISTRY:
    raise ValueError(f"Unknown experiment {name!r}; valid names: "
                     f"{', '.join(sorted(_REGISTRY))}.")
  config = _REGISTRY[name]()
  config.name = name
  return config.validate()


def describe(name: str) -> str:
  _load()
  return (_REGISTRY[name].__doc__ or "").strip()


def _load():
  # Imported for their registration side effect (relative: this package is
  # `experiments` in a checkout and `official_conadv.experiments` installed).
  from . import (  # pylint: disable=g-import-not-at-top,unused-import
      cifar10, imagenet, imagenet_efficientnet, mnist, mnist_applications)
