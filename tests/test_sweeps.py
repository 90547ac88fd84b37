"""Hydra multirun sweeps: one MLflow parent run, a complete nested run per job, in parallel too.

The end-to-end tests run `tfstack run -m ...` in a shrunk git + DVC copy of the project (the
`project` fixture of test_pipeline.py), in a subprocess as a user would: Hydra configures logging
per job, which must not leak into the test process.
"""

import json
import math
import re
from pathlib import Path

import pytest
import test_pipeline
import yaml
from omegaconf import OmegaConf
from project_copy import PACKAGED_CONF
from test_pipeline import _runs, _sh, assert_complete_run

from tfstack import cli
from tfstack.errors import ConfigError
from tfstack.pipeline import sweeps

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
project = test_pipeline.project  # the fixture: a shrunk git + DVC copy of the project


def _children(client, runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _parent(runs):
    parents = [r for r in runs if "sweep_dir" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return parents[0]


def test_best_of_history_takes_the_first_best_epoch():
    history = [{"epoch": 0, "val_accuracy": 0.2}, {"epoch": 1, "val_accuracy": 0.6}]
    history.append({"epoch": 2, "val_accuracy": 0.6})
    assert sweeps.best_of_history(history, "val_accuracy", "max") == (0.6, 2)
    assert sweeps.best_of_history(history, "val_accuracy", "min") == (0.2, 1)
    assert sweeps.best_of_history([], "val_accuracy", "max") == (-math.inf, -1)


def test_pick_best_ignores_failed_values_and_breaks_ties_by_job():
    results = [{"job": 0, "value": 0.5}, {"job": 1, "value": 0.7}, {"job": 2, "value": 0.7}]
    assert sweeps.pick_best(results, "max")["job"] == 1
    assert sweeps.pick_best(results, "min")["job"] == 0
    assert sweeps.pick_best([], "max") is None


def test_objective_must_agree_with_the_optuna_direction():
    cfg = OmegaConf.create({"objective": {"metric": "val_loss", "mode": "min"}})
    assert sweeps.objective_of(cfg) == {"metric": "val_loss", "mode": "min"}
    cfg.hydra = {"sweeper": {"direction": "maximize"}}
    with pytest.raises(ConfigError, match="hydra.sweeper.direction=minimize"):
        sweeps.objective_of(cfg)


def test_optuna_preset_searches_lr_depth_and_schedule():
    config, objective, swept = sweeps.preflight(["hparams_search=optuna"], CONF)
    assert objective == {"metric": "val_accuracy", "mode": "max"}
    assert swept == ["train.lr", "freeze.unfreeze_last", "schedule"]
    assert config.freeze.policy == "partial"
    preset = yaml.safe_load((PACKAGED_CONF / "hparams_search" / "optuna.yaml").read_text())
    assert preset["hydra"]["sweeper"]["direction"] == "maximize"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stacking=sequential,stackish"], "stacking=stackish is not an option"),
        (["train.epoch=1,2"], "Did you mean train.epochs?"),
        (["freeze=partial", "freeze.bn=train,sometimes"], "freeze.bn='sometimes' is not valid"),
        (["hparams_search=optuna", "objective.mode=up"], "objective.mode='up' is not valid"),
        (
            ["hparams_search=optuna", "objective.metric=val_auc"],
            "objective.metric=val_auc is not in the training history",
        ),
    ],
)
def test_a_bad_sweep_fails_before_any_run_or_job(tmp_path, monkeypatch, capsys, overrides, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "-m", *overrides, "--config-dir", str(CONF)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_six_job_sweep_in_parallel_nests_six_complete_runs_under_one_parent(project):
    """The README's sweep, with two joblib workers writing one sqlite store at once."""
    result = _sh(
        project,
        "tfstack",
        "run",
        "-m",
        "stacking=sequential,adapter,functional",
        "freeze=frozen,joint",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert "tfstack: sweep of 6 jobs" in result.stdout
    # The three strategies build the same network on the demo: joint ties with itself.
    assert re.search(r"(Best|Tie): freeze=joint", result.stdout), result.stdout[-3000:]
    client, runs = _runs(project)
    parent = _parent(runs)
    children = _children(client, runs, parent.info.run_id)
    assert len(runs) == 7 and len(children) == 6
    for child in children:
        assert_complete_run(client, child, epochs=1, freeze=child.data.tags["freeze"])
    configs = {(c.data.tags["stacking"], c.data.tags["freeze"]) for c in children}
    assert len(configs) == 6
    assert parent.info.status == "FINISHED" and parent.data.tags["launcher"] == "JoblibLauncher"
    assert parent.data.metrics["jobs"] == 6 and parent.data.metrics["jobs_failed"] == 0
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert "comparison/validation_curves.png" in logged
    # Each job wrote its own outputs; the shared outputs/ holds only the demo's inputs.
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/sweep_result.json"))]
    assert len({r["output_dir"] for r in results}) == 6
    for r in results:
        job = Path(r["output_dir"])
        assert (job / "evaluate" / "metrics.json").is_file()
        assert json.loads((job / "run.json").read_text())["run_id"] == r["run_id"]
        assert client.get_run(r["run_id"]).info.run_name == " ".join(r["overrides"])
    assert sorted(p.name for p in (project / "outputs").iterdir()) == ["prepare", "pretrain"]


@pytest.mark.slow
def test_optuna_search_returns_the_metric_and_records_the_best_trial(project):
    result = _sh(
        project, "tfstack", "run", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "seed=1"
    )
    assert "sweep of 3 jobs" in result.stdout
    client, runs = _runs(project)
    parent = _parent(runs)
    children = _children(client, runs, parent.info.run_id)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["sweeper"] == "OptunaSweeper"
    # What each trial returned to Optuna: the best epoch's val_accuracy of its run.
    best_values = {
        c.info.run_id: max(
            m.value for m in client.get_metric_history(c.info.run_id, "val_accuracy")
        )
        for c in children
    }
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == pytest.approx(max(best_values.values()))
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(optuna["best_value"])
    best = client.get_run(parent.data.tags["best_run_id"])
    assert best_values[best.info.run_id] == pytest.approx(optuna["best_value"])
    for key, value in optuna["best_params"].items():
        assert parent.data.tags[f"best_param.{key}"] == str(value)
        assert f"{key}={value}" in parent.data.tags["best_overrides"]
    assert {"train.lr", "freeze.unfreeze_last", "schedule"} == set(optuna["best_params"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/optimization_results.yaml" in logged


@pytest.mark.slow
def test_a_failing_job_ends_its_run_failed_and_the_sweep_goes_on(project):
    """The wide head does not fit a sequential stack; the adapter job still runs."""
    result = _sh(
        project,
        "tfstack",
        "run",
        "-m",
        "experiment=wide_head",
        "stacking=sequential,adapter",
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED" in result.stdout and "stacking=adapter" in result.stdout
    client, runs = _runs(project)
    parent = _parent(runs)
    children = {c.data.tags["stacking"]: c for c in _children(client, runs, parent.info.run_id)}
    assert children["sequential"].info.status == "FAILED"
    assert "stacking=adapter" in children["sequential"].data.tags["error"]
    assert children["adapter"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs_failed"] == 1
    assert parent.data.tags["best_run_id"] == children["adapter"].info.run_id
