"""The Keras callbacks the phase loop attaches to every fit.

`EpochOrder` tells an epoch-seeded dataset each epoch's number (so a resumed run sees the order
an uninterrupted one saw), `EpochCheckpoint` writes the per-epoch checkpoint (the format is
`tfstack.checkpoints`), and `StopOnNonFiniteLoss` stops at once when the loss is NaN or infinite,
naming the epoch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import keras

from tfstack import checkpoints
from tfstack.checkpoints import TrainingState
from tfstack.datasets import IndexedDataset
from tfstack.early_stopping import (
    ARRAYS,
    STATE_KEY,
    PhaseEarlyStopping,
)
from tfstack.epoch_metrics import epoch_metrics_row, numeric_logs
from tfstack.errors import TrainingError
from tfstack.freezing import count_params

logger = logging.getLogger(__name__)


def batches_of(data):
    return data.batches() if isinstance(data, IndexedDataset) else data


class EpochOrder(keras.callbacks.Callback):
    """Tell an `IndexedDataset` which epoch starts, so an epoch-seeded one gives that epoch's order.

    (`IndexedDataset.set_epoch` does nothing for a dataset that is not epoch-seeded.)
    """

    def __init__(self, dataset: IndexedDataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.set_epoch(epoch)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, record it in the state and write a checkpoint (`tfstack.checkpoints`).

    The loop's, not the format's: it decides what a checkpoint says about the epoch (its
    metrics row, the phase's history so far, the time spent). Put it before any callback that
    logs the epoch elsewhere: an epoch is logged only once it is checkpointed, so a resumed run
    never logs an epoch twice (gaps are filled from ``state.epoch_rows`` instead).

    Args:
        directory: the checkpoint directory.
        stacked: the stacked model (whose variables and optimizer are saved, whichever model the
            phase fits: a cached phase fits a part that shares them).
        state: the state to update and write; shared by the phases of one schedule.
        phase_index: the phase's position in the schedule.
        phase_record: the phase's record in ``state.phases`` (its history grows per epoch).
        early_stopping: the phase's early stopping, whose state (and best weights) each
            checkpoint keeps; it must run before this callback.
    """

    def __init__(
        self,
        directory: Path,
        stacked: keras.Model,
        state: TrainingState,
        *,
        phase_index: int,
        phase_record: dict[str, Any],
        early_stopping: PhaseEarlyStopping | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.stacked = stacked
        self.state = state
        self.phase_index = phase_index
        self.record = phase_record
        self.seconds_before = float(phase_record.get("seconds", 0.0))
        self.started = time.perf_counter()
        self.write_seconds: list[float] = []
        self.layout: checkpoints.Layout | None = None
        self.early_stopping = early_stopping

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        # What the phase's result will say, in case the process dies after its last epoch's
        # checkpoint but before the result is recorded (the cache note is not known here).
        self.record["counts"] = count_params(self.stacked).to_dict()
        self.layout = None  # the optimizer is built by the first step, not yet
        self.record.setdefault("cached", self.model is not self.stacked)
        self.record.setdefault("cache_note", "")

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        numbers = numeric_logs(logs)
        history = self.record.setdefault("history", {})
        for key, value in numbers.items():
            history.setdefault(key, []).append(value)
        metrics = epoch_metrics_row(numbers, self.stacked.optimizer, self.phase_index)
        self.record["seconds"] = self.seconds_before + (start - self.started)
        state = self.state
        state.epoch_rows.append({"epoch": int(epoch), "metrics": metrics})
        state.epochs_done = int(epoch) + 1
        state.optimizer_phase = self.phase_index
        extra = None
        if self.early_stopping is not None:
            self.record[STATE_KEY] = self.early_stopping.state()
            if self.early_stopping.best_weights is not None:
                extra = {ARRAYS: self.early_stopping.best_weights}
        self.layout = checkpoints.write_checkpoint(
            self.directory, state, self.stacked, layout=self.layout, extra=extra
        )
        self.write_seconds.append(time.perf_counter() - start)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise a TrainingError naming the phase, epoch and batch when the loss is NaN or infinite.

    The loss is checked after every batch (in a cached phase that runs one epoch's batches per
    call, ``steps_per_execution``, after every call: the error then names that call's batches),
    on Keras's callback thread (``async_safe``): reading it
    does not hold up the next step, and the error surfaces in ``fit`` one batch later at most,
    and always before the epoch's ``on_epoch_end`` callbacks (so no checkpoint records a diverged
    epoch). Measured: no cost over an epoch-end check, within the run-to-run noise of about 10%
    (benchmarks/reliability.py, section (a)).
    """

    async_safe = True
    # Its batch hook holds under steps_per_execution > 1 (tfstack.frozen_features).
    batch_hooks_per_execution = True

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # Called once per execution of `steps_per_execution` batches, with the last one's index;
        # the loss is the epoch's running mean, non-finite once any batch's was.
        per_call = getattr(self.model, "steps_per_execution", 1) or 1
        if per_call > 1:
            last = min(batch + 1, (self.params or {}).get("steps") or batch + 1)
            where = f"batches {batch + 2 - per_call}-{last}"
        else:
            where = f"batch {batch + 1}"
        self._check((logs or {}).get("loss"), f"epoch {self.epoch + 1}, {where}")

    def on_epoch_end(self, epoch, logs=None):
        self._check((logs or {}).get("loss"), f"epoch {epoch + 1}")

    def _check(self, loss, where: str) -> None:
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(
                f"The loss became {float(loss)} in phase {self.phase!r} at {where}. "
                "Lower train.lr, check the data for extreme values, or check train.loss fits "
                "the head's output."
            )
