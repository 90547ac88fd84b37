"""The per-epoch metrics row, as the tracking callback logs it and the checkpoint keeps it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfstack.epoch_metrics import current_learning_rate, epoch_metrics_row  # noqa: E402


def test_row_holds_numeric_logs_lr_and_phase_index():
    optimizer = keras.optimizers.Adam(learning_rate=0.125)
    logs = {"loss": np.float32(0.5), "val_accuracy": np.array(0.75), "note": "text", "v": [1, 2]}

    row = epoch_metrics_row(logs, optimizer, 2)

    assert row == {"loss": 0.5, "val_accuracy": 0.75, "lr": 0.125, "phase_index": 2.0}
    assert all(type(value) is float for value in row.values())


def test_row_without_optimizer_has_no_lr():
    assert epoch_metrics_row(None, None, 0) == {"phase_index": 0.0}
    assert current_learning_rate(object()) is None  # no learning_rate: skipped, not raised


def test_lr_follows_a_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    optimizer.iterations.assign(2)
    assert np.isclose(current_learning_rate(optimizer), 0.025)
