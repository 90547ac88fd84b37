"""What a run records besides params and tags: metrics; text, JSON, figure, file artifacts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfstack.errors import TrackingError
from tfstack.tracking.registry import get_tracked_run, now_ms
from tfstack.tracking.values import MAX_METRICS_PER_BATCH, chunks, json_default, metric_entries


def log_metrics(
    run_id: str,
    metrics: Mapping[str, Any],
    step: int | None = None,
    *,
    synchronous: bool = True,
) -> None:
    """Log numeric metrics at one step with one timestamp, batched.

    Args:
        run_id: A run started or resumed in this process.
        metrics: Metric names to numbers (Python or numpy scalars, 0-d arrays). NaN is allowed.
        step: Step (epoch) of the values; None logs at step 0, as MLflow does.
        synchronous: False queues the write on MLflow's background thread; `flush`, `end_run`
            and `tracked_run` wait for it.

    Raises:
        TrackingError: A value is not a number, or the store fails.
    """
    run = get_tracked_run(run_id)
    entries = metric_entries(metrics, 0 if step is None else int(step), now_ms())
    for chunk in chunks(entries, MAX_METRICS_PER_BATCH):
        operation = run.write(
            f"logging metrics to run {run_id}",
            run.client.log_batch,
            run_id,
            metrics=list(chunk),
            synchronous=synchronous,
        )
        if not synchronous:
            run.add_pending(operation)


def check_artifact_file(artifact_file: str) -> None:
    """Refuse an artifact path that is empty, absolute or leaves the run's artifacts.

    Raises:
        TrackingError: The path is not a relative path inside the artifacts.
    """
    parts = Path(artifact_file).parts
    if not artifact_file or Path(artifact_file).is_absolute() or ".." in parts:
        raise TrackingError(
            f"artifact_file={artifact_file!r} must be a relative path inside the run's "
            f"artifacts, such as 'eval/metrics.json'."
        )


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    """Store `text` as artifact `artifact_file` (e.g. "summary/model.txt").

    Args:
        run_id: A run started or resumed in this process.
        text: File contents.
        artifact_file: Relative path inside the run's artifacts.
    """
    check_artifact_file(artifact_file)
    run = get_tracked_run(run_id)
    run.write(
        f"logging {artifact_file} to run {run_id}",
        run.client.log_text,
        run_id,
        text,
        artifact_file,
    )


def log_json(run_id: str, obj: Any, artifact_file: str) -> None:
    """Store a JSON-ready object (numpy scalars and arrays allowed) as a JSON artifact.

    Args:
        run_id: A run started or resumed in this process.
        obj: dict, list or scalar.
        artifact_file: Relative path inside the run's artifacts, e.g. "build/layers.json".
    """
    log_text(run_id, json.dumps(obj, indent=2, default=json_default) + "\n", artifact_file)


def log_figure(run_id: str, fig: Any, artifact_file: str) -> None:
    """Store a matplotlib figure as an image artifact (format from the extension, e.g. ".png").

    Args:
        run_id: A run started or resumed in this process.
        fig: matplotlib `Figure`.
        artifact_file: Relative path inside the run's artifacts, e.g. "eval/confusion.png".
    """
    check_artifact_file(artifact_file)
    run = get_tracked_run(run_id)
    run.write(
        f"logging figure {artifact_file} to run {run_id}",
        run.client.log_figure,
        run_id,
        fig,
        artifact_file,
    )


def log_artifact_file(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a local file (or a directory's contents) into the run's artifacts.

    Args:
        run_id: A run started or resumed in this process.
        path: Local file or directory.
        artifact_path: Directory inside the run's artifacts; None for the root.

    Raises:
        TrackingError: The path does not exist.
    """
    path = Path(path)
    if artifact_path is not None:
        check_artifact_file(artifact_path)
    run = get_tracked_run(run_id)
    if path.is_dir():
        fn = run.client.log_artifacts
    elif path.is_file():
        fn = run.client.log_artifact
    else:
        raise TrackingError(f"cannot log artifact {path}: no such file or directory.")
    run.write(f"logging artifact {path} to run {run_id}", fn, run_id, str(path), artifact_path)
