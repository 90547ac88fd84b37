"""Python values as MLflow stores them: param and tag strings, metric entries, MLflow's limits."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric

from tfstack.errors import TrackingError

# MLflow's own limits (mlflow/utils/validation.py in MLflow 3.17).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def truncate(value: str, limit: int) -> str:
    """`value`, cut to `limit` characters with "..." when longer."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def json_default(value: Any) -> Any:
    """`json.dumps` fallback: numpy scalars and arrays, paths, sets; anything else as str."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=json_default)
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def tag_value(value: Any) -> str:
    """A tag's string: lists as JSON, numpy scalars as numbers, cut to MLflow's limit."""
    return truncate(_param_value(value), MAX_TAG_VALUE_LENGTH)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts into dotted keys with string values, as MLflow stores params.

    `{"train": {"lr": 0.001, "sizes": [1, 2]}}` becomes `{"train.lr": "0.001",
    "train.sizes": "[1, 2]"}`. Lists and tuples become JSON, an empty dict becomes "{}", and values
    are truncated to MLflow's 6000-character limit.

    Args:
        params: Possibly nested mapping.
        prefix: Key prefix (used in recursion).

    Returns:
        Flat mapping of dotted keys to strings.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        full_key = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{full_key}."))
        elif isinstance(value, Mapping):
            flat[full_key] = "{}"
        else:
            flat[full_key] = truncate(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """`items` in consecutive slices of at most `size` (MLflow's batch limits)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def metric_entries(metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> list[Metric]:
    """MLflow `Metric`s of one step and timestamp.

    Raises:
        TrackingError: A value is not a single number.
    """
    entries = []
    for key, value in metrics.items():
        try:
            number = float(np.asarray(value).item())
        except (TypeError, ValueError) as exc:
            raise TrackingError(
                f"metric {key!r} must be a single number; received {type(value).__name__} "
                f"{value!r:.80}."
            ) from exc
        entries.append(Metric(str(key), number, timestamp_ms, step))
    return entries
