"""The Keras callback that logs every epoch of a phase into a run: `EpochLogger`."""

from __future__ import annotations

import logging
import math
import time

import keras

from tfstack.epoch_metrics import epoch_metrics_row
from tfstack.tracking.registry import TrackedRun, get_tracked_run, now_ms
from tfstack.tracking.runs import log_tags, tag_entries
from tfstack.tracking.values import metric_entries

logger = logging.getLogger(__name__)


class EpochLogger(keras.callbacks.Callback):
    """Log every epoch's `logs` to MLflow at the global epoch, with the phase recorded.

    Keras passes the global epoch (continued across phases through `fit(initial_epoch=...)`), so
    the steps of successive phases are contiguous. Each epoch logs, in one batch with one
    timestamp, the epoch's metrics row (`tfstack.epoch_metrics.epoch_metrics_row`: all numeric
    `logs` entries under Keras's names, `loss`, `val_loss`, `accuracy`, ..., the optimizer's
    current learning rate as `lr`, and `phase_index`). Tags `phase.<index>.name` and
    `phase.<index>.epochs` ("first-last") record the phase.

    Args:
        run_id: A run started or resumed in this process.
        phase: Phase name, e.g. "head" or "finetune".
        phase_index: Position of the phase in the schedule.
        synchronous: False queues writes on MLflow's background thread and waits for them at
            `on_train_end`, so logging does not hold up training.
        min_interval_s: write the epochs gathered so far only once this many seconds have passed
            since the phase began or since the last write, and at `on_train_end`, in one batch.
            Every epoch keeps its own step and timestamp, so the run records the same metrics;
            a phase of short epochs costs a few writes instead of one per epoch (a sqlite write
            takes about as long as a demo epoch); the phase's tags go with those writes. The
            epochs are gathered on the run (`TrackedRun.queue`), so a phase that ends with an
            error still has them written when the run is ended. 0 writes every epoch. An epoch
            that writes nothing checks the store (`check_store`), so a store that fails stops
            training within one epoch.
    """

    def __init__(
        self,
        run_id: str,
        phase: str,
        *,
        phase_index: int = 0,
        synchronous: bool = True,
        min_interval_s: float = 0.0,
    ) -> None:
        super().__init__()
        get_tracked_run(run_id)  # fail now, not at the first epoch, for a run not started here
        self.run_id = run_id
        self.phase = phase
        self.phase_index = int(phase_index)
        self.synchronous = synchronous
        self.min_interval_s = float(min_interval_s)
        self.epochs_logged: list[int] = []
        self.logging_seconds: list[float] = []
        self.flush_seconds = 0.0
        self._last_write = time.monotonic()

    @property
    def run(self) -> TrackedRun:
        """The run in this process (looked up each time: a later stage may re-register it)."""
        return get_tracked_run(self.run_id)

    def _tag(self, tags: dict[str, str]) -> None:
        """Set tags now, or with the next write of metrics when writes are gathered."""
        if self.min_interval_s > 0:
            self.run.queue(tags=tag_entries(tags))
        else:
            log_tags(self.run_id, tags)

    def _write_queued(self, epoch: int) -> None:
        self.run.write_queued(
            f"logging epoch {epoch} to run {self.run_id}", synchronous=self.synchronous
        )
        self._last_write = time.monotonic()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.epochs_logged = []
        self._last_write = time.monotonic()
        self._tag({f"phase.{self.phase_index}.name": self.phase})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        start = time.perf_counter()
        row = epoch_metrics_row(logs, getattr(self.model, "optimizer", None), self.phase_index)
        if not all(math.isfinite(v) for v in row.values()):
            logger.warning("epoch %d of phase %s has non-finite metrics", epoch, self.phase)
        self.run.queue(metrics=metric_entries(row, int(epoch), now_ms()))
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self._write_queued(int(epoch))
        else:  # not writing yet: still notice a failed store now, not at the next write
            self.run.check_store(f"after epoch {epoch}")
        self.epochs_logged.append(int(epoch))
        self.logging_seconds.append(time.perf_counter() - start)

    def on_train_end(self, logs: dict | None = None) -> None:
        start = time.perf_counter()
        if self.epochs_logged and self.min_interval_s > 0:
            first, last = self.epochs_logged[0], self.epochs_logged[-1]
            self._tag({f"phase.{self.phase_index}.epochs": f"{first}-{last}"})
        if self.run.has_queued:
            self._write_queued(self.epochs_logged[-1] if self.epochs_logged else 0)
        self.run.flush()
        if self.epochs_logged and self.min_interval_s <= 0:
            first, last = self.epochs_logged[0], self.epochs_logged[-1]
            log_tags(self.run_id, {f"phase.{self.phase_index}.epochs": f"{first}-{last}"})
        self.flush_seconds = time.perf_counter() - start
        if self.logging_seconds:
            logger.debug(
                "phase %s: MLflow logging took %.1f ms per epoch, %.1f ms to flush",
                self.phase,
                1000 * sum(self.logging_seconds) / len(self.logging_seconds),
                1000 * self.flush_seconds,
            )
