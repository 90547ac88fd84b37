"""Keras Applications' pretrained weights: from the Keras cache, downloaded only when online.

``keras.applications.NAME(weights="imagenet")`` asks ``keras.utils.get_file`` for a file whose
name depends on the configuration (family, ``alpha``, input rows, ``include_top``, ...) in
``$KERAS_HOME/models`` (default ``~/.keras/models``), and downloads it when it is missing.
Offline, that download can wait for minutes in DNS or on a dropped connection before it fails
with a traceback. So tfstack lets the builder ask for its file as usual and answers the request
itself (`weights_requests`), without knowing any family's file names:

- a file in the cache is used as it is, after Keras's own hash check when the builder gives a
  hash (a read-only shared cache works too);
- a missing file is downloaded by Keras's ``get_file`` only after the host it would connect to
  (the origin's, or the proxy's of ``$HTTPS_PROXY``) answered within `PROBE_SECONDS`;
- otherwise the build fails at once with one line naming the file and the folder to put it in.

With ``check_only``, the same answers are given but the build stops at the request
(`WeightsAvailable`), before any file is read into the model or downloaded: the pipeline asks
so before a run starts (`tfstack.components.check_pretrained_weights`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

from tfstack import _keras_compat
from tfstack.errors import ComponentError
from tfstack.vocabulary import NAMED_WEIGHTS

logger = logging.getLogger(__name__)

# How long the host a download would use may take to accept a connection (DNS included).
PROBE_SECONDS = 5.0


def keras_cache_dir() -> str:
    """The Keras home folder: ``$KERAS_HOME`` as set now, else the one Keras read at import.

    Keras reads ``$KERAS_HOME`` once, when it is imported; reading it again here means a
    process (a notebook, a test) that sets it later still gets the folder it names.
    """
    return os.path.expanduser(os.environ.get("KERAS_HOME") or _keras_compat.keras_home())


class WeightsAvailable(Exception):  # noqa: N818 - an outcome, not an error
    """Raised inside a builder in ``check_only`` mode: its weights file is there or can be had.

    Attributes:
        path: The cached file, or None when it would be downloaded.
    """

    def __init__(self, path: str | None):
        super().__init__(path)
        self.path = path


@contextlib.contextmanager
def weights_requests(
    key: str, *, probe_seconds: float = PROBE_SECONDS, check_only: bool = False
) -> Iterator[list[str]]:
    """Answer the weight-file requests of the Keras Applications builders called inside.

    Args:
        key: Config key prefix of the component, for messages (``components.base``).
        probe_seconds: How long the download host may take to accept a connection.
        check_only: Stop the builder at its first request with `WeightsAvailable` once the file
            is known to be cached (and to pass the hash check) or downloadable; nothing is
            loaded or downloaded. A file that is neither still raises `ComponentError`.

    Yields:
        A list that receives the path of every weights file a builder was given.

    Raises:
        ComponentError: (from inside the builder) a file is neither cached nor downloadable,
            or the cached file fails Keras's hash check and no fresh copy can be downloaded.
    """
    used: list[str] = []

    def get_file(keras_get_file: Callable[..., str], fname=None, origin=None, **options) -> str:
        cache_subdir = options.get("cache_subdir", "datasets")
        cache_dir = options.get("cache_dir") or keras_cache_dir()
        if options.get("extract") or options.get("untar") or origin is None:
            # Not a weights file (no builder asks for an archive): Keras's own behaviour.
            return keras_get_file(fname, origin, **options)
        name = fname or os.path.basename(urllib.parse.urlsplit(origin).path)
        folder = os.path.join(cache_dir, cache_subdir)
        path = os.path.join(folder, name)
        file_hash = options.get("file_hash") or options.get("md5_hash")
        algorithm = options.get("hash_algorithm", "auto") if options.get("file_hash") else "md5"
        if os.path.isfile(path) and (
            file_hash is None or _keras_compat.file_matches_hash(path, file_hash, algorithm)
        ):
            if check_only:
                raise WeightsAvailable(path)
            logger.info("%s: weights from the Keras cache, %s", key, path)
            used.append(path)
            return path
        offline = unreachable(origin, timeout=probe_seconds)
        if offline and os.path.isfile(path):
            raise ComponentError(
                f"{key}.weights={NAMED_WEIGHTS}: the cached {path} does not match the hash Keras "
                f"expects for it ({file_hash}), and no fresh copy can be downloaded from {origin} "
                f"({offline}). Replace it with the file from {origin}."
            )
        if offline:
            raise ComponentError(
                f"{key}.weights={NAMED_WEIGHTS} needs the weights file {name}, which is not in "
                f"the Keras cache folder {folder} and cannot be downloaded ({offline}). Download "
                f"{origin} where there is network access and put it in {folder} (or set "
                f"KERAS_HOME to a folder whose models/ holds it), or set {key}.weights=null."
            )
        if check_only:
            raise WeightsAvailable(None)
        os.makedirs(folder, exist_ok=True)  # else Keras falls back to /tmp/.keras
        downloaded = keras_get_file(name, origin, **{**options, "cache_dir": cache_dir})
        used.append(downloaded)
        return downloaded

    with _keras_compat.answering_get_file(get_file):
        yield used


def unreachable(url: str, *, timeout: float) -> str | None:
    """Why a download of ``url`` cannot start, or None when its host accepts a connection.

    The host is the proxy urllib would use for the URL (``$HTTPS_PROXY``, ...), else the URL's
    own. The name lookup and the connection run in a daemon thread, so a resolver that never
    answers costs ``timeout`` seconds, not the resolver's own minutes.

    Args:
        url: The file's URL.
        timeout: Seconds to wait for the lookup and the connection together.

    Returns:
        A short reason (``no answer from storage.googleapis.com:443 within 5 s``), or None.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = None
    if not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = urllib.request.getproxies().get(parts.scheme)
    target = parts
    if proxy:
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    where = f"{'proxy ' if proxy else ''}{host}:{port}"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {where}: {err.strerror or err}")

    thread = threading.Thread(target=connect, name="tfstack-download-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer from {where} within {timeout:g} s"
