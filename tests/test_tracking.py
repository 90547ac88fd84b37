"""Tracking against a real sqlite MLflow store under tmp_path (no mocks of MLflow)."""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import keras  # noqa: E402
import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import mlflow.tensorflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from tfstack import tracking  # noqa: E402
from tfstack.errors import TrackingError  # noqa: E402

EXPERIMENT = "tfstack-test"


@pytest.fixture
def uri(tmp_path):
    return tracking.default_tracking_uri(tmp_path)


def tiny_model(seed: int = 0) -> keras.Model:
    """(batch, 4) -> (batch, 3) softmax, with unique layer names."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="logits")(hidden)
    return keras.Model(inputs, outputs, name="tiny")


def tiny_data(n: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, size=n).astype("int32")


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the same venv python), as a separate DVC stage would."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = tracking.default_tracking_uri("store")
    assert uri == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    assert uri.startswith("sqlite:////")


@pytest.mark.slow
def test_start_log_end_lands_in_one_finished_run(uri, tmp_path):
    run_id = tracking.start_run(uri, EXPERIMENT, run_name="unit", tags={"stage": "build"})
    tracking.log_params_flat(run_id, {"train": {"lr": 0.001, "sizes": [1, 2]}, "seed": 0})
    tracking.log_tags(run_id, {"strategy": "sequential"})
    tracking.log_metrics(run_id, {"test_accuracy": np.float32(0.75), "test_loss": 1.5}, step=3)
    tracking.log_json(run_id, {"layers": np.arange(3), "n": np.int64(3)}, "build/layers.json")
    tracking.log_text(run_id, "summary", "build/summary.txt")
    figure = Figure()
    axes = figure.subplots()
    axes.plot([0, 1], [1, 0])
    tracking.log_figure(run_id, figure, "eval/curve.png")
    local = tmp_path / "notes.md"
    local.write_text("notes")
    tracking.log_artifact_file(run_id, local, "docs")
    tracking.end_run(run_id)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit"
    assert run.data.params == {"train.lr": "0.001", "train.sizes": "[1, 2]", "seed": "0"}
    assert run.data.tags["stage"] == "build"
    assert run.data.tags["strategy"] == "sequential"
    assert history(client, run_id, "test_accuracy") == [(3, 0.75)]
    stored = {m.key: m.timestamp for m in client.get_metric_history(run_id, "test_loss")}
    assert stored["test_loss"] == client.get_metric_history(run_id, "test_accuracy")[0].timestamp
    paths = {a.path for a in client.list_artifacts(run_id, "build")}
    assert paths == {"build/layers.json", "build/summary.txt"}
    layers = json.loads(Path(client.download_artifacts(run_id, "build/layers.json")).read_text())
    assert layers == {"layers": [0, 1, 2], "n": 3}
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/curve.png"}
    assert {a.path for a in client.list_artifacts(run_id, "docs")} == {"docs/notes.md"}
    # Artifacts live beside the database, not under the working directory's ./mlruns.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


@pytest.mark.slow
def test_second_process_resumes_the_same_run(uri, tmp_path):
    ref_path = tmp_path / "outputs" / "run.json"
    stage = """
        import sys
        from tfstack import tracking
        uri, ref_path, stage, last = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
        ref = tracking.read_run_ref(ref_path)
        run_id = ref["run_id"] if ref else None
        with tracking.tracked_run(uri, "tfstack-test", run_id=run_id, end=last) as run_id:
            tracking.write_run_ref(ref_path, run_id, uri, "tfstack-test")
            tracking.log_params_flat(run_id, {stage: {"pid": 1}, "shared": {"seed": 7}})
            tracking.log_metrics(run_id, {stage + "_done": 1.0}, step=0)
        print(run_id)
    """
    first = run_python(stage, uri, str(ref_path), "build", "0").stdout.strip().splitlines()[-1]
    client = MlflowClient(uri)
    # The first process has exited; the run must still be open for the next stage.
    assert client.get_run(first).info.status == "RUNNING"
    second = run_python(stage, uri, str(ref_path), "train", "1").stdout.strip().splitlines()[-1]

    assert second == first
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"build.pid": "1", "train.pid": "1", "shared.seed": "7"}
    assert set(run.data.metrics) == {"build_done", "train_done"}
    assert tracking.read_run_ref(ref_path) == {
        "run_id": first,
        "uri": uri,
        "experiment": EXPERIMENT,
    }


@pytest.mark.slow
def test_resuming_a_finished_run_reopens_it(uri):
    run_id = tracking.start_run(uri, EXPERIMENT)
    tracking.end_run(run_id)
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    with tracking.tracked_run(uri, EXPERIMENT, run_id=run_id, end=False) as resumed:
        assert client.get_run(run_id).info.status == "RUNNING"
    assert resumed == run_id
    assert client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.parametrize("end", [True, False])
@pytest.mark.slow
def test_failing_stage_ends_run_failed_with_error(uri, end):
    with pytest.raises(ValueError, match="boom"):
        with tracking.tracked_run(uri, EXPERIMENT, end=end) as run_id:
            tracking.log_metrics(run_id, {"loss": 1.0}, step=0)
            raise ValueError("boom: components.head.path=x.keras\nsecond line")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ValueError: boom: components.head.path=x.keras"
    error_text = Path(client.download_artifacts(run_id, "error.txt")).read_text()
    assert "Traceback" in error_text
    assert "second line" in error_text


def test_flatten_params():
    flat = tracking.flatten_params(
        {
            "train": {"lr": 1e-3, "phases": {"head": {"epochs": 2}}},
            "layers": ["a", "b"],
            "shape": (None, 12),
            "empty": {},
            "flag": True,
            "long": "x" * 7000,
            "n": np.int64(4),
        }
    )
    assert flat["train.lr"] == "0.001"
    assert flat["train.phases.head.epochs"] == "2"
    assert flat["layers"] == '["a", "b"]'
    assert flat["shape"] == "[null, 12]"
    assert flat["empty"] == "{}"
    assert flat["flag"] == "True"
    assert flat["n"] == "4"
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE_LENGTH
    assert flat["long"].endswith("...")


@pytest.mark.slow
def test_many_params_are_batched(uri):
    run_id = tracking.start_run(uri, EXPERIMENT)
    params = {"grid": {f"p{i:03d}": i for i in range(250)}}
    assert len(tracking.log_params_flat(run_id, params)) == 250
    assert len(MlflowClient(uri).get_run(run_id).data.params) == 250
    tracking.end_run(run_id)


@pytest.mark.slow
def test_params_are_write_once(uri):
    run_id = tracking.start_run(uri, EXPERIMENT)
    tracking.log_params_flat(run_id, {"train": {"lr": 0.001}, "long": "y" * 7000})
    # Same values again (a resumed stage logging its config): skipped, no error.
    assert tracking.log_params_flat(run_id, {"train": {"lr": 0.001}, "long": "y" * 7000}) == {}

    with pytest.raises(TrackingError) as excinfo:
        tracking.log_params_flat(run_id, {"train": {"lr": 0.01}, "new": 1})
    message = str(excinfo.value)
    assert "train.lr: logged '0.001', now '0.01'" in message
    assert "write-once" in message
    assert "phase.1.lr" in message
    # Nothing from the conflicting call was logged.
    assert "new" not in MlflowClient(uri).get_run(run_id).data.params
    tracking.end_run(run_id)


def test_logging_needs_a_started_run(uri):
    with pytest.raises(TrackingError, match="was not started or resumed in this process"):
        tracking.log_metrics("0123456789abcdef", {"loss": 1.0})


@pytest.mark.slow
def test_resuming_an_unknown_run_fails_clearly(uri):
    with pytest.raises(TrackingError, match="run_id=deadbeef does not exist"):
        tracking.start_run(uri, EXPERIMENT, run_id="deadbeef")


@pytest.mark.slow
def test_non_numeric_metric_names_the_key(uri):
    run_id = tracking.start_run(uri, EXPERIMENT)
    with pytest.raises(TrackingError, match="metric 'report' must be a single number"):
        tracking.log_metrics(run_id, {"report": "good"})
    tracking.end_run(run_id)


@pytest.mark.parametrize("synchronous", [True, False])
@pytest.mark.slow
def test_epoch_logger_logs_contiguous_epochs_across_phases(uri, synchronous):
    run_id = tracking.start_run(uri, EXPERIMENT)
    model = tiny_model()
    x, y = tiny_data()
    phases = [("head", 1e-2, 0, 2), ("finetune", 1e-3, 2, 5)]
    loggers = []
    for index, (phase, lr, initial_epoch, epochs) in enumerate(phases):
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        epoch_logger = tracking.EpochLogger(
            run_id, phase, phase_index=index, synchronous=synchronous
        )
        model.fit(
            x,
            y,
            validation_split=0.25,
            batch_size=8,
            initial_epoch=initial_epoch,
            epochs=epochs,
            callbacks=[epoch_logger],
            verbose=0,
        )
        loggers.append(epoch_logger)
    tracking.end_run(run_id)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {
        "loss",
        "val_loss",
        "accuracy",
        "val_accuracy",
        "lr",
        "phase_index",
    }
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert [step for step, _ in history(client, run_id, key)] == [0, 1, 2, 3, 4]
    assert history(client, run_id, "phase_index") == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]
    lrs = [value for _, value in history(client, run_id, "lr")]
    np.testing.assert_allclose(lrs, [1e-2, 1e-2, 1e-3, 1e-3, 1e-3], rtol=1e-5)
    assert run.data.tags["phase.0.name"] == "head"
    assert run.data.tags["phase.0.epochs"] == "0-1"
    assert run.data.tags["phase.1.name"] == "finetune"
    assert run.data.tags["phase.1.epochs"] == "2-4"
    assert [e for lg in loggers for e in lg.epochs_logged] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_log_keras_model_loads_back_with_equal_predictions(uri, tmp_path):
    run_id = tracking.start_run(uri, EXPERIMENT)
    model = tiny_model(seed=3)
    x, _ = tiny_data(n=8, seed=1)
    model_uri = tracking.log_keras_model(run_id, model, x, name="model")
    tracking.end_run(run_id)
    expected = model.predict(x, verbose=0)

    mlflow.set_tracking_uri(uri)
    assert model_uri.startswith("models:/")
    keras_model = mlflow.tensorflow.load_model(model_uri)
    np.testing.assert_allclose(keras_model.predict(x, verbose=0), expected, rtol=1e-6)
    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_allclose(np.asarray(pyfunc_model.predict(x)), expected, rtol=1e-6)

    signature = pyfunc_model.metadata.signature
    assert signature is not None
    [input_spec], [output_spec] = signature.inputs.inputs, signature.outputs.inputs
    assert (str(input_spec.type), tuple(input_spec.shape)) == ("float32", (-1, 4))
    assert (str(output_spec.type), tuple(output_spec.shape)) == ("float32", (-1, 3))

    client = MlflowClient(uri)
    model_id = model_uri.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    run = client.get_run(run_id)
    assert logged.experiment_id == run.info.experiment_id
    assert logged.source_run_id == run_id
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    # The run-relative URI resolves to the same model because it is in the run's experiment.
    via_run = mlflow.tensorflow.load_model(f"runs:/{run_id}/model")
    np.testing.assert_allclose(via_run.predict(x, verbose=0), expected, rtol=1e-6)
    # Model artifacts live beside the database, with the pinned (not inferred) requirements.
    model_dir = Path(urllib.parse.urlparse(logged.artifact_location).path)
    assert model_dir.is_relative_to(tmp_path / "mlartifacts")
    requirements = (model_dir / "requirements.txt").read_text().splitlines()
    assert requirements == tracking.default_pip_requirements()
    assert requirements[:3] == [
        f"{name}=={importlib.metadata.version(name)}" for name in ("tensorflow", "keras", "mlflow")
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_http_uri_fails_fast_with_clear_message():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as excinfo:
        tracking.start_run(uri, EXPERIMENT)
    assert time.monotonic() - start < 10
    message = str(excinfo.value)
    assert message.startswith(f"tracking.uri={uri} is unreachable: ")
    assert "start the server" in message
    assert "or set tracking.uri=sqlite:///" in message


def test_silent_http_server_times_out():
    with socket.socket() as server:  # accepts connections into the backlog, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingError, match="is unreachable"):
            tracking.check_reachable(uri, timeout_s=1)
        assert time.monotonic() - start < 5


def test_sqlite_in_missing_directory_fails_clearly(tmp_path):
    uri = f"sqlite:///{tmp_path}/missing/mlflow.db"
    with pytest.raises(TrackingError, match=r"directory .*missing does not exist"):
        tracking.check_reachable(uri)


def test_run_ref_round_trip_and_errors(tmp_path):
    path = tmp_path / "refs" / "run.json"
    assert tracking.read_run_ref(path) is None
    tracking.write_run_ref(path, "abc", "sqlite:////x/mlflow.db", "exp", config_hash="f00d")
    assert tracking.read_run_ref(path) == {
        "run_id": "abc",
        "uri": "sqlite:////x/mlflow.db",
        "experiment": "exp",
        "config_hash": "f00d",
    }
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temp file left behind
    path.write_text("{not json")
    with pytest.raises(TrackingError, match="not valid JSON.*Delete it"):
        tracking.read_run_ref(path)
    path.write_text('{"run_id": "abc"}')
    with pytest.raises(TrackingError, match="lacks uri, experiment"):
        tracking.read_run_ref(path)


@pytest.mark.slow
def test_concurrent_processes_share_a_fresh_database(uri):
    # Without the init lock, 3 of 4 processes creating the same fresh sqlite store failed in
    # MLflow's schema migration ("table ... already exists", "duplicate column name").
    code = """
        import sys
        from tfstack import tracking
        run_id = tracking.start_run(sys.argv[1], "tfstack-test")
        for step in range(20):
            tracking.log_metrics(run_id, {"loss": float(step)}, step=step)
        tracking.end_run(run_id)
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=180)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], "\n".join(e[-1500:] for e in errors)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 20 for r in runs)


