"""The catalogue of bad inputs, end to end through the `tfstack` command (README, "When something
is wrong").

Every case runs `tfstack.cli.main` in a copy of the project (the demo already prepared and
pretrained) and checks what a user sees and what is left behind: exit code 2, one
``tfstack: error: ...`` line naming the file or config key and the fix, no traceback, no
temporary or half-written file in ``outputs/``, no output of the stages that did not complete,
and no MLflow run left RUNNING (a run that started ends FAILED with the ``error`` tag).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from project_copy import leftovers

from tfstack import cli

STAGE_OUTPUTS = ("build", "train", "evaluate")


def fail(capsys, *args: str) -> str:
    """Run the command, expect exit code 2 and one short error line; return that line."""
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("tfstack: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def runs(project: Path) -> list:
    db = project / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def assert_left_clean(project: Path, *, completed=(), run: bool = True) -> None:
    """Nothing half-written, no output of a stage that did not complete, no run RUNNING."""
    outputs = project / "outputs"
    assert not leftovers(outputs), leftovers(outputs)
    for stage in STAGE_OUTPUTS:
        if stage not in completed:
            assert not (outputs / stage).exists() or not any((outputs / stage).rglob("*.*")), (
                f"outputs/{stage} was written: {sorted((outputs / stage).rglob('*'))}"
            )
    recorded = runs(project)
    assert all(r.info.status != "RUNNING" for r in recorded)
    if run:
        assert [r.info.status for r in recorded] == ["FAILED"]
        assert recorded[0].data.tags["error"]
    else:
        assert recorded == []


def tiny_head(path: Path, *layers, inputs=(32,), dtype="float32") -> Path:
    model = keras.Sequential(
        [keras.Input(inputs, dtype=dtype), *layers, keras.layers.Dense(5, activation="softmax")]
    )
    model.save(path)
    return path


def digits_like(project: Path, name: str, **changes) -> Path:
    """The demo's target task with some arrays replaced."""
    with np.load(project / "outputs" / "prepare" / "target.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    np.savez(project / name, **arrays)
    return project / name


# ---------------------------------------------------------------------------------------------
# Component files
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_component_file(project, capsys):
    line = fail(capsys, "run", "components.base.path=models/missing.keras")
    assert "components.base.path=" in line and "missing.keras does not exist" in line
    assert "Fix the path" in line
    # Found before any run starts (and before TensorFlow is imported).
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_truncated_keras_file(project, capsys):
    whole = (project / "outputs" / "pretrain" / "base.keras").read_bytes()
    (project / "cut.keras").write_bytes(whole[: len(whole) // 3])
    line = fail(capsys, "run", "components.base.path=cut.keras")
    assert "components.base.path=" in line and "not a readable .keras file" in line
    assert "truncated or corrupt" in line
    assert_left_clean(project)


@pytest.mark.slow
def test_truncated_h5_file(project, capsys):
    tiny_head(project / "head.h5")
    whole = (project / "head.h5").read_bytes()
    (project / "head.h5").write_bytes(whole[: len(whole) // 2])
    line = fail(capsys, "run", "components.head.path=head.h5")
    assert "components.head.path=" in line and "not a readable HDF5 file" in line
    assert_left_clean(project)


@pytest.mark.slow
def test_h5_with_weights_only(project, capsys):
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(5)])
    model.save_weights(project / "head.weights.h5")
    shutil.copy(project / "head.weights.h5", project / "head.h5")
    line = fail(capsys, "run", "components.head.path=head.h5")
    assert "holds no model" in line and "weights only" in line
    assert "model.save('model.keras')" in line
    assert_left_clean(project)


@pytest.mark.slow
def test_h5_that_is_not_a_model(project, capsys):
    with h5py.File(project / "table.h5", "w") as file:
        file["values"] = np.arange(10)
    line = fail(capsys, "run", "components.head.path=table.h5")
    assert "components.head.path=" in line and "holds no model" in line
    assert_left_clean(project)


@pytest.mark.slow
def test_directory_that_is_not_a_savedmodel(project, capsys):
    (project / "exported").mkdir()
    (project / "exported" / "notes.txt").write_text("not a model")
    line = fail(capsys, "run", "components.base.path=exported")
    assert "is a directory but not a TensorFlow SavedModel" in line and "notes.txt" in line
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_lambda_layer_in_an_untrusted_file(project, capsys):
    tiny_head(project / "head.keras", keras.layers.Lambda(lambda t: t * 2, name="double"))
    line = fail(capsys, "run", "components.head.path=head.keras")
    assert "Lambda layer (double)" in line and "safe_mode=True" in line
    assert "components.head.trust_code=true" in line
    assert_left_clean(project)


@pytest.mark.slow
def test_trust_code_allows_the_lambda_of_that_component_only(project, capsys):
    tiny_head(project / "head.keras", keras.layers.Lambda(lambda t: t * 2, name="double"))
    overrides = ["components.head.path=head.keras", "tracking=none"]
    assert cli.main(["run", *overrides, "components.head.trust_code=true"]) == 0
    assert (project / "outputs" / "train" / "model.keras").is_file()
    # Trust is per component: the base's flag does not cover the head's file.
    line = fail(capsys, "run", *overrides, "components.base.trust_code=true")
    assert "components.head.trust_code=true" in line


@pytest.mark.slow
def test_sequential_without_a_defined_input(project, capsys):
    keras.Sequential([keras.layers.Dense(5)]).save(project / "head.keras")
    line = fail(capsys, "run", "components.head.path=head.keras")
    assert "no defined input" in line and "keras.Input(shape=...)" in line
    assert_left_clean(project)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["components.head.path=outputs/pretrain/head_wide.keras"], ["(None, 64)", "(None, 32)"]),
        (["components.base.cut_at=conv2"], ["(None, 8, 8, 32)", "rank 4 != 2"]),
        (["components.head.path=int_head.keras"], ["dtype float32 != int32"]),
    ],
    ids=["shape", "rank", "dtype"],
)
@pytest.mark.slow
def test_incompatible_components_with_stacking_sequential(project, capsys, overrides, expected):
    tiny_head(project / "int_head.keras", dtype="int32")
    line = fail(capsys, "run", "stacking=sequential", *overrides)
    for text in expected:
        assert text in line
    assert "stacking=adapter" in line
    assert_left_clean(project)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stacking=nosuch", "stacking=nosuch is not an option of config group 'stacking'"),
        ("train.epoch=3", "Did you mean train.epochs?"),
        ("trian.lr=3", "trian is not a config key. Did you mean train?"),
        ("schedule.lr_multipliers.base=0.1", "+schedule.lr_multipliers.base=0.1"),
        ("train.resume=sometimes", "train.resume='sometimes' is not valid"),
        ("seed=-1", "seed=-1 must be between 0 and 2**32 - 1"),
        ("train.loss=nosuch", "train.loss='nosuch' is not a Keras loss"),
        ("components.base.name=../../etc", "is not a valid component name"),
        ("output_dir=../elsewhere", "output_dir=../elsewhere leaves the project root"),
    ],
)
def test_bad_config(project, capsys, override, expected):
    line = fail(capsys, "run", override)
    assert expected in line
    # Every one of these is found before any run starts, Keras names included.
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_debug_and_hydra_full_error_show_the_traceback(project, capsys, monkeypatch):
    from tfstack.errors import ConfigError

    with pytest.raises(ConfigError, match="stacking=nosuch"):
        cli.main(["--debug", "run", "stacking=nosuch"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="stacking=nosuch"):
        cli.main(["run", "stacking=nosuch"])


# ---------------------------------------------------------------------------------------------
# Freeze policies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("'[unclosed'", "is not a valid regex"), ("'^zzz$'", "matches no layer")],
    ids=["invalid", "no-match"],
)
@pytest.mark.slow
def test_freeze_pattern(project, capsys, pattern, expected):
    line = fail(
        capsys,
        "run",
        "freeze=partial",
        "freeze.unfreeze_last=null",
        f"freeze.unfreeze_pattern={pattern}",
    )
    assert "freeze.unfreeze_pattern=" in line and expected in line
    if pattern == "'[unclosed'":  # a regex is checked with the config, before any run
        assert_left_clean(project, run=False)
    else:  # matching needs the model's layers
        assert_left_clean(project, completed=("build",))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_empty_dataset(project, capsys):
    empty = np.zeros((0, 8, 8, 1), "float32")
    digits_like(project, "empty.npz", x_train=empty, y_train=np.zeros(0, "int64"))
    line = fail(capsys, "run", "data=npz", "data.path=empty.npz")
    assert "data.path=" in line and "the train split is empty" in line
    assert_left_clean(project, completed=("build",))


