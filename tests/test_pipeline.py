"""End to end: `tfstack run`, `dvc repro`, `dvc exp run -S`, every run complete in MLflow.

Each test works in a copy of the project under tmp_path, with the real conf/ shrunk to one epoch
so the pipeline takes seconds, and a real sqlite MLflow store at the copy's root.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from project_copy import PROJECT_FILES, ROOT, VENV_BIN, env
from project_copy import shrink as _shrink

from tfstack import cli


def _env(project: Path) -> dict:
    """The environment of a subprocess in ``project`` (see `project_copy.env`)."""
    return env()


def _sh(project: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(cmd), cwd=project, env=_env(project), capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _compose_params(project: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(project / "conf"), version_base=None):
        cfg = compose(config_name="config")
    OmegaConf.resolve(cfg)
    (project / "params.yaml").write_text(OmegaConf.to_yaml(cfg))


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """Each test starts without a process-wide MLflow URI (tests here set one to load models)."""
    import mlflow

    for name in ("TFSTACK_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def project(tmp_path):
    """A git + DVC copy of the project with a shrunk config."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name)
        else:
            shutil.copy2(src, project / name)
    shutil.copy2(ROOT / ".gitignore", project / ".gitignore")
    _shrink(project)
    _compose_params(project)
    _sh(project, "git", "init", "-q")
    _sh(project, "git", "config", "user.email", "ci@example.com")
    _sh(project, "git", "config", "user.name", "ci")
    _sh(project, "dvc", "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    _sh(project, "dvc", "commit", "-q", "-f", "data.dvc")
    _sh(project, "git", "add", "-A")
    _sh(project, "git", "commit", "-q", "-m", "project copy")
    return project


def _runs(project: Path, experiment: str = "tfstack"):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "no MLflow experiment was created"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _artifact_paths(client, run_id, path=""):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def assert_complete_run(client, run, *, epochs: int, freeze: str):
    """What every pipeline run must hold, as a user comparing runs would look for it."""
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["freeze.policy"] == freeze
    assert params["train.epochs"] == str(epochs)
    assert tags["freeze"] == freeze and tags["stacking"] and tags["schedule"]
    # An .npz's md5, or the sha256 over an image folder's files (the demo's default).
    assert len(tags["data_hash"]) == (32 if params["data.format"] == "npz" else 64)
    assert tags["config_hash"]
    artifacts = set(_artifact_paths(client, run.info.run_id))
    for expected in [
        "shapes/stacked_layers.json",
        "shapes/base_layers.json",
        "shapes/head_layers.json",
        "shapes/summary_stacked.txt",
        "shapes/stacked.png",
        "shapes/stacked.svg",
        "training/phases.json",
        "evaluation/confusion_matrix.png",
        "evaluation/learning_curve.png",
    ]:
        assert expected in artifacts, f"{expected} missing from {sorted(artifacts)}"
    # What the (first) phase trains, drawn: tests/test_diagrams.py checks the pictures.
    assert any(a.startswith("shapes/phase_0_") and a.endswith(".svg") for a in artifacts)
    for name in ["test_accuracy", "test_loss", "params_trainable", "params_non_trainable"]:
        assert name in metrics
    for name in ["loss", "val_loss", "accuracy", "val_accuracy", "lr", "phase_index"]:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(len(history))) and history
    stage_times = {k for k in metrics if k.startswith("stage_seconds_")}
    assert stage_times
    return artifacts


def _load_logged_model(client, run):
    import mlflow

    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        # The TensorFlow flavor; the run's pyfunc `classifier` is tests/test_classnames.py's.
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'",
        output_format="list",
    )
    assert models, "no model logged for the run"
    uri = f"models:/{models[0].model_id}"
    return mlflow.tensorflow.load_model(uri), mlflow.pyfunc.load_model(uri)


