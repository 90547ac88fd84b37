"""The MLflow Model Registry: `tracking.register`, `tfstack promote` and `models:/NAME@ALIAS`.

The store tests write runs by hand through `tfstack.tracking` (a tiny Keras classifier, a few
epochs of `val_accuracy`, the tags a pipeline run carries) into one sqlite store per module, and
register them through the real registry; the end-to-end tests train the shrunk demo project.
"""

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from project_copy import dvc_project, sh, tfstack
from test_team_tracking import mlflow_server, postgres  # noqa: F401 (fixtures)

from tfstack import cli, tracking
from tfstack.errors import ConfigError, TfstackError
from tfstack.pipeline import promote as promoting
from tfstack.pipeline.compose import compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
NAMES = ["cat", "dog", "eel"]
RUN_TAGS = {"freeze": "joint", "stacking": "adapter", "schedule": "two_phase"}


# ---------------------------------------------------------------------------------------------
# tracking.register in the config
# ---------------------------------------------------------------------------------------------


def test_register_is_off_by_default_and_takes_a_name_and_an_alias():
    assert compose([], config_dir=CONF).tracking.register.name is None
    config = compose(
        ["tracking.register.name=digits", "tracking.register.alias=champion"], config_dir=CONF
    )
    assert (config.tracking.register.name, config.tracking.register.alias) == (
        "digits",
        "champion",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tracking.register.alias=latest"], "tracking.register.alias='latest' is reserved"),
        (["tracking.register.alias=V2"], "tracking.register.alias='V2' is reserved"),
        (["tracking.register.alias=best model"], "may hold only letters, digits, '_' and '-'"),
        (["tracking.register.name=team/digits"], "holds '/' or ':'"),
        (["tracking.register.name=..digits"], "is not a plain name"),
        (["tracking.register.name=''"], "tracking.register.name='' is empty"),
    ],
)
def test_names_and_aliases_mlflow_refuses_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(["tracking.register.name=digits", *overrides], config_dir=CONF)


def test_register_needs_a_name_and_a_logged_model():
    with pytest.raises(ConfigError, match="needs the registered model's name"):
        compose(["tracking.register.alias=champion"], config_dir=CONF)
    for off, key in (("tracking=none", "enabled"), ("tracking.log_model=false", "log_model")):
        with pytest.raises(ConfigError, match=f"tracking.{key}=false logs none"):
            compose([off, "tracking.register.name=digits"], config_dir=CONF)


def test_a_version_carries_what_the_run_was_and_the_sweep_objective():
    run = {
        "run_id": "r1",
        "run_name": "freeze=joint",
        "tags": {**RUN_TAGS, "config_hash": "abc", "sweep_job": "0", "mlflow.user": "me"},
        "metrics": {"test_accuracy": 0.8, "test_loss": 0.4, "stage_seconds_train": 3.0},
    }
    objective = {"metric": "val_loss", "mode": "min", "value": 0.3, "parent_run_id": "p1"}
    assert promoting.version_tags(run, objective) == {
        **RUN_TAGS,
        "config_hash": "abc",
        "test_accuracy": 0.8,
        "test_loss": 0.4,
        "run_name": "freeze=joint",
        "objective": "min val_loss",
        "best_val_loss": 0.3,
        "sweep_parent_run_id": "p1",
    }
    parent = {"run_id": "p1", "tags": {"objective": "min val_loss"}}
    assert promoting.parse_objective(parent) == {"mode": "min", "metric": "val_loss"}


