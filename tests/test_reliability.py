"""Crash safety, determinism, concurrency and security, end to end.

- A real `tfstack run` is killed with SIGKILL twice during training (once in each phase) and
  rerun: it resumes into the same MLflow run from its last completed epoch, and ends with the
  metrics, history and weights of an uninterrupted run with the same seed.
- The same config and seed, run twice, give identical weights and metrics; an op without a
  deterministic kernel is reported by name with the setting that avoids it.
- Four `tfstack run` processes at once against one fresh sqlite store all finish and are
  recorded intact.
- Logged models hold no pickle; the MLflow UI is bound to 127.0.0.1 wherever the project
  starts it; artifact names cannot leave the run's artifacts; a failed write leaves the old file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient
from project_copy import ROOT, VENV_BIN, env, leftovers, tfstack

from tfstack import cli

EPOCH_METRICS = ["loss", "val_loss", "accuracy", "val_accuracy", "lr", "phase_index"]


def client_of(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project: Path) -> list:
    client = client_of(project)
    experiment = client.get_experiment_by_name("tfstack")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def weights(path: Path) -> list[np.ndarray]:
    return [np.asarray(v) for v in keras.saving.load_model(path, compile=False).weights]


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    pairs = zip(first, second, strict=False)
    return len(first) == len(second) and all(np.array_equal(x, y) for x, y in pairs)


# ---------------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------------

# Two phases of 4 epochs on the source digits (721 images, 90 steps an epoch) with a Dropout
# layer before the head, whose random state must be restored too.
RESUMABLE = [
    "data=npz",
    "data.path=source.npz",
    "schedule=two_phase",
    "train.epochs=4",
    "train.batch_size=8",
    "stacking=functional",
    "stacking.intermediate=[{class_name: Dropout, config: {rate: 0.3}}]",
    "tracking.log_model=false",
]


def _epochs_done(project: Path) -> int:
    try:
        state = json.loads((project / "outputs/train/checkpoint/state.json").read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return state["epochs_done"]


def _run_and_kill(project: Path, after_epochs: int) -> int:
    """Start `tfstack run`, SIGKILL it once its checkpoint holds ``after_epochs`` epochs."""
    process = subprocess.Popen(
        [str(VENV_BIN / "tfstack"), "run", *RESUMABLE],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while _epochs_done(project) < after_epochs:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return _epochs_done(project)


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_run_and_matches_an_uninterrupted_one(project):
    with np.load(project / "outputs/prepare/source.npz") as source:
        np.savez(
            project / "source.npz",
            x_train=source["x_train"],
            y_train=source["y_train"],
            x_test=source["x_test"],
            y_test=source["y_test"],
        )
    reference = tfstack(project, "run", *RESUMABLE, "output_dir=reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_at = [_run_and_kill(project, 2)]  # inside the first phase (epochs 0-3)
    (first, killed) = all_runs(project)
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves; the rerun takes it over
    killed_at.append(_run_and_kill(project, 6))  # inside the second phase (epochs 4-7)
    assert len(all_runs(project)) == 2, "a rerun must not start another run"
    resumed = tfstack(project, "run", *RESUMABLE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming training at epoch" in resumed.stderr
    assert 2 <= killed_at[0] < killed_at[1] <= 8, killed_at  # usually 2 and 6: mid-phase

    client = client_of(project)
    runs = all_runs(project)
    assert [r.info.run_id for r in runs] == [first.info.run_id, killed.info.run_id]
    run = runs[1]
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert int(run.data.tags["resumed_at_epoch"]) == killed_at[1]
    assert run.data.tags["phase.0.epochs"] == "0-3" and run.data.tags["phase.1.epochs"] == "4-7"
    for key in EPOCH_METRICS:
        steps = history(client, run.info.run_id, key)
        assert [step for step, _ in steps] == list(range(8)), (key, steps)  # once per epoch
        assert steps == history(client, first.info.run_id, key), key
    for key in ("test_accuracy", "test_loss", "params_trainable", "params_non_trainable"):
        assert history(client, run.info.run_id, key) == history(client, first.info.run_id, key)

    outputs, uninterrupted = project / "outputs", project / "reference"
    for name in ("train/history.json", "evaluate/metrics.json"):
        assert (outputs / name).read_text() == (uninterrupted / name).read_text(), name
    assert same_weights(outputs / "train/model.keras", uninterrupted / "train/model.keras")
    assert not (outputs / "train/checkpoint").exists()
    assert not leftovers(outputs)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_same_config_and_seed_twice_give_identical_weights_and_metrics(project):
    overrides = [
        "tracking=none",
        "schedule=two_phase",
        "train.epochs=2",
        "stacking=functional",
        "stacking.intermediate=[{class_name: Dropout, config: {rate: 0.3}}]",
    ]
    for name in ("first", "second"):
        assert cli.main(["run", *overrides, f"output_dir={name}"]) == 0
    first, second = project / "first", project / "second"
    assert same_weights(first / "train/model.keras", second / "train/model.keras")
    for name in ("train/history.json", "evaluate/metrics.json"):
        assert (first / name).read_text() == (second / name).read_text(), name


@keras.saving.register_keras_serializable(package="tests")
class TimestampNoise(keras.layers.Layer):
    """Adds zero times the time: an op TensorFlow refuses under op determinism, even on CPU."""

    def call(self, inputs):
        return inputs + 0.0 * tf.cast(tf.timestamp(), inputs.dtype)


@pytest.mark.slow
def test_an_op_without_a_deterministic_kernel_is_named_with_the_setting_to_change(project, capsys):
    head = keras.Sequential(
        [keras.Input((32,)), TimestampNoise(), keras.layers.Dense(5, activation="softmax")]
    )
    head.save(project / "head.keras")
    # TimestampNoise is a custom class (registered by this module): code, so it needs trust.
    head_overrides = ["components.head.path=head.keras", "components.head.trust_code=true"]
    code = cli.main(["run", *head_overrides])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "no deterministic implementation of Timestamp" in err
    assert "Set train.deterministic=false" in err
    (run,) = all_runs(project)
    assert run.info.status == "FAILED" and "Timestamp" in run.data.tags["error"]
    assert not (project / "outputs/train/model.keras").exists()
    overrides = [*head_overrides, "train.deterministic=false", "tracking=none"]
    assert cli.main(["run", *overrides]) == 0


# ---------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_runs_at_once_share_one_fresh_sqlite_store(project):
    assert not (project / "mlflow.db").exists()  # first use races in MLflow's migrations
    processes = [
        subprocess.Popen(
            [str(VENV_BIN / "tfstack"), "run", f"output_dir=out{i}", f"seed={i}"],
            cwd=project,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    client = client_of(project)
    runs = all_runs(project)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    for i in range(4):
        ref = json.loads((project / f"out{i}" / "run.json").read_text())
        run = by_id[ref["run_id"]]
        assert run.data.params["seed"] == str(i) and run.data.params["output_dir"] == f"out{i}"
        metrics = json.loads((project / f"out{i}" / "evaluate" / "metrics.json").read_text())
        assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/confusion_matrix.png" in artifacts
    # The TensorFlow flavor; the run's pyfunc `classifier` is tests/test_classnames.py's.
    models = client.search_logged_models([runs[0].info.experiment_id], "name = 'model'")
    assert sorted(m.source_run_id for m in models) == sorted(by_id)
    _assert_logged_model_holds_no_pickle(project, models[0].model_id)


def _assert_logged_model_holds_no_pickle(project: Path, model_id: str) -> None:
    """The logged model is JSON, YAML and a .keras archive, and loads with pickles refused."""
    import mlflow

    files = [p for p in (project / "mlartifacts").rglob("*") if model_id in str(p) and p.is_file()]
    assert any(p.name == "model.keras" for p in files)
    pickled = [p for p in files if re.search(r"\.(pkl|pickle|cloudpickle|joblib)$", p.name)]
    assert not pickled, pickled
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        model = mlflow.tensorflow.load_model(f"models:/{model_id}")
    finally:
        del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    assert model.output_shape == (None, 5)


# ---------------------------------------------------------------------------------------------
# Security and atomic writes
# ---------------------------------------------------------------------------------------------


def test_the_mlflow_ui_and_server_are_bound_to_localhost_wherever_the_project_starts_them():
    commands = []
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S):
        commands += [line for line in block.splitlines() if re.search(r"mlflow (ui|server)", line)]
    makefile = (ROOT / "Makefile").read_text()
    commands += [line for line in makefile.splitlines() if re.search(r"mlflow (ui|server)", line)]
    commands = [c for c in commands if not c.lstrip().startswith("#")]
    assert commands
    for command in commands:
        assert "--host 127.0.0.1" in command, command
    summary = cli._summary(None, {}, type("P", (), {"out": Path("outputs")})())
    assert "0.0.0.0" not in summary


def test_artifact_names_cannot_leave_the_runs_artifacts():
    from tfstack import tracking
    from tfstack.errors import TrackingError

    for name in ["../../etc/passwd", "/tmp/x.json", "shapes/../../x.json", ""]:
        with pytest.raises(TrackingError, match="must be a relative path inside"):
            tracking.log_text("no-such-run", "text", name)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    from tfstack.files import atomic_path, write_json

    target = tmp_path / "metrics.json"
    write_json(target, {"test_accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"test_accu')  # interrupted half-way
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"test_accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoints_hold_numbers_only(tmp_path):
    """A checkpoint loads with pickles refused, and its state is plain JSON."""
    from tfstack import checkpoints
    from tfstack.epoch_callbacks import EpochCheckpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(), "mse")
    model.optimizer.build(model.trainable_variables)
    state = checkpoints.TrainingState(key="k", run_id=None, total_epochs=2)
    callback = EpochCheckpoint(tmp_path, model, state, phase_index=0, phase_record={"history": {}})
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, {"loss": 0.5})
    loaded = checkpoints.read_state(tmp_path)
    assert loaded.epochs_done == 1 and loaded.epoch_rows[0]["metrics"]["loss"] == 0.5
    with np.load(tmp_path / loaded.weights_file, allow_pickle=False) as arrays:
        assert len(arrays.files) == len(model.variables) + len(model.optimizer.variables)
    json.loads((tmp_path / "state.json").read_text())


@pytest.mark.slow
def test_a_run_whose_process_was_killed_before_any_checkpoint_is_not_left_running(project):
    """Killed during build (no checkpoint yet): the next command in that output_dir ends it."""
    from tfstack import tracking

    uri = f"sqlite:///{project / 'mlflow.db'}"
    orphan = tracking.start_run(uri, "tfstack")  # what a killed build leaves: RUNNING
    tracking.write_run_ref(project / "outputs/run.json", orphan, uri, "tfstack", config_hash="x")
    assert cli.main(["run", "tracking.log_model=false"]) == 0
    client = client_of(project)
    assert client.get_run(orphan).info.status == "KILLED"
    assert "ended before finishing" in client.get_run(orphan).data.tags["error"]
    assert [r.info.status for r in all_runs(project)] == ["KILLED", "FINISHED"]


@pytest.mark.parametrize(
    ("error", "op"),
    [
        (
            tf.errors.UnimplementedError(
                None,
                None,
                "A deterministic GPU implementation of SparseTensorDenseMatmulOp is not "
                "currently available.",
            ),
            "SparseTensorDenseMatmulOp",
        ),
        (
            tf.errors.UnimplementedError(
                None, None, "Determinism is not yet supported for MaxPoolGradWithArgmax."
            ),
            "MaxPoolGradWithArgmax",
        ),
    ],
)
def test_gpu_ops_without_deterministic_kernels_are_reported_too(error, op):
    """On GPUs TensorFlow raises UnimplementedError for such ops; the message names the op."""
    from tfstack.errors import TrainingError
    from tfstack.guards import determinism_errors

    with pytest.raises(TrainingError, match=f"deterministic implementation of {op}.*=false"):
        with determinism_errors():
            raise error
    with pytest.raises(ValueError), determinism_errors():  # anything else passes through
        raise ValueError("not about determinism")


def test_a_phase_record_in_a_checkpoint_reads_back_as_the_same_result():
    """What a resumed run reports for phases finished before the kill (phases.json, MLflow)."""
    from tfstack.freezing import ParamCounts
    from tfstack.phase_results import PhaseResult

    result = PhaseResult(
        name="head",
        index=0,
        initial_epoch=0,
        epochs=2,
        lr=1e-3,
        freeze="frozen",
        counts=ParamCounts(27, 120),
        history={"loss": [1.0, 0.5]},
        seconds=1.5,
        cached=True,
        cache_note="cached the outputs of base (None, 8)",
        inference_mode=["base"],
    )
    assert PhaseResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
