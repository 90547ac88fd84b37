"""Reading runs back as plain values: `tfstack compare`, `tfstack reproduce`, sweeps, resume."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from tfstack.errors import TrackingError
from tfstack.tracking.records import check_artifact_file
from tfstack.tracking.store import reading_store

PARENT_RUN_TAG = "mlflow.parentRunId"


def _run_record(run: Any) -> dict[str, Any]:
    """A run as plain values: ids, name, status, times (ms), params, tags, latest metrics."""
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
    }


def get_run(uri: str, run_id: str) -> dict[str, Any]:
    """Read one run as plain values (see `search_runs`), with its experiment's name.

    Raises:
        TrackingError: The store or the run does not exist.
    """
    client = reading_store(uri).client
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(
            f"run {run_id} does not exist in tracking.uri={uri}. Check the id (MLflow UI, or "
            f"`tfstack compare`), or point tracking.uri at the store that holds it."
        ) from exc
    record = _run_record(run)
    record["experiment"] = client.get_experiment(run.info.experiment_id).name
    return record


def search_runs(
    uri: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    filter_string: str | None = None,
    statuses: Sequence[str] | None = ("FINISHED",),
) -> list[dict[str, Any]]:
    """Runs of an experiment as plain dicts, oldest first.

    Args:
        uri: Tracking URI.
        experiment: Experiment name.
        parent_run_id: Only the children of this run (tag `mlflow.parentRunId`).
        filter_string: An MLflow search filter, e.g. "tags.freeze = 'joint' and params.seed = '1'".
        statuses: Keep runs with these statuses; None keeps all.

    Returns:
        One dict per run: `run_id`, `run_name`, `status`, `experiment_id`, `start_time`,
        `end_time` (ms), `params`, `tags`, `metrics` (latest value of each metric).

    Raises:
        TrackingError: The store or experiment does not exist, or the filter is invalid.
    """
    client = reading_store(uri).client
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(
            f"tracking.experiment={experiment} does not exist in {uri}. Experiments there: {names}."
        )
    clauses = [f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"] if parent_run_id else []
    if filter_string:
        clauses.append(filter_string)
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(
                [found.experiment_id],
                filter_string=" and ".join(clauses),
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
        except MlflowException as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise TrackingError(
                f"cannot search runs with filter {' and '.join(clauses)!r}: {first_line}. "
                f'Filters look like "tags.freeze = \'joint\'" or "metrics.test_accuracy > 0.9".'
            ) from exc
        runs += [_run_record(run) for run in page]
        token = page.token
        if not token:
            break
    if statuses is not None:
        runs = [run for run in runs if run["status"] in statuses]
    return runs


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """All values of one metric of a run as `(step, value)`, by step (empty if never logged)."""
    store = reading_store(uri)
    history = store.write(
        f"reading metric {key} of run {run_id}", store.client.get_metric_history, run_id, key
    )
    return sorted((m.step, m.value) for m in history)


def read_artifact_text(uri: str, run_id: str, artifact_file: str) -> str | None:
    """The text of one artifact of a run, or None when the run has no such artifact."""
    check_artifact_file(artifact_file)
    client = reading_store(uri).client
    listed = {item.path for item in client.list_artifacts(run_id, str(Path(artifact_file).parent))}
    if artifact_file not in listed:
        return None
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bar for one small file
    try:
        with tempfile.TemporaryDirectory(prefix="tfstack-artifact-") as tmp:
            local = client.download_artifacts(run_id, artifact_file, tmp)
            return Path(local).read_text(encoding="utf-8")
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
