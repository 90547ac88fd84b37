"""The shared on-disk frozen-feature cache: entries by key, atomic writes, locks, LRU eviction.

A frozen phase's features (the frozen part's outputs for every sample of a split, in input
order) are stored under a key that covers everything they depend on (`tfstack.feature_keys`),
so a later run, a sweep's other jobs, a DVC queue worker or a later session reads them instead
of running the frozen part again. This module stores and finds entries; it imports no
TensorFlow.

Layout of the cache directory (`resolve_root`: the configured one, else ``$TFSTACK_FEATURE_CACHE``,
else ``$XDG_CACHE_HOME/tfstack/features``, else ``~/.cache/tfstack/features``)::

    <key>/meta.json        what the entry holds (model, cut, data, rows, bytes); its mtime is
                           the entry's last use (touched on every hit, for LRU eviction)
    <key>/0.npy, 1.npy ... one array per output of the frozen part, one row per sample
                           (row-major; `get_or_write` appends them batch by batch, so an
                           entry never has to fit in memory: `tfstack.feature_streaming`)
    .locks/<key>.lock      held (fcntl) while one job computes the key: the others wait
    .tmp-<key>-*/          an entry being written, renamed to <key>/ when complete

Writes are atomic: an entry is written into a temporary directory and renamed into place
(`os.replace`) once every file is complete and synced, so a reader sees a whole entry or none,
never a torn file. Two jobs wanting the same key take the key's lock: the first computes and
stores, the second waits and reads it (`FeatureCache.get_or_compute`). Without working locks
(a file system without ``flock``), both compute and the first rename wins. A cache larger than
``max_bytes`` drops its least recently used entries after each write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ENV_VAR = "TFSTACK_FEATURE_CACHE"
"""The environment variable naming the cache directory (when the config leaves it null)."""
DEFAULT_MAX_GB = 10.0
META = "meta.json"
_LOCKS = ".locks"
_TMP = ".tmp-"
_TRASH = ".trash-"
_STALE_SECONDS = 6 * 3600  # a temporary entry this old belongs to a job that died


def default_root() -> Path:
    """``$XDG_CACHE_HOME/tfstack/features``, or ``~/.cache/tfstack/features``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tfstack" / "features"


def resolve_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``configured``, else ``$TFSTACK_FEATURE_CACHE``, else the default."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return default_root()


@dataclass
class Entry:
    """One stored entry, as `FeatureCache.entries` lists it."""

    key: str
    bytes: int
    last_used: float
    meta: dict[str, Any]


