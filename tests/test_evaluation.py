"""Evaluating a trained model: metrics as Keras and by hand, real PNGs, DVC-ready tables."""

import doctest
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from matplotlib.image import imread

from tfstack import evaluation
from tfstack.errors import ConfigError, DataError


@pytest.mark.slow
def test_importing_tfstack_keeps_the_users_matplotlib_backend():
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import tfstack.evaluation, tfstack.compare; print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"


@pytest.mark.slow
def test_figures_save_as_pngs_that_open(tmp_path):
    matrix = evaluation.confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), 3)
    history = [
        {"epoch": 0, "phase": "head", "loss": 1.0, "val_loss": 1.1, "accuracy": 0.5},
        {"epoch": 1, "phase": "fine_tune", "loss": 0.8, "val_loss": 0.9, "accuracy": 0.6},
    ]
    figures = {
        "confusion": evaluation.confusion_figure(matrix),
        "regression": evaluation.regression_figure(np.arange(5.0), np.arange(5.0) + 0.1),
        "curve": evaluation.learning_curve_figure(history, [(0, "head"), (1, "fine_tune")]),
    }
    for name, figure in figures.items():
        path = tmp_path / f"{name}.png"
        figure.savefig(path, format="png")
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 0, f"{name} is blank"


# ---------------------------------------------------------------------------------------------
# evaluation.evaluate: the library step, on tiny models trained here
# ---------------------------------------------------------------------------------------------


