"""The one run object, `TrackedRun`, and the registry of the runs open in this process.

A `TrackedRun` is everything this process knows about one MLflow run it writes to: the run id,
its experiment, the `Store` it lives in (client and failure state, shared by every run of that
store), the metrics and tags gathered for a later batched write (`EpochLogger(min_interval_s=...)`)
and the asynchronous writes not yet awaited. `runs.start_run` and `runs.attach_run` create it and
register it here by run id; every other function of the package takes a run id and looks the run
up with `get_tracked_run`, so two runs in two stores can be written from one process. This module
owns the registry; nothing else keeps per-run state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from tfstack.errors import TrackingError
from tfstack.tracking.store import Store
from tfstack.tracking.values import MAX_METRICS_PER_BATCH, chunks


@dataclass
class TrackedRun:
    """One MLflow run this process writes to.

    Attributes:
        run_id: MLflow run id.
        store: The store the run lives in.
        experiment_id: Id of the run's experiment.
        pending: Asynchronous writes (MLflow `RunOperations`) not yet awaited; `flush` waits.
        queued_metrics: Metrics gathered for the next `write_queued`.
        queued_tags: Tags gathered for the next `write_queued`.
    """

    run_id: str
    store: Store
    experiment_id: str
    pending: list[Any] = field(default_factory=list)
    queued_metrics: list[Metric] = field(default_factory=list)
    queued_tags: list[RunTag] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def uri(self) -> str:
        """The tracking URI of the run's store."""
        return self.store.uri

    @property
    def client(self) -> MlflowClient:
        """The `MlflowClient` of the run's store."""
        assert self.store.client is not None, "a registered run's store is open"
        return self.store.client

    @property
    def store_failed(self) -> bool:
        """Whether the run's store stopped working during this process (nothing is written)."""
        return self.store.lost is not None

    def write(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`Store.write` on the run's store (bounded retries, one-line errors)."""
        return self.store.write(what, fn, *args, **kwargs)

    def check_store(self, when: str | None = None) -> None:
        """Raise `StoreLostError` if the run's store stopped working (see `runs.check_store`)."""
        self.store.raise_if_lost(f"{when} of run {self.run_id}" if when else None, http=True)

    def add_pending(self, operation: Any) -> None:
        """Remember an asynchronous write for `flush` (None, from a synchronous one, is skipped)."""
        if operation is not None:
            with self._lock:
                self.pending.append(operation)

    def queue(self, metrics: Sequence[Metric] = (), tags: Sequence[RunTag] = ()) -> None:
        """Gather metrics and tags for the next `write_queued`."""
        with self._lock:
            self.queued_metrics.extend(metrics)
            self.queued_tags.extend(tags)

    @property
    def has_queued(self) -> bool:
        """Whether metrics or tags wait for `write_queued`."""
        return bool(self.queued_metrics or self.queued_tags)

    def write_queued(self, what: str, *, synchronous: bool = True) -> None:
        """Write the gathered metrics and tags, in batches MLflow accepts (tags with the first).

        Each metric keeps the step and timestamp it was gathered with.
        """
        with self._lock:
            entries, self.queued_metrics = self.queued_metrics, []
            tags, self.queued_tags = self.queued_tags, []
        for index, chunk in enumerate(list(chunks(entries, MAX_METRICS_PER_BATCH)) or [[]]):
            operation = self.write(
                what,
                self.client.log_batch,
                self.run_id,
                metrics=list(chunk),
                tags=tags if index == 0 else [],
                synchronous=synchronous,
            )
            if not synchronous:
                self.add_pending(operation)

    def flush(self) -> None:
        """Wait for this process's asynchronous writes into the run to land in the store.

        Raises:
            TrackingError: An asynchronous write failed.
        """
        with self._lock:
            pending, self.pending = self.pending, []
        for operation in pending:
            try:
                operation.wait()
            except Exception as exc:
                raise TrackingError(
                    f"asynchronous logging into run {self.run_id} failed: {exc}"
                ) from exc


# Run id -> the run, for every run started, resumed or attached in this process.
_RUNS: dict[str, TrackedRun] = {}
_RUNS_LOCK = threading.Lock()


def register(run: TrackedRun) -> TrackedRun:
    """Make `run` the process's record of its run id.

    A run registered again (resumed by a later stage of the same process) keeps the writes the
    earlier record had not yet made or awaited.
    """
    with _RUNS_LOCK:
        earlier = _RUNS.get(run.run_id)
        if earlier is not None and earlier is not run:
            run.pending[:0] = earlier.pending
            run.queue(earlier.queued_metrics, earlier.queued_tags)
        _RUNS[run.run_id] = run
    return run


def get_tracked_run(run_id: str) -> TrackedRun:
    """Return the `TrackedRun` of a run started, resumed or attached in this process.

    Raises:
        TrackingError: The run was not started or resumed here.
    """
    run = _RUNS.get(run_id)
    if run is None:
        raise TrackingError(
            f"run {run_id} was not started or resumed in this process. Call "
            f"start_run(uri, experiment, run_id={run_id!r}) (or tracked_run) before logging to it."
        )
    return run


def now_ms() -> int:
    """The current time in milliseconds, as MLflow timestamps metrics."""
    return int(time.time() * 1000)
