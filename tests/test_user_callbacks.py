"""train.callbacks (issue 14, point 6): the user's Keras callbacks, every phase, the full model.

Unit tests use tiny models built here; the end-to-end test runs `tfstack run` in a copy of the
shrunk demo project.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest
import yaml
from mlflow.tracking import MlflowClient
from project_copy import tfstack
from recording_callbacks import RecordModel
from stop_callbacks import StopAt

from tfstack import ArrayDataset, FreezePolicy, build_stacked, run_schedule
from tfstack.errors import ConfigError
from tfstack.keras_names import KERAS_CALLBACKS, REFUSED_CALLBACKS
from tfstack.pipeline.config import validate
from tfstack.schedules import Phase
from tfstack.user_callbacks import builtin_callback

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
LOSS = "sparse_categorical_crossentropy"


def _stacked():
    from conftest import make_base, make_head

    keras.utils.set_random_seed(0)
    return build_stacked("sequential", make_base(), make_head())


def _data():
    from conftest import make_data

    x, y = make_data(32)
    return ArrayDataset(x, y, batch_size=16, shuffle=True, seed=0), ArrayDataset(
        *make_data(16, seed=1), batch_size=16, shuffle=False, seed=0
    )


def _config(callbacks: list, **top):
    """The committed params.yaml with these train.callbacks (no Hydra compose: fast)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["callbacks"] = callbacks
    params.update(top)
    return validate(params, source="params.yaml")


def _refusal(callbacks: list, **top) -> str:
    with pytest.raises(ConfigError) as caught:
        _config(callbacks, **top)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_callback_names_are_those_of_the_installed_keras():
    public = {
        name
        for name in dir(keras.callbacks)
        if isinstance(getattr(keras.callbacks, name), type) and not name.startswith("_")
    }
    assert set(KERAS_CALLBACKS) == public
    assert set(REFUSED_CALLBACKS) <= public


@pytest.mark.slow  # two tiny fits, with caching: seconds
def test_a_cached_phase_runs_the_callbacks_on_the_full_stacked_model(tmp_path):
    """A ModelCheckpoint from config saves the stacked model, and a _target_-style callback
    sees it, while the phase fits the head alone on cached features."""
    stack = _stacked()
    train, val = _data()
    checkpoint = builtin_callback(
        {"class_name": "ModelCheckpoint", "config": {"filepath": "best.keras"}},
        index=0,
        directory=tmp_path,
    )
    recorder = RecordModel()
    [result] = run_schedule(
        stack.model,
        [Phase("head", 2, FreezePolicy("frozen"), 0.01)],
        train,
        val,
        loss=LOSS,
        feature_extractors=stack.feature_extractors,
        callbacks=[checkpoint, recorder],
        verbose=0,
        cache_frozen=True,
    )
    assert result.cached
    full = (stack.model.name, len(stack.model.layers))
    assert recorder.seen == [(0, *full), (1, *full)]
    saved = keras.saving.load_model(tmp_path / "best.keras", compile=False)
    assert (saved.name, [layer.name for layer in saved.layers]) == (
        stack.model.name,
        [layer.name for layer in stack.model.layers],
    )


@pytest.mark.slow  # two tiny fits, with caching: seconds
def test_stop_training_from_a_callback_ends_a_cached_phase():
    stack = _stacked()
    train, val = _data()
    results = run_schedule(
        stack.model,
        [
            Phase("head", 5, FreezePolicy("frozen"), 0.01),
            Phase("fine_tune", 1, FreezePolicy("joint"), 0.001),
        ],
        train,
        val,
        loss=LOSS,
        feature_extractors=stack.feature_extractors,
        callbacks=[StopAt(1)],
        verbose=0,
        cache_frozen=True,
    )
    head, fine_tune = results
    assert head.cached
    assert (head.epochs, head.planned_epochs) == (2, 5)
    assert (fine_tune.initial_epoch, fine_tune.epochs) == (2, 1)


def test_keras_refusing_the_parameters_is_one_line_naming_the_entry(tmp_path):
    with pytest.raises(ConfigError) as caught:
        builtin_callback(
            {"class_name": "EarlyStopping", "config": {"patiense": 3}},
            index=2,
            directory=tmp_path,
        )
    message = str(caught.value)
    assert message.startswith("train.callbacks[2]: EarlyStopping(patiense=3) is refused by Keras")
    assert "patiense" in message and "\n" not in message


