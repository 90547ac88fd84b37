"""`tfstack compare`: the table from plain run dicts, then from a real sqlite store via the CLI."""

import csv
import io
import math
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from tfstack import cli, compare, tracking  # noqa: E402

CONF = ["--config-dir", str(Path(__file__).resolve().parents[1] / "conf")]


def _run(run_id, freeze, seed, test_accuracy, stacking="sequential", schedule="single", **tags):
    return {
        "run_id": run_id,
        "run_name": f"{freeze} {seed}",
        "params": {"seed": str(seed), "train.lr": "0.01", "freeze.policy": freeze},
        "tags": {"freeze": freeze, "stacking": stacking, "schedule": schedule, **tags},
        "metrics": {
            "test_accuracy": test_accuracy,
            "test_loss": 1 - test_accuracy,
            "stage_seconds_train": 2.0 + seed,
            "params_trainable": 165 if freeze == "frozen" else 21429,
        },
    }


def _curve(*values):
    return {
        "val_accuracy": list(enumerate(values)),
        "val_loss": [(i, 1 - v) for i, v in enumerate(values)],
    }


RUNS = [
    _run("f1", "frozen", 1, 0.60),
    _run("f2", "frozen", 2, 0.70),
    _run("j1", "joint", 1, 0.85),
    _run("j2", "joint", 2, 0.89),
]
HISTORIES = {
    "f1": _curve(0.2, 0.5, 0.5, 0.4),
    "f2": _curve(0.3, 0.6, 0.6, 0.6),
    "j1": _curve(0.4, 0.9, 1.0, 1.0),
    "j2": _curve(0.5, 0.8, 0.9, 0.7),
}


def test_best_epoch_is_first_best_and_one_based():
    assert compare.best_epoch([(0, 0.2), (1, 0.9), (2, 0.9)], "val_accuracy") == (0.9, 2)
    assert compare.best_epoch([(0, 2.0), (1, 0.5), (2, 0.7)], "val_loss") == (0.5, 2)
    assert compare.best_epoch([(0, float("nan"))], "val_accuracy") == (None, None)


