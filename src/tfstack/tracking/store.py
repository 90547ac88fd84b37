"""The tracking store: URIs, reachability, one client per store, bounded retries, failure.

A `Store` is one tracking URI opened by this process: its `MlflowClient`, the identity of its
sqlite file, and whether it failed during a run. Every MLflow call of the package goes through
`Store.write`, which retries sqlite's "database is locked" a bounded number of times, turns
MLflow's errors into one-line `TrackingError`s, and notices a store that stopped working (its
file deleted, replaced or made read-only; its server gone): such a store raises the same
`StoreLostError` on every later use, so nothing more is written there.

`open_store(uri)` returns the process's `Store` for a URI, creating the database (under a file
lock, see `_init_lock`) on first use. The stores live in `_STORES`, owned by this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tfstack.errors import StoreLostError, TrackingError

try:  # POSIX only; elsewhere first use of a fresh sqlite store is simply not serialized
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

# MLflow's sqlite sessions already wait up to 20 s (PRAGMA busy_timeout); these retries cover what
# still escapes that, bounded: 4 attempts over about 3.5 s.
_LOCK_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
_LOCK_MESSAGES = ("database is locked", "database table is locked")

# HTTP answers MLflow's client retries with backoff (mlflow/utils/request_utils.py) besides 5xx.
_RETRIED_HTTP_CODES = (408, 429)
# A server that does not answer its health check within this time counts as gone.
_PROBE_TIMEOUT_S = 5.0
# Bounds for MLflow's HTTP client unless the user set them (MLflow's defaults retry a closed
# port for about 4 minutes): 2 retries 1-3 s apart; 30 s without a byte is a timeout.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# ---------------------------------------------------------------------------------------------
# URIs and reachability
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


def sqlite_path(uri: str) -> Path | None:
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
        reason = http_problem(uri, timeout_s)
        if reason is not None:
            raise TrackingError(
                f"tracking.uri={uri} is unreachable: {reason}; start the server "
                f"(mlflow server --backend-store-uri sqlite:///mlflow.db) or set "
                f"tracking.uri=sqlite:////absolute/path/mlflow.db"
            )
    elif scheme == "sqlite":
        path = sqlite_path(uri)
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


def http_problem(uri: str, timeout_s: float) -> str | None:
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


def bound_http_retries(uri: str) -> None:
    """Apply `HTTP_LIMITS` (unless set) so a server that goes away fails a write in seconds."""
    if urllib.parse.urlparse(uri).scheme.lower() in ("http", "https"):
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)


# ---------------------------------------------------------------------------------------------
# Errors of a write
# ---------------------------------------------------------------------------------------------


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


class _DropStoreTracebacks(logging.Filter):
    """Drop MLflow's logged tracebacks of store errors: `Store.write` reports them in one line.

    MLflow's sqlite session logs every OperationalError with its traceback before raising it
    (mlflow/store/db/utils.py), so one failed write printed two or more tracebacks. With the
    root logger at DEBUG (``tfstack --debug``) they are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or logging.getLogger().isEnabledFor(logging.DEBUG)


logging.getLogger("mlflow.store.db.utils").addFilter(_DropStoreTracebacks())


def _file_identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


# ---------------------------------------------------------------------------------------------
# The store object
# ---------------------------------------------------------------------------------------------


