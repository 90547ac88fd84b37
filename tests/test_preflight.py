"""Checks that need no TensorFlow run before any MLflow run is created (issue 11, point 9).

Unit tests of `tfstack.pipeline.preflight` on real files, directories and devices; then the
`tfstack` command itself in a subprocess: a mistyped optimizer, a missing data file and a missing
component file each exit 2 with one line naming the key, leave no run in the MLflow store (not
even FAILED), and leave TensorFlow unimported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from project_copy import env

from tfstack import components
from tfstack.errors import ComponentError, DataError
from tfstack.pipeline import Paths, preflight
from tfstack.pipeline.compose import compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture
def paths(tmp_path):
    return Paths(root=tmp_path, out=tmp_path / "outputs")


def _npz(path: Path) -> Path:
    x = np.zeros((4, 8, 8, 1), "float32")
    y = np.zeros(4, "int64")
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


def test_constants_agree_with_the_loader():
    assert preflight.APPLICATIONS_PREFIX == components.APPLICATIONS_PREFIX
    assert preflight.MODEL_FILE_EXTENSIONS == components.KERAS_EXTENSIONS + components.H5_EXTENSIONS
    assert preflight.SAVEDMODEL_FILES == components.SAVEDMODEL_FILES


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing.npz", "data.path=missing.npz does not exist"),
        # Before: "no such file" for both.
        ("a_directory", "data.path=a_directory is a directory, not a file. Expected an .npz"),
        ("/dev/null", "data.path=/dev/null is a character device, not a file. Expected an .npz"),
    ],
)
def test_data_path_must_be_a_file(paths, value, message):
    (paths.root / "a_directory").mkdir()
    with pytest.raises(DataError) as err:
        preflight.check_data_path(value, paths)
    assert str(err.value).startswith(message)


def test_an_existing_data_file_passes(paths):
    _npz(paths.root / "data.npz")
    preflight.check_data_path("data.npz", paths)  # relative to the project root


@pytest.mark.parametrize(
    ("overrides", "make", "message"),
    [
        (["components.base.path=no.keras"], None, "components.base.path=no.keras does not exist"),
        (["components.head.path=/dev/zero"], None, "components.head.path=/dev/zero is a character"),
        (
            ["components.base.path=model.txt"],
            "model.txt",
            "components.base.path=model.txt has extension '.txt'",
        ),
        (
            ["components.base.path=exported"],
            "exported/",
            "components.base.path=exported is a directory but not",
        ),
        (
            [
                "components.base.path=keras_applications:MobileNetV2",
                "components.base.weights=w.h5",
            ],
            None,
            "components.base.weights='w.h5' is neither imagenet nor a local file",
        ),
        (["+components.extra.second.path=x.h5"], None, "components.extra.second.path=x.h5 does"),
    ],
)
def test_component_paths_are_checked(paths, overrides, make, message):
    if make and make.endswith("/"):
        (paths.root / make).mkdir()
        (paths.root / make / "notes.txt").write_text("not a model")
    elif make:
        (paths.root / make).write_text("not a model")
    for name in ("base.keras", "head.keras"):
        (paths.root / name).write_bytes(b"")
    defaults = ["components.base.path=base.keras", "components.head.path=head.keras"]
    config = compose(defaults + overrides, config_dir=CONF)
    with pytest.raises(ComponentError) as err:
        preflight.check_inputs(config, paths, stage="build")
    assert str(err.value).startswith(message)


def test_savedmodel_directories_and_applications_pass(paths):
    (paths.root / "exported").mkdir()
    (paths.root / "exported" / "saved_model.pb").write_bytes(b"")
    (paths.root / "head.h5").write_bytes(b"")
    config = compose(
        ["components.base.path=exported", "components.head.path=head.h5"], config_dir=CONF
    )
    preflight.check_inputs(config, paths, stage="build")
    config = compose(["components.base.path=keras_applications:MobileNetV2"], config_dir=CONF)
    preflight.check_inputs(config, paths, stage="build", skip=frozenset({"components.head.path"}))


def test_each_stage_checks_what_it_reads(paths):
    _npz(paths.root / "data.npz")
    config = compose(["data=npz", "data.path=data.npz"], config_dir=CONF)
    # build reads the components only; train and evaluate the data and the earlier output.
    with pytest.raises(ComponentError):
        preflight.check_inputs(config, paths, stage="build")
    with pytest.raises(DataError, match=r"build/stacked.keras is missing; run the build stage"):
        preflight.check_inputs(config, paths, stage="train")
    with pytest.raises(DataError, match=r"train/model.keras is missing; run the train stage"):
        preflight.check_inputs(config, paths, stage="evaluate")
    for stage in ("prepare", "pretrain"):
        preflight.check_inputs(config, paths, stage=stage)


@pytest.mark.slow
def test_the_demos_inputs_are_left_to_the_demo():
    config = compose([], config_dir=CONF)
    assert preflight.made_by_demo(config) == {
        "data.path",
        "components.base.path",
        "components.head.path",
    }
    mine = compose(["components.base.path=mine.keras"], config_dir=CONF)
    assert "components.base.path" not in preflight.made_by_demo(mine)
    assert (
        preflight.made_by_demo(compose(["data=npz", "data.path=x.npz"], config_dir=CONF)) == set()
    )


# ---------------------------------------------------------------------------------------------
# The command: exit 2, one line, no run in the store, no TensorFlow import
# ---------------------------------------------------------------------------------------------

PROBE = """
import sys, time
from tfstack import cli
start = time.perf_counter()
code = cli.main(sys.argv[1:])
print("seconds", time.perf_counter() - start)
print("imported", "tensorflow" in sys.modules, "mlflow" in sys.modules)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """conf/ and a small real dataset: nothing that needs TensorFlow to make."""
    project = tmp_path_factory.mktemp("preflight")
    shutil.copytree(CONF, project / "conf")
    _npz(project / "data.npz")
    return project


def _runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.optimizer=nosuch"], "train.optimizer='nosuch' is not a Keras optimizer"),
        (["data=npz", "data.path=missing.npz"], "data.path=missing.npz does not exist"),
        (["components.base.path=missing.keras"], "components.base.path=missing.keras does not"),
    ],
    ids=["optimizer", "data", "component"],
)
def test_a_typo_fails_before_any_run_and_before_tensorflow(project, tmp_path, overrides, key):
    db = tmp_path / "mlflow.db"
    args = ["run", *overrides, f"tracking.uri=sqlite:///{db}", f"output_dir={tmp_path / 'out'}"]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=project,
        env={**env(), "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("tfstack: error: ")]
    assert len(lines) == 1 and key in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "imported False False" in result.stdout, result.stdout
    assert _runs(db) == []  # not even a FAILED one
    print(f"{overrides}: {wall:.2f} s wall, {result.stdout.split()[1]} s in cli.main")


@pytest.mark.slow
def test_the_tfstack_command_fails_fast_on_a_missing_data_file(project, tmp_path):
    db = tmp_path / "mlflow.db"
    start = time.perf_counter()
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "tfstack"),
            "run",
            "data=npz",
            "data.path=/dev/null",
            f"tracking.uri=sqlite:///{db}",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("tfstack: error: data.path=/dev/null is a character device, not a file")
    )
    assert _runs(db) == []
    print(f"tfstack run data.path=/dev/null: {wall:.2f} s")
