"""tfstack's config groups are package data (pkg://tfstack.conf): `tfstack run` works in a
directory without conf/, and a project's conf/ adds options to the packaged groups or replaces
them. The slow test installs the wheel (not editable) into a fresh venv and runs there."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_base, make_data, make_head
from project_copy import PACKAGED_CONF, ROOT, wheel_env, wheel_venv

from tfstack.errors import ConfigError
from tfstack.pipeline.compose import compose, compose_yaml
from tfstack.pipeline.conf_dirs import SEARCHPATH

MINE = """\
defaults:
  - default
base:
  path: models/base.keras
head:
  path: models/head.keras
"""
# A project's own partial.yaml replaces the packaged one (which unfreezes the last 2 layers).
PARTIAL = """\
policy: partial
unfreeze_last: 1
unfreeze_pattern: null
bn: freeze
components: null
"""


def _project_conf(root: Path, *, searchpath: bool = True) -> Path:
    """A project conf/: the packaged primary config (components: mine) and two options."""
    conf = root / "conf"
    (conf / "components").mkdir(parents=True)
    (conf / "freeze").mkdir()
    (conf / "components" / "mine.yaml").write_text(MINE)
    (conf / "freeze" / "partial.yaml").write_text(PARTIAL)
    text = (PACKAGED_CONF / "config.yaml").read_text()
    text = text.replace("components: default", "components: mine")
    if searchpath:
        text += f"hydra:\n  searchpath:\n    - {SEARCHPATH}\n"
    (conf / "config.yaml").write_text(text)
    return conf


def test_without_conf_the_packaged_config_composes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = ["components.base.path=b.keras", "components.head.path=h.keras", "data.path=pics"]
    config = compose(mine, config_dir="conf")
    assert (config.data.format, config.data.path) == ("images", "pics")
    assert (config.freeze.policy, config.stacking.strategy, config.schedule.name) == (
        "frozen",
        "sequential",
        "single",
    )
    assert yaml.safe_load(compose_yaml("conf", mine))["dvc_deps"]["base"] == "b.keras"
    with pytest.raises(ConfigError, match=r"^components.base.path is not set"):
        compose(["data.path=pics"], config_dir="conf")


def test_a_project_conf_adds_options_and_replaces_packaged_ones(tmp_path):
    conf = _project_conf(tmp_path)
    config = compose(["data.path=pics"], config_dir=conf)
    assert config.components.base.path == "models/base.keras"  # conf/components/mine.yaml
    assert config.components.head.name == "head"  # from the packaged default it extends
    assert config.freeze.policy == "frozen"  # packaged
    partial = compose(["freeze=partial", "data.path=pics"], config_dir=conf)
    assert partial.freeze.unfreeze_last == 1  # conf/freeze/partial.yaml replaces the packaged
    with pytest.raises(ConfigError) as err:
        compose(["components=nosuch"], config_dir=conf)
    assert str(err.value) == (
        "components=nosuch is not an option of config group 'components'. "
        f"Options: ['default', 'mine'] (files in {conf / 'components'} and "
        f"{PACKAGED_CONF.resolve() / 'components'})."
    )


def test_the_repository_conf_lists_its_own_and_the_packaged_options():
    with pytest.raises(ConfigError, match=r"Options: \['default', 'demo', 'demo_wide'\]"):
        compose(["components=nosuch"], config_dir=ROOT / "conf")


def test_a_conf_that_does_not_search_the_package_says_how_to_fix_it(tmp_path):
    conf = _project_conf(tmp_path, searchpath=False)
    unsearched = r"^\w+=\w+ is one of tfstack's packaged options, which .*config.yaml does not"
    with pytest.raises(ConfigError, match=unsearched):
        compose([], config_dir=conf)
    (conf / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"has no config.yaml. Run `tfstack init`"):
        compose([], config_dir=conf)
    with pytest.raises(ConfigError, match=r"--config-dir .*elsewhere does not exist"):
        compose([], config_dir=tmp_path / "elsewhere")


@pytest.mark.slow
def test_the_installed_wheel_runs_in_a_directory_without_conf(tmp_path):
    from mlflow.tracking import MlflowClient

    venv = wheel_venv(tmp_path)
    environment = wheel_env(venv)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import tfstack.conf; print(tfstack.conf.__file__)"],
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    make_base().save(work / "models" / "base.keras")
    make_head(in_features=8, classes=3).save(work / "models" / "head.keras")
    x, y = make_data(n=36)
    np.savez(work / "data.npz", x_train=x[:24], y_train=y[:24], x_test=x[24:], y_test=y[24:])
    store = f"sqlite:///{work / 'runs.db'}"
    done = subprocess.run(
        [
            str(venv / "bin" / "tfstack"),
            "run",
            "components.base.path=models/base.keras",
            "components.head.path=models/head.keras",
            "data=npz",
            "data.path=data.npz",
            "preprocess=none",
            "train.epochs=1",
            "train.verbose=0",
            "tracking.log_model=false",
            f"tracking.uri={store}",
        ],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (work / "conf").exists()
    runs = MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()]
    )
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert 0.0 <= runs[0].data.metrics["test_accuracy"] <= 1.0
    assert runs[0].data.params["freeze.policy"] == "frozen"

    # The wheel carries tfstack init's templates too: the scaffold of this directory composes.
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    files = ["--base", "models/base.keras", "--head", "models/head.keras", "--data", "data.npz"]
    done = subprocess.run(
        [str(venv / "bin" / "tfstack"), "init", *files],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["dvc_deps"]["base"] == "models/base.keras"
    assert params["data"]["format"] == "npz"
    assert "pkg://tfstack.conf" in (work / "conf" / "config.yaml").read_text()
