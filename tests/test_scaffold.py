"""`tfstack init` scaffolds tfstack into a user's own git repository: conf/ on top of the packaged
groups, a dvc.yaml of build -> train -> evaluate on the user's files, params.yaml, MLproject,
ignore entries and TFSTACK.md; then `dvc repro` and `dvc exp run -S` give complete runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_base, make_head
from project_copy import PACKAGED_CONF, wheel_env, wheel_venv

from tfstack import cli
from tfstack.pipeline.compose import compose_yaml
from tfstack.pipeline.scaffold import make_plan
from tfstack.png_files import write_gray_png

WRITTEN = [
    "conf/config.yaml",
    "conf/components/project.yaml",
    "conf/data/project.yaml",
    "dvc.yaml",
    "MLproject",
    "TFSTACK.md",
]


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def _dvc_ready(repo: Path) -> None:
    """A DVC set-up with Hydra enabled already, so init runs no `dvc` process."""
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text("[hydra]\n    enabled = true\n")


def _init(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["init", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_outside_a_git_repository_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _init(capsys)
    assert code == 2
    assert err.splitlines() == [
        f"tfstack: error: {tmp_path.resolve()} is not in a git repository; tfstack init needs "
        "one (DVC versions the pipeline in git). Run `git init` first."
    ]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_what_it_would_write_and_writes_nothing(tmp_path, monkeypatch, capsys):
    repo = _git_repo(tmp_path / "repo")
    (repo / ".gitignore").write_text("/mlflow.db\n")
    monkeypatch.chdir(repo)
    code, out, _ = _init(capsys, "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        "tfstack init --dry-run: nothing written. It would",
        "  run      dvc init -q",
        "  set      hydra.enabled = true in .dvc/config",
        *(f"  write    {name}" for name in WRITTEN),  # no params.yaml: placeholders to fill
        "  append   10 lines to .gitignore",  # /mlflow.db is there already
        "  append   5 lines to .dvcignore",
    ]
    assert sorted(p.name for p in repo.iterdir()) == [".git", ".gitignore"]
    assert (repo / ".gitignore").read_text() == "/mlflow.db\n"


def test_init_refuses_to_overwrite_unless_forced(tmp_path, monkeypatch, capsys):
    repo = _git_repo(tmp_path / "repo")
    _dvc_ready(repo)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "MLproject").write_text("name: mine\n")
    (repo / ".gitignore").write_text("/secrets")  # no final newline
    monkeypatch.chdir(repo)
    code, _, err = _init(capsys)
    assert code == 2
    assert err.splitlines() == [
        f"tfstack: error: tfstack init would overwrite dvc.yaml, MLproject in {repo.resolve()}. "
        "Move them away, or pass --force to replace them (--dry-run lists what it writes)."
    ]
    assert (repo / "dvc.yaml").read_text() == "stages: {}\n"
    assert not (repo / "conf").exists() and not (repo / ".dvcignore").exists()

    code, out, _ = _init(capsys, "--force")
    assert code == 0
    assert "tfstack init: wrote dvc.yaml (replaced)" in out.splitlines()
    assert "set the ??? values in conf/components/project.yaml, conf/data/project.yaml" in out
    assert all((repo / name).is_file() for name in WRITTEN)
    assert "${dvc_deps.base}" in (repo / "dvc.yaml").read_text()
    assert not (repo / "params.yaml").exists()  # composed once the placeholders are filled
    ignored = (repo / ".gitignore").read_text().splitlines()
    assert ignored[:3] == ["/secrets", "", "# tfstack (tfstack init)"]
    assert "/outputs/train/checkpoint/" in ignored
    components = yaml.safe_load((repo / "conf/components/project.yaml").read_text())
    assert components == {"defaults": ["default"], "base": {"path": "???"}, "head": {"path": "???"}}
    assert "Still to do: set the `???` values" in (repo / "TFSTACK.md").read_text()
    code, out, _ = _init(capsys, "--force")  # again: the ignore files have every entry
    assert code == 0 and "appended" not in out


def test_init_with_a_missing_file_names_the_option(tmp_path, monkeypatch, capsys):
    repo = _git_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    code, _, err = _init(capsys, "--base", "models/base.keras")
    assert code == 2
    assert err.startswith("tfstack: error: --base models/base.keras does not exist")
    assert sorted(p.name for p in repo.iterdir()) == [".git"]


def test_the_written_config_is_the_packaged_one_with_the_users_files(tmp_path):
    repo = _git_repo(tmp_path / "repo")
    (repo / "models").mkdir()
    (repo / "models" / "head.keras").write_bytes(b"")  # only its path is written, not read
    (repo / "arrays.npz").write_bytes(b"")
    base = "keras_applications:MobileNetV2"
    plan = make_plan(repo, base=base, head=str(repo / "models" / "head.keras"), data="arrays.npz")
    assert not plan.placeholders
    packaged = compose_yaml(
        PACKAGED_CONF,
        [
            f"components.base.path={base}",
            "components.head.path=models/head.keras",  # stored relative to the repository
            "data=npz",
            "data.path=arrays.npz",
        ],
    )
    assert plan.files["params.yaml"] == packaged


def _images(folder: Path, classes: int = 3, per_class: int = 8) -> None:
    """Class folders of 8x8 grayscale PNGs whose brightness is the class."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        (folder / f"class_{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (8, 8)) + 90 * label
            write_gray_png(folder / f"class_{label}" / f"{i}.png", pixels.astype(np.uint8))


