"""Whether labels or targets fit the head and the task: one message per way they can be wrong.

`check_labels` takes the task in the config's words (``vocabulary.TASKS``: classification,
binary, regression) and names the fix in them: relabel to 0..K-1, drop unlabelled samples, a
head with more outputs, or another ``train.task``.
"""

from __future__ import annotations

import numpy as np

from tfstack.errors import DataError
from tfstack.vocabulary import TASKS


def check_labels(
    y: np.ndarray,
    num_outputs: int,
    *,
    task: str,
    key: str = "y_train",
) -> list[int]:
    """Check that labels fit a head with ``num_outputs`` outputs, or that targets are numbers.

    For ``task="classification"`` the labels must be integers in ``[0, num_outputs)`` (sparse
    labels for a softmax head). For ``task="binary"`` the head has one output and the labels are 0
    or 1. For ``task="regression"`` the targets must be finite numbers. The tasks are the
    config's ``train.task`` values (``vocabulary.TASKS``), and messages name fixes in its words.

    Args:
        y: Labels, shape ``(n,)`` or ``(n, 1)``; for regression, targets of any shape.
        num_outputs: Size of the head's last output dimension.
        task: ``"classification"``, ``"binary"`` or ``"regression"``.
        key: What the labels are called in messages (e.g. ``data.path=... y_train``).

    Returns:
        The sorted distinct labels (empty for regression, and for no labels).

    Raises:
        DataError: The labels are not integer class ids, fall outside the head's range, or are
            NaN or infinite; regression targets are not finite numbers; or ``task`` is unknown.
    """
    if task not in TASKS:
        raise DataError(f"Unknown task {task!r}. Expected one of: {', '.join(TASKS)}.")
    y = np.asarray(y)
    if y.size == 0:
        return []
    if task == "regression":
        _check_regression_targets(y, key)
        return []
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{key}: {task} labels must be integer class ids of shape (n,); received shape "
            f"{y.shape}. If they are one-hot, store np.argmax(y, axis=1) instead."
        )
    _check_label_values(y, task, key)
    labels = [int(v) for v in np.unique(y)]
    if task == "binary":
        _check_binary_labels(labels, num_outputs, key)
        return labels
    _check_multiclass_labels(labels, num_outputs, key)
    return labels


def _check_regression_targets(y: np.ndarray, key: str) -> None:
    """Regression targets are numbers, all finite (one NaN makes every loss NaN)."""
    if y.dtype.kind not in "biuf":
        raise DataError(
            f"{key}: regression targets must be numbers; received dtype {y.dtype}. Store "
            "them as floats (y.astype('float32')), or set train.task=classification for classes."
        )
    bad = ~np.isfinite(y) if y.dtype.kind == "f" else np.zeros(y.shape, dtype=bool)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(y), -1).any(axis=1))
        raise DataError(
            f"{key}: regression targets hold {int(bad.sum())} NaN or infinite values, in samples "
            f"{first_values(rows.tolist(), 5)}. Drop those samples or fill in their targets."
        )


def _check_label_values(y: np.ndarray, task: str, key: str) -> None:
    """Class labels are finite whole numbers."""
    if y.dtype.kind not in "biuf":
        raise DataError(
            f"{key}: {task} labels must be integer class ids; received dtype {y.dtype}. Map the "
            "class names to 0..K-1, the same way in every split: names = np.unique(y_train), "
            "then y = np.searchsorted(names, y)."
        )
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        rows = np.flatnonzero(~np.isfinite(y))
        raise DataError(
            f"{key}: {task} labels hold {len(rows)} NaN or infinite values, in samples "
            f"{first_values(rows.tolist(), 5)}; every sample needs a class id. Drop those "
            "samples or label them."
        )
    if not is_label_array(y):
        fractional = first_values(np.unique(y[y != np.round(y)]))
        raise DataError(
            f"{key}: {task} labels must be integer class ids; received {y.dtype} values such as "
            f"{fractional}. Store whole-number class ids (0..K-1), or, if these are continuous "
            "targets, set train.task=regression (with a one-output head)."
        )


def _check_binary_labels(labels: list[int], num_outputs: int, key: str) -> None:
    """Binary labels are 0 or 1, for a head with one (sigmoid) output."""
    if num_outputs != 1:
        raise DataError(
            f"{key}: train.task=binary needs a head with 1 (sigmoid) output; the head outputs "
            f"{num_outputs}. Set train.task=classification for a {num_outputs}-way softmax head "
            f"(labels 0..{num_outputs - 1}), or use a head with one sigmoid output."
        )
    bad = [v for v in labels if v not in (0, 1)]
    if not bad:
        return
    found = f"{key}: binary labels must be 0 or 1; found {first_values(bad)}"
    if len(labels) > 2:
        raise DataError(
            f"{found} among {len(labels)} distinct labels {first_values(labels)}: that is a "
            f"{len(labels)}-class task. Set train.task=classification, with a head of "
            f"{len(labels)} softmax outputs and the labels relabelled to 0..{len(labels) - 1}."
        )
    negative = " Negative labels are never valid." if labels[0] < 0 else ""
    if len(labels) == 2:
        fix = f"(y == {labels[1]}).astype('int64')"
        raise DataError(f"{found}.{negative} Map the two classes to 0 and 1, e.g. {fix}.")
    raise DataError(f"{found}.{negative} Map the classes to 0 and 1.")


def _check_multiclass_labels(labels: list[int], num_outputs: int, key: str) -> None:
    """Classification labels are 0..K-1 for a head of K (softmax) outputs."""
    negative = [v for v in labels if v < 0]
    too_large = [v for v in labels if v >= num_outputs]
    if not negative and not too_large:
        return
    outputs = f"{num_outputs} output{'s' if num_outputs != 1 else ''}"
    valid = f"valid labels 0..{num_outputs - 1}"
    parts = []
    if negative:
        parts.append(
            f"{key}: labels {first_values(negative)} are negative, and a negative label is never "
            f"valid: labels must be in 0..K-1 (here {valid}, for a head with {outputs})."
            + (
                f" If {negative[0]} marks unlabelled samples, drop them."
                if len(negative) == 1
                else ""
            )
        )
    if too_large:
        prefix = "Also, labels" if negative else f"{key}: labels"
        parts.append(
            f"{prefix} {first_values(too_large)} do not fit the head, which has {outputs} "
            f"({valid}); the data has {len(labels)} distinct labels from {labels[0]} to "
            f"{labels[-1]}. Relabel the classes to 0..K-1, or use a head with at least "
            f"{too_large[-1] + 1} outputs (stacking=adapter cannot fix this)."
        )
    if num_outputs == 1:
        parts.append(
            "A head with 1 output is for train.task=binary (labels 0 and 1) or regression."
        )
    raise DataError(" ".join(parts))


def is_label_array(y: np.ndarray) -> bool:
    """Whether ``y`` holds integer class ids (integer or bool dtype, or integral floats)."""
    if y.dtype.kind in "iub":
        return True
    if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)):
        return bool(np.all(y == np.round(y)))
    return False


def first_values(values: list | np.ndarray, limit: int = 10) -> str:
    """At most ``limit`` values as text, with a count of the rest."""
    values = [v.item() if isinstance(v, np.generic) else v for v in list(values)]
    shown = ", ".join(str(v) for v in values[:limit])
    rest = len(values) - limit
    return f"[{shown}{f', ... ({rest} more)' if rest > 0 else ''}]"
