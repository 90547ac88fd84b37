"""A tracking store that fails during a run stops it within one epoch, in one line, resumably.

End to end, against a real `tfstack run`, once the first epoch's checkpoint exists: the sqlite
file is deleted, the sqlite file is made read-only (`chattr +i` as root, whom file permissions do
not stop; `chmod 0444` otherwise), and an `mlflow server` is stopped. Each time the run stops
with exit code 2 and one `tfstack: error:` line naming the store and the fix, no traceback, the
checkpoint kept; once the store is back, the same command resumes the run and finishes it.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from project_copy import (
    LONG_EPOCHS,
    LONG_RUN,
    VENV_BIN,
    env,
    epochs_done,
    start,
    tfstack,
    wait_for_checkpoint,
)

from tfstack import tracking


def break_mid_run(project: Path, overrides: list[str], break_store: Callable[[], None]):
    """Run `tfstack run`, break the store after the first checkpoint; (code, stderr, epoch)."""
    process = start(project, "tfstack", "run", *overrides)
    try:
        wait_for_checkpoint(project, process)
        break_store()
        broken_at = epochs_done(project)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stderr, broken_at


def assert_one_line(stderr: str, uri: str, problem: str, fix: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("tfstack:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-4000:]
    (line,) = lines
    assert line.startswith(f"tfstack: error: tracking.uri={uri} failed during the run"), line
    assert problem in line and fix in line, line
    assert "stays RUNNING" in line and "the checkpoint after epoch" in line, line


def assert_stopped_within_one_epoch(project: Path, broken_at: int) -> None:
    # The epoch running when the store broke may finish; the next one does not start.
    assert broken_at <= epochs_done(project) <= broken_at + 2, (broken_at, epochs_done(project))
    assert not (project / "outputs/train/model.keras").exists()


def assert_resumed(client: MlflowClient, result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_at_epoch"]) >= 1
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(LONG_EPOCHS))  # each epoch logged once


# ---------------------------------------------------------------------------------------------
# In process: the probe and what follows it
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_deleted_sqlite_store_is_noticed_and_never_written_again(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    with pytest.raises(tracking.StoreLostError) as caught:
        with tracking.tracked_run(uri, "lost") as run_id:
            tracking.check_store(run_id)  # fine while the file is there
            db.unlink()
            tracking.check_store(run_id, "after epoch 3")
    message = str(caught.value)
    assert f"tracking.uri={uri} failed during the run (after epoch 3 of run {run_id})" in message
    assert "was deleted" in message and "Restore the file" in message
    assert not db.exists()  # ending the run FAILED did not create an empty store in its place
    with pytest.raises(tracking.StoreLostError):
        tracking.log_metrics(run_id, {"loss": 1.0})
    assert not db.exists()


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sqlite_store_deleted_mid_run(project):
    db = project / "mlflow.db"
    backup = project / "backup.db"

    def delete():
        with sqlite3.connect(db) as source, sqlite3.connect(backup) as copy:
            source.backup(copy)  # a consistent copy, as a backup would be
        db.unlink()

    code, stderr, broken_at = break_mid_run(project, LONG_RUN, delete)
    assert code == 2
    uri = f"sqlite:///{db}"
    assert_one_line(stderr, uri, f"the sqlite file {db} was deleted", "Restore the file")
    assert_stopped_within_one_epoch(project, broken_at)
    assert not db.exists()
    os.replace(backup, db)
    assert_resumed(MlflowClient(uri), tfstack(project, "run", *LONG_RUN))


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_sqlite_store_made_read_only_mid_run(project):
    db = project / "mlflow.db"
    as_root = os.geteuid() == 0  # root writes a 0444 file: only an immutable one stops it

    def make_read_only():
        if as_root:
            assert _chattr("+i", db), "chattr +i failed (file system without attributes?)"
        else:
            db.chmod(0o444)

    try:
        code, stderr, broken_at = break_mid_run(project, LONG_RUN, make_read_only)
    finally:
        if as_root:
            _chattr("-i", db)
    assert code == 2
    uri = f"sqlite:///{db}"
    problem = f"the sqlite file {db} or its directory became read-only"
    assert_one_line(stderr, uri, problem, "Make both writable again")
    assert_stopped_within_one_epoch(project, broken_at)
    db.chmod(0o644)
    assert_resumed(MlflowClient(uri), tfstack(project, "run", *LONG_RUN))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(directory: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination",
            str(directory / "artifacts"),
        ],
        cwd=directory,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers too are stopped with its process group
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "no mlflow server"
            time.sleep(0.5)


def _stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, 9)
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_tracking_server_stopped_mid_run(project, tmp_path):
    directory = tmp_path / "server"
    directory.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    overrides = [*LONG_RUN, f"tracking.uri={uri}"]
    server = _start_server(directory, port)
    try:
        code, stderr, broken_at = break_mid_run(project, overrides, lambda: _stop_server(server))
        assert code == 2
        assert_one_line(stderr, uri, "the tracking server stopped answering", "Start the server")
        assert_stopped_within_one_epoch(project, broken_at)
        server = _start_server(directory, port)
        resumed = tfstack(project, "run", *overrides)
        assert_resumed(MlflowClient(f"sqlite:///{directory / 'mlflow.db'}"), resumed)
    finally:
        _stop_server(server)
