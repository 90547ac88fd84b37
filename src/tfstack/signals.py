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
(``PR_SET_PDEATHSIG``), and, where the stage's shell stays between them (dash, Debian's
``/bin/sh``, when ``$SHELL`` is unset), waits on DVC's process itself (``pidfd_open``).
A signal sent to the whole process group (``timeout``, a terminal, SLURM) reaches the stage
directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
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
    install handlers) this does nothing. A signal the process was started ignoring keeps being
    ignored: under ``nohup tfstack run ...`` SIGHUP is ignored (a closed terminal must not stop
    the run), and a handler installed here would undo that.
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

    previous = {}
    for signum in signals:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# A stage's command runs in a shell: ``$SHELL -c CMD``, else ``/bin/sh -c CMD``. bash replaces
# itself with a lone command; dash (Debian's /bin/sh) does not, so it stays the stage's parent
# and outlives DVC. The process to follow is the nearest ancestor that is not one of these.
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "ash", "busybox"})
_POLL_S = 0.5  # how often the fallback watcher looks, where pidfd_open is unavailable


def _process(pid: int) -> tuple[str, str, int] | None:
    """``(name, state, parent pid)`` of a live process from ``/proc``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # "pid (name) state ppid ...": the name may itself hold spaces and parentheses.
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    if state in ("Z", "X"):  # exited, not yet reaped
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], state, int(ppid)


def ancestor_to_follow() -> int:
    """This process's nearest ancestor that is not a shell (its parent if that is not a shell)."""
    ancestor = os.getppid()
    while (found := _process(ancestor)) is not None and found[0] in SHELLS and found[2] > 1:
        ancestor = found[2]
    return ancestor


def _stop_when_gone(pid: int) -> None:
    """Send this process SIGTERM once ``pid`` exits (a daemon thread waits for it)."""
    me = os.getpid()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(me, signal.SIGTERM)
        return
    except (OSError, AttributeError):  # no pidfd (Linux < 5.3, a sandbox): look every _POLL_S
        pidfd = None

    def wait() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while _process(pid) is not None:
                time.sleep(_POLL_S)
        os.kill(me, signal.SIGTERM)

    threading.Thread(target=wait, name=f"tfstack-follow-{pid}", daemon=True).start()


def stop_with_parent() -> None:
    """Receive SIGTERM when the parent process dies (Linux; elsewhere a no-op).

    For a DVC stage, whose parent ``dvc`` forwards no SIGTERM. The parent is followed through
    the shell that runs the stage's command: where that shell stays (dash), the process followed
    is DVC above it. If the parent is already gone (the process was re-parented before the
    request took effect), SIGTERM is sent now.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    kernel_follows = True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as err:
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable, watching instead: %s", err)
        kernel_follows = False
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    ancestor = ancestor_to_follow()
    if ancestor != parent or not kernel_follows:
        logger.debug("following process %d above the shell %d", ancestor, parent)
        _stop_when_gone(ancestor)