@pytest.mark.slow
def test_wheel_then_init_dvc_repro_exp_run_promote_and_predict(tmp_path):
    # The "Done when", as a user types it: the wheel installed (not editable), then in an
    # empty git repository with two saved models and an image folder: tfstack init, dvc repro,
    # dvc exp run -S freeze=joint, tfstack promote --parent last, tfstack predict models:/...
    from mlflow.tracking import MlflowClient

    venv = wheel_venv(tmp_path / "install")
    environment = wheel_env(venv)

    def user(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            args, cwd=repo, env=environment, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done

    repo = _git_repo(tmp_path / "repo")
    (repo / "models").mkdir()
    make_base().save(repo / "models" / "base.keras")
    make_head(in_features=8, classes=3).save(repo / "models" / "head.keras")
    _images(repo / "images")
    args = ["--base", "models/base.keras", "--head", "models/head.keras", "--data", "images"]
    done = user("tfstack", "init", *args)
    assert "tfstack init: ran dvc init -q" in done.stdout
    where = user("python", "-c", "import tfstack; print(tfstack.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's tfstack, not the checkout's
    data = yaml.safe_load((repo / "conf" / "data" / "project.yaml").read_text())
    assert data["color_mode"] == "grayscale"  # read from the base's input, (8, 8, 1)
    assert data["test_fraction"] == 0.2  # images/ has no test/ folder
    # The project replaces the packaged train/default.yaml with a short, quiet copy.
    (repo / "conf" / "train").mkdir()
    text = (PACKAGED_CONF / "train" / "default.yaml").read_text()
    text = re.sub(
        r"(?m)^verbose: \d+", "verbose: 0", re.sub(r"(?m)^epochs: \d+", "epochs: 2", text)
    )
    (repo / "conf" / "train" / "default.yaml").write_text(text)
    user("tfstack", "params")
    user("git", "add", "-A")
    user("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "init")

    user("dvc", "repro")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {dep["path"] for dep in lock["stages"]["build"]["deps"]} >= {
        "models/base.keras",
        "models/head.keras",
        "images",
    }
    assert set(lock["stages"]) == {"build", "train", "evaluate"}
    user("dvc", "exp", "run", "-S", "freeze=joint")

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((run.info.status, run.data.tags["freeze"]) for run in runs) == [
        ("FINISHED", "frozen"),
        ("FINISHED", "joint"),
    ]
    for run in runs:
        assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
        assert run.data.params["data.path"] == "images"

    # The better of the two by its best epoch's val_accuracy becomes digits@champion.
    done = user("tfstack", "promote", "--parent", "last", "--name", "digits", "--alias", "champion")

    def rank(run) -> tuple[float, int]:  # the best epoch; a tie goes to the earlier run
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        return max(m.value for m in history), -run.info.start_time

    best = max(runs, key=rank)
    assert f"of run {best.info.run_id})" in done.stdout, done.stdout
    assert "picked as the best of the experiment's 2 runs (no sweep)" in done.stdout
    version = client.get_model_version_by_alias("digits", "champion")
    assert version.run_id == best.info.run_id and version.tags["freeze"] in ("frozen", "joint")

    done = user("tfstack", "predict", "models:/digits@champion", "images/", "--output", "p.csv")
    rows = (repo / "p.csv").read_text().splitlines()
    assert rows[0] == "path,label,p_class_0,p_class_1,p_class_2"
    assert len(rows) == 1 + 3 * 8  # every image of every class folder
    assert {row.split(",")[1] for row in rows[1:]} <= {"class_0", "class_1", "class_2"}
    assert all(row.startswith("images/class_") for row in rows[1:])
