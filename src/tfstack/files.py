"""Writing outputs so that nothing half-written is ever seen: write beside, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tfstack.errors import OutputError


def cannot_write(path: Path, err: OSError, key: str = "output_dir") -> OutputError:
    """The error for a file that cannot be written: which file, why, and the config key to fix."""
    return OutputError(
        f"Cannot write {path}: {err.strerror or err}. Check that the directory exists and is "
        f"writable (and that the disk has space), or set {key}=... to a directory you can write."
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A reader (or a process killed mid-write) sees the old file or the new one, never part of
    one. Failures to write raise `OutputError` naming the file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as err:
        raise cannot_write(path, err) from err
    os.close(fd)
    os.unlink(tmp)  # Keras refuses to overwrite some formats; let the writer create it.
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise cannot_write(path, err) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
