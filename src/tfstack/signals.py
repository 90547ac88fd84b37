"""Stopping on SIGTERM and SIGHUP as on Ctrl-C: the run ends KILLED, the checkpoint is kept.

``kill``, ``timeout``, Docker, SLURM and Kubernetes stop a process with SIGTERM, a closed terminal
sends SIGHUP. Python's default for both ends the process at once: no ``finally`` runs, so the
MLflow run stays RUNNING. `stop_on_signals` (installed by the ``tfstack`` command only; the
library never installs signal handlers) turns them into `Stopped`, a `KeyboardInterrupt`, so they
unwind exactly like Ctrl-C: every ``except KeyboardInterrupt`` / ``BaseException`` site already
ends the run KILLED and keeps the last per-epoch checkpoint, and a rerun of the same command
resumes from it.

Python runs a handler in the main thread between two bytecodes, so a signal that arrives while
TensorFlow runs a step in C++ takes effect when that step returns to Python: Keras's ``fit`` does
so after every batch, so the stop waits at most one batch (or one long C call, such as loading
a model).

Under ``dvc repro`` a stage is the child of the ``dvc`` process, which does not forward SIGTERM or
SIGHUP: ``kill <dvc pid>`` ends DVC alone and the stage would go on training, orphaned. With
`stop_with_parent` a stage process asks Linux to send it SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``). A signal sent to the whole process group (``timeout``, a terminal, SLURM)
reaches the stage directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)

# SIGINT keeps Python's own handler (KeyboardInterrupt); these are made to behave like it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# A repeated signal within this many seconds of the first is ignored, so the run being ended
# KILLED is not itself interrupted; after it, a repeat stops again (in case the first `Stopped`
# was swallowed, e.g. raised inside a `__del__`).
REPEAT_GRACE_S = 30.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when the process receives a stop signal (SIGTERM, SIGHUP).

    A `KeyboardInterrupt`, so it unwinds as Ctrl-C does: not caught by ``except Exception``.

    Attributes:
        signum: The signal's number.
        signal_name: Its name, e.g. "SIGTERM".
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


def signal_name(interrupt: BaseException) -> str:
    """The signal behind a `KeyboardInterrupt`: a `Stopped`'s own, else SIGINT (Ctrl-C)."""
    return getattr(interrupt, "signal_name", "SIGINT")


def exit_code(interrupt: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended (130 for SIGINT)."""
    return 128 + getattr(interrupt, "signum", int(signal.SIGINT))


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Raise `Stopped` in the main thread on each of ``signals`` while the block runs.

    The previous handlers are restored afterwards. Outside the main thread (where Python cannot
    install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def handler(signum: int, frame) -> None:
        now = time.monotonic()
        if first and now - first[0] < REPEAT_GRACE_S:
            logger.warning("%s again: already stopping", signal.Signals(signum).name)
            return
        first[:] = [now]
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_with_parent() -> None:
    """Receive SIGTERM when the parent process dies (Linux; elsewhere a no-op).

    For a DVC stage, whose parent ``dvc`` forwards no SIGTERM. If the parent is already gone
    (the process was re-parented before the request took effect), SIGTERM is sent now.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as err:
        logger.debug("cannot follow the parent process: %s", err)
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