@pytest.mark.slow
def test_empty_validation_split(project, capsys):
    line = fail(capsys, "run", "data.val_fraction=0.001")
    assert "the validation split would be empty" in line and "data.val_fraction" in line
    assert_left_clean(project, completed=("build",))


@pytest.mark.slow
def test_labels_outside_the_heads_classes(project, capsys):
    with np.load(project / "outputs" / "prepare" / "target.npz") as data:
        y = data["y_train"] + 3  # 3..7 for a 5-way head
    digits_like(project, "labels.npz", y_train=y)
    line = fail(capsys, "run", "data=npz", "data.path=labels.npz")
    assert "labels [5, 6, 7] do not fit the head, which has 5 outputs" in line
    assert_left_clean(project, completed=("build",))


@pytest.mark.slow
def test_samples_of_another_shape_than_the_model_takes(project, capsys):
    with np.load(project / "outputs" / "prepare" / "target.npz") as data:
        x_train, x_test = data["x_train"], data["x_test"]
    digits_like(
        project,
        "big.npz",
        x_train=np.repeat(np.repeat(x_train, 2, axis=1), 2, axis=2),
        x_test=np.repeat(np.repeat(x_test, 2, axis=1), 2, axis=2),
    )
    line = fail(capsys, "run", "data=npz", "data.path=big.npz")
    assert "holds samples of shape (16, 16, 1), but the stacked model takes (8, 8, 1)" in line
    assert_left_clean(project, completed=("build",))


