"""MLflow tracking: one run per pipeline execution, shared by several stages.

This is the only tfstack module that imports mlflow. It receives plain values (dicts, numbers,
strings, numpy arrays, matplotlib figures, Keras models) and logs them into a run by its id.

A pipeline execution is one MLflow run written to by several processes (the DVC stages `build`,
`train`, `evaluate`). The first stage starts the run and writes its id to a small JSON file
(`write_run_ref`); each later stage reads it (`read_run_ref`) and resumes the run by id.
Everything is logged through `MlflowClient` with an explicit run id, never through MLflow's fluent
"active run", so no process-global state decides where data lands and nothing ends a run behind
our back. A stage that is not the last one leaves the run RUNNING (`tracked_run(..., end=False)`);
the last stage ends it FINISHED; any stage that raises ends it FAILED with an `error` tag and an
`error.txt` artifact.

Typical stage:

    ref = read_run_ref(ref_path)
    with tracked_run(uri, experiment, run_id=ref and ref["run_id"], end=False) as run_id:
        write_run_ref(ref_path, run_id, uri, experiment)
        log_params_flat(run_id, params)
        model.fit(..., callbacks=[EpochLogger(run_id, phase="head", phase_index=0)])
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import mlflow.tensorflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from tfstack.errors import StoreLostError, TrackingError
from tfstack.signals import signal_name

try:  # POSIX only; elsewhere first use of a fresh sqlite store is simply not serialized
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

# MLflow's own limits (mlflow/utils/validation.py in MLflow 3.17).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Short tag for the UI's run table; the full traceback goes to `error.txt`.
MAX_ERROR_TAG_LENGTH = 500

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's sqlite sessions already wait up to 20 s (PRAGMA busy_timeout); these retries cover what
# still escapes that, bounded: 4 attempts over about 3.5 s.
_LOCK_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
_LOCK_MESSAGES = ("database is locked", "database table is locked")

RUN_REF_KEYS = ("run_id", "uri", "experiment")

# HTTP answers MLflow's client retries with backoff (mlflow/utils/request_utils.py) besides 5xx.
_RETRIED_HTTP_CODES = (408, 429)


@dataclass(frozen=True)
class RunHandle:
    """Where a run lives: its id, tracking URI and experiment.

    Attributes:
        run_id: MLflow run id.
        uri: Tracking URI the run is stored under.
        experiment_id: Id of the run's experiment.
    """

    run_id: str
    uri: str
    experiment_id: str

    @property
    def client(self) -> MlflowClient:
        """The (cached) `MlflowClient` for this run's tracking URI."""
        return _client(self.uri)


# Runs started or resumed in this process, by id. Logging functions take a run id and look up
# its URI here, so two runs in two stores can be written from one process deterministically.
_RUNS: dict[str, RunHandle] = {}
_CLIENTS: dict[str, MlflowClient] = {}
_PENDING: dict[str, list[Any]] = {}  # run id -> RunOperations of async logging not yet awaited
_STATE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# URIs, reachability, clients
# ---------------------------------------------------------------------------------------------


def default_tracking_uri(root: str | Path) -> str:
    """Return the absolute sqlite tracking URI `sqlite:////abs/root/mlflow.db`.

    An absolute URI keeps every stage (and every DVC queued experiment, which runs in a temporary
    copy of the workspace) writing to the same database.

    Args:
        root: Directory holding `mlflow.db` (relative paths are resolved against the working
            directory now).

    Returns:
        The sqlite URI.
    """
    return f"sqlite:///{(Path(root).expanduser().resolve() / 'mlflow.db').as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    """Database file of a `sqlite:///` URI, or None for other URIs and in-memory databases."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    if not rest.startswith("///"):
        return None
    path = rest[3:].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def check_reachable(uri: str, timeout_s: float = 5) -> None:
    """Fail fast, with a clear message, when the tracking store cannot be used.

    For `http(s)://` URIs this probes `<uri>/health` once, so an unreachable server fails within
    about `timeout_s` seconds instead of after MLflow's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2 by default: measured 245 s against a closed port).
    An answer that MLflow would retry (HTTP 408, 429, 5xx: e.g. a proxy whose tracking server is
    down; measured 251 s for `tfstack run` against a 503) or a 404 (no MLflow server at that
    address or path prefix) fails here too; any other answer (401, 403) counts as reachable.
    For `sqlite:///` URIs it checks that the database's directory exists and is writable. Other
    schemes are not checked.

    Args:
        uri: Tracking URI.
        timeout_s: Seconds to wait for an HTTP server, DNS lookup included.

    Raises:
        TrackingError: The server does not answer, or the sqlite directory is missing or
            read-only.
    """
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            return
        directory = path.parent
        if not directory.is_dir():
            raise TrackingError(
                f"tracking.uri={uri}: directory {directory} does not exist. Create it, or set "
                f"tracking.uri to a sqlite file in an existing directory."
            )
        if not os.access(directory, os.W_OK | os.X_OK) or (
            path.exists() and not os.access(path, os.R_OK | os.W_OK)
        ):
            raise TrackingError(
                f"tracking.uri={uri}: {path if path.exists() else directory} is not writable. "
                f"Fix its permissions, or set tracking.uri to a sqlite file you can write."
            )
    elif scheme in ("", "file"):
        raise TrackingError(
            f"tracking.uri={uri} is a filesystem store, which MLflow 3 refuses by default. "
            f"Set tracking.uri=sqlite:////absolute/path/mlflow.db instead."
        )