@pytest.mark.slow
def test_tfstack_run_records_one_complete_run(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert cli.main(["run", "stacking=adapter", "freeze=joint"]) == 0
    out = capsys.readouterr().out
    assert "MLflow run" in out and "test_accuracy" in out and "mlflow ui" in out
    client, runs = _runs(project)
    assert len(runs) == 1
    assert_complete_run(client, runs[0], epochs=1, freeze="joint")
    keras_model, pyfunc_model = _load_logged_model(client, runs[0])
    x = np.load(project / "outputs" / "prepare" / "target.npz")["x_test"][:4]
    assert keras_model.predict(x, verbose=0).shape == (4, 5)
    assert np.asarray(pyfunc_model.predict(x)).shape == (4, 5)
    metrics = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(runs[0].data.metrics["test_accuracy"])


@pytest.mark.slow
def test_dvc_repro_then_exp_run_overlay_in_one_store(project):
    _sh(project, "dvc", "repro")
    client, runs = _runs(project)
    assert len(runs) == 1, [r.data.tags.get("mlflow.runName") for r in runs]
    first = runs[0]
    assert_complete_run(client, first, epochs=1, freeze="frozen")
    keras_model, _ = _load_logged_model(client, first)
    assert keras_model.output_shape == (None, 5)
    status = _sh(project, "dvc", "status", "data.dvc").stdout
    assert "changed" not in status and "modified" not in status

    _sh(project, "dvc", "exp", "run", "-S", "freeze=joint")
    client, runs = _runs(project)
    assert len(runs) == 2
    second = runs[1]
    assert_complete_run(client, second, epochs=1, freeze="joint")
    assert second.data.tags.get("dvc_exp_name")
    assert first.data.tags["config_hash"] != second.data.tags["config_hash"]
    # Same metric names, so the two runs overlay in the MLflow compare view.
    assert set(first.data.metrics) == set(second.data.metrics)
    shown = _sh(project, "dvc", "exp", "show", "--csv").stdout
    assert "test_accuracy" in shown


def _stop_queue_workers(project: Path) -> None:
    """`dvc queue stop`, then end any worker that missed it (no process outlives the test)."""
    _sh(project, "dvc", "queue", "stop", check=False)
    for info in (project / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.json"):
        pid = json.loads(info.read_text()).get("pid")
        deadline = time.monotonic() + 20
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent is gone counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_queued_dvc_grid_logs_every_experiment_into_the_workspace_store(project):
    """Queued experiments run in .dvc/tmp/exps copies; their runs must land in one store."""
    _sh(project, "dvc", "exp", "run", "--queue", "-S", "freeze=frozen,joint")
    # The workers outlive `dvc queue start` and keep the descriptors it was given: no pipes, or
    # reading its output waits for them. One may also miss the shutdown DVC broadcasts when the
    # queue empties while it still runs a task (seen here once), so stop them at the end.
    started = subprocess.run(
        ["dvc", "queue", "start", "-j", "2"],  # two workers writing one sqlite store
        cwd=project,
        env=_env(project),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    assert started.returncode == 0
    try:
        _sh(project, "dvc", "exp", "run", "--run-all")  # waits until the queue is empty
    finally:
        _stop_queue_workers(project)
    queue = _sh(project, "dvc", "queue", "status").stdout
    assert "Failed" not in queue, queue
    client, runs = _runs(project)
    assert sorted(r.data.tags["freeze"] for r in runs) == ["frozen", "joint"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags.get("dvc_exp_name") for r in runs)
    assert not list((project / ".dvc" / "tmp" / "exps").glob("**/mlflow.db"))


@pytest.mark.slow
def test_mlflow_run_entry_point_gives_one_complete_run(project):
    env = _env(project)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    result = subprocess.run(
        [
            str(VENV_BIN / "mlflow"),
            "run",
            ".",
            "-e",
            "main",
            "--env-manager",
            "local",
            "--experiment-name",
            "tfstack",
            "-P",
            "overrides=freeze=joint",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = _runs(project)
    assert len(runs) == 1, "mlflow run and tfstack must share one run"
    assert runs[0].data.tags["mlflow.project.entryPoint"] == "main"
    assert_complete_run(client, runs[0], epochs=1, freeze="joint")


@pytest.mark.slow
def test_wide_head_experiment_needs_and_gets_an_adapter(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert cli.main(["run", "experiment=wide_head", "stacking=sequential"]) == 2
    err = capsys.readouterr().err
    assert "(None, 64)" in err and "(None, 32)" in err and "stacking=adapter" in err
    assert cli.main(["run", "experiment=wide_head"]) == 0
    client, runs = _runs(project)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert "Dense" in runs[1].data.tags["adapter"]
    layers = json.loads((project / "outputs" / "build" / "shapes.json").read_text())
    names = [row["name"] for row in layers["stacked"]["layers"]]
    assert "adapter_1" in names


@pytest.mark.slow
def test_a_failing_stage_ends_its_run_failed(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    overrides = ["freeze=partial", "freeze.unfreeze_last=null", "freeze.unfreeze_pattern='^no$'"]
    assert cli.main(["run", *overrides]) == 2
    err = capsys.readouterr().err
    assert "freeze.unfreeze_pattern" in err and "Traceback" not in err
    client, runs = _runs(project)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "matches no layer" in runs[0].data.tags["error"]


def test_inspect_prints_verdict_and_adapter(tmp_path, capsys):
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10, name="features")], name="b")
    head = keras.Sequential([keras.Input((12,)), keras.layers.Dense(2, name="out")], name="h")
    base.save(tmp_path / "base.keras")
    head.save(tmp_path / "head.keras")
    assert cli.main(["inspect", str(tmp_path / "base.keras"), str(tmp_path / "head.keras")]) == 0
    out = capsys.readouterr().out
    assert "(None, 10)" in out and "(None, 12)" in out
    assert "stacking=adapter" in out
    assert "adapter auto would add: Dense(12)" in out


def _task_project(project: Path, task: str):
    """A regression or binary dataset and matching components, written as a user would."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8, 8, 1)).astype("float32")
    signal = x.mean(axis=(1, 2, 3))
    y = signal.astype("float32") if task == "regression" else (signal > 0).astype("int64")
    np.savez(project / "task.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(16, activation="relu", name="features"),
        ]
    )
    activation = "sigmoid" if task == "binary" else None
    head = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1, activation=activation)])
    base.save(project / "my_base.keras")
    head.save(project / "my_head.keras")
    return [
        "data=npz",
        "data.path=task.npz",
        "components.base.path=my_base.keras",
        "components.head.path=my_head.keras",
        f"train={task}",
        "train.epochs=2",
        "freeze=joint",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "plot", "metric"),
    [
        ("regression", "evaluation/predicted_vs_true.png", "test_mae"),
        ("binary", "evaluation/confusion_matrix.png", "test_auc"),
    ],
)
def test_regression_and_binary_tasks_end_to_end(project, monkeypatch, task, plot, metric):
    monkeypatch.chdir(project)
    assert cli.main(["run", *_task_project(project, task)]) == 0
    client, runs = _runs(project)
    run = runs[-1]
    assert run.info.status == "FINISHED"
    assert plot in _artifact_paths(client, run.info.run_id)
    assert np.isfinite(run.data.metrics[metric])


def test_mlproject_entry_points_take_overrides():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(spec["entry_points"]) == {"main", "build", "train", "evaluate"}
    for entry in spec["entry_points"].values():
        assert "{overrides}" in entry["command"]
