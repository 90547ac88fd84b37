"""Runs: experiments, starting, resuming, attaching and ending a run; its params and tags.

`start_run` (or `tracked_run`, its `with` form) and `attach_run` create the run's `TrackedRun`
(see `tfstack.tracking.registry`); every other function takes the run id.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from tfstack.errors import StoreLostError, TrackingError
from tfstack.signals import signal_name
from tfstack.tracking import records
from tfstack.tracking.queries import get_run
from tfstack.tracking.registry import TrackedRun, get_tracked_run, register
from tfstack.tracking.store import (
    bound_http_retries,
    check_reachable,
    open_store,
    reopen_if_lost,
    sqlite_path,
)
from tfstack.tracking.values import (
    MAX_KEY_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    chunks,
    flatten_params,
    tag_value,
    truncate,
)

logger = logging.getLogger(__name__)

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Short tag for the UI's run table; the full traceback goes to `error.txt`.
MAX_ERROR_TAG_LENGTH = 500


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------


def run_experiment_name(uri: str, run_id: str) -> str:
    """The name of the experiment a run belongs to (e.g. a run `mlflow run` created).

    Raises:
        TrackingError: The run does not exist in the store.
    """
    return get_run(uri, run_id)["experiment"]


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Absolute artifact root beside a sqlite database, or None to let the store decide.

    MLflow's default for a local store is `./mlruns/<id>` resolved against the working directory
    of whichever process creates the experiment, which scatters artifacts (a DVC queued experiment
    runs in a temporary copy). Keeping them beside the database makes the store self-contained.
    """
    path = sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return (path.parent / "mlartifacts" / slug).as_uri()


def ensure_experiment(uri: str, name: str) -> str:
    """Return the id of experiment `name`, creating it if needed.

    For sqlite stores a new experiment keeps its artifacts in `<db dir>/mlartifacts/<name>`.

    Args:
        uri: Tracking URI.
        name: Experiment name.

    Returns:
        The experiment id.

    Raises:
        TrackingError: The name is empty, the experiment was deleted, or the store fails.
    """
    if not name or not name.strip():
        raise TrackingError("tracking.experiment is empty. Set tracking.experiment=<name>.")
    store = open_store(uri)
    experiment = store.write("looking up the experiment", store.client.get_experiment_by_name, name)
    if experiment is None:
        try:
            return store.write(
                f"creating experiment {name!r}",
                store.client.create_experiment,
                name,
                artifact_location=_artifact_location(uri, name),
            )
        except TrackingError:
            # Another process may have created it between our lookup and create.
            experiment = store.client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.experiment={name} was deleted in {uri}. Restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose "
            f"another tracking.experiment."
        )
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------------
# Starting and ending
# ---------------------------------------------------------------------------------------------


def _context_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """User tags plus MLflow's usual context tags (user, source, git commit) when available."""
    user_tags = {str(k): tag_value(v) for k, v in (tags or {}).items()}
    try:
        from mlflow.tracking.context import registry as context_registry

        return {str(k): str(v) for k, v in context_registry.resolve_tags(user_tags).items()}
    except Exception:  # context tags are a nicety; never fail a run over them
        logger.debug("could not resolve MLflow context tags", exc_info=True)
        return user_tags


def _check_resumable(uri: str, run: Any, experiment: str, experiment_id: str) -> None:
    run_id = run.info.run_id
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(
            f"run_id={run_id} was deleted in tracking.uri={uri}. Delete the run reference "
            f"file to start a new run, or restore the run (mlflow runs restore)."
        )
    if run.info.experiment_id != experiment_id:
        actual = open_store(uri).client.get_experiment(run.info.experiment_id).name
        raise TrackingError(
            f"run_id={run_id} belongs to experiment {actual!r}, not "
            f"tracking.experiment={experiment}. Use the same experiment in every stage, or "
            f"delete the run reference file to start a new run."
        )