@pytest.mark.slow
def test_non_finite_loss_stops_at_once_and_names_the_epoch(project, capsys):
    with np.load(project / "outputs" / "prepare" / "target.npz") as data:
        x = data["x_train"].astype(np.float32)
    x[:, 0, 0, 0] = 3e38  # finite, but overflows to inf in the first convolution
    digits_like(project, "huge.npz", x_train=x)
    overrides = ["data=npz", "data.path=huge.npz", "preprocess=none", "freeze=joint"]
    line = fail(capsys, "run", *overrides, "train.epochs=5")
    assert "The loss became nan in phase 'train' at epoch 1, batch" in line
    assert "Lower train.lr" in line
    assert_left_clean(project, completed=("build",))
    (run,) = runs(project)
    assert "at epoch 1, batch" in run.data.tags["error"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_metric_history(run.info.run_id, "loss") == []  # no epoch was recorded
    assert not (project / "outputs" / "train" / "checkpoint" / "state.json").exists()


# ---------------------------------------------------------------------------------------------
# Tracking and outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unreachable_tracking_server_fails_within_seconds(project, capsys):
    start = time.perf_counter()
    line = fail(capsys, "run", "tracking.uri=http://127.0.0.1:9")
    seconds = time.perf_counter() - start
    assert "tracking.uri=http://127.0.0.1:9 is unreachable" in line
    assert "start the server" in line
    assert seconds < 20, f"took {seconds:.1f} s"  # MLflow's own retries take about 4 minutes
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_tracking_store_in_a_missing_directory(project, capsys):
    line = fail(capsys, "run", "tracking.uri=sqlite:////no/such/dir/mlflow.db")
    assert "tracking.uri=sqlite:////no/such/dir/mlflow.db: directory /no/such/dir does not" in line
    assert "Create it" in line
    assert_left_clean(project, run=False)
    assert not Path("/no/such/dir").exists()


@pytest.mark.slow
def test_output_dir_below_a_regular_file(project, capsys):
    (project / "notes.txt").write_text("a file, not a directory")
    line = fail(capsys, "run", f"output_dir={project / 'notes.txt' / 'out'}")
    assert "output_dir=" in line and "cannot be written: Not a directory" in line
    assert "Set output_dir=... to a directory you can write" in line
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_output_dir_without_permission(project, capsys):
    # Tests run as root, for whom chmod does not block writes; sysfs refuses even root.
    target = Path("/sys/tfstack-outputs")
    try:
        target.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - not on this kind of machine
        target.rmdir()
        pytest.skip("/sys accepts new directories here")
    line = fail(capsys, "run", f"output_dir={target}")
    assert f"output_dir={target} cannot be written" in line
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_an_output_dir_in_use_by_another_process(project, capsys):
    from tfstack.pipeline.output_lock import exclusive

    with exclusive(project / "outputs"):  # as a concurrent tfstack process holds it
        line = fail(capsys, "run")
    assert "output_dir=" in line and "is in use by tfstack process" in line
    assert "give this run its own output_dir" in line
    assert_left_clean(project, run=False)


@pytest.mark.slow
def test_a_damaged_stage_output(project, capsys):
    assert cli.main(["build", "tracking=none"]) == 0
    stacked = project / "outputs" / "build" / "stacked.keras"
    stacked.write_bytes(stacked.read_bytes()[:1000])
    line = fail(capsys, "train")
    assert "stacked.keras cannot be loaded" in line and "dvc repro -f build" in line
    assert_left_clean(project, completed=("build",))


@pytest.mark.slow
def test_a_damaged_checkpoint(project, capsys):
    checkpoint = project / "outputs" / "train" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{not json")
    line = fail(capsys, "run")
    assert "checkpoint" in line and "cannot be read" in line
    assert f"Delete {checkpoint}" in line and "train.resume=off" in line
    assert cli.main(["run", "tracking=none", "train.resume=off"]) == 0


def test_every_catalogued_message_is_in_the_readme():
    """The README's table lists what these tests check, so users can look a message up."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## When something is wrong", 1)[1].split("\n## ", 1)[0]
    for text in [
        "does not exist",
        "not a readable .keras file",
        "not a readable HDF5 file",
        "holds no model",
        "is a directory but not a TensorFlow SavedModel",
        "Lambda layer",
        "no defined input",
        "stacking=adapter",
        "is not an option of config group",
        "is not a config key",
        "is not a valid regex",
        "matches no layer",
        "split is empty",
        "do not fit the head",
        "The loss became nan",
        "is unreachable",
        "cannot be written",
        "is in use by",
        "cannot be loaded",
        "no deterministic implementation",
    ]:
        assert text in section, text