class FeatureCache:
    """Frozen features on disk, shared by every process that uses the same directory.

    Args:
        root: The cache directory (created on the first write).
        max_bytes: The size limit; after a write, least recently used entries are removed
            until the cache fits. An entry larger than the limit is not stored.

    Example:
        >>> import numpy as np
        >>> cache = FeatureCache("/tmp/features", max_bytes=10**9)
        >>> arrays, hit = cache.get_or_compute("abc", lambda: [np.zeros((4, 2))], {})
        >>> hit, cache.get_or_compute("abc", lambda: [np.ones((4, 2))], {})[1]
        (False, True)
    """

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def path(self, key: str) -> Path:
        """The entry's directory (it may not exist)."""
        return self.root / key

    def load(self, key: str) -> list[np.ndarray] | None:
        """The entry's arrays (memory-mapped, read-only), or None; a hit marks it as used."""
        entry = self.path(key)
        try:
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
            arrays = [
                _as_dtype(np.load(entry / f"{i}.npy", mmap_mode="r", allow_pickle=False), dtype)
                for i, dtype in zip(range(int(meta["arrays"])), meta["dtypes"], strict=True)
            ]
            if [list(a.shape) for a in arrays] != meta["shapes"]:
                raise ValueError(f"shapes {[a.shape for a in arrays]} differ from {META}'s")
            os.utime(entry / META)  # last used, for LRU eviction
        except FileNotFoundError:
            return None  # absent, or evicted by another job meanwhile
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("Feature cache entry %s is unreadable (%s); computing it", entry, err)
            self._remove(entry)
            return None
        return arrays

    def open_files(self, key: str):
        """The entry as `tfstack.feature_streaming.StoredFeatures` (read by rows), or None.

        Nothing is loaded: the files are opened, so they stay readable if the entry is evicted
        meanwhile. A hit marks the entry as used.
        """
        from tfstack.feature_streaming import StoredFeatures

        entry = self.path(key)
        try:
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
            paths = [entry / f"{i}.npy" for i in range(int(meta["arrays"]))]
            stored = StoredFeatures(paths, meta["dtypes"])
            if [list(s) for s in stored.shapes] != meta["shapes"]:
                stored.close()
                raise ValueError(f"shapes {stored.shapes} differ from {META}'s")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("Feature cache entry %s is unreadable (%s); computing it", entry, err)
            self._remove(entry)
            return None
        # Last used, for LRU eviction; the open files stay readable if it is evicted meanwhile,
        # and a meta.json this user may not touch (a shared directory) is no reason to drop it.
        with contextlib.suppress(OSError):
            os.utime(entry / META)
        return stored

    def get_or_write(
        self,
        key: str,
        write: Callable[[Path], Sequence[str]],
        meta: dict[str, Any],
        *,
        expected_bytes: int | None = None,
    ):
        """The entry as files (`open_files`), written batch by batch under its lock if absent.

        The entry is written into its temporary directory by ``write`` (which returns the
        dtype of each ``<i>.npy`` it wrote), opened, then renamed into place, as `store` does.

        Args:
            key: The entry's key.
            write: Writes ``0.npy``, ``1.npy``, ... into the directory it is given.
            meta: What the entry holds (as for `get_or_compute`).
            expected_bytes: The entry's size if known: larger than ``max_bytes``, nothing is
                written here (None is returned, to write elsewhere).

        Returns:
            ``(stored, hit)``, or ``(None, False)`` when the entry cannot be stored here (too
            large, or the directory is not writable): the caller writes the features elsewhere.
        """
        stored = self.open_files(key)
        if stored is not None:
            return stored, True
        if expected_bytes is not None and expected_bytes > self.max_bytes:
            self._too_large(expected_bytes)
            return None, False
        with self._lock(key):
            stored = self.open_files(key)
            if stored is not None:
                return stored, True
            tmp = self._temporary(key)
            try:
                tmp.mkdir(parents=True)
            except OSError as err:
                logger.warning("Could not store features in %s: %s", self.root, err)
                return None, False
            try:
                dtypes = list(write(tmp))
                stored = self._open_written(tmp, dtypes)
                if stored.nbytes > self.max_bytes:
                    self._too_large(stored.nbytes)
                    shutil.rmtree(tmp, ignore_errors=True)  # its files stay open for this run
                    return stored, False
                record = self._record(key, stored.shapes, dtypes, stored.nbytes, meta)
                self._commit(tmp, key, record)
            except OSError as err:
                logger.warning("Could not store features in %s: %s", self.root, err)
                shutil.rmtree(tmp, ignore_errors=True)
                if stored is not None:
                    return stored, False
                return None, False
            except BaseException:
                if stored is not None:
                    stored.close()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.evict(keep=key)
        return stored, False

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Sequence[np.ndarray]],
        meta: dict[str, Any],
    ) -> tuple[list[np.ndarray], bool]:
        """The entry's arrays, computed (once, under the key's lock) and stored if absent.

        Args:
            key: The entry's key (`tfstack.feature_keys.entry_key`).
            compute: Gives the arrays (one row per sample) when the entry is absent.
            meta: What the entry holds, JSON-ready (shown by ``tfstack cache list``).

        Returns:
            ``(arrays, hit)``: ``hit`` is True when they were read from the cache.
        """
        arrays = self.load(key)
        if arrays is not None:
            return arrays, True
        with self._lock(key):
            arrays = self.load(key)  # another job may have stored it while this one waited
            if arrays is not None:
                return arrays, True
            arrays = [np.asarray(a) for a in compute()]
            self.store(key, arrays, meta)
        return arrays, False

    def store(self, key: str, arrays: Sequence[np.ndarray], meta: dict[str, Any]) -> bool:
        """Write an entry atomically, then evict to the size limit; True if it was stored.

        A failure to write (disk full, read-only) is logged, never raised: the cache only
        saves time.
        """
        size = sum(int(a.nbytes) for a in arrays)
        if size > self.max_bytes:
            self._too_large(size)
            return False
        tmp = self._temporary(key)
        shapes = [a.shape for a in arrays]
        record = self._record(key, shapes, [str(a.dtype) for a in arrays], size, meta)
        try:
            tmp.mkdir(parents=True)
            for i, array in enumerate(arrays):
                with open(tmp / f"{i}.npy", "wb") as f:
                    np.save(f, _storable(np.ascontiguousarray(array)), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            if not self._commit(tmp, key, record):
                return False
        except OSError as err:
            logger.warning("Could not store features in %s: %s", self.root, err)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        self.evict(keep=key)
        return True

    def _temporary(self, key: str) -> Path:
        return self.root / f"{_TMP}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _too_large(self, size: int) -> None:
        logger.warning(
            "Features of %.1f MB exceed the feature cache's limit (%.1f MB): not stored; "
            "raise train.feature_cache_max_gb to keep them",
            size / 1e6,
            self.max_bytes / 1e6,
        )

    @staticmethod
    def _record(key: str, shapes, dtypes, size: int, meta: dict[str, Any]) -> dict[str, Any]:
        """``meta.json``: the caller's ``meta`` and what the files hold."""
        return {
            **meta,
            "key": key,
            "arrays": len(shapes),
            "shapes": [list(s) for s in shapes],
            "dtypes": list(dtypes),
            "bytes": size,
            "created": time.time(),
        }

    @staticmethod
    def _open_written(tmp: Path, dtypes: Sequence[str]):
        from tfstack.feature_streaming import StoredFeatures

        return StoredFeatures([tmp / f"{i}.npy" for i in range(len(dtypes))], dtypes)

    def _commit(self, tmp: Path, key: str, record: dict[str, Any]) -> bool:
        """Write ``meta.json`` into ``tmp`` and rename it into place; False if another job won.

        Raises:
            OSError: writing or renaming failed (``tmp`` is left for the caller to remove).
        """
        with open(tmp / META, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, self.path(key))
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            logger.info("Feature cache entry %s was stored by another job first", key)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True

    def entries(self) -> list[Entry]:
        """Every complete entry, least recently used first."""
        found = []
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                meta_path = entry / META
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                used = meta_path.stat().st_mtime
            except (OSError, ValueError):
                continue  # removed meanwhile, or not an entry
            found.append(Entry(entry.name, int(meta.get("bytes", 0)), used, meta))
        return sorted(found, key=lambda e: e.last_used)

    def size(self) -> int:
        """Bytes held by the complete entries."""
        return sum(e.bytes for e in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the cache fits ``max_bytes``.

        Also removes what jobs that died left (temporary entries older than 6 hours).

        Returns:
            The keys removed.
        """
        self._remove_stale()
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.key == keep:
                continue
            self._remove(self.path(entry.key))
            total -= entry.bytes
            removed.append(entry.key)
        if removed:
            logger.info("Feature cache: evicted %d least recently used entries", len(removed))
        return removed

    def clear(self, keys: Sequence[str] = ()) -> tuple[int, int]:
        """Remove the given entries (by key or key prefix), or all with none given.

        Returns:
            ``(entries, bytes)`` removed.
        """
        count = size = 0
        for entry in self.entries():
            if keys and not any(entry.key.startswith(k) for k in keys):
                continue
            self._remove(self.path(entry.key))
            count += 1
            size += entry.bytes
        if not keys and self.root.is_dir():
            for leftover in self.root.iterdir():  # interrupted writes, locks
                if leftover.name.startswith((_TMP, _TRASH)):
                    shutil.rmtree(leftover, ignore_errors=True)
        return count, size

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """The key's exclusive lock (blocking); nothing when locks cannot be taken here."""
        locks = self.root / _LOCKS
        try:
            locks.mkdir(parents=True, exist_ok=True)
            handle = open(locks / f"{key}.lock", "a+b")  # noqa: SIM115 (closed below)
        except OSError as err:
            logger.warning("No lock for the feature cache in %s (%s)", self.root, err)
            yield
            return
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as err:  # e.g. a network file system without flock
                logger.warning("Cannot lock %s (%s): jobs may compute it twice", key, err)
            yield
        finally:
            handle.close()  # releases the lock; the lock file stays (removing it would race)

    def _remove(self, entry: Path) -> None:
        """Remove an entry directory; renamed first, so no reader sees half of it."""
        trash = self.root / f"{_TRASH}{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(entry, trash)
        except OSError:
            return  # removed by another job
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self) -> None:
        if not self.root.is_dir():
            return
        now = time.time()
        for leftover in self.root.iterdir():
            if not leftover.name.startswith((_TMP, _TRASH)):
                continue
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)


