"""Writing outputs so that nothing half-written is ever seen: write beside, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tfstack.errors import OutputError


def cannot_write(path: Path, err: OSError, key: str = "output_dir") -> OutputError:
    """The error for a file that cannot be written: which file, why, and the config key to fix."""
    return OutputError(
        f"Cannot write {path}: {err.strerror or err}. Check that the directory exists and is "
        f"writable (and that the disk has space), or set {key}=... to a directory you can write."
    )


@contextlib.contextmanager
def atomic_path(
    path: Path, *, error: Callable[[Path, OSError], OutputError] = cannot_write
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The one way tfstack writes a file someone may read: a reader (or a process killed
    mid-write) sees the old file or the new one, never part of one. Files are not fsync'ed
    (it cost more than a demo epoch): an operating-system crash may lose the newest file.

    Args:
        path: The file to write; its directory is created.
        error: Builds the error for a write that fails (default: `cannot_write`).

    Raises:
        OutputError: The file cannot be written (made by ``error``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as err:
        raise error(path, err) from err
    os.close(fd)
    os.unlink(tmp)  # Keras refuses to overwrite some formats; let the writer create it.
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise error(path, err) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