# ---------------------------------------------------------------------------------------------
# The registry, against a sqlite store
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module: creating a sqlite store costs seconds."""
    return tracking.default_tracking_uri(tmp_path_factory.mktemp("store"))


@pytest.fixture(autouse=True)
def _no_process_uri():
    yield
    mlflow.set_tracking_uri(None)


def _classifier(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(len(NAMES), activation="softmax")]
    )


X = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")


def _run(uri, experiment, *, history=(), model=None, status="FINISHED", tags=None) -> str:
    """A run as the pipeline leaves it: tags, val_accuracy per epoch, test metrics, a model."""
    run_id = tracking.start_run(
        uri, experiment, tags={**RUN_TAGS, "config_hash": "0123abcd", **(tags or {})}
    )
    for epoch, value in enumerate(history):
        tracking.log_metrics(run_id, {"val_accuracy": value}, step=epoch)
    tracking.log_metrics(run_id, {"test_accuracy": 0.75, "test_loss": 0.5, "lr": 0.01})
    if model is not None:
        tracking.log_keras_model(run_id, model, X, name="model")
        tracking.log_classifier_model(run_id, model, X, NAMES)
    tracking.end_run(run_id, status)
    return run_id


def _sweep(uri, experiment, jobs) -> tuple[str, list[str]]:
    """A sweep's parent run and its children: ``jobs`` is (history, status, model) per job."""
    parent = tracking.start_run(
        uri, experiment, tags={"sweep_dir": "/tmp/sweep", "objective": "max val_accuracy"}
    )
    children = []
    for job, (history, status, model) in enumerate(jobs):
        tags = {tracking.PARENT_RUN_TAG: parent, "sweep_job": job}
        child = _run(uri, experiment, history=history, model=model, status=status, tags=tags)
        children.append(child)
    tracking.end_run(parent)
    return parent, children


