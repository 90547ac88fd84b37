"""Run the ``tfstack`` command with a flat wall-time profile by category; used by bench.py.

bench.py puts a ``tfstack`` script first on ``PATH`` that runs this file, so ``dvc repro`` runs
the real stages, each in its own process, unchanged. Every second of the process is charged to
exactly one category, the innermost one active:

- ``startup``: from the shell starting the command (``TFSTACK_BENCH_T0``) to this file running;
- ``import``: top-level ``import`` statements (TensorFlow, Keras, MLflow, ... on first use);
- ``data``: reading and splitting the data, building the input pipelines, the demo's tasks;
- ``model_io``: loading components and saved models, stacking, saving models;
- ``training``: the schedule's phases (and the demo's pretraining);
- ``checkpoint``: the per-epoch training checkpoints of the pipeline's training loop;
- ``evaluation``: the evaluate stage, less its tracking;
- ``tracking``: every call into ``tfstack.tracking`` and the run's tags (git, data hash);
- ``other``: the rest (config, JSON outputs, the CLI).

The totals and the process's wall time (to its last ``atexit`` handler) are appended as one JSON
line to ``TFSTACK_BENCH_PROFILE``; the wrapper script appends when the interpreter has exited to
``TFSTACK_BENCH_PROFILE.exits``.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import inspect
import json
import os
import sys
import threading
import time

START = time.time()
LAUNCHED = float(os.environ.get("TFSTACK_BENCH_T0") or START)


class FlatProfile:
    """Exclusive wall time per category, attributed to the innermost active category."""

    def __init__(self) -> None:
        self.stack = ["other"]
        self.totals: dict[str, float] = {"startup": START - LAUNCHED}
        self.mark = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        top = self.stack[-1]
        self.totals[top] = self.totals.get(top, 0.0) + now - self.mark
        self.mark = now

    def enter(self, category: str) -> None:
        self._charge()
        self.stack.append(category)

    def exit(self) -> None:
        self._charge()
        self.stack.pop()


PROFILE = FlatProfile()


def _timed(category: str, function):
    if getattr(function, "_bench_timed", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        PROFILE.enter(category)
        try:
            return function(*args, **kwargs)
        finally:
            PROFILE.exit()

    wrapper._bench_timed = True
    return wrapper


# module -> {attribute (or Class.method): category}
TARGETS = {
    "tfstack.data": {
        "load_npz": "data",
        "ArrayDataset.__init__": "data",
        "make_dataset": "data",
        "save_npz": "data",
    },
    "tfstack.pipeline.demo": {
        "make_transfer_task": "data",
        "write_raw_digits": "data",
        "pretrain_components": "training",
    },
    # The pipeline's training loop, with a checkpoint after every epoch when it has one.
    "tfstack.training": {
        "run_schedule": "training",
        "EpochCheckpoint.on_epoch_end": "checkpoint",
        "EpochCheckpoint.on_train_begin": "checkpoint",
    },
    "tfstack.checkpoints": {"write_state": "checkpoint", "remove": "checkpoint"},
    "tfstack.pipeline": {
        "build": "model_io",
        "load_model": "model_io",
        "evaluate": "evaluation",
        "log_build_report": "tracking",
        "RunLog.tags": "tracking",
        "RunLog.__init__": "tracking",
    },
    "tfstack.components": {"load_component": "model_io"},
    "tfstack.tracking": {
        "EpochLogger.on_train_begin": "tracking",
        "EpochLogger.on_epoch_end": "tracking",
        "EpochLogger.on_train_end": "tracking",
    },
}
# With TFSTACK_BENCH_DETAIL=1 (benchmarks/fixed_costs.py), the fixed costs of a run one by one:
# the pipeline's stage functions as stages.py calls them, each plot, each model save and load,
# each logged model. Innermost wins, so a model save inside log_keras_model is "model_save".
DETAIL_TARGETS = {
    "tfstack.pipeline.stages": {
        "build": "build",
        "evaluate": "evaluate_other",
        "load_model": "model_load",
        "log_build_report": "tracking",
        "served_example": "evaluate_other",
    },
    "tfstack.evaluation": {
        "evaluate": "test_predictions",
        "confusion_figure": "plots",
        "regression_figure": "plots",
        "learning_curve_figure": "plots",
    },
    "matplotlib.figure": {"Figure.savefig": "plots"},
    "tfstack.diagrams": {"draw": "diagrams", "draw_phases": "diagrams"},
    "tfstack.frozen_features": {"frozen_outputs": "training"},
    "keras.src.models.model": {"Model.save": "model_save"},
    "keras.saving": {"load_model": "model_load"},
    "keras.models": {"load_model": "model_load"},
    "tfstack.tracking": {
        "log_keras_model": "log_model",
        "log_classifier_model": "log_classifier",
        "log_figure": "plots",
    },
}
if os.environ.get("TFSTACK_BENCH_DETAIL"):
    for _module, _targets in DETAIL_TARGETS.items():
        TARGETS.setdefault(_module, {}).update(_targets)
_patched: set[str] = set()


def _resolve(module, dotted: str):
    """The attribute ``Class.method`` or ``function`` of ``module``, or None if it has none."""
    target = module
    for part in dotted.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def _patch(module_name: str) -> None:
    module = sys.modules[module_name]
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        return  # still executing its body; patched after a later import
    names = {
        dotted: category
        for dotted, category in TARGETS[module_name].items()
        if _resolve(module, dotted) is not None
    }
    if module_name == "tfstack.tracking":
        # Every public function: starting, ending and logging to the run, logging the model.
        for name, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module_name:
                names.setdefault(name, "tracking")
    for dotted, category in names.items():
        owner, _, attribute = dotted.rpartition(".")
        target = getattr(module, owner) if owner else module
        setattr(target, attribute, _timed(category, getattr(target, attribute)))
    _patched.add(module_name)


_original_import = builtins.__import__


def _import(*args, **kwargs):
    if PROFILE.stack[-1] == "import" or threading.current_thread() is not threading.main_thread():
        return _original_import(*args, **kwargs)
    PROFILE.enter("import")
    try:
        return _original_import(*args, **kwargs)
    finally:
        PROFILE.exit()
        for name in TARGETS:
            if name not in _patched and name in sys.modules:
                _patch(name)


def _report() -> None:
    PROFILE._charge()
    out = os.environ.get("TFSTACK_BENCH_PROFILE")
    if not out:
        return
    record = {
        "command": sys.argv[1:2],
        "launched": LAUNCHED,
        "wall": time.time() - LAUNCHED,
        "seconds": PROFILE.totals,
    }
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def main() -> None:
    builtins.__import__ = _import
    atexit.register(_report)
    from tfstack import cli

    cli.run(sys.argv[1:])  # exits as the `tfstack` command does


if __name__ == "__main__":
    main()