def test_a_relative_file_goes_under_the_outputs_and_csvlogger_appends(tmp_path):
    logger = builtin_callback(
        {"class_name": "CSVLogger", "config": {"filename": "epochs.csv"}},
        index=0,
        directory=tmp_path / "train",
    )
    assert (logger.filename, logger.append) == (str(tmp_path / "train" / "epochs.csv"), True)


def test_an_unknown_name_suggests_the_close_ones():
    message = _refusal([{"class_name": "EarlyStoping"}])
    assert message.startswith("train.callbacks[0]: 'EarlyStoping' is not a Keras callback.")
    assert "Did you mean EarlyStopping?" in message


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("BackupAndRestore", "resumes a killed run itself"),
        ("TensorBoard", "tracking.tensorboard=true"),
        ("LambdaCallback", "_target_"),
    ],
)
def test_callbacks_that_break_tfstack_are_refused_with_the_reason(name, reason):
    message = _refusal([{"class_name": "TerminateOnNaN"}, {"class_name": name}])
    assert message.startswith(f"train.callbacks[1]: tfstack does not run {name}: ")
    assert reason in message


def test_a_target_entry_needs_the_top_level_trust_code():
    entry = [{"_target_": "recording_callbacks.RecordModel"}]
    message = _refusal(entry)
    assert message.startswith("train.callbacks[0] (_target_: recording_callbacks.RecordModel)")
    assert "trust_code=true" in message
    assert _config(entry, trust_code=True).train.callbacks == entry


@pytest.mark.slow  # a Hydra compose: about a second
def test_dvc_exp_run_set_param_expresses_a_list(tmp_path):
    """`dvc exp run -S` composes params.yaml with DVC's compose_and_dump: the list survives."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    overrides = ["train.callbacks=[{class_name: EarlyStopping, config: {patience: 2}}]"]
    compose_and_dump(out, str(CONF), None, "config", str(ROOT), overrides)
    config = validate(yaml.safe_load(out.read_text()), source="params.yaml")
    assert config.train.callbacks == [{"class_name": "EarlyStopping", "config": {"patience": 2}}]


@pytest.mark.slow
def test_tfstack_run_with_callbacks_in_every_phase(template, tmp_path):
    """`tfstack run` with a built-in and the user's own callback (trusted) in a two-phase
    schedule whose head phase is cached: both run, the user's sees the full model; logged.
    With tracking.tensorboard=true too: the logs of both phases are in the run's artifacts."""
    from project_copy import clone

    project = clone(template, tmp_path / "project")
    (project / "recording_callbacks.py").write_text(
        (Path(__file__).parent / "recording_callbacks.py").read_text()
    )
    seen = project / "seen.json"
    done = tfstack(
        project,
        "run",
        "schedule=two_phase",
        "trust_code=true",
        "tracking.tensorboard=true",
        "train.callbacks=[{class_name: TerminateOnNaN}, "
        f"{{_target_: recording_callbacks.RecordModel, path: '{seen}'}}]",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    phases = json.loads((project / "outputs" / "train" / "phases.json").read_text())
    assert [p["cached"] for p in phases] == [True, False]
    records = json.loads(seen.read_text())
    assert [epoch for epoch, _, _ in records] == [0, 1]
    assert len({(name, layers) for _, name, layers in records}) == 1  # the same, full model
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["callbacks"] == "TerminateOnNaN, recording_callbacks.RecordModel"
    assert "TerminateOnNaN" in run.data.params["train.callbacks"]
    assert run.data.params["tracking.tensorboard"] == "True"
    logs = project / "outputs" / "train" / "tensorboard"
    assert list((logs / "train").glob("events.out.tfevents.*"))
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "tensorboard")}
    assert logged == {"tensorboard/train", "tensorboard/validation"}
    events = client.list_artifacts(run.info.run_id, "tensorboard/train")
    # One event file per phase (each fit opens its writers); TensorBoard reads them as one run.
    assert sorted(Path(a.path).name for a in events) == sorted(
        p.name for p in (logs / "train").iterdir()
    )
    assert len(events) == 2