def _trained(task: str, outputs: int, loss: str, metrics: list[str]):
    """A tiny model fitted for two epochs on separable data, with its test arrays."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)).astype("float32")
    if task == "regression":
        y = (x[:, :outputs] * 2.0 + 0.5).astype("float32")
    elif task == "binary":
        y = (x[:, 0] > 0).astype(int)
    else:
        y = np.argmax(x[:, :outputs], axis=1)
    activation = {"classification": "softmax", "binary": "sigmoid", "regression": None}[task]
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(outputs, activation=activation)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss, metrics=metrics)
    model.fit(x[:60], y[:60], epochs=2, batch_size=16, verbose=0)
    return model, x[60:], y[60:]


def _assert_png_opens(figure, path):
    figure.savefig(path, format="png")
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0, path.name


def _recall_mean(truth, predicted):
    return np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)])


@pytest.mark.slow
def test_evaluate_classification_matches_keras_and_hand_counts(tmp_path):
    model, x, y = _trained("classification", 3, "sparse_categorical_crossentropy", ["accuracy"])
    keras_scores = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    optimizer = model.optimizer
    # A compiled model keeps its compile state: the loss given here is only for uncompiled ones.
    result = evaluation.evaluate(model, x, y, task="classification", batch_size=8, loss="mse")
    assert model.optimizer is optimizer

    assert set(result.metrics) == {"loss", "accuracy", "balanced_accuracy"}
    assert all(type(v) is float for v in result.metrics.values())
    assert result.metrics["loss"] == pytest.approx(keras_scores["loss"], rel=1e-6)
    probabilities = model.predict(x, verbose=0)
    predicted = probabilities.argmax(axis=1)
    assert result.metrics["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert result.metrics["accuracy"] == pytest.approx(keras_scores["accuracy"])
    assert result.metrics["balanced_accuracy"] == pytest.approx(_recall_mean(y, predicted))
    np.testing.assert_allclose(result.outputs, probabilities, rtol=1e-6)

    matrix = result.confusion_matrix
    assert matrix.shape == (3, 3) and matrix.sum() == len(y)
    assert [matrix[c, c] for c in range(3)] == [
        np.sum((y == c) & (predicted == c)) for c in range(3)
    ]
    # DVC's confusion template (dvc.yaml: x: actual, y: predicted) reads one row per sample.
    rows = result.tables["confusion.json"]
    assert rows == [
        {"actual": int(a), "predicted": int(p)} for a, p in zip(y, predicted, strict=True)
    ]
    assert all(type(r["actual"]) is int and type(r["predicted"]) is int for r in rows)
    json.dumps(rows)
    assert set(result.figures) == {"confusion_matrix.png"}
    _assert_png_opens(result.figures["confusion_matrix.png"], tmp_path / "confusion_matrix.png")


@pytest.mark.slow
def test_evaluate_binary_thresholds_at_one_half_and_keeps_compiled_auc(tmp_path):
    model, x, y = _trained("binary", 1, "binary_crossentropy", ["auc"])
    keras_scores = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    result = evaluation.evaluate(model, x, y, task="binary", batch_size=8)

    assert set(result.metrics) == {"loss", "auc", "accuracy", "balanced_accuracy"}
    assert result.metrics["loss"] == pytest.approx(keras_scores["loss"], rel=1e-6)
    assert result.metrics["auc"] == pytest.approx(keras_scores["auc"], rel=1e-6)
    predicted = (model.predict(x, verbose=0)[:, 0] >= 0.5).astype(int)
    assert result.metrics["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert result.metrics["balanced_accuracy"] == pytest.approx(_recall_mean(y, predicted))
    assert result.confusion_matrix.shape == (2, 2)
    assert result.confusion_matrix.tolist() == [
        [int(np.sum((y == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)
    ]
    assert len(result.tables["confusion.json"]) == len(y)
    _assert_png_opens(result.figures["confusion_matrix.png"], tmp_path / "binary.png")


@pytest.mark.slow
def test_evaluate_regression_gives_mse_mae_and_prediction_rows(tmp_path):
    model, x, y = _trained("regression", 2, "mse", ["mae"])
    keras_scores = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    result = evaluation.evaluate(model, x, y, task="regression", batch_size=8)

    assert set(result.metrics) == {"loss", "mae", "mse"}
    assert result.metrics["loss"] == pytest.approx(keras_scores["loss"], rel=1e-5)
    error = model.predict(x, verbose=0).astype(float) - y
    assert result.metrics["mse"] == pytest.approx(np.mean(error**2), rel=1e-6)
    assert result.metrics["mse"] == pytest.approx(keras_scores["loss"], rel=1e-5)
    assert result.metrics["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-6)
    assert result.confusion_matrix is None
    rows = result.tables["predictions.json"]
    assert len(rows) == y.size and set(rows[0]) == {"true", "predicted"}
    assert rows[1] == {"true": float(y[0, 1]), "predicted": float(result.outputs[0, 1])}
    assert set(result.figures) == {"predicted_vs_true.png"}
    _assert_png_opens(result.figures["predicted_vs_true.png"], tmp_path / "regression.png")


def test_evaluate_compiles_an_uncompiled_model_with_the_given_loss_only():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x, y = np.random.default_rng(1).random((12, 4)).astype("float32"), np.arange(12) % 3
    with pytest.raises(ConfigError, match=r"not compiled .* pass loss="):
        evaluation.evaluate(model, x, y, task="classification")
    assert not model.compiled
    result = evaluation.evaluate(
        model, x, y, task="classification", loss="sparse_categorical_crossentropy"
    )
    assert model.compiled and model.loss == "sparse_categorical_crossentropy"
    assert set(result.metrics) == {"loss", "accuracy", "balanced_accuracy"}


def test_evaluate_refuses_an_unknown_task_before_running_the_model():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(DataError, match=r"Unknown task 'multiclass'.*classification, binary"):
        evaluation.evaluate(model, np.zeros((2, 4)), np.zeros(2), task="multiclass", loss="mse")
    assert not model.compiled


def test_confusion_figure_names_classes_and_refuses_a_wrong_count():
    matrix = evaluation.confusion_matrix(np.array([0, 1, 2]), np.array([0, 1, 1]), 3)
    figure = evaluation.confusion_figure(matrix, class_names=["cat", "dog", "eel"])
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "eel"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "eel"]
    with pytest.raises(DataError, match="class_names has 2 names for 3 classes"):
        evaluation.confusion_figure(matrix, class_names=["cat", "dog"])


def test_phase_starts_of_a_history_are_the_first_epoch_of_each_phase():
    history = [
        {"epoch": 0, "phase": "head"},
        {"epoch": 1, "phase": "head"},
        {"epoch": 2, "phase": "fine_tune"},
        {"epoch": 3, "phase": "fine_tune"},
    ]
    assert evaluation.phase_starts_of(history) == [(0, "head"), (2, "fine_tune")]
    assert evaluation.phase_starts_of([]) == []


@pytest.mark.slow
def test_the_docstring_example_of_evaluate_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder()
    (test,) = finder.find(evaluation.evaluate, "evaluate", globs={})
    assert len(test.examples) >= 5
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert imread(tmp_path / "confusion_matrix.png").std() > 0


def test_evaluate_on_the_frozen_part_once_gives_the_two_pass_numbers():
    from conftest import make_base, make_data, make_head

    from tfstack.stacking import build_stacked

    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", make_base(), make_head()).model
    model.get_layer("base").trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*make_data(32), epochs=1, batch_size=8, verbose=0)
    x, y = make_data(40, seed=1)
    kwargs = {"task": "classification", "batch_size": 8}
    two_pass = evaluation.evaluate(model, x, y, **kwargs)
    one_pass = evaluation.evaluate(model, x, y, feature_extractors=["base"], **kwargs)
    assert one_pass.metrics == two_pass.metrics  # the loss from the same logits, bit for bit
    np.testing.assert_array_equal(one_pass.outputs, two_pass.outputs)
    # A base that trains has no frozen part to run once: evaluated as a whole, same numbers.
    model.get_layer("base").trainable = True
    joint = evaluation.evaluate(model, x, y, feature_extractors=["base"], **kwargs)
    assert joint.metrics == two_pass.metrics


def test_test_features_through_the_shared_cache_give_the_same_numbers(tmp_path):
    """A later evaluation of the same frozen part and test set reads the stored features."""
    from conftest import make_base, make_data, make_head

    from tfstack.datasets import ArrayDataset
    from tfstack.feature_cache import FeatureCache
    from tfstack.stacking import build_stacked

    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", make_base(), make_head()).model
    model.get_layer("base").trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = make_data(40, seed=1)
    kwargs = {"task": "classification", "batch_size": 8, "feature_extractors": ["base"]}
    alone = evaluation.evaluate(model, x, y, **kwargs)
    cache = FeatureCache(tmp_path, max_bytes=10**8)
    test = ArrayDataset(x, y, batch_size=8, shuffle=False, seed=0)
    stored = evaluation.evaluate(model, test, y, feature_cache=cache, **kwargs)
    [entry] = cache.entries()
    assert entry.meta["data"].startswith("test split, 40 samples")
    first_use = entry.last_used
    read = evaluation.evaluate(model, test, y, feature_cache=cache, **kwargs)
    [again] = cache.entries()
    assert again.key == entry.key and again.last_used >= first_use  # a hit marks it used
    for result in (stored, read):
        assert result.metrics == alone.metrics
        np.testing.assert_array_equal(result.outputs, alone.outputs)
    # Streamed from the entry's files (over a budget of 0 MB): the same numbers again.
    streamed = evaluation.evaluate(
        model, test, y, feature_cache=cache, feature_memory_mb=0, **kwargs
    )
    assert streamed.metrics == alone.metrics
    # And it is the entry that is read: features overwritten with zeros change the outputs.
    features = np.load(cache.path(entry.key) / "0.npy")
    np.save(cache.path(entry.key) / "0.npy", np.zeros_like(features))
    zeros = evaluation.evaluate(model, test, y, feature_cache=cache, **kwargs)
    assert not np.allclose(zeros.outputs, alone.outputs)
    # A shuffled test set would not follow y: refused, in one line.
    shuffled = ArrayDataset(x, y, batch_size=8, shuffle=True, seed=0)
    with pytest.raises(DataError, match="shuffled dataset.*shuffle=False"):
        evaluation.evaluate(model, shuffled, y, feature_cache=cache, **kwargs)
