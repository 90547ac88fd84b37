"""Phases that end early: early stopping per phase, and the bookkeeping of short phases.

In-process tests train the tiny conftest models with `run_schedule`; one slow end-to-end test
runs `tfstack run` with early stopping and reads the MLflow run back.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_data, make_stacked
from stop_callbacks import KillAfter, Killed, StopAt

from tfstack import checkpoints
from tfstack.datasets import ArrayDataset
from tfstack.early_stopping import EarlyStoppingSpec
from tfstack.freezing import FreezePolicy
from tfstack.phase_results import history_rows
from tfstack.schedules import make_schedule
from tfstack.training import run_schedule

LOSS = "sparse_categorical_crossentropy"
CONF = Path(__file__).resolve().parents[1] / "conf"


pytestmark = pytest.mark.usefixtures("deterministic_ops")


def _data(n=48):
    x, y = make_data(n)
    train = ArrayDataset(x, y, batch_size=16, shuffle=True, seed=0, epoch_seeded=True)
    xv, yv = make_data(24, seed=1)
    return train, ArrayDataset(xv, yv, batch_size=24, shuffle=False, seed=0)


def _schedule(model, epochs, **options):
    train, val = _data()
    phases = make_schedule(
        "two_phase", epochs=epochs, lr=0.05, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    return run_schedule(
        model,
        phases,
        train,
        val,
        loss=LOSS,
        metrics=["accuracy"],
        feature_extractors=["base"],
        verbose=0,
        **options,
    )


@pytest.mark.slow
def test_a_callback_stopping_a_30_epoch_phase_at_epoch_1_hands_over_at_the_next_epoch(tmp_path):
    model = make_stacked()
    results = _schedule(
        model,
        30,
        callbacks_for_phase=lambda phase, index: [StopAt(1)] if index == 0 else [StopAt(3)],
        checkpoint_dir=tmp_path / "checkpoint",
    )
    head, fine_tune = results
    assert (head.initial_epoch, head.epochs, head.planned_epochs) == (0, 2, 30)
    assert (fine_tune.initial_epoch, fine_tune.epochs) == (2, 2)  # epochs 2 and 3
    rows = history_rows(results)
    assert [(r["epoch"], r["phase"]) for r in rows] == [
        (0, "head"),
        (1, "head"),
        (2, "fine_tune"),
        (3, "fine_tune"),
    ]
    state = checkpoints.read_state(tmp_path / "checkpoint")
    assert state.epochs_done == 4 and [row["epoch"] for row in state.epoch_rows] == [0, 1, 2, 3]
    # The finished checkpoint resumes to the same results, training nothing more.
    again = _schedule(make_stacked(), 30, checkpoint_dir=tmp_path / "checkpoint", resume_from=state)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in results]


@pytest.mark.slow
def test_early_stopping_stops_each_phase_and_restores_its_best_weights():
    model = make_stacked()
    rule = EarlyStoppingSpec(monitor="val_loss", patience=1, restore_best_weights=True)
    # lr 0.05 over 30 epochs on random labels: val_loss rises soon in both phases.
    results = _schedule(model, 30, early_stopping=rule)
    for result in results:
        assert result.stopped_epoch is not None, result.history["val_loss"]
        assert result.epochs < 30
        assert result.stopped_epoch == result.initial_epoch + result.epochs - 1
        losses = result.history["val_loss"]
        best = result.initial_epoch + int(np.argmin(losses))
        assert result.best_epoch == result.restored_epoch == best
    assert results[1].initial_epoch == results[0].initial_epoch + results[0].epochs
    # The model ends on the fine-tuning phase's best weights: its val_loss is the best one.
    _, val = _data()
    loss = model.evaluate(val.batches(), verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(min(results[1].history["val_loss"]), rel=1e-5)


@pytest.mark.slow
def test_start_from_epoch_counts_from_the_phase_start():
    rule = EarlyStoppingSpec(monitor="loss", mode="max", patience=0, start_from_epoch=3)
    # mode=max on the loss: every epoch after the first monitored one "fails to improve".
    results = _schedule(make_stacked(), 10, early_stopping=[None, rule])
    assert results[0].epochs == 10 and results[0].stopped_epoch is None
    assert results[1].initial_epoch == 10
    # Monitored from epoch 13 (best), stops at 14 (patience 0).
    assert (results[1].best_epoch, results[1].stopped_epoch) == (13, 14)


RESTORING = EarlyStoppingSpec(monitor="val_loss", patience=2, restore_best_weights=True)


class KillAtStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        raise Killed


def _checkpointed(directory, *, resume_from=None, kill_after=None, cache_frozen=False):
    """The two-phase schedule (8 + 8 epochs, early stopping that restores), checkpointed;
    ``kill_after``: an epoch, or "next_phase" (killed as the fine-tuning phase begins)."""
    model = make_stacked()
    results = None
    kill = [] if kill_after in (None, "next_phase") else [KillAfter(kill_after)]
    try:
        results = _schedule(
            model,
            8,
            early_stopping=RESTORING,
            checkpoint_dir=directory,
            resume_from=resume_from,
            callbacks=kill,
            callbacks_for_phase=lambda phase, index: (
                [KillAtStart()] if kill_after == "next_phase" and index == 1 else []
            ),
            cache_frozen=cache_frozen,
        )
    except Killed:
        pass
    return model, results


def _summary(results):
    keys = ("name", "initial_epoch", "epochs", "history", "stopped_epoch", "best_epoch")
    return [{k: r.to_dict()[k] for k in (*keys, "restored_epoch")} for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["after_best", "at_stop", "next_phase"])
def test_a_run_killed_after_its_best_epoch_resumes_to_the_uninterrupted_result(tmp_path, kill):
    whole, whole_results = _checkpointed(tmp_path / "whole")
    head = whole_results[0]
    assert head.stopped_epoch is not None and head.stopped_epoch == head.best_epoch + 2
    kill_after = {
        "after_best": head.best_epoch + 1,  # the wait count and best weights are checkpointed
        "at_stop": head.stopped_epoch,  # stopped, killed before the phase ended
        "next_phase": "next_phase",  # ended on the best weights, killed before epoch 1 of 2
    }[kill]
    _, none = _checkpointed(tmp_path / "killed", kill_after=kill_after)
    assert none is None  # killed
    state = checkpoints.read_state(tmp_path / "killed")
    assert state.epochs_done == head.stopped_epoch + 1 if kill != "after_best" else kill_after + 1
    resumed, results = _checkpointed(tmp_path / "killed", resume_from=state)
    assert _summary(results) == _summary(whole_results)
    for a, b in zip(whole.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_phase_that_ran_no_epoch_has_no_rows_and_the_curve_still_draws():
    from tfstack import evaluation
    from tfstack.freezing import ParamCounts
    from tfstack.phase_results import PhaseResult

    common = {"lr": 0.1, "freeze": "frozen", "counts": ParamCounts(3, 4)}
    results = [
        PhaseResult("head", 0, 0, 2, history={"loss": [1.0, 0.5]}, planned_epochs=30, **common),
        PhaseResult("fine_tune", 1, 2, 0, history={}, planned_epochs=30, **common),
        PhaseResult("last", 2, 2, 1, history={"loss": [0.4]}, **common),
    ]
    rows = history_rows(results)
    assert [(r["epoch"], r["phase"]) for r in rows] == [(0, "head"), (1, "head"), (2, "last")]
    assert evaluation.phase_starts_of(rows) == [(0, "head"), (2, "last")]
    evaluation.learning_curve_figure(rows, evaluation.phase_starts_of(rows))
    again = [PhaseResult.from_dict(r.to_dict()) for r in results]
    assert [r.to_dict() for r in again] == [r.to_dict() for r in results]


@pytest.mark.slow
def test_a_cached_head_phase_stops_as_the_uncached_one(tmp_path):
    cached, cached_results = _checkpointed(tmp_path / "cached", cache_frozen=True)
    plain, plain_results = _checkpointed(tmp_path / "plain", cache_frozen=False)
    assert cached_results[0].cached and not plain_results[0].cached
    assert cached_results[0].stopped_epoch is not None
    for a, b in zip(cached_results, plain_results, strict=True):
        assert (a.stopped_epoch, a.best_epoch, a.restored_epoch, a.epochs) == (
            b.stopped_epoch,
            b.best_epoch,
            b.restored_epoch,
            b.epochs,
        )
    for a, b in zip(cached.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.early_stopping.patience=1", "train.early_stopping.monitor=val_auc"],
            "train.early_stopping.monitor='val_auc' is not in the training history. Expected "
            "one of ['loss', 'accuracy', 'val_loss', 'val_accuracy'].",
        ),
        (
            ["train.early_stopping.patience=1", "train.early_stopping.mode=up"],
            "train.early_stopping.mode='up' is not valid. Expected one of ['auto', 'min', 'max']",
        ),
        (["train.early_stopping.patience=-1"], "train.early_stopping.patience=-1 must be at"),
        (
            ["train.early_stopping.patience=1", "train.early_stopping.min_delta=-0.1"],
            "train.early_stopping.min_delta=-0.1 must be at least 0",
        ),
        (
            ["train.early_stopping.restore_best_weights=true"],
            "train.early_stopping.restore_best_weights=true would be ignored: early stopping is "
            "off while train.early_stopping.patience is null.",
        ),
        (
            ["schedule=two_phase", "+schedule.early_stopping.finetune={patience: 2}"],
            "schedule.early_stopping.finetune: schedule=two_phase has no phase 'finetune'. Its "
            "phases: ['head', 'fine_tune'].",
        ),
        (
            ["schedule=two_phase", "+schedule.early_stopping.head={patiense: 2}"],
            "schedule.early_stopping.head.patiense is not a config key.",
        ),
        (
            ["schedule=two_phase", "+schedule.early_stopping.head={patience: 2, mode: up}"],
            "schedule.early_stopping.head.mode='up' is not valid.",
        ),
        (
            ["schedule=two_phase", "schedule.early_stopping.head.patience=2"],
            "needs Hydra's '+' prefix: +schedule.early_stopping.head.patience=2",
        ),
    ],
)
def test_a_bad_early_stopping_setting_is_one_line_naming_the_key(overrides, message):
    from tfstack.errors import ConfigError
    from tfstack.pipeline.compose import compose

    with pytest.raises(ConfigError) as caught:
        compose(overrides, config_dir=CONF)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_phase_overrides_the_common_setting_or_turns_it_off():
    from tfstack.pipeline.compose import compose
    from tfstack.pipeline.inputs import early_stopping_rules, make_phases

    config = compose(
        [
            "schedule=gradual",
            "train.early_stopping.patience=3",
            "+schedule.early_stopping.head={patience: 1, restore_best_weights: true}",
            "+schedule.early_stopping.unfreeze_2=null",
        ],
        config_dir=CONF,
    )
    rules = early_stopping_rules(config, make_phases(config))
    assert rules == [
        EarlyStoppingSpec(patience=1, restore_best_weights=True),
        EarlyStoppingSpec(patience=3),
        None,
    ]
    off = compose(
        ["schedule=two_phase", "+schedule.early_stopping.fine_tune={patience: 2}"], config_dir=CONF
    )
    assert early_stopping_rules(off, make_phases(off)) == [None, EarlyStoppingSpec(patience=2)]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("single", {}),
        ("two_phase", {}),
        ("two_phase", {"fine_tune_epochs": 0}),
        ("gradual", {}),
        ("gradual", {"stages": 4}),
    ],
)
def test_the_vocabularys_phase_names_are_the_schedules(name, options):
    from tfstack.vocabulary import phase_names

    phases = make_schedule(
        name, epochs=1, lr=0.1, optimizer="adam", freeze=FreezePolicy("frozen"), **options
    )
    assert phase_names(name, **options) == [p.name for p in phases]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tfstack_run_with_early_stopping_finishes_with_contiguous_steps_and_the_tags(project):
    from mlflow.tracking import MlflowClient
    from project_copy import tfstack

    result = tfstack(
        project,
        "run",
        "schedule=two_phase",
        "train.epochs=30",
        "train.early_stopping.patience=1",
        "train.early_stopping.monitor=val_accuracy",
        "train.early_stopping.restore_best_weights=true",
        "tracking.log_model=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    phases = json.loads((project / "outputs/train/phases.json").read_text())
    head, fine_tune = phases
    assert head["planned_epochs"] == 30 and head["epochs"] < 30, head
    assert head["stopped_epoch"] == head["epochs"] - 1
    assert fine_tune["initial_epoch"] == head["epochs"]  # handed over at the next epoch
    total = head["epochs"] + fine_tune["epochs"]
    history = json.loads((project / "outputs/train/history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(total))

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("val_accuracy", "loss", "phase_index", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(total)), key
    counts = client.get_metric_history(run.info.run_id, "params_trainable")
    assert sorted(m.step for m in counts) == [0, head["epochs"]]
    tags = run.data.tags
    assert tags["phase.0.epochs"] == f"0-{head['epochs'] - 1}"
    assert tags["phase.1.epochs"] == f"{head['epochs']}-{total - 1}"
    assert tags["phase.0.stopped_epoch"] == str(head["stopped_epoch"])
    assert tags["phase.0.best_epoch"] == str(head["best_epoch"])
    assert tags["weights_from_epoch"] == str(fine_tune["restored_epoch"])
    assert run.data.metrics["phase.0.best_epoch"] == head["best_epoch"]
    assert "test_accuracy" in run.data.metrics
    assert not (project / "outputs/train/checkpoint").exists()
