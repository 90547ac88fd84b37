"""The static Keras names (tfstack.keras_names) equal what the installed Keras accepts."""

import inspect

import keras
import numpy as np
import pytest
from keras.src.losses import ALL_OBJECTS_DICT as LOSS_OBJECTS
from keras.src.metrics import ALL_OBJECTS_DICT as METRIC_OBJECTS
from keras.src.optimizers import ALL_OBJECTS_DICT as OPTIMIZER_OBJECTS

from tfstack import keras_names
from tfstack.schedules import OPTIMIZERS

# `get` accepts the abstract base classes too, but they compute nothing: left out on purpose.
ABSTRACT = {"Loss", "Metric", "metric"}


def _accepted(get, names) -> set[str]:
    accepted = set()
    for name in names:
        try:
            get(name)
        except Exception:  # ValueError mostly; MultiOptimizer raises KeyError
            continue
        accepted.add(name)
    return accepted


def test_loss_names_are_what_keras_losses_get_accepts():
    # `get` looks strings up in this dict only, so its keys are every candidate.
    assert keras_names.KERAS_LOSSES == _accepted(keras.losses.get, LOSS_OBJECTS) - ABSTRACT


def test_metric_names_are_what_keras_metrics_get_accepts():
    assert keras_names.KERAS_METRICS == _accepted(keras.metrics.get, METRIC_OBJECTS) - ABSTRACT


def test_optimizer_names_are_what_keras_optimizers_get_accepts():
    accepted = {
        name
        for name in _accepted(keras.optimizers.get, OPTIMIZER_OBJECTS)
        if not inspect.isabstract(OPTIMIZER_OBJECTS[name])
    }
    assert keras_names.KERAS_OPTIMIZERS == accepted
    # The optimizers tfstack compiles with are these, and each is the class Keras would give.
    assert set(keras_names.SUPPORTED_OPTIMIZERS) == set(OPTIMIZERS)
    for name, cls in OPTIMIZERS.items():
        assert type(keras.optimizers.get(name)) is cls


def _compiles(loss: str, metric: str) -> bool:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(loss=loss, metrics=[metric])
    try:
        model.evaluate(np.ones((2, 3)), np.array([0, 1]), verbose=0)
    except ValueError:
        return False
    return True


@pytest.mark.slow
def test_compile_aliases_are_what_compile_resolves():
    for alias in keras_names.COMPILE_METRIC_ALIASES:
        assert _compiles("sparse_categorical_crossentropy", alias.upper())
        assert keras_names.is_metric(alias.upper())
    for alias in keras_names.COMPILE_LOSS_ALIASES:
        assert _compiles(alias.upper(), "accuracy")
        assert keras_names.is_loss(alias.upper())
        # A loss alias only: compile refuses it as a metric, so the check must too.
        assert not _compiles("sparse_categorical_crossentropy", alias)
        assert not keras_names.is_metric(alias)