def start_run(
    uri: str,
    experiment: str,
    *,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Start a new run, or resume an existing one by id, and register it in this process.

    Resuming sets a run that was already ended back to RUNNING (as `mlflow.start_run(run_id=...)`
    does), so re-running a single stage of a finished pipeline logs into the same run.

    Args:
        uri: Tracking URI (see `default_tracking_uri`).
        experiment: Experiment name; created if missing.
        run_id: Id of the run to resume; None starts a new run.
        run_name: Name of a new run (ignored when resuming).
        tags: Tags to set on the run.

    Returns:
        The run id.

    Raises:
        TrackingError: The store is unreachable, the run does not exist, was deleted, or belongs
            to another experiment.
    """
    check_reachable(uri)
    bound_http_retries(uri)
    reopen_if_lost(uri)
    store = open_store(uri)
    experiment_id = ensure_experiment(uri, experiment)
    resuming = run_id is not None
    if not resuming:
        run = store.write(
            "creating a run",
            store.client.create_run,
            experiment_id,
            run_name=run_name,
            tags=_context_tags(tags),
        )
        run_id = run.info.run_id
        logger.info("started MLflow run %s in experiment %r (%s)", run_id, experiment, uri)
    else:
        try:
            run = store.client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(
                f"run_id={run_id} does not exist in tracking.uri={uri}. Delete the run "
                f"reference file to start a new run, or point tracking.uri at the store that "
                f"holds it."
            ) from exc
        _check_resumable(uri, run, experiment, experiment_id)
        if run.info.status != "RUNNING":
            logger.info("reopening MLflow run %s (was %s)", run_id, run.info.status)
            store.write("reopening the run", store.client.update_run, run_id, status="RUNNING")
    register(TrackedRun(run_id=run_id, store=store, experiment_id=experiment_id))
    if resuming:
        if tags:
            log_tags(run_id, tags)
        logger.info("resumed MLflow run %s in experiment %r (%s)", run_id, experiment, uri)
    return run_id


def attach_run(uri: str, run_id: str) -> str:
    """Register an existing run for logging in this process without changing its status.

    Unlike `start_run(run_id=...)`, a finished run stays FINISHED: used to add a comparison
    table or a sweep's summary to a run after the fact.

    Returns:
        The run id.

    Raises:
        TrackingError: The run does not exist.
    """
    record = get_run(uri, run_id)
    register(
        TrackedRun(run_id=run_id, store=open_store(uri), experiment_id=record["experiment_id"])
    )
    return run_id


def check_store(run_id: str, when: str | None = None) -> None:
    """Fail if the store of a run stopped working since this process opened it.

    Cheap enough for every epoch: a few `stat` calls for sqlite, one GET of ``/health`` for a
    server (about a millisecond on the same machine); other stores are not checked.

    Args:
        run_id: A run started or resumed in this process.
        when: For the message, e.g. "after epoch 3".

    Raises:
        StoreLostError: The sqlite file was deleted, replaced or made read-only, or the server
            does not answer.
    """
    get_tracked_run(run_id).check_store(when)


def flush(run_id: str) -> None:
    """Write what is gathered for `run_id` and wait for its asynchronous logging to land.

    Raises:
        TrackingError: A write failed.
    """
    run = get_tracked_run(run_id)
    if run.has_queued:
        run.write_queued(f"logging gathered metrics to run {run_id}")
    run.flush()


def end_run(
    run_id: str,
    status: str = "FINISHED",
    *,
    error: BaseException | str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """End a run with a terminal status, recording an error if given.

    Metrics still gathered for a batched write (an `EpochLogger` whose phase was cut short) are
    written first.

    Args:
        run_id: A run started or resumed in this process.
        status: "FINISHED", "FAILED" or "KILLED".
        error: The exception (or message) that ended the run: sets tag `error` to a short message
            and logs the full traceback as artifact `error.txt`.
        tags: More tags to set first, e.g. ``{"killed_by": "SIGTERM"}``.

    Raises:
        TrackingError: Unknown status or run, or the store fails.
    """
    if status not in TERMINAL_STATUSES:
        raise TrackingError(
            f"end_run status={status!r} is not a terminal MLflow status; expected one of "
            f"{', '.join(TERMINAL_STATUSES)}."
        )
    run = get_tracked_run(run_id)
    try:
        flush(run_id)
    except TrackingError:
        if error is None:
            raise
        logger.exception("logging into run %s failed while it was failing", run_id)
    if tags:
        log_tags(run_id, tags)
    if error is not None:
        _record_error(run_id, error)
    run.write(f"ending run {run_id} as {status}", run.client.set_terminated, run_id, status=status)
    logger.info("ended MLflow run %s as %s", run_id, status)


def _short_error(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        message = f"{type(error).__name__}: {first}" if first else type(error).__name__
    else:
        message = str(error).strip().splitlines()[0] if str(error).strip() else "error"
    return truncate(message, MAX_ERROR_TAG_LENGTH)


def _record_error(run_id: str, error: BaseException | str) -> None:
    log_tags(run_id, {"error": _short_error(error)})
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    else:
        text = str(error)
    records.log_text(run_id, text, "error.txt")


@contextlib.contextmanager
def tracked_run(uri: str, experiment: str, *, end: bool = True, **start: Any) -> Iterator[str]:
    """Start or resume a run for the duration of a `with` block; yield its id.

    On success the run is ended FINISHED when `end` is True, or left RUNNING for the next stage
    when `end` is False (pending asynchronous logging is flushed either way). On an exception the
    run gets tag `error` and artifact `error.txt`, is ended FAILED (KILLED, with tag `killed_by`
    naming the signal, for KeyboardInterrupt, `tfstack.signals.Stopped` and other non-`Exception`
    exits), and the exception is re-raised: a run is never left RUNNING by a failing stage, except
    when its store failed (`StoreLostError`): then nothing can be written there.

    Args:
        uri: Tracking URI.
        experiment: Experiment name.
        end: End the run FINISHED on success (the pipeline's last stage), or leave it open.
        **start: `start_run`'s keywords: ``run_id`` (resume it), ``run_name``, ``tags``.

    Yields:
        The run id.
    """
    run_id = start_run(uri, experiment, **start)
    run = get_tracked_run(run_id)
    try:
        yield run_id
    except BaseException as exc:
        if isinstance(exc, StoreLostError) or run.store_failed:
            logger.debug("not ending MLflow run %s: its store failed", run_id)
            raise
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        tags = {"killed_by": signal_name(exc)} if isinstance(exc, KeyboardInterrupt) else None
        try:
            end_run(run_id, status, error=exc, tags=tags)
        except Exception:
            # Never hide the stage's own error behind a tracking error.
            logger.exception("could not mark MLflow run %s as %s", run_id, status)
        raise
    if end:
        end_run(run_id, "FINISHED")
    else:
        flush(run_id)
        logger.info("left MLflow run %s open for the next stage", run_id)


# ---------------------------------------------------------------------------------------------
# Params and tags
# ---------------------------------------------------------------------------------------------


def log_params_flat(run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log (possibly nested) params, flattened with dots, in batches of at most 100.

    MLflow params are write-once. A param already in the run with the same value is skipped, so
    a resumed stage can log its config again. A param already in the run with a *different* value
    raises before anything is logged: two stages of one run disagreeing about the config means the
    run would describe neither, so we refuse rather than silently prefix or drop the new value.
    Log genuinely per-phase values under per-phase keys (`phase.0.lr`, `phase.1.lr`).

    Args:
        run_id: A run started or resumed in this process.
        params: Mapping, nested dicts allowed.

    Returns:
        The flattened params that were newly logged.

    Raises:
        TrackingError: A key is too long, or a param conflicts with its logged value.
    """
    run = get_tracked_run(run_id)
    flat = flatten_params(params)
    too_long = [key for key in flat if len(key) > MAX_KEY_LENGTH]
    if too_long:
        raise TrackingError(
            f"param key {too_long[0]!r} is {len(too_long[0])} characters; MLflow allows "
            f"{MAX_KEY_LENGTH}. Shorten the config key."
        )
    existing = run.write("reading the run", run.client.get_run, run_id).data.params
    conflicts = [key for key, value in flat.items() if key in existing and existing[key] != value]
    if conflicts:
        details = "; ".join(
            f"{key}: logged {existing[key]!r}, now {flat[key]!r}" for key in conflicts[:5]
        )
        more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
        raise TrackingError(
            f"params of run {run_id} are write-once and {len(conflicts)} differ from what an "
            f"earlier stage logged: {details}{more}. Rerun the whole pipeline with the new config "
            f"(delete the run reference file to start a new run), or log per-phase values under "
            f"distinct keys such as phase.1.lr."
        )
    new = {key: value for key, value in flat.items() if key not in existing}
    entries = [Param(key, value) for key, value in new.items()]
    for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        run.write(
            f"logging params to run {run_id}", run.client.log_batch, run_id, params=list(chunk)
        )
    return new


def tag_entries(tags: Mapping[str, Any]) -> list[RunTag]:
    """MLflow `RunTag`s of `tags`, stringified and truncated to MLflow's limit."""
    return [RunTag(str(key), tag_value(value)) for key, value in tags.items()]


def log_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags (mutable, unlike params), stringified and truncated to MLflow's limit.

    Args:
        run_id: A run started or resumed in this process.
        tags: Tag names to values.
    """
    run = get_tracked_run(run_id)
    for chunk in chunks(tag_entries(tags), MAX_PARAMS_TAGS_PER_BATCH):
        run.write(f"setting tags on run {run_id}", run.client.log_batch, run_id, tags=list(chunk))


def delete_tags(run_id: str, keys: Sequence[str]) -> None:
    """Remove tags from a run; keys the run does not have are skipped.

    Args:
        run_id: A run started or resumed in this process.
        keys: Tag names, e.g. ``["error"]`` when a resumed run no longer failed.
    """
    run = get_tracked_run(run_id)
    present = run.write("reading the run", run.client.get_run, run_id).data.tags
    for key in keys:
        if key in present:
            run.write(f"deleting tag {key} of run {run_id}", run.client.delete_tag, run_id, key)