def test_seeds_of_one_configuration_give_mean_and_spread():
    comparison = compare.compare_runs(RUNS, HISTORIES)
    joint, frozen = comparison.rows  # ranked: joint first
    assert joint.group == ("joint", "sequential", "single") and joint.n == 2
    assert joint.mean["test_accuracy"] == pytest.approx(0.87)
    assert joint.spread["test_accuracy"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert joint.mean["best_val_accuracy"] == pytest.approx(0.95)  # 1.0 (epoch 3), 0.9 (epoch 3)
    assert joint.mean["best_epoch"] == pytest.approx(3)
    assert joint.mean["epochs"] == 4 and joint.mean["params_trainable"] == 21429
    assert frozen.mean["best_epoch"] == pytest.approx(2)  # first best: epoch 2 in both seeds
    assert frozen.mean["train_seconds"] == pytest.approx(3.5)
    text = comparison.text()
    assert "0.8700 ± 0.0283" in text and "21429" in text
    assert "Best: freeze=joint stacking=sequential schedule=single" in comparison.verdict
    assert "0.2200 above the next, freeze=frozen" in comparison.verdict
    assert "within the spread" not in comparison.verdict


def test_verdict_says_when_the_margin_is_inside_the_seed_spread():
    runs = [_run("a1", "frozen", 1, 0.80), _run("a2", "frozen", 2, 0.90)]
    runs += [_run("b1", "joint", 1, 0.84), _run("b2", "joint", 2, 0.84)]
    comparison = compare.compare_runs(runs, {})
    assert comparison.verdict.startswith("Best: freeze=frozen")
    assert "within the spread over seeds" in comparison.verdict
    tie = compare.compare_runs([_run("c", "frozen", 1, 0.5), _run("d", "joint", 1, 0.5)], {})
    assert tie.verdict.startswith("Tie:")


def test_lower_is_better_metrics_rank_ascending():
    comparison = compare.compare_runs(RUNS, HISTORIES, rank_by="test_loss")
    assert comparison.rows[0].group[0] == "joint"
    assert "below the next" in comparison.verdict


def test_runs_differing_in_more_than_the_seed_are_flagged_or_grouped_apart():
    runs = [_run("a", "joint", 1, 0.8), _run("b", "joint", 2, 0.9)]
    runs[1]["params"]["train.lr"] = "0.001"
    comparison = compare.compare_runs(runs, {})
    assert "also differ in train.lr" in comparison.text()
    by_lr = compare.compare_runs(runs, {}, group_by=[*compare.GROUP_BY, "train.lr"])
    assert [row.n for row in by_lr.rows] == [1, 1]
    assert "train.lr" in by_lr.text().splitlines()[0]


def test_csv_markdown_and_curves(tmp_path):
    comparison = compare.compare_runs(RUNS, HISTORIES)
    files = comparison.write(tmp_path)
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert [r["freeze"] for r in rows] == ["joint", "frozen"]
    assert float(rows[0]["test_accuracy_mean"]) == pytest.approx(0.87)
    assert float(rows[0]["test_accuracy_std"]) > 0 and rows[0]["runs"] == "2"
    markdown = files["markdown"].read_text()
    assert markdown.startswith("| freeze | stacking | schedule | runs |")
    assert "Best: freeze=joint" in markdown
    assert files["png"].stat().st_size > 10_000
    # Frozen and joint overlaid: one line per configuration and panel, coloured by policy.
    accuracy_panel = comparison.figure.axes[0]
    colors = {line.get_label(): line.get_color() for line in accuracy_panel.get_lines()}
    assert colors == {
        "freeze=joint stacking=sequential schedule=single (n=2)": "tab:orange",
        "freeze=frozen stacking=sequential schedule=single (n=2)": "tab:blue",
    }


# ---------------------------------------------------------------------------------------------
# From a real store, through the CLI
# ---------------------------------------------------------------------------------------------


def _log(uri, experiment, run, history, parent=None):
    tags = dict(run["tags"])
    if parent:
        tags[tracking.PARENT_RUN_TAG] = parent
    run_id = tracking.start_run(uri, experiment, run_name=run["run_name"], tags=tags)
    tracking.log_params_flat(run_id, {"seed": run["params"]["seed"]})
    for (step, accuracy), (_, loss) in zip(
        history["val_accuracy"], history["val_loss"], strict=True
    ):
        tracking.log_metrics(run_id, {"val_accuracy": accuracy, "val_loss": loss}, step=step)
    tracking.log_metrics(run_id, run["metrics"])
    tracking.end_run(run_id)
    return run_id


@pytest.fixture
def store(tmp_path):
    """A sweep parent with four children (frozen and joint, two seeds each) and a reproduction;
    one more run in another experiment."""
    uri = tracking.default_tracking_uri(tmp_path)
    parent = tracking.start_run(uri, "sweeps", run_name="sweep", tags={"sweep_dir": "multirun/x"})
    for run in RUNS:
        _log(uri, "sweeps", run, HISTORIES[run["run_id"]], parent=parent)
    # A reproduction repeats a run; it must not count as another seed.
    copy = _run("r", "joint", 1, 0.10, reproduced_from="j1")
    _log(uri, "sweeps", copy, HISTORIES["j1"], parent=parent)
    tracking.end_run(parent)
    _log(uri, "tfstack", _run("o", "partial", 1, 0.93), HISTORIES["j1"])
    return uri, parent


@pytest.mark.slow
def test_compare_cli_reads_a_sweep_and_logs_the_table_to_its_parent(
    store, tmp_path, monkeypatch, capsys
):
    uri, parent = store
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--parent", "last", f"tracking.uri={uri}", "tracking.experiment=sweeps"]
    assert cli.main([*args, *CONF, "--out", "table"]) == 0
    out = capsys.readouterr().out
    assert "joint   sequential  single    2" in out and "± 0.0283" in out
    assert "Best: freeze=joint" in out and f"logged to parent run {parent}" in out
    assert {p.name for p in (tmp_path / "table").iterdir()} == {
        "comparison.csv",
        "comparison.md",
        "validation_curves.png",
    }
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert logged == {
        "comparison/comparison.csv",
        "comparison/comparison.md",
        "comparison/validation_curves.png",
    }
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"  # logging afterwards does not reopen it
    assert run.data.tags["best_config"] == "freeze=joint stacking=sequential schedule=single"


@pytest.mark.slow
def test_compare_cli_by_experiment_and_filter(store, tmp_path, monkeypatch, capsys):
    uri, _ = store
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", f"tracking.uri={uri}", *CONF, "--out", "a"]) == 0
    out = capsys.readouterr().out
    assert "partial" in out and "frozen" not in out.split("Best")[0]  # experiment tfstack only
    filtered = ["--filter", "tags.freeze = 'frozen'", "--out", "b"]
    overrides = [f"tracking.uri={uri}", "tracking.experiment=sweeps"]
    assert cli.main(["compare", *overrides, *CONF, *filtered]) == 0
    out = capsys.readouterr().out
    assert "frozen" in out and "joint" not in out


@pytest.mark.parametrize(
    ("overrides", "options", "message"),
    [
        (["tracking.experiment=nope"], [], "tracking.experiment=nope does not exist"),
        ([], ["--filter", "tags.freeze == 'x'"], "cannot search runs with filter"),
        ([], ["--parent", "0123abc"], "run 0123abc does not exist"),
        (["train.lr=1"], [], "takes only tracking overrides"),
        ([], ["--filter", "tags.freeze = 'none'"], "No finished tfstack runs"),
    ],
)
@pytest.mark.slow
def test_compare_cli_errors_name_the_problem(
    store, tmp_path, monkeypatch, capsys, overrides, options, message
):
    uri, _ = store
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", f"tracking.uri={uri}", *overrides, *CONF, *options]) == 2
    assert message in capsys.readouterr().err


def test_compare_on_a_missing_store_does_not_create_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli.main(["compare", f"tracking.uri={uri}", *CONF]) == 2
    assert "holds no runs" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
