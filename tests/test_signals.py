"""SIGTERM and SIGHUP stop a run as Ctrl-C does: one line, exit 128+N, run KILLED, resumable.

Each signal is sent to a real `tfstack run` and to a real `dvc repro` (to DVC's own process, as
`kill <pid>` does: DVC 3.67 forwards neither signal to its stage, which tfstack then learns of
through PR_SET_PDEATHSIG; and to DVC's whole process group, as a closed terminal or `timeout`
does, so the stage gets the signal itself) once the first epoch's checkpoint exists; the same
command then resumes into the same MLflow run and ends it FINISHED.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from project_copy import (
    CHECKPOINT_STATE,
    LONG_RUN,
    dvc_project,
    epochs_done,
    sh,
    start,
    tfstack,
    wait_for_checkpoint,
)

from tfstack import signals


def the_run(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    return run


def assert_stopped(project: Path, stderr: str, signum: int) -> None:
    name = signal.Signals(signum).name
    lines = [line for line in stderr.splitlines() if line.startswith("tfstack:")]
    expected = f"tfstack: stopped by {name}; the checkpoint after"
    assert lines and lines[-1].startswith(expected), lines
    assert "rerun to resume" in lines[-1] and "Traceback" not in stderr, stderr[-3000:]
    run = the_run(project)
    assert run.info.status == "KILLED" and run.data.tags["killed_by"] == name
    assert epochs_done(project) >= 1  # the checkpoint is kept


def assert_resumed(project: Path, result: subprocess.CompletedProcess, stopped_id: str) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    run = the_run(project)  # the same run, continued
    assert run.info.run_id == stopped_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_at_epoch"]) >= 1
    assert "killed_by" not in run.data.tags and "error" not in run.data.tags
    assert not (project / CHECKPOINT_STATE).exists()


# ---------------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_signal_raises_a_keyboard_interrupt_naming_it(signum, code):
    before = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt) as caught, signals.stop_on_signals():
        os.kill(os.getpid(), signum)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert isinstance(caught.value, signals.Stopped)
    assert signals.signal_name(caught.value) == signum.name
    assert signals.exit_code(caught.value) == code
    assert signal.getsignal(signum) is before  # restored


def test_a_signal_ignored_by_nohup_stays_ignored():
    # Before: the SIGHUP handler replaced nohup's SIG_IGN, so `nohup tfstack run ...` stopped
    # KILLED when the terminal closed.
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)  # no Stopped: the run goes on
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still handled
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_repeated_stop_signal_does_not_interrupt_the_unwinding():
    with pytest.raises(signals.Stopped), signals.stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        finally:  # e.g. ending the MLflow run KILLED, when a second SIGTERM arrives
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            cleaned_up = True
    assert cleaned_up
    assert signals.exit_code(KeyboardInterrupt()) == 130  # Ctrl-C


# A stage as DVC runs it: a parent (DVC) starts a shell that runs the command.
FOLLOWER = """
import pathlib, sys, time
from tfstack import signals
out = pathlib.Path(sys.argv[1])
with signals.stop_on_signals():
    try:
        signals.stop_with_parent()
        (out / "ready").touch()
        time.sleep(60)
    except signals.Stopped as stopped:
        (out / "stopped.tmp").write_text(stopped.signal_name)
        (out / "stopped.tmp").rename(out / "stopped")
"""
PARENT = """
import subprocess, sys, time
subprocess.Popen(sys.argv[1:])
time.sleep(60)
"""


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash", None], ids=["dash", "bash", "no-shell"])
def test_a_stage_is_stopped_when_its_parent_dies_whatever_shell_runs_it(tmp_path, shell):
    import shlex
    import sys

    out = tmp_path  # the follower touches "ready", then writes the signal's name to "stopped"
    follower = [sys.executable, "-c", FOLLOWER, str(out)]
    command = [shell, "-c", shlex.join(follower)] if shell else follower
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *command])
    try:
        deadline = time.monotonic() + 60
        while not (out / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "ready").exists()
        parent.kill()  # SIGKILL: nothing is forwarded; the shell (if it stays) lives on
        parent.wait()
        deadline = time.monotonic() + 20
        while not (out / "stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "stopped").read_text() == "SIGTERM"
    finally:
        parent.kill()


# ---------------------------------------------------------------------------------------------
# tfstack run
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_tfstack_run_stopped_by_a_signal_ends_killed_and_resumes(project, signum):
    process = start(project, "tfstack", "run", *LONG_RUN)
    try:
        wait_for_checkpoint(project, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert_stopped(project, stderr, signum)
    stopped = the_run(project).info.run_id
    assert_resumed(project, tfstack(project, "run", *LONG_RUN), stopped)


# ---------------------------------------------------------------------------------------------
# dvc repro
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_dvc_repro_stopped_by_a_signal_ends_killed_and_resumes(
    template, tmp_path, monkeypatch, signum
):
    # DVC runs the stage in $SHELL, else /bin/sh: bash execs the command, dash stays in between.
    monkeypatch.setenv("SHELL", "/bin/sh" if signum == signal.SIGTERM else "/bin/bash")
    project = dvc_project(template, tmp_path / "dvc", LONG_RUN)
    process = start(project, "dvc", "repro")  # stdout: the stages' output
    try:
        wait_for_checkpoint(project, process)
        process.send_signal(signum)  # to DVC alone: it dies of it, forwarding nothing
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == -signum
    # The stage, orphaned, still writes to DVC's pipes: its line arrives once it has stopped.
    deadline = time.monotonic() + 120
    while the_run(project).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_stopped(project, stdout + stderr, signal.SIGTERM)  # PR_SET_PDEATHSIG sends SIGTERM
    stopped = the_run(project).info.run_id
    assert_resumed(project, sh(project, "dvc", "repro"), stopped)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_dvc_repro_whose_process_group_gets_a_signal_ends_killed_by_it_and_resumes(
    template, tmp_path, monkeypatch, signum
):
    # A closed terminal sends SIGHUP to its foreground job's process group, `timeout` SIGTERM:
    # DVC, the shell between (dash) and the stage all get it. The stage's SIGTERM from
    # PR_SET_PDEATHSIG, once DVC is gone, arrives within the grace period and is ignored.
    monkeypatch.setenv("SHELL", "/bin/sh")
    project = dvc_project(template, tmp_path / "dvc", LONG_RUN)
    process = start(project, "dvc", "repro", own_group=True)
    try:
        wait_for_checkpoint(project, process)
        os.killpg(process.pid, signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0
    deadline = time.monotonic() + 120
    while the_run(project).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_stopped(project, stdout + stderr, signum)  # the stage names the signal it got
    stopped = the_run(project).info.run_id
    assert_resumed(project, sh(project, "dvc", "repro"), stopped)