class Store:
    """One tracking store as this process uses it.

    Attributes:
        uri: The tracking URI.
        client: The `MlflowClient` for it (set by `open_store` once the store is created).
        file_identity: ``(st_dev, st_ino)`` of the sqlite file when it was opened, to notice it
            being deleted or replaced (sqlite itself keeps writing to an open, deleted file).
        lost: The `StoreLostError` once the store failed during a run; every later write raises
            it at once.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client: MlflowClient | None = None
        self.file_identity: tuple[int, int] | None = None
        self.lost: StoreLostError | None = None

    def problem(self, *, http: bool) -> tuple[str, str] | None:
        """What is wrong with the store, and the fix; None if it looks usable.

        For sqlite: a few `stat` calls (microseconds): the file is gone, another file took its
        place, or it or its directory can no longer be written (`os.access`, which honours
        `chattr +i` and, for non-root users, permissions). For a server (``http``): one GET of
        ``/health``.
        """
        path = sqlite_path(self.uri)
        if path is not None and self.file_identity is not None:
            identity = _file_identity(path)
            if identity is None:
                return f"the sqlite file {path} was deleted", "Restore the file"
            if identity != self.file_identity:
                return f"the sqlite file {path} was replaced by another file", "Restore the file"
            if not os.access(path, os.R_OK | os.W_OK) or not os.access(
                path.parent, os.W_OK | os.X_OK
            ):
                return (
                    f"the sqlite file {path} or its directory became read-only",
                    "Make both writable again",
                )
            return None
        if http and urllib.parse.urlparse(self.uri).scheme.lower() in ("http", "https"):
            reason = http_problem(self.uri, _PROBE_TIMEOUT_S)
            if reason is not None:
                return f"the tracking server stopped answering ({reason})", "Start the server again"
        return None

    def raise_if_lost(self, what: str | None, *, http: bool) -> None:
        """Raise `StoreLostError` if the store failed (now or earlier in this process)."""
        if self.lost is not None:
            raise self.lost
        problem = self.problem(http=http)
        if problem is not None:
            self.lost = StoreLostError(self.uri, *problem, what=what)
            raise self.lost

    def write(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call an MLflow function, retrying a bounded number of times on "database is locked".

        MLflow errors become `TrackingError` naming what was being done and where; a store that
        failed during the run (see `StoreLostError`) is checked before each sqlite write (the
        file is gone, replaced or read-only) and after a failed write of any store, and once
        failed is not written again by this process.

        Args:
            what: What is being done, for messages: "logging epoch 3 to run <id>".
            fn: The MLflow call (usually a method of `client`).
            *args: Its arguments.
            **kwargs: Its keyword arguments.

        Returns:
            What `fn` returns.

        Raises:
            TrackingError: The call failed.
            StoreLostError: The store stopped working.
        """
        self.raise_if_lost(what, http=False)
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
                problem = self.problem(http=True)  # why it failed, if the store is gone
                if problem is not None:
                    self.lost = StoreLostError(self.uri, *problem, what=what)
                    raise self.lost from exc
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise TrackingError(
                    f"{what} failed (tracking.uri={self.uri}): {first_line}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


# URI -> the Store this process opened; guarded by _STORES_LOCK.
_STORES: dict[str, Store] = {}
_STORES_LOCK = threading.Lock()


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Serialize first use of a sqlite database across processes.

    Several processes creating the same fresh database at once race in MLflow's schema
    migrations ("table ... already exists", "duplicate column name: step"); measured: 3 of 4
    concurrent processes failed. A lock file beside the database makes them take turns.
    """
    path = sqlite_path(uri)
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


def open_store(uri: str) -> Store:
    """Return this process's `Store` for `uri`, creating the database on first use.

    Raises:
        TrackingError: The store cannot be opened.
    """
    with _STORES_LOCK:
        store = _STORES.get(uri)
        if store is not None:
            return store
        store = Store(uri)
        with _init_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            # Touch the store now, under the lock, so schema creation/migration happens here.
            store.write("opening the tracking store", client.search_experiments, max_results=1)
        store.client = client
        store.file_identity = _file_identity(sqlite_path(uri))
        _STORES[uri] = store
        return store


def reopen_if_lost(uri: str) -> None:
    """Before a run starts: forget a store this process found failed, or whose file changed.

    Its next use opens it afresh, as a new process would (a sweep's next job, a test).
    """
    with _STORES_LOCK:
        store = _STORES.get(uri)
        if store is None:
            return
        changed = (
            store.file_identity is not None
            and _file_identity(sqlite_path(uri)) != store.file_identity
        )
        if changed or store.lost is not None:
            del _STORES[uri]


def is_lost(uri: str) -> bool:
    """Whether this process found the store at `uri` failed."""
    store = _STORES.get(uri)
    return store is not None and store.lost is not None


def reading_store(uri: str) -> Store:
    """The store at `uri` for reading: it must already exist (reading never creates one).

    Raises:
        TrackingError: The sqlite file does not exist, or the server does not answer.
    """
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(
            f"tracking.uri={uri}: {path} does not exist, so it holds no runs. Run `tfstack run` "
            f"first, or point tracking.uri at the store that holds your runs."
        )
    check_reachable(uri)
    return open_store(uri)
