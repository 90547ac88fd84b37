"""Class weights (train.class_weight): balanced from the training labels, or a mapping."""

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_base, make_data, make_head

from tfstack.class_weights import balanced_class_weights, resolve_class_weight
from tfstack.datasets import ArrayDataset
from tfstack.errors import ConfigError, DataError
from tfstack.freezing import FreezePolicy
from tfstack.schedules import make_schedule
from tfstack.stacking import build_stacked
from tfstack.training import run_schedule

CONF = Path(__file__).resolve().parents[1] / "conf"
LOSS = "sparse_categorical_crossentropy"
NAMES = ["cat", "dog", "eel"]


def test_balanced_is_sklearns_definition_on_a_known_label_vector():
    y = np.array([0, 0, 0, 1, 2, 2])  # 6 samples, 3 classes: 6 / (3 * count)
    assert balanced_class_weights(y, 3) == pytest.approx({0: 2 / 3, 1: 2.0, 2: 1.0}, abs=1e-12)
    sklearn = pytest.importorskip("sklearn.utils.class_weight")
    expected = sklearn.compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert list(balanced_class_weights(y, 3).values()) == pytest.approx(expected, abs=1e-12)
    # (n, 1) labels, as binary data often has, count the same.
    binary = np.array([[0.0], [1.0], [1.0], [1.0]])  # 4 / (2 * count)
    assert resolve_class_weight("balanced", binary, ["no", "yes"], task="binary") == (
        pytest.approx({0: 2.0, 1: 2 / 3})
    )


def test_a_mapping_takes_names_or_indices_and_the_others_weigh_1():
    y = np.array([0, 1, 2])
    weights = resolve_class_weight({"dog": 3, 2: 0.5}, y, NAMES, task="classification")
    assert weights == {0: 1.0, 1: 3.0, 2: 0.5}
    assert resolve_class_weight(None, y, NAMES, task="classification") is None


@pytest.mark.parametrize(
    ("setting", "task", "message"),
    [
        ({"cow": 2.0}, "classification", "train.class_weight.cow is not a class of the data."),
        ({7: 2.0}, "classification", "train.class_weight.7 is not a class of the data."),
        ({"dog": -1.0}, "classification", "train.class_weight.dog=-1.0 must be a finite number"),
        ({"dog": "a"}, "classification", "train.class_weight.dog='a' must be a number."),
        ("balance", "classification", "train.class_weight='balance' is not valid."),
        ("balanced", "regression", "train.class_weight weights classes, but train.task="),
        ({"cat": 0, "dog": 0, "eel": 0}, "classification", "every weight is 0"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_key(setting, task, message):
    with pytest.raises(ConfigError) as caught:
        resolve_class_weight(
            setting, np.array([0, 1, 2]), NAMES, task=task, key="train.class_weight"
        )
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_balanced_refuses_a_class_without_training_samples():
    with pytest.raises(DataError, match=r"class 2 has no sample in the training split"):
        resolve_class_weight("balanced", np.array([0, 1, 1]), NAMES, task="classification")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.class_weight=even"], "train.class_weight='even' is not valid."),
        (["train=regression", "train.class_weight=balanced"], "train.task=regression has none"),
    ],
)
def test_the_config_check_names_the_key(overrides, message):
    from tfstack.pipeline.compose import compose

    with pytest.raises(ConfigError) as caught:
        compose(overrides, config_dir=CONF)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def _weighted_losses(freeze: str, cache_frozen: bool):
    """The epoch losses of our loop and of plain Keras fit, same model, data and class_weight."""
    x, y = make_data(48)
    y[:30] = 0  # imbalanced: balanced weights differ from 1
    weights = resolve_class_weight("balanced", y, NAMES, task="classification")
    keras.utils.set_random_seed(0)
    ours = build_stacked("sequential", make_base(), make_head()).model
    keras.utils.set_random_seed(0)
    theirs = build_stacked("sequential", make_base(), make_head()).model
    theirs.set_weights(ours.get_weights())

    data = ArrayDataset(x, y, batch_size=16, shuffle=False, seed=0)
    phases = make_schedule(
        "single", epochs=2, lr=0.01, optimizer="adam", freeze=FreezePolicy(freeze)
    )
    (result,) = run_schedule(
        ours,
        phases,
        data,
        loss=LOSS,
        feature_extractors=["base"],
        verbose=0,
        cache_frozen=cache_frozen,
        class_weight=weights,
    )
    # Plain Keras: its own class_weight on the same batches; BN frozen with the base.
    theirs.get_layer("base").trainable = freeze != "frozen"
    theirs.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    before = theirs.get_weights()
    plain = theirs.fit(data.batches(), epochs=2, class_weight=weights, verbose=0)
    theirs.set_weights(before)
    theirs.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    unweighted = theirs.fit(data.batches(), epochs=2, verbose=0)
    return result, plain.history["loss"], unweighted.history["loss"]


@pytest.mark.slow  # three fits
@pytest.mark.parametrize(("freeze", "cache_frozen"), [("joint", False), ("frozen", True)])
def test_balanced_changes_the_loss_exactly_as_keras_class_weight(freeze, cache_frozen):
    result, plain, unweighted = _weighted_losses(freeze, cache_frozen)
    assert result.cached is cache_frozen  # the cached head phase is weighted the same
    assert result.history["loss"] == pytest.approx(plain, abs=1e-6)
    assert abs(result.history["loss"][0] - unweighted[0]) > 1e-3  # the weights did something


@pytest.mark.slow
def test_tfstack_run_with_an_unknown_class_name_fails_in_one_line(project):
    from mlflow.tracking import MlflowClient
    from project_copy import tfstack

    result = tfstack(project, "run", "train.class_weight={cow: 2.0}", "tracking.log_model=false")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("tfstack: error:")]
    assert "train.class_weight.cow is not a class of the data." in line
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (project / "outputs/train/model.keras").exists()
