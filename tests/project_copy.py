"""Shrunk copies of the project for end-to-end tests (the pattern of test_pipeline's fixture).

`make_template` copies conf/, data/ and src/ under a directory, shrinks the config (one epoch,
two pretraining epochs, quiet Keras) and runs the demo's prepare and pretrain stages once;
`clone` then copies that template for one test in a fraction of a second, so each test starts
from a project whose demo components exist and whose MLflow store is empty.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The generic config groups, package data of tfstack (pkg://tfstack.conf); conf/ has the demo's.
PACKAGED_CONF = ROOT / "src" / "tfstack" / "conf"
VENV_BIN = Path(sys.executable).parent
PROJECT_FILES = ["conf", "data", "data.dvc", "dvc.yaml", "MLproject", "python_env.yaml", "src"]
TEMP_NAME = re.compile(r"^\.|\.tmp$|\.tfstack-probe")  # what an interrupted write would leave
CHECKPOINT_STATE = Path("outputs/train/checkpoint/state.json")
# Overrides of a run long enough to be stopped, or broken, mid-training.
LONG_EPOCHS = 40
LONG_RUN = [f"train.epochs={LONG_EPOCHS}", "tracking.log_model=false"]


def option_files(group: str, conf: Path = ROOT / "conf") -> list[Path]:
    """The files of a config group's options as Hydra finds them: ``conf``'s, then the packaged
    ones that ``conf`` does not replace."""
    found: dict[str, Path] = {}
    for directory in (conf / group, PACKAGED_CONF / group):
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return [found[name] for name in sorted(found)]


def shrink(project: Path) -> None:
    """One epoch everywhere, two pretraining epochs, quiet Keras: the real config, made small.

    The packaged train options are copied into the project's conf/train/, which Hydra searches
    first, and shrunk there.
    """
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("pretrain_epochs: 15", "pretrain_epochs: 2"))
    (project / "conf" / "train").mkdir(exist_ok=True)
    for source in option_files("train", project / "conf"):
        text = re.sub(r"(?m)^epochs: \d+", "epochs: 1", source.read_text())
        path = project / "conf" / "train" / source.name
        path.write_text(re.sub(r"(?m)^verbose: \d+", "verbose: 0", text))


def env() -> dict:
    """The environment of a `tfstack` subprocess: the venv first on PATH, no leaked MLflow URI."""
    environment = dict(os.environ)
    environment["PATH"] = f"{VENV_BIN}:{environment['PATH']}"
    environment["DVC_NO_ANALYTICS"] = "1"
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for leaked in ("TFSTACK_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        environment.pop(leaked, None)
    return environment


def tfstack(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `tfstack` command in ``project``."""
    return subprocess.run(
        [str(VENV_BIN / "tfstack"), *args],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_template(directory: Path) -> Path:
    """A shrunk project copy with the demo's prepared data and pretrained components."""
    project = directory / "template"
    project.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        elif source.exists():
            shutil.copy2(source, project / name)
    shrink(project)
    for stage in ("prepare", "pretrain"):
        result = tfstack(project, stage)
        assert result.returncode == 0, result.stderr[-3000:]
    return project


def clone(template: Path, destination: Path) -> Path:
    """A copy of the template for one test (src/ is not needed: tfstack runs from the venv)."""
    shutil.copytree(template, destination, ignore=shutil.ignore_patterns("src", "mlflow.db*"))
    return destination


def leftovers(directory: Path) -> list[Path]:
    """Temporary files an interrupted or failed write would leave behind."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and TEMP_NAME.search(p.name) and p.name != ".tfstack-lock"
    )


def start(project: Path, *command: str, own_group: bool = False) -> subprocess.Popen:
    """Start ``command`` (e.g. ``tfstack run ...``, ``dvc repro``) in ``project``, stderr piped.

    With ``own_group`` it leads a process group of its own (as a terminal's foreground job), so
    `os.killpg` reaches it and its children, not the tests.
    """
    executable = str(VENV_BIN / command[0]) if (VENV_BIN / command[0]).exists() else command[0]
    return subprocess.Popen(
        [executable, *command[1:]],
        cwd=project,
        env=env(),
        stdout=subprocess.PIPE if command[0] == "dvc" else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_group,
        preexec_fn=_default_stop_signals,
    )


def _default_stop_signals() -> None:
    """In the child: SIGTERM and SIGHUP end it by default, as under a terminal, even when the
    tests run under nohup (whose ignored SIGHUP the child would inherit)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def epochs_done(project: Path) -> int:
    """The epochs the training checkpoint holds (0 before the first, or after its removal)."""
    try:
        return json.loads((project / CHECKPOINT_STATE).read_text())["epochs_done"]
    except (FileNotFoundError, ValueError):
        return 0


def wait_for_checkpoint(project: Path, process: subprocess.Popen, epochs: int = 1) -> None:
    """Wait until the running ``process`` has checkpointed ``epochs`` epochs."""
    deadline = time.monotonic() + 600
    while epochs_done(project) < epochs:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint of {epochs} epochs within 600 s"
        time.sleep(0.02)


def sh(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command (git, dvc, tfstack) in ``project``; it must succeed."""
    result = subprocess.run(args, cwd=project, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, (args, result.stderr[-3000:])
    return result


def dvc_project(template: Path, destination: Path, overrides: list[str] = ()) -> Path:
    """A git + DVC copy whose prepare and pretrain stages are committed (not rerun)."""
    shutil.copytree(template, destination, ignore=shutil.ignore_patterns("mlflow.db*"))
    shutil.copy2(ROOT / ".gitignore", destination / ".gitignore")
    sh(destination, "git", "init", "-q")
    sh(destination, "git", "config", "user.email", "ci@example.com")
    sh(destination, "git", "config", "user.name", "ci")
    sh(destination, "dvc", "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", destination / ".dvc" / "config")
    sh(destination, "tfstack", "params", *overrides)
    sh(destination, "dvc", "commit", "-q", "-f", "data.dvc", "prepare", "pretrain")
    sh(destination, "git", "add", "-A")
    sh(destination, "git", "commit", "-q", "-m", "project copy")
    return destination


def wheel_venv(tmp_path: Path) -> Path:
    """A venv with tfstack's wheel installed (not editable) and the test venv's packages behind,
    as ``pip install tfstack-*.whl`` gives a user (the dependencies come from the test venv, as
    this machine reaches no index with TensorFlow's wheels in the test's time).

    The wheel is built from a copy of the sources (no stale build/ of the checkout). A ``.pth``
    line appends this interpreter's site-packages after the fresh venv's own: the installed
    wheel's tfstack comes first, and the ``.pth`` files of the appended directory (the editable
    install of the checkout) are not processed.
    """
    sources = tmp_path / "sources"
    shutil.copytree(
        ROOT / "src", sources / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, sources / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    subprocess.run([*build, str(sources)], check=True, capture_output=True, timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("tfstack-*.whl"))
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=600)
    return venv


def wheel_env(venv: Path) -> dict:
    """`env()` with the wheel's venv first on PATH and no checkout src/ on PYTHONPATH."""
    environment = env()
    environment.pop("PYTHONPATH", None)  # the checkout's src/ must not shadow the wheel
    environment["PATH"] = f"{venv / 'bin'}:{environment['PATH']}"
    return environment