def _predict(model_uri: str, uri: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(model_uri).predict(X)


@pytest.mark.slow
def test_promote_registers_the_classifier_moves_the_alias_and_tags_the_version(uri):
    first = _run(uri, "promote", history=[0.5], model=_classifier(0))
    second = _run(uri, "promote", history=[0.6], model=_classifier(1))
    one = promoting.promote(uri, name="animals", alias="champion", run_id=first)
    two = promoting.promote(uri, name="animals", alias="champion", run_id=second)

    assert (one["version"], two["version"]) == ("1", "2")
    assert two["model_uri"] == "models:/animals@champion" and two["model_name"] == "classifier"
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("animals", "champion")
    assert (str(champion.version), champion.run_id) == ("2", second)
    assert client.get_model_version("animals", "1").aliases == []  # the alias moved
    assert champion.source == two["source"] and champion.source.startswith("models:/m-")
    # What the run was, on the version: freeze/stacking/schedule, config hash, test metrics.
    assert {key: champion.tags[key] for key in RUN_TAGS} == RUN_TAGS
    assert champion.tags["config_hash"] == "0123abcd"
    assert float(champion.tags["test_accuracy"]) == 0.75 and "lr" not in champion.tags
    # models:/NAME@champion answers as the run's own classifier, with the class names.
    served = _predict("models:/animals@champion", uri)
    own = _predict(f"runs:/{second}/classifier", uri)
    assert list(served.columns) == ["label", *NAMES]
    assert np.allclose(served[NAMES].to_numpy(), own[NAMES].to_numpy())
    assert np.allclose(served[NAMES].to_numpy(), _classifier(1).predict(X, verbose=0), atol=1e-6)
    # The LoggedModel knows its registered version, as after mlflow.register_model.
    logged = client.get_logged_model(two["source"].removeprefix("models:/"))
    assert '"version": "2"' in logged.tags["mlflow.modelVersions"]


@pytest.mark.slow
def test_promote_parent_takes_the_best_finished_child_by_the_objective(uri, capsys):
    # Job 0 peaks highest (0.9 at its first epoch); job 1 ends higher than job 0 ends; job 2
    # failed with a higher value; job 3 ties job 0 later. The best epoch decides, ties the job.
    parent, children = _sweep(
        uri,
        "sweep",
        [
            ([0.9, 0.4], "FINISHED", _classifier(0)),
            ([0.5, 0.8], "FINISHED", None),
            ([0.99], "FAILED", None),
            ([0.9], "FINISHED", None),
        ],
    )
    found = promoting.promote(uri, name="sweep-best", alias="champion", parent=parent)
    assert found["run_id"] == children[0]
    assert found["tags"]["objective"] == "max val_accuracy"
    assert found["tags"]["best_val_accuracy"] == 0.9
    version = MlflowClient(uri).get_model_version_by_alias("sweep-best", "champion")
    assert version.tags["sweep_parent_run_id"] == parent and version.run_id == children[0]

    # The CLI, with --parent last: the most recent sweep of the experiment.
    code = cli.main(
        ["promote", "--parent", "last", "--name", "sweep-best", "--alias", "champion",
         "--tracking-uri", uri, "--experiment", "sweep", "--config-dir", str(CONF)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    expected = "models:/sweep-best@champion (version 2 of sweep-best: the classifier of run"
    assert f"{expected} {children[0]})" in out


@pytest.mark.slow
def test_promote_parent_last_without_a_sweep_takes_the_best_pipeline_run(uri, capsys):
    # dvc repro, then dvc exp run -S freeze=joint: two top-level runs, no sweep parent. The best
    # epoch of val_accuracy decides; a failed run and a sweep's child are not candidates.
    _run(uri, "dvc", history=[0.5, 0.6], model=_classifier(0))
    best = _run(uri, "dvc", history=[0.7, 0.65], model=_classifier(1))
    _run(uri, "dvc", history=[0.99], status="FAILED")
    code = cli.main(
        ["promote", "--parent", "last", "--name", "dvc-best", "--alias", "champion",
         "--tracking-uri", uri, "--experiment", "dvc", "--config-dir", str(CONF)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"the classifier of run {best})" in out
    picked = "picked as the best of the experiment's 2 runs (no sweep) by max val_accuracy (0.7)"
    assert picked in out
    version = MlflowClient(uri).get_model_version_by_alias("dvc-best", "champion")
    assert version.run_id == best and version.tags["picked_among_runs"] == "2"
    assert "sweep_parent_run_id" not in version.tags


@pytest.mark.slow
def test_promote_errors_are_one_line_and_register_nothing(uri, capsys):
    no_model = _run(uri, "errors", history=[0.5])
    failed = _run(uri, "errors", history=[0.5], status="FAILED")
    _run(uri, "no-sweeps")  # an experiment without sweeps
    empty, _ = _sweep(uri, "errors", [([0.5], "FAILED", None)])
    no_metric, _ = _sweep(uri, "errors", [((), "FINISHED", None)])
    cases = [
        (["no-such-run"], "run no-such-run does not exist in tracking.uri="),
        ([no_model], f"run {no_model} has no logged model (neither classifier nor model)"),
        ([failed], f"run {failed} is FAILED, not FINISHED"),
        (["--parent", no_model], f"run {no_model} has no sweep objective"),
        (["--parent", empty], f"sweep parent run {empty} has no FINISHED child run"),
        (["--parent", no_metric], "logged the objective metric val_accuracy (max)"),
        (["--parent", "last", "--experiment", "no-sweeps"], "has no sweep and no FINISHED run"),
        ([no_model, "--alias", "v1"], "--alias='v1' is reserved by MLflow"),
    ]
    for arguments, message in cases:
        code = cli.main(
            ["promote", *arguments, "--name", "errors", "--tracking-uri", uri,
             "--config-dir", str(CONF)]
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, arguments
        # MLflow may log a line or two first (creating the registry's tables); then one line.
        last = err.strip().splitlines()[-1]
        assert last.startswith("tfstack: error: ") and "Traceback" not in err, err
        assert message in last, err
    assert MlflowClient(uri).search_model_versions("name = 'errors'") == []


@pytest.mark.slow
def test_a_failed_registration_leaves_the_run_finished_and_says_how_to_retry(uri):
    from tfstack.pipeline.run_log import RunLog

    run_id = _run(uri, "failing", history=[0.5])  # no model logged: registration fails
    config = compose(
        [f"tracking.uri={uri}", "tracking.experiment=failing", "tracking.register.name=digits",
         "tracking.register.alias=champion"],
        config_dir=CONF,
    )  # fmt: skip
    run = RunLog(config, paths=type("Paths", (), {"root": ROOT})())
    run.run_id = run_id
    with pytest.raises(TfstackError) as caught:
        promoting.register_finished_run(run, config)
    message = str(caught.value)
    assert message.startswith(f"run {run_id} FINISHED, but registering its model as ")
    assert f"`tfstack promote {run_id} --name digits --alias champion`" in message
    assert "\n" not in message
    assert tracking.get_run(uri, run_id)["status"] == "FINISHED"


# ---------------------------------------------------------------------------------------------
# End to end: the pipeline registers at the end of a successful run
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_evaluate_stage_registers_the_run_and_the_sweep_its_best_job(project):
    register = ["tracking.register.name=digits", "tracking.register.alias=champion"]
    for stage in ("build", "train"):
        assert tfstack(project, stage).returncode == 0
    done = tfstack(project, "evaluate", *register)
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert run.info.status == "FINISHED"
    champion = client.get_model_version_by_alias("digits", "champion")
    assert champion.run_id == run.info.run_id and str(champion.version) == "1"
    assert "registered   models:/digits@champion (version 1 of digits" in done.stdout
    assert champion.tags["freeze"] == run.data.tags["freeze"]
    assert champion.tags["config_hash"] == run.data.tags["config_hash"]
    assert float(champion.tags["test_accuracy"]) == run.data.metrics["test_accuracy"]
    with np.load(project / "outputs" / "prepare" / "target.npz") as target:
        x = target["x_test"][:8]
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/digits@champion").predict(x)
    own = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/classifier").predict(x)
    names = ["5", "6", "7", "8", "9"]
    assert list(served["label"]) == list(own["label"])
    assert np.allclose(served[names].to_numpy(), own[names].to_numpy())

    # A sweep registers its best job once (its jobs do not), as `promote --parent` would.
    swept = tfstack(project, "run", "-m", "freeze=frozen,joint", *register)
    assert swept.returncode == 0, swept.stderr[-3000:]
    parents = client.search_runs(
        [client.get_experiment_by_name("tfstack").experiment_id], "tags.sweep_dir != ''"
    )
    [parent] = parents
    champion = client.get_model_version_by_alias("digits", "champion")
    assert str(champion.version) == "2" and champion.run_id == parent.data.tags["best_run_id"]
    assert len(client.search_model_versions("name = 'digits'")) == 2
    again = tfstack(project, "promote", "--parent", "last", "--name", "digits", "--alias=champion")
    assert again.returncode == 0, again.stderr[-3000:]
    assert client.get_model_version_by_alias("digits", "champion").run_id == champion.run_id


@pytest.mark.slow
def test_dvc_repro_registers_after_the_evaluate_stage(template, tmp_path):
    project = dvc_project(
        template, tmp_path / "dvc", ["tracking.register.name=digits", "tracking.register.alias=a"]
    )
    out = sh(project, "dvc", "repro", "evaluate").stdout
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("digits", "a")
    shown = "registered   models:/digits@a (version 1 of digits: the classifier of run"
    shown += f" {version.run_id})"
    assert shown in out, out
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert version.tags["config_hash"] == run.data.tags["config_hash"]
    assert len(client.search_model_versions("name = 'digits'")) == 1  # once, after evaluate


# ---------------------------------------------------------------------------------------------
# The team's server: `mlflow server` on PostgreSQL, artifacts proxied
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_promote_against_the_postgres_backed_server(mlflow_server):  # noqa: F811
    server_uri, _ = mlflow_server
    first = _run(server_uri, "team", history=[0.5], model=_classifier(0))
    second = _run(server_uri, "team", history=[0.7], model=_classifier(1))
    promoting.promote(server_uri, name="team-digits", alias="champion", run_id=first)
    found = promoting.promote(server_uri, name="team-digits", alias="champion", run_id=second)

    client = MlflowClient(server_uri)
    champion = client.get_model_version_by_alias("team-digits", "champion")
    assert (str(champion.version), champion.run_id) == ("2", second) == (found["version"], second)
    assert champion.tags["stacking"] == "adapter" and champion.tags["config_hash"] == "0123abcd"
    assert client.get_model_version("team-digits", "1").aliases == []
    # A teammate loads the champion through the server: the run's own predictions.
    served = _predict("models:/team-digits@champion", server_uri)
    own = _predict(f"runs:/{second}/classifier", server_uri)
    assert np.allclose(served[NAMES].to_numpy(), own[NAMES].to_numpy())
