"""One process per output directory: the lock every pipeline command holds on ``output_dir``.

Two processes writing one output directory would overwrite each other's models and checkpoints,
and could each take the other's RUNNING MLflow run for a killed one (`tfstack.pipeline.resume`). So
`run_all` and `run_stage` hold `exclusive` on ``output_dir`` for the whole command.

Part of the entry layer (it knows the ``output_dir`` convention, not Config).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tfstack.errors import OutputError

try:  # POSIX only; elsewhere two processes sharing an output directory are not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_FILE = ".tfstack-lock"


@contextlib.contextmanager
def exclusive(directory: Path, what: str = "output_dir") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for a block; refuse when another process has it.

    The lock is a ``flock`` on ``<directory>/.tfstack-lock``, released by the kernel when the
    process dies, so a killed run never leaves it behind. The file names the holder's process id
    while the lock is held, for the message another process shows.

    Args:
        directory: the directory to lock (created if missing).
        what: the config key the directory comes from, for messages.

    Raises:
        OutputError: another process holds the lock, or the directory cannot be written.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = Path(directory) / LOCK_FILE
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as err:
        raise OutputError(
            f"{what}={directory} cannot be written ({err}). Choose a directory you can write."
        ) from err
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            raise OutputError(
                f"{what}={directory} is in use by {holder}. Wait for it to finish, or give this "
                f"run its own {what}=... ."
            ) from err
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"tfstack process {os.getpid()}\n")
        lock_file.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_file.seek(0)
                lock_file.truncate()
            fcntl.flock(lock_file, fcntl.LOCK_UN)
