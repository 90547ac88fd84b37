"""tfstack: stack pretrained Keras models and train them by freeze policy and schedule.

The library works on Keras values alone, without Hydra, DVC or MLflow (those are the
``tfstack`` command's: ``tfstack.pipeline`` and ``tfstack.tracking``). Its public API is these
names, imported on first use so ``import tfstack`` stays cheap:

- `load_component`: a pretrained model from a file, a SavedModel or Keras Applications.
- `build_stacked`: feature extractor(s) and head stacked by strategy (``sequential``,
  ``adapter``, ``functional``); returns a `StackResult` whose ``.model`` is the stacked model.
- `FreezePolicy`: what trains inside the feature extractors (``frozen``, ``joint``,
  ``partial``).
- `Phase`, `make_schedule`: the phases of a fine-tuning schedule (``single``, ``two_phase``,
  ``gradual``).
- `run_schedule`: the phase loop (freeze, recompile, fit; optional checkpoints and resume).
- `ArrayDataset`, `load_npz`: batched data with a seeded order; a dataset ``.npz`` with splits.
- `evaluate`: metrics, the task's figure and table of a trained model.
- `TfstackError`: the base class of every error caused by input.

Example:
    >>> import keras, numpy as np
    >>> import tfstack
    >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)], name="sequential")
    >>> base.save("base.keras")
    >>> head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, "softmax")])
    >>> stacked = tfstack.build_stacked(
    ...     "sequential", tfstack.load_component("base.keras", name="base"), head
    ... ).model
    >>> stacked.output_shape
    (None, 2)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "load_component": "tfstack.components",
    "build_stacked": "tfstack.stacking",
    "FreezePolicy": "tfstack.freezing",
    "Phase": "tfstack.schedules",
    "make_schedule": "tfstack.schedules",
    "run_schedule": "tfstack.training",
    "ArrayDataset": "tfstack.datasets",
    "load_npz": "tfstack.data",
    "evaluate": "tfstack.evaluation",
    "TfstackError": "tfstack.errors",
}

__all__ = [
    "ArrayDataset",
    "FreezePolicy",
    "Phase",
    "TfstackError",
    "__version__",
    "build_stacked",
    "evaluate",
    "load_component",
    "load_npz",
    "make_schedule",
    "run_schedule",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from tfstack.components import load_component
    from tfstack.data import load_npz
    from tfstack.datasets import ArrayDataset
    from tfstack.errors import TfstackError
    from tfstack.evaluation import evaluate
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import Phase, make_schedule
    from tfstack.stacking import build_stacked
    from tfstack.training import run_schedule


def __getattr__(name: str):
    # PEP 562: import TensorFlow and Keras only when a name that needs them is first used.
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfstack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
