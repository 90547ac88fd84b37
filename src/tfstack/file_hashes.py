"""The sha256 of a model file or a SavedModel directory, to record exactly what a run loaded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK_BYTES = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file, or of every file in a directory.

    A file's digest equals ``sha256sum FILE``. For a directory (a SavedModel), every regular
    file below it is read in sorted order of its relative POSIX path, and each contributes its
    relative path, a NUL byte and its bytes, so renaming, adding or changing a file changes the
    digest, while the directory's own location and file times do not.

    Args:
        path: A file or a directory.

    Returns:
        The hex digest (64 characters).

    Raises:
        OSError: The path or a file below it cannot be read.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(
            (file.relative_to(path).as_posix(), file) for file in path.rglob("*") if file.is_file()
        )
        for relative, file in files:
            digest.update(relative.encode() + b"\0")
            _update(digest, file)
    else:
        _update(digest, path)
    return digest.hexdigest()


def _update(digest, file: Path) -> None:
    with open(file, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
