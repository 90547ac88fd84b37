"""Class weights for Keras ``fit(class_weight=...)``: ``balanced``, or the user's mapping.

``balanced`` is scikit-learn's definition, ``n_samples / (n_classes * count_c)`` over the
training labels, so every class contributes the same total weight to the loss. A mapping may
name classes by name (the run's class names) or by index; classes it leaves out weigh 1. The
result is a ``{class index: weight}`` dict for every class, which Keras turns into per-sample
weights for arrays and ``tf.data`` pipelines alike (``keras/src/trainers/data_adapters``), so it
works for cached frozen-feature phases too (they fit a ``tf.data`` pipeline of the same labels).

Binary tasks (one sigmoid output, labels 0 or 1) take class weights too: Keras rounds the
label to its class index. Regression has no classes and refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from tfstack.errors import ConfigError, DataError

BALANCED = "balanced"
"""The class-weight setting computed from the training labels."""


def balanced_class_weights(y: np.ndarray, n_classes: int, *, key: str = "class_weight"):
    """``n_samples / (n_classes * count_c)`` for each class ``c`` of the training labels.

    Args:
        y: Integer class ids, shape ``(n,)`` or ``(n, 1)``.
        n_classes: The number of classes (the head's, not only those present).
        key: What the setting is called in messages.

    Returns:
        ``{class index: weight}`` for ``0 .. n_classes-1``.

    Raises:
        DataError: A class has no training sample (its weight would be infinite).

    Example:
        >>> balanced_class_weights(np.array([0, 0, 0, 1]), 2)
        {0: 0.6666666666666666, 1: 2.0}
    """
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    missing = [c for c in range(n_classes) if counts[c] == 0]
    if missing:
        raise DataError(
            f"{key}=balanced: class {missing[0]} has no sample in the training split, so its "
            "weight would be infinite. Add samples of it, or give explicit weights "
            f"({key}={{NAME: WEIGHT}})."
        )
    return {c: float(len(labels) / (n_classes * counts[c])) for c in range(n_classes)}


def resolve_class_weight(
    setting: str | Mapping | None,
    y_train: np.ndarray,
    class_names: Sequence[str] | None,
    *,
    task: str,
    key: str = "class_weight",
) -> dict[int, float] | None:
    """The ``{class index: weight}`` of a class-weight setting, for every class.

    Args:
        setting: None (no weights), ``"balanced"``, or a mapping of class names or indices
            to non-negative weights (classes left out weigh 1).
        y_train: The training split's labels.
        class_names: One name per class, in class-index order (None for regression).
        task: ``classification``, ``binary`` or ``regression``.
        key: The config key, for messages.

    Returns:
        One weight per class index, or None when ``setting`` is None.

    Raises:
        ConfigError: The setting does not fit the task, names an unknown class, or has a
            weight that is negative or not a finite number.
        DataError: ``balanced`` and a class has no training sample.
    """
    check_setting(setting, task=task, key=key)
    if setting is None:
        return None
    n_classes = len(class_names or ())
    if setting == BALANCED:
        return balanced_class_weights(y_train, n_classes, key=key)
    weights = dict.fromkeys(range(n_classes), 1.0)
    for name, weight in setting.items():
        weights[class_index(name, class_names, key=key)] = float(weight)
    if not any(weights.values()):
        raise ConfigError(f"{key}: every weight is 0, so nothing would train. Give one above 0.")
    return weights


def check_setting(setting, *, task: str, key: str = "class_weight") -> None:
    """Check a class-weight setting's form without the data (the config check runs it too).

    Raises:
        ConfigError: A setting on a regression task, a value that is neither null, balanced
            nor a mapping, or a weight that is not a finite number of at least 0.
    """
    if setting is None:
        return
    if task == "regression":
        raise ConfigError(
            f"{key} weights classes, but train.task=regression has none. Remove it ({key}=null)."
        )
    if setting == BALANCED:
        return
    if not isinstance(setting, Mapping) or not setting:
        raise ConfigError(
            f"{key}={setting!r} is not valid. Use null, balanced, or a mapping of class names "
            f"or indices to weights, e.g. {key}={{cat: 2.0}} (classes left out weigh 1)."
        )
    for name, weight in setting.items():
        entry = f"{key}.{name}"
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"{entry}={weight!r} must be a number.")
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{entry}={weight} must be a finite number of at least 0.")


def class_index(name, class_names: Sequence[str], *, key: str = "class_weight") -> int:
    """The index of a class given by name, or by index (an int or a string of digits).

    A name wins over an index: with class names "0".."K-1" they agree anyway.

    Raises:
        ConfigError: No class has that name or index.
    """
    text = str(name)
    if text in class_names:
        return list(class_names).index(text)
    if not isinstance(name, bool) and text.isdigit() and int(text) < len(class_names):
        return int(text)
    shown = list(class_names)[:20]
    raise ConfigError(
        f"{key}.{name} is not a class of the data. Use a class name of {shown} or an index "
        f"0..{len(class_names) - 1}."
    )