def _storable(array: np.ndarray) -> np.ndarray:
    """``array``, or its bits as unsigned integers for a dtype ``.npy`` cannot name (bfloat16)."""
    if array.dtype.kind == "V":  # ml_dtypes' bfloat16 and float8 types: saved as raw void
        return array.view(f"u{array.dtype.itemsize}")
    return array


def _as_dtype(array: np.ndarray, name: str) -> np.ndarray:
    """The stored array as the dtype it was stored from (`_storable` undone)."""
    if str(array.dtype) == name:
        return array
    import ml_dtypes  # installed with TensorFlow and Keras

    return array.view(getattr(ml_dtypes, name))


def listing(cache: FeatureCache) -> str:
    """``tfstack cache list``: one line per entry, most recently used first, and the total."""
    entries = cache.entries()[::-1]
    lines = [f"feature cache {cache.root} (limit {cache.max_bytes / 1e9:.1f} GB)"]
    if entries:
        lines.append(f"  {'key':<32}  {'size':>9}  {'last used':<19}  what")
    for entry in entries:
        meta = entry.meta
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
        cut = ", ".join(meta.get("cut", []))
        what = f"{meta.get('model', '?')} [{cut}] on {meta.get('data', '?')}"
        lines.append(f"  {entry.key:<32}  {_size(entry.bytes):>9}  {used:<19}  {what}")
    total = sum(e.bytes for e in entries)
    lines.append(f"  {len(entries)} entries, {_size(total)}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