def _check_http(uri: str, timeout_s: float) -> None:
    reason = _http_problem(uri, timeout_s)
    if reason is not None:
        raise TrackingError(
            f"tracking.uri={uri} is unreachable: {reason}; start the server "
            f"(mlflow server --backend-store-uri sqlite:///mlflow.db) or set "
            f"tracking.uri=sqlite:////absolute/path/mlflow.db"
        )


def _http_problem(uri: str, timeout_s: float) -> str | None:
    """Why the server at `uri` cannot be used (one GET of `<uri>/health`), or None."""
    health = uri.rstrip("/") + "/health"
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(health, timeout=timeout_s):  # noqa: S310 (http(s) only)
                pass
            outcome["error"] = None
        except urllib.error.HTTPError as exc:
            # Another answer than 200 is reachable (401/403 fail fast in MLflow anyway), except
            # what MLflow would retry for minutes, and 404: no MLflow server at this address.
            if exc.code in _RETRIED_HTTP_CODES or exc.code >= 500:
                outcome["error"] = ConnectionError(f"{health} answered HTTP {exc.code}")
            elif exc.code == 404:
                outcome["error"] = ConnectionError(
                    f"{health} answered HTTP 404, so no MLflow tracking server is at this "
                    f"address (check the host, port and any path prefix)"
                )
            else:
                outcome["error"] = None
        except (OSError, ValueError) as exc:  # URLError, refused, timeout, DNS failure
            outcome["error"] = exc

    # A thread bounds the whole probe, DNS resolution included (socket timeouts do not cover it).
    thread = threading.Thread(target=probe, name="tfstack-tracking-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if thread.is_alive():
        error: BaseException | None = TimeoutError(f"no answer within {timeout_s:g} s")
    else:
        error = outcome.get("error")
    return None if error is None else str(getattr(error, "reason", error))


def _is_locked(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if any(message in str(seen) for message in _LOCK_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_store_error(exc: BaseException) -> bool:
    """Errors raised by MLflow or its storage/HTTP layers (as opposed to bugs in our code)."""
    package = type(exc).__module__.split(".", 1)[0]
    return isinstance(exc, MlflowException) or package in (
        "mlflow",
        "sqlalchemy",
        "alembic",
        "sqlite3",
        "requests",
        "urllib3",
    )


# ---------------------------------------------------------------------------------------------
# A store that fails during a run
# ---------------------------------------------------------------------------------------------


# Per sqlite URI opened by this process: (st_dev, st_ino) of its database file, to notice the
# file being deleted or replaced (sqlite itself keeps writing to an open, deleted file).
_STORE_FILES: dict[str, tuple[int, int]] = {}
# Stores found failed in this process (URI -> the error): every later write fails at once.
_LOST: dict[str, StoreLostError] = {}
# A server that does not answer its health check within this time counts as gone.
_PROBE_TIMEOUT_S = 5.0
# Bounds for MLflow's HTTP client unless the user set them (MLflow's defaults retry a closed
# port for about 4 minutes): 2 retries 1-3 s apart; 30 s without a byte is a timeout.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _store_problem(uri: str, *, http: bool) -> tuple[str, str] | None:
    """What is wrong with a store this process opened, and the fix; None if it looks usable.

    For sqlite: a few `stat` calls (microseconds): the file is gone, another file took its place,
    or it or its directory can no longer be written (`os.access`, which honours `chattr +i` and,
    for non-root users, permissions). For a server (``http``): one GET of ``/health``.
    """
    path = _sqlite_path(uri)
    if path is not None and uri in _STORE_FILES:
        identity = _file_identity(path)
        if identity is None:
            return f"the sqlite file {path} was deleted", "Restore the file"
        if identity != _STORE_FILES[uri]:
            return f"the sqlite file {path} was replaced by another file", "Restore the file"
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            return (
                f"the sqlite file {path} or its directory became read-only",
                "Make both writable again",
            )
        return None
    if http and urllib.parse.urlparse(uri).scheme.lower() in ("http", "https"):
        reason = _http_problem(uri, _PROBE_TIMEOUT_S)
        if reason is not None:
            return f"the tracking server stopped answering ({reason})", "Start the server again"
    return None


def _raise_if_lost(uri: str, what: str | None, *, http: bool) -> None:
    lost = _LOST.get(uri)
    if lost is not None:
        raise lost
    problem = _store_problem(uri, http=http)
    if problem is not None:
        _LOST[uri] = StoreLostError(uri, *problem, what=what)
        raise _LOST[uri]


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
    handle = _handle(run_id)
    _raise_if_lost(handle.uri, f"{when} of run {run_id}" if when else None, http=True)


def _bound_http_retries(uri: str) -> None:
    """Apply `HTTP_LIMITS` (unless set) so a server that goes away fails a write in seconds."""
    if urllib.parse.urlparse(uri).scheme.lower() in ("http", "https"):
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)


class _DropStoreTracebacks(logging.Filter):
    """Drop MLflow's logged tracebacks of store errors: `_write` reports them in one line.

    MLflow's sqlite session logs every OperationalError with its traceback before raising it
    (mlflow/store/db/utils.py), so one failed write printed two or more tracebacks. With the
    root logger at DEBUG (``tfstack --debug``) they are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or logging.getLogger().isEnabledFor(logging.DEBUG)


logging.getLogger("mlflow.store.db.utils").addFilter(_DropStoreTracebacks())


def _write(what: str, uri: str, fn, *args, **kwargs):
    """Call an MLflow write, retrying a bounded number of times on sqlite "database is locked".

    MLflow errors become `TrackingError` naming what was being done and where; a store that
    failed during the run (see `StoreLostError`) is checked before each sqlite write (the file
    is gone, replaced or read-only) and after a failed write of any store, and once failed is
    not written again by this process.
    """
    _raise_if_lost(uri, what, http=False)
    for attempt in range(len(_LOCK_RETRY_DELAYS_S) + 1):
        try:
            return fn(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as exc:
            if _is_locked(exc) and attempt < len(_LOCK_RETRY_DELAYS_S):
                delay = _LOCK_RETRY_DELAYS_S[attempt]
                logger.warning("%s: sqlite database is locked; retrying in %.1f s", what, delay)
                time.sleep(delay)
                continue
            if not _is_store_error(exc):
                raise
            problem = _store_problem(uri, http=True)  # why it failed, if the store is gone
            if problem is not None:
                _LOST[uri] = StoreLostError(uri, *problem, what=what)
                raise _LOST[uri] from exc
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise TrackingError(f"{what} failed (tracking.uri={uri}): {first_line}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Serialize first use of a sqlite database across processes.

    Several processes creating the same fresh database at once race in MLflow's schema
    migrations ("table ... already exists", "duplicate column name: step"); measured: 3 of 4
    concurrent processes failed. A lock file beside the database makes them take turns.
    """
    path = _sqlite_path(uri)
    if path is None or fcntl is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _client(uri: str) -> MlflowClient:
    """Return a cached `MlflowClient` for `uri`, creating the store on first use."""
    with _STATE_LOCK:
        client = _CLIENTS.get(uri)
        if client is not None:
            return client
        with _init_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            # Touch the store now, under the lock, so schema creation/migration happens here.
            _write("opening the tracking store", uri, client.search_experiments, max_results=1)
        _CLIENTS[uri] = client
        path = _sqlite_path(uri)
        identity = _file_identity(path) if path is not None else None
        if identity is not None:
            _STORE_FILES[uri] = identity
        return client


def _reopen_if_lost(uri: str) -> None:
    """Before a run starts: forget a store this process found failed, or whose file changed.

    Its next use opens it afresh, as a new process would (a sweep's next job, a test).
    """
    with _STATE_LOCK:
        changed = uri in _STORE_FILES and _file_identity(_sqlite_path(uri)) != _STORE_FILES[uri]
        if changed or uri in _LOST:
            _LOST.pop(uri, None)
            _STORE_FILES.pop(uri, None)
            _CLIENTS.pop(uri, None)


def _handle(run_id: str) -> RunHandle:
    handle = _RUNS.get(run_id)
    if handle is None:
        raise TrackingError(
            f"run {run_id} was not started or resumed in this process. Call "
            f"start_run(uri, experiment, run_id={run_id!r}) (or tracked_run) before logging to it."
        )
    return handle


def get_run_handle(run_id: str) -> RunHandle:
    """Return the `RunHandle` of a run started or resumed in this process.

    Raises:
        TrackingError: The run was not started or resumed here.
    """
    return _handle(run_id)


# ---------------------------------------------------------------------------------------------
# Experiments and runs
# ---------------------------------------------------------------------------------------------


def run_experiment_name(uri: str, run_id: str) -> str:
    """The name of the experiment a run belongs to (e.g. a run `mlflow run` created).

    Raises:
        TrackingError: The run does not exist in the store.
    """
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"run_id={run_id} does not exist in tracking.uri={uri}.") from exc
    return client.get_experiment(run.info.experiment_id).name


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Absolute artifact root beside a sqlite database, or None to let the store decide.

    MLflow's default for a local store is `./mlruns/<id>` resolved against the working directory
    of whichever process creates the experiment, which scatters artifacts (a DVC queued experiment
    runs in a temporary copy). Keeping them beside the database makes the store self-contained.
    """
    path = _sqlite_path(uri)
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
    client = _client(uri)
    experiment = _write("looking up the experiment", uri, client.get_experiment_by_name, name)
    if experiment is None:
        try:
            return _write(
                f"creating experiment {name!r}",
                uri,
                client.create_experiment,
                name,
                artifact_location=_artifact_location(uri, name),
            )
        except TrackingError:
            # Another process may have created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.experiment={name} was deleted in {uri}. Restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose "
            f"another tracking.experiment."
        )
    return experiment.experiment_id


def _context_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """User tags plus MLflow's usual context tags (user, source, git commit) when available."""
    user_tags = {str(k): _tag_value(v) for k, v in (tags or {}).items()}
    try:
        from mlflow.tracking.context import registry as context_registry

        return {str(k): str(v) for k, v in context_registry.resolve_tags(user_tags).items()}
    except Exception:  # context tags are a nicety; never fail a run over them
        logger.debug("could not resolve MLflow context tags", exc_info=True)
        return user_tags


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
    _bound_http_retries(uri)
    _reopen_if_lost(uri)
    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    resuming = run_id is not None
    if not resuming:
        run = _write(
            "creating a run",
            uri,
            client.create_run,
            experiment_id,
            run_name=run_name,
            tags=_context_tags(tags),
        )
        run_id = run.info.run_id
        logger.info("started MLflow run %s in experiment %r (%s)", run_id, experiment, uri)
    else:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(
                f"run_id={run_id} does not exist in tracking.uri={uri}. Delete the run "
                f"reference file to start a new run, or point tracking.uri at the store that "
                f"holds it."
            ) from exc
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(
                f"run_id={run_id} was deleted in tracking.uri={uri}. Delete the run reference "
                f"file to start a new run, or restore the run (mlflow runs restore)."
            )
        if run.info.experiment_id != experiment_id:
            actual = client.get_experiment(run.info.experiment_id).name
            raise TrackingError(
                f"run_id={run_id} belongs to experiment {actual!r}, not "
                f"tracking.experiment={experiment}. Use the same experiment in every stage, or "
                f"delete the run reference file to start a new run."
            )
        if run.info.status != "RUNNING":
            logger.info("reopening MLflow run %s (was %s)", run_id, run.info.status)
            _write("reopening the run", uri, client.update_run, run_id, status="RUNNING")
    _RUNS[run_id] = RunHandle(run_id=run_id, uri=uri, experiment_id=experiment_id)
    if resuming:
        if tags:
            log_tags(run_id, tags)
        logger.info("resumed MLflow run %s in experiment %r (%s)", run_id, experiment, uri)
    return run_id


def flush(run_id: str) -> None:
    """Wait for this process's asynchronous logging into `run_id` to land in the store.

    Raises:
        TrackingError: An asynchronous write failed.
    """
    with _STATE_LOCK:
        pending = _PENDING.pop(run_id, [])
    for operation in pending:
        try:
            operation.wait()
        except Exception as exc:
            raise TrackingError(f"asynchronous logging into run {run_id} failed: {exc}") from exc


def end_run(
    run_id: str,
    status: str = "FINISHED",
    *,
    error: BaseException | str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """End a run with a terminal status, recording an error if given.

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
    handle = _handle(run_id)
    try:
        flush(run_id)
    except TrackingError:
        if error is None:
            raise
        logger.exception("asynchronous logging into run %s failed while it was failing", run_id)
    if tags:
        log_tags(run_id, tags)
    if error is not None:
        _record_error(run_id, error)
    _write(
        f"ending run {run_id} as {status}",
        handle.uri,
        handle.client.set_terminated,
        run_id,
        status=status,
    )
    logger.info("ended MLflow run %s as %s", run_id, status)


def _short_error(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        message = f"{type(error).__name__}: {first}" if first else type(error).__name__
    else:
        message = str(error).strip().splitlines()[0] if str(error).strip() else "error"
    return _truncate(message, MAX_ERROR_TAG_LENGTH)


def _record_error(run_id: str, error: BaseException | str) -> None:
    log_tags(run_id, {"error": _short_error(error)})
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    else:
        text = str(error)
    log_text(run_id, text, "error.txt")


@contextlib.contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    *,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    end: bool = True,
) -> Iterator[str]:
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
        run_id: Run to resume; None starts a new one.
        run_name: Name of a new run.
        tags: Tags to set on the run.
        end: End the run FINISHED on success (the pipeline's last stage), or leave it open.

    Yields:
        The run id.
    """
    run_id = start_run(uri, experiment, run_id=run_id, run_name=run_name, tags=tags)
    try:
        yield run_id
    except BaseException as exc:
        if isinstance(exc, StoreLostError) or uri in _LOST:
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
# Carrying the run id between stages
# ---------------------------------------------------------------------------------------------


def write_run_ref(path: str | Path, run_id: str, uri: str, experiment: str, **extra: str) -> None:
    """Write the run reference that later stages read to resume the run.

    The JSON file is written to a temporary file beside it and moved into place with
    `os.replace`, so a reader never sees a half-written file.

    Args:
        path: File to write (parent directories are created).
        run_id: MLflow run id.
        uri: Tracking URI of the run.
        experiment: Experiment name of the run.
        **extra: More string fields to carry, e.g. `config_hash=...` so a later stage can tell
            whether the run was started with the same config.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clashing = sorted(set(extra) & set(RUN_REF_KEYS))
    if clashing:
        raise TrackingError(f"write_run_ref: extra field {clashing[0]!r} is a reserved key.")
    ref = {"run_id": run_id, "uri": uri, "experiment": experiment}
    ref.update({str(key): str(value) for key, value in extra.items()})
    content = json.dumps(ref, indent=2)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(content + "\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def read_run_ref(path: str | Path) -> dict[str, str] | None:
    """Read a run reference written by `write_run_ref`.

    Args:
        path: The reference file.

    Returns:
        `{"run_id", "uri", "experiment", ...extra fields}`, or None when the file does not exist.

    Raises:
        TrackingError: The file exists but is not a valid run reference.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        ref = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrackingError(
            f"run reference {path} is not valid JSON ({exc}). Delete it to start a new run."
        ) from exc
    missing = [key for key in RUN_REF_KEYS if not isinstance(ref, dict) or not ref.get(key)]
    if missing:
        raise TrackingError(
            f"run reference {path} lacks {', '.join(missing)}. Expected a JSON object with "
            f"{', '.join(RUN_REF_KEYS)}; delete it to start a new run."
        )
    return {str(key): str(value) for key, value in ref.items()}


# ---------------------------------------------------------------------------------------------
# Params, tags, metrics
# ---------------------------------------------------------------------------------------------


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _json_default(value: Any) -> Any:
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
        return json.dumps(list(value), default=_json_default)
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _tag_value(value: Any) -> str:
    return _truncate(_param_value(value), MAX_TAG_VALUE_LENGTH)


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
            flat[full_key] = _truncate(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    handle = _handle(run_id)
    flat = flatten_params(params)
    too_long = [key for key in flat if len(key) > MAX_KEY_LENGTH]
    if too_long:
        raise TrackingError(
            f"param key {too_long[0]!r} is {len(too_long[0])} characters; MLflow allows "
            f"{MAX_KEY_LENGTH}. Shorten the config key."
        )
    existing = _write("reading the run", handle.uri, handle.client.get_run, run_id).data.params
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
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        _write(
            f"logging params to run {run_id}",
            handle.uri,
            handle.client.log_batch,
            run_id,
            params=list(chunk),
        )
    return new


def log_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags (mutable, unlike params), stringified and truncated to MLflow's limit.

    Args:
        run_id: A run started or resumed in this process.
        tags: Tag names to values.
    """
    handle = _handle(run_id)
    entries = [RunTag(str(key), _tag_value(value)) for key, value in tags.items()]
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        _write(
            f"setting tags on run {run_id}",
            handle.uri,
            handle.client.log_batch,
            run_id,
            tags=list(chunk),
        )


def delete_tags(run_id: str, keys: Sequence[str]) -> None:
    """Remove tags from a run; keys the run does not have are skipped.

    Args:
        run_id: A run started or resumed in this process.
        keys: Tag names, e.g. ``["error"]`` when a resumed run no longer failed.
    """
    handle = _handle(run_id)
    present = _write("reading the run", handle.uri, handle.client.get_run, run_id).data.tags
    for key in keys:
        if key in present:
            _write(
                f"deleting tag {key} of run {run_id}",
                handle.uri,
                handle.client.delete_tag,
                run_id,
                key,
            )


def _metric_entries(metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> list[Metric]:
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
    handle = _handle(run_id)
    entries = _metric_entries(metrics, 0 if step is None else int(step), int(time.time() * 1000))
    for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
        operation = _write(
            f"logging metrics to run {run_id}",
            handle.uri,
            handle.client.log_batch,
            run_id,
            metrics=list(chunk),
            synchronous=synchronous,
        )
        if not synchronous and operation is not None:
            with _STATE_LOCK:
                _PENDING.setdefault(run_id, []).append(operation)


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------


def _check_artifact_file(artifact_file: str) -> None:
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
    _check_artifact_file(artifact_file)
    handle = _handle(run_id)
    _write(
        f"logging {artifact_file} to run {run_id}",
        handle.uri,
        handle.client.log_text,
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
    log_text(run_id, json.dumps(obj, indent=2, default=_json_default) + "\n", artifact_file)


def log_figure(run_id: str, fig: Any, artifact_file: str) -> None:
    """Store a matplotlib figure as an image artifact (format from the extension, e.g. ".png").

    Args:
        run_id: A run started or resumed in this process.
        fig: matplotlib `Figure`.
        artifact_file: Relative path inside the run's artifacts, e.g. "eval/confusion.png".
    """
    _check_artifact_file(artifact_file)
    handle = _handle(run_id)
    _write(
        f"logging figure {artifact_file} to run {run_id}",
        handle.uri,
        handle.client.log_figure,
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
        _check_artifact_file(artifact_path)
    handle = _handle(run_id)
    if path.is_dir():
        fn = handle.client.log_artifacts
    elif path.is_file():
        fn = handle.client.log_artifact
    else:
        raise TrackingError(f"cannot log artifact {path}: no such file or directory.")
    _write(
        f"logging artifact {path} to run {run_id}",
        handle.uri,
        fn,
        run_id,
        str(path),
        artifact_path,
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def default_pip_requirements() -> list[str]:
    """Pinned requirements of a logged Keras model: the installed tensorflow, keras and mlflow.

    Passing them skips MLflow's requirement inference, which reloads the model in a subprocess
    (measured: about 4.6 s against 0.35 s for a tiny model).
    """
    packages = ["tensorflow", "keras", "mlflow"]
    return [f"{name}=={importlib.metadata.version(name)}" for name in packages]


@contextlib.contextmanager
def _without_global_custom_objects() -> Iterator[None]:
    """Hide Keras's registered custom objects while MLflow saves a model.

    mlflow.tensorflow.save_model cloudpickles every registered custom object (tfstack registers
    its Cast layer and discriminative optimizers) into ``global_custom_objects.cloudpickle``, and
    load_model unpickles it: a pickle in every logged model. Keras saves registered classes by
    name in the model's config without that dict, so hiding it only drops the pickle; a process
    that loads a model using tfstack's classes imports them (``import tfstack.adapters,
    tfstack.schedules``) as for any registered Keras class.
    """
    registered = keras.saving.get_custom_objects()
    saved = dict(registered)
    registered.clear()
    try:
        yield
    finally:
        registered.update(saved)


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Set MLflow's process-wide tracking URI for a block, then restore it and the env var."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both the URI and the env var


def log_keras_model(
    run_id: str,
    model: keras.Model,
    input_example: np.ndarray,
    *,
    name: str = "model",
    pip_requirements: list[str] | None = None,
) -> str:
    """Log a Keras model with the MLflow TensorFlow flavor, with a signature and input example.

    In MLflow 3 a model is a LoggedModel of its own (artifacts under `.../models/<model_id>/`,
    not under the run's artifacts) linked to the run as an output. It loads with
    `mlflow.tensorflow.load_model(uri)` (the Keras model) and `mlflow.pyfunc.load_model(uri)`.
    The LoggedModel is created explicitly in the run's experiment: with a run id but no active
    fluent run MLflow 3.17 would put it in experiment "0" under `./mlruns`, where
    `runs:/<run_id>/<name>` cannot find it.

    Args:
        run_id: A run started or resumed in this process.
        model: The Keras model.
        input_example: A batch of inputs; the first 5 rows are stored as the example and used with
            the model's predictions to infer the signature.
        name: Model name (`runs:/<run_id>/<name>` also resolves to it).
        pip_requirements: Requirements recorded with the model; None uses
            `default_pip_requirements()` (pinned installed versions, no slow inference).

    Returns:
        The model URI, `models:/<model_id>`.

    Raises:
        TrackingError: Logging failed.
    """
    from mlflow.models import infer_signature

    handle = _handle(run_id)
    example = np.asarray(input_example)[:5]
    predictions = model.predict(example, verbose=0)
    if isinstance(predictions, (list, tuple)):
        predictions = dict(zip(model.output_names, predictions, strict=True))
    signature = infer_signature(example, predictions)
    requirements = default_pip_requirements() if pip_requirements is None else pip_requirements
    logged_model = _write(
        f"creating model {name!r} in run {run_id}",
        handle.uri,
        handle.client.create_logged_model,
        experiment_id=handle.experiment_id,
        name=name,
        source_run_id=run_id,
    )
    start = time.perf_counter()
    # Model.log resolves its store from the process-wide tracking URI; set it only for this call
    # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would leak into later runs
    # of this process and into every subprocess it starts).
    with _process_tracking_uri(handle.uri), _without_global_custom_objects():
        info = _write(
            f"logging model {name!r} to run {run_id}",
            handle.uri,
            mlflow.tensorflow.log_model,
            model,
            name=name,
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            run_id=run_id,
            model_id=logged_model.model_id,
        )
    logger.info(
        "logged model %s to run %s in %.2f s", info.model_uri, run_id, time.perf_counter() - start
    )
    return info.model_uri


# ---------------------------------------------------------------------------------------------
# Keras callback
# ---------------------------------------------------------------------------------------------


class EpochLogger(keras.callbacks.Callback):
    """Log every epoch's `logs` to MLflow at the global epoch, with the phase recorded.

    Keras passes the global epoch (continued across phases through `fit(initial_epoch=...)`), so
    the steps of successive phases are contiguous. Each epoch logs, in one batch with one
    timestamp, all numeric `logs` entries under Keras's names (`loss`, `val_loss`, `accuracy`,
    ...), the optimizer's current learning rate as `lr`, and `phase_index`. Tags
    `phase.<index>.name` and `phase.<index>.epochs` ("first-last") record the phase.

    Args:
        run_id: A run started or resumed in this process.
        phase: Phase name, e.g. "head" or "finetune".
        client: `MlflowClient` to write with; None uses the run's cached client.
        phase_index: Position of the phase in the schedule.
        synchronous: False queues writes on MLflow's background thread and waits for them at
            `on_train_end`, so logging does not hold up training.
        min_interval_s: write the epochs gathered so far only once this many seconds have passed
            since the phase began or since the last write, and at `on_train_end`, in one batch.
            Every epoch keeps its own step and timestamp, so the run records the same metrics;
            a phase of short epochs costs a few writes instead of one per epoch (a sqlite write
            takes about as long as a demo epoch); the phase's tags go with those writes. An error
            that ends training before `on_train_end` loses at most the last interval's epochs.
            0 writes every epoch. An epoch that writes nothing checks the store (`check_store`),
            so a store that fails stops training within one epoch.
    """

    def __init__(
        self,
        run_id: str,
        phase: str,
        client: MlflowClient | None = None,
        *,
        phase_index: int = 0,
        synchronous: bool = True,
        min_interval_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.handle = _handle(run_id)
        self.run_id = run_id
        self.phase = phase
        self.phase_index = int(phase_index)
        self.synchronous = synchronous
        self.min_interval_s = float(min_interval_s)
        self.client = client or self.handle.client
        self.epochs_logged: list[int] = []
        self.logging_seconds: list[float] = []
        self._pending: list[Any] = []
        self._unwritten: list[Metric] = []
        self._unwritten_tags: list[RunTag] = []
        self._last_write = time.monotonic()

    def _current_lr(self) -> float | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        try:
            return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        except Exception:  # exotic optimizers or schedules: skip lr rather than fail training
            return None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.epochs_logged = []
        self._last_write = time.monotonic()
        self._tag({f"phase.{self.phase_index}.name": self.phase})

    def _tag(self, tags: dict[str, str]) -> None:
        """Set tags now, or with the next write of metrics when writes are gathered."""
        if self.min_interval_s > 0:
            self._unwritten_tags.extend(RunTag(k, _tag_value(v)) for k, v in tags.items())
        else:
            log_tags(self.run_id, tags)

    def _write_unwritten(self, epoch: int) -> None:
        """Write the gathered epochs' metrics and tags (in batches MLflow accepts)."""
        entries, self._unwritten = self._unwritten, []
        tags, self._unwritten_tags = self._unwritten_tags, []
        for index, chunk in enumerate(list(_chunks(entries, MAX_METRICS_PER_BATCH)) or [[]]):
            operation = _write(
                f"logging epoch {epoch} to run {self.run_id}",
                self.handle.uri,
                self.client.log_batch,
                self.run_id,
                metrics=list(chunk),
                tags=tags if index == 0 else [],
                synchronous=self.synchronous,
            )
            if operation is not None and not self.synchronous:
                self._pending.append(operation)
        self._last_write = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        start = time.perf_counter()
        values: dict[str, float] = {}
        for key, value in (logs or {}).items():
            try:
                number = float(np.asarray(value).item())
            except (TypeError, ValueError):
                continue
            values[str(key)] = number
        lr = self._current_lr()
        if lr is not None:
            values["lr"] = lr
        values["phase_index"] = float(self.phase_index)
        if not all(math.isfinite(v) for v in values.values()):
            logger.warning("epoch %d of phase %s has non-finite metrics", epoch, self.phase)
        self._unwritten.extend(_metric_entries(values, int(epoch), int(time.time() * 1000)))
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self._write_unwritten(int(epoch))
        else:  # not writing yet: still notice a failed store now, not at the next write
            check_store(self.run_id, f"after epoch {epoch}")
        self.epochs_logged.append(int(epoch))
        self.logging_seconds.append(time.perf_counter() - start)

    def on_train_end(self, logs: dict | None = None) -> None:
        start = time.perf_counter()
        if self.epochs_logged and self.min_interval_s > 0:
            first, last = self.epochs_logged[0], self.epochs_logged[-1]
            self._tag({f"phase.{self.phase_index}.epochs": f"{first}-{last}"})
        if self._unwritten or self._unwritten_tags:
            self._write_unwritten(self.epochs_logged[-1] if self.epochs_logged else 0)
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()
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


# ---------------------------------------------------------------------------------------------
# Reading runs back (tfstack compare, tfstack reproduce, sweeps)
# ---------------------------------------------------------------------------------------------

PARENT_RUN_TAG = "mlflow.parentRunId"


def _reading_client(uri: str) -> MlflowClient:
    """A client for a store that must already exist (reading never creates a database)."""
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(
            f"tracking.uri={uri}: {path} does not exist, so it holds no runs. Run `tfstack run` "
            f"first, or point tracking.uri at the store that holds your runs."
        )
    check_reachable(uri)
    return _client(uri)


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
    client = _reading_client(uri)
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
    client = _reading_client(uri)
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
    client = _reading_client(uri)
    history = _write(
        f"reading metric {key} of run {run_id}", uri, client.get_metric_history, run_id, key
    )
    return sorted((m.step, m.value) for m in history)


def read_artifact_text(uri: str, run_id: str, artifact_file: str) -> str | None:
    """The text of one artifact of a run, or None when the run has no such artifact."""
    _check_artifact_file(artifact_file)
    client = _reading_client(uri)
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
    _RUNS[run_id] = RunHandle(run_id=run_id, uri=uri, experiment_id=record["experiment_id"])
    return run_id
