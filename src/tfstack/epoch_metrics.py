"""The per-epoch metrics row: what one Keras epoch records, built in one place.

The row is the epoch's numeric Keras `logs` under Keras's names (`loss`, `val_loss`,
`accuracy`, ...), the learning rate as `lr` (the optimizer's at the epoch's end, or, with a
learning-rate schedule, the rate of the epoch's first step), and the phase's position in the
schedule as `phase_index`. The tracking callback logs it to the run; the checkpoint keeps it
(`TrainingState.epoch_rows`) so a resumed run can log the epochs a killed process had not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np


def numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The entries of Keras epoch `logs` that are single numbers, as floats; others are skipped."""
    values: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            values[str(key)] = float(np.asarray(value).item())
        except (TypeError, ValueError):
            continue
    return values


def current_learning_rate(optimizer: Any) -> float | None:
    """The optimizer's learning rate now, or None without an optimizer or for exotic ones."""
    if optimizer is None:
        return None
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except Exception:  # exotic optimizers or schedules: skip lr rather than fail training
        return None


def epoch_metrics_row(
    logs: Mapping[str, Any] | None, optimizer: Any, phase_index: int
) -> dict[str, float]:
    """Build the metrics row of one epoch: numeric `logs`, `lr` (when known), `phase_index`.

    Args:
        logs: The `logs` Keras passes to `Callback.on_epoch_end`.
        optimizer: The optimizer the epoch trained with (None: no `lr`).
        phase_index: Position of the phase in the schedule.

    Returns:
        Metric names to floats.

    Example:
        >>> epoch_metrics_row({"loss": 0.5, "note": "x"}, None, 1)
        {'loss': 0.5, 'phase_index': 1.0}
    """
    row = numeric_logs(logs)
    # A non-constant schedule puts the rate of the epoch's first step in the logs as `lr`
    # (tfstack.lr_schedules.EpochStartRate); otherwise the rate is the optimizer's now.
    lr = row.pop("lr", None)
    if lr is None:
        lr = current_learning_rate(optimizer)
    if lr is not None:
        row["lr"] = lr
    row["phase_index"] = float(phase_index)
    return row