@pytest.mark.slow
def test_log_keras_model_leaves_no_process_wide_tracking_uri(uri, monkeypatch):
    """A later run in this process, or a subprocess, must not inherit this store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = tracking.start_run(uri, EXPERIMENT)
    x, _ = tiny_data(n=4, seed=1)
    tracking.log_keras_model(run_id, tiny_model(seed=3), x, name="model")
    tracking.end_run(run_id)
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.parametrize("synchronous", [True, False])
@pytest.mark.slow
def test_epoch_logger_gathers_short_epochs_into_one_write_per_interval(uri, synchronous):
    run_id = tracking.start_run(uri, EXPERIMENT)
    model = tiny_model()
    x, y = tiny_data()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    client = MlflowClient(uri)
    written_so_far = []

    class Peek(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            written_so_far.append(len(client.get_metric_history(run_id, "loss")))

    epoch_logger = tracking.EpochLogger(
        run_id, "head", min_interval_s=3600, synchronous=synchronous
    )
    model.fit(x, y, batch_size=8, epochs=4, callbacks=[epoch_logger, Peek()], verbose=0)
    tracking.end_run(run_id)  # waits for a queued (asynchronous) last write

    assert written_so_far == [0, 0, 0, 0]  # nothing written while the phase ran
    assert [step for step, _ in history(client, run_id, "loss")] == [0, 1, 2, 3]
    timestamps = [m.timestamp for m in client.get_metric_history(run_id, "loss")]
    assert timestamps == sorted(timestamps)  # each epoch keeps the time it ended
    tags = client.get_run(run_id).data.tags
    assert tags["phase.0.name"] == "head" and tags["phase.0.epochs"] == "0-3"


@pytest.mark.slow
def test_epochs_gathered_by_a_phase_cut_short_are_written_when_the_run_fails(uri):
    """An error mid-phase ends the run FAILED with every completed epoch in its history."""
    model = tiny_model()
    x, y = tiny_data()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    class FailAfterThirdEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        with tracking.tracked_run(uri, EXPERIMENT) as run_id:
            epoch_logger = tracking.EpochLogger(run_id, "head", min_interval_s=3600)
            model.fit(x, y, epochs=5, callbacks=[epoch_logger, FailAfterThirdEpoch()], verbose=0)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: disk full"
    assert run.data.tags["phase.0.name"] == "head"
    assert [step for step, _ in history(client, run_id, "loss")] == [0, 1, 2]
    assert [value for _, value in history(client, run_id, "phase_index")] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_runs_in_two_stores_are_written_from_one_process(tmp_path):
    """Each TrackedRun writes to its own store, whatever was started last."""
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    first_uri = tracking.default_tracking_uri(first_dir)
    second_uri = tracking.default_tracking_uri(second_dir)
    first = tracking.start_run(first_uri, EXPERIMENT)
    second = tracking.start_run(second_uri, EXPERIMENT)
    tracking.log_metrics(first, {"score": 1.0})
    tracking.log_metrics(second, {"score": 2.0}, synchronous=False)
    assert tracking.get_tracked_run(second).uri == second_uri
    tracking.end_run(second)
    tracking.end_run(first)

    assert MlflowClient(first_uri).get_run(first).data.metrics == {"score": 1.0}
    assert MlflowClient(second_uri).get_run(second).data.metrics == {"score": 2.0}
    assert MlflowClient(first_uri).get_run(first).info.status == "FINISHED"
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient(first_uri).get_run(second)
