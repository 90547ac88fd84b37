"""Evaluate a trained model on a dataset: metrics, the task's figure and its table.

`evaluate` is the library step: it takes a Keras model and arrays and returns an `Evaluation`
(plain-float metrics, figures, JSON-ready tables and the model's outputs); writing files and
logging runs is the caller's business. Classification (multi-class and binary) gets a confusion
matrix; regression gets predicted against true. `learning_curve_figure` draws a training
history over the global epoch, with phase boundaries marked (`phase_starts_of`). Figures are
`matplotlib.figure.Figure` objects made without pyplot, so importing this module never switches a
notebook's backend and nothing needs closing; tables are JSON-ready lists of dicts that DVC's
plot templates read.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from tfstack.errors import ConfigError, DataError
from tfstack.vocabulary import TASKS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured on one dataset.

    Attributes:
        metrics: Plain floats without a split prefix: the compiled Keras metrics as
            ``model.evaluate`` names them (``loss``, ``accuracy``, ``auc``, ...), then the task
            metrics of `task_metrics`, which take precedence on a shared name. The pipeline
            logs them as ``test_<name>``.
        figures: File name -> figure: ``confusion_matrix.png`` (classification, binary) or
            ``predicted_vs_true.png`` (regression).
        tables: File name -> JSON-ready rows for DVC's plot templates: ``confusion.json``
            (``{"actual", "predicted"}`` per sample, class names when given, else class ids) or
            ``predictions.json``
            (``{"true", "predicted"}`` per target value).
        outputs: The model's predictions on ``x``, as ``model.predict`` returns them.
        confusion_matrix: Counts, rows true and columns predicted; ``None`` for regression.
    """

    metrics: dict[str, float]
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    outputs: np.ndarray | None = None
    confusion_matrix: np.ndarray | None = None


def evaluate(
    model,
    x,
    y,
    *,
    task: str,
    batch_size: int = 32,
    loss=None,
    metrics: Sequence = (),
    class_names: Sequence[str] | None = None,
    feature_extractors: Sequence[str] = (),
    feature_memory_mb: float | None = None,
    feature_cache=None,
) -> Evaluation:
    """Metrics, the task's figure and its table of a trained model on ``(x, y)``.

    The model is used as it is: a compiled model keeps its loss and metrics (and optimizer, so
    a model saved afterwards still resumes training). A model that is not compiled is compiled
    here with ``loss`` and ``metrics`` only, for measuring.

    Args:
        model: A Keras model whose outputs fit ``task``: ``(n, classes)`` probabilities for
            ``classification``, ``(n, 1)`` probabilities for ``binary``, targets for
            ``regression``.
        x: Inputs, as ``model.evaluate`` takes them (usually a NumPy array), or a batched
            ``tf.data.Dataset`` of ``(x, y)`` (e.g. `tfstack.images.ImageDataset.batches`, so
            test images stream from disk) whose targets, in order, are ``y``; or the test set
            as a `tfstack.datasets.IndexedDataset` (unshuffled; needed by ``feature_cache``).
        y: Integer class ids for classification and binary, target values for regression.
        task: ``"classification"``, ``"binary"`` or ``"regression"``.
        batch_size: Samples per batch of ``model.evaluate`` and ``model.predict``.
        loss: The loss to compile with when ``model`` is not compiled (a Keras name or object).
        metrics: The Keras metrics to compile with when ``model`` is not compiled.
        class_names: One name per class, in class-id order: the confusion matrix's tick labels
            and the values of its table's rows (default: class ids).
        feature_extractors: Names of the model's frozen feature extractors. When the model can
            be cut after them (`tfstack.frozen_features.split_frozen`), their part runs once
            over ``x`` and the rest (compiled as the model is) is evaluated and predicts on its
            outputs, in the same batches: the same numbers as ``model.evaluate`` and
            ``model.predict``, which would each run (and trace) the whole model, and decode
            streamed images twice.
        feature_memory_mb: Above this many MB those outputs are written batch by batch to a
            temporary directory (removed at the end) and read back batch by batch, never held
            whole (`tfstack.feature_streaming`); None keeps them in memory.
        feature_cache: A `tfstack.feature_cache.FeatureCache`: with ``x`` an `IndexedDataset`,
            those outputs are read from it when another run stored them, else computed and
            stored (`tfstack.cached_features.phase_features`, split ``test``): a sweep's jobs
            over one frozen base run it over the test set once. The numbers are the same.

    Returns:
        An `Evaluation`.

    Raises:
        DataError: ``task`` is unknown, or ``class_names`` does not name every class.
        ConfigError: ``model`` is not compiled and no ``loss`` is given.

    Example:
        >>> import keras, numpy as np
        >>> from tfstack.evaluation import evaluate
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "softmax")])
        >>> x, y = np.random.rand(20, 4).astype("float32"), np.arange(20) % 3
        >>> result = evaluate(model, x, y, task="classification",
        ...                   loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> sorted(result.metrics)
        ['accuracy', 'balanced_accuracy', 'loss']
        >>> result.figures["confusion_matrix.png"].savefig("confusion_matrix.png")
    """
    if task not in TASKS:
        raise DataError(f"Unknown task {task!r}. Expected one of: {', '.join(TASKS)}.")
    if not model.compiled:
        if loss is None:
            raise ConfigError(
                f"Model {model.name!r} is not compiled and evaluate() got no loss: pass "
                "loss=... (and metrics=[...]), e.g. the loss it was trained with, or compile it."
            )
        model.compile(loss=loss, metrics=list(metrics))
    from tfstack.datasets import ArrayDataset, IndexedDataset

    data = x if isinstance(x, IndexedDataset) else None
    if data is not None and data.shuffle:
        raise DataError(
            "evaluate() got a shuffled dataset: its batches would not follow y. "
            "Give the test set with shuffle=False."
        )
    if data is not None:
        x = data.x if isinstance(data, ArrayDataset) else data.batches()
    scores, outputs = _scores_and_outputs(
        model,
        x,
        y,
        batch_size,
        feature_extractors,
        feature_memory_mb,
        cache=(data, feature_cache) if data is not None and feature_cache is not None else None,
    )
    measured = {name: float(value) for name, value in scores.items()}
    measured.update(task_metrics(y, outputs, task))
    if task == "regression":
        rows = [
            {"true": float(t), "predicted": float(p)}
            for t, p in zip(np.ravel(y), np.ravel(outputs), strict=True)
        ]
        return Evaluation(
            metrics=measured,
            figures={"predicted_vs_true.png": regression_figure(y, outputs)},
            tables={"predictions.json": rows},
            outputs=outputs,
        )
    predicted = predict_labels(outputs, task)
    classes = 2 if task == "binary" else int(outputs.shape[-1])
    matrix = confusion_matrix(y, predicted, classes)
    return Evaluation(
        metrics=measured,
        figures={"confusion_matrix.png": confusion_figure(matrix, class_names=class_names)},
        tables={"confusion.json": confusion_rows(y, predicted, class_names=class_names)},
        outputs=outputs,
        confusion_matrix=matrix,
    )


def _scores_and_outputs(
    model,
    x,
    y,
    batch_size: int,
    feature_extractors: Sequence[str],
    memory_mb: float | None,
    cache=None,
):
    """``model.evaluate``'s scores and ``model.predict``'s outputs, in one pass when it can.

    With a cut after the frozen feature extractors (and no regularization loss in the part
    before it, which ``evaluate``'s loss would add), the part before the cut predicts once; the
    part after it, compiled from the model's compile config, evaluates and predicts on those
    outputs in the same batches, so the loss still comes from the same logits. ``cache``:
    ``(test data, shared feature cache)`` to read (or store) those outputs there.
    """
    split = None
    if feature_extractors:
        from tfstack.frozen_features import inference_split

        split = inference_split(model, feature_extractors)
    compiled = model.get_compile_config()
    if split is not None and not split.frozen.losses and compiled:
        import keras
        import tensorflow as tf

        # Batches of inputs alone, as a cached phase fed the frozen part: its traced predict
        # function serves them (an array, or (x, y) batches, would be traced anew).
        if _is_dataset(x):
            inputs = x.map(lambda *batch: batch[0])
        elif isinstance(x, np.ndarray):
            inputs = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
        else:
            inputs = x
        rest = split.trainable
        # Its loss, metrics and jit_compile; no optimizer (it measures, never trains).
        settings = keras.saving.deserialize_keras_object(compiled)
        settings.pop("optimizer", None)
        rest.compile(**settings)
        if cache is not None:
            from tfstack.cached_features import phase_features

            data, shared = cache
            features = phase_features(split, {"test": data}, shared, memory_mb=memory_mb)
            try:
                return _scores_on(rest, features.outputs["test"], y, batch_size)
            finally:
                features.close()
        from tfstack.feature_streaming import over_budget

        if inputs is not x and over_budget(split.frozen, [len(y)], memory_mb):
            return _streamed_scores_and_outputs(split.frozen, rest, inputs, y, batch_size)
        features = split.frozen.predict(
            inputs, batch_size=None if inputs is not x else batch_size, verbose=0
        )
        scores = rest.evaluate(features, y, batch_size=batch_size, verbose=0, return_dict=True)
        return scores, rest.predict(features, batch_size=batch_size, verbose=0)
    if _is_dataset(x):
        # Batches of (x, y) streamed from disk: Keras takes the batches as they come.
        scores = model.evaluate(x, verbose=0, return_dict=True)
        return scores, model.predict(x, verbose=0)
    scores = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return scores, model.predict(x, batch_size=batch_size, verbose=0)


def _streamed_scores_and_outputs(frozen, rest, inputs, y, batch_size: int):
    """As the in-memory path, with the frozen part's outputs in a temporary directory's files.

    Written batch by batch, then read back in input order in batches of ``batch_size`` (the
    in-memory path's batches), so the scores and predictions are the same.
    """

    from tfstack import feature_streaming

    stored = feature_streaming.temporary_features(frozen, inputs, len(y), name="test")
    try:
        return _scores_on(rest, stored, y, batch_size)
    finally:
        stored.close()


def _scores_on(rest, features, y, batch_size: int):
    """``rest``'s scores and outputs on the frozen part's outputs (arrays, or rows in files)."""
    if hasattr(features, "rows"):  # tfstack.feature_streaming.StoredFeatures
        import tensorflow as tf

        order = tf.data.Dataset.range(len(y)).batch(batch_size)
        batches = features.batches(order, tf.convert_to_tensor(np.asarray(y)))
        scores = rest.evaluate(batches, verbose=0, return_dict=True)
        return scores, rest.predict(batches, verbose=0)
    scores = rest.evaluate(features, y, batch_size=batch_size, verbose=0, return_dict=True)
    return scores, rest.predict(features, batch_size=batch_size, verbose=0)


def predict_labels(probabilities: np.ndarray, task: str) -> np.ndarray:
    """Class predictions from a head's outputs.

    Args:
        probabilities: model outputs, ``(n, classes)`` for multi-class or ``(n, 1)``/``(n,)``
            for binary.
        task: ``classification`` or ``binary``.

    Returns:
        Integer labels, shape ``(n,)``.
    """
    probabilities = np.asarray(probabilities)
    if task == "binary":
        return (probabilities.reshape(len(probabilities), -1)[:, 0] >= 0.5).astype(int)
    return probabilities.argmax(axis=-1).astype(int)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs: rows are true labels, columns predicted."""
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (np.asarray(y_true).astype(int).ravel(), np.asarray(y_pred).ravel()), 1)
    return matrix


def confusion_figure(
    matrix: np.ndarray,
    title: str = "Confusion matrix",
    *,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """A labelled heat map of a confusion matrix, ticks named by ``class_names`` if given.

    Raises:
        DataError: ``class_names`` does not hold one name per class.
    """
    classes = matrix.shape[0]
    if class_names is not None and len(class_names) != classes:
        raise DataError(
            f"class_names has {len(class_names)} names for {classes} classes; give one per class."
        )
    fig = Figure(figsize=(1.0 + 0.6 * classes, 0.8 + 0.6 * classes), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    if class_names is not None:
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(classes):
        for j in range(classes):
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    return fig


def regression_figure(
    y_true: np.ndarray, y_pred: np.ndarray, title: str = "Predicted vs true"
) -> Figure:
    """A scatter of predictions against targets with the identity line."""
    y_true = np.asarray(y_true, dtype=float).ravel()
    y_pred = np.asarray(y_pred, dtype=float).ravel()
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    ax.scatter(y_true, y_pred, s=8, alpha=0.6)
    low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def phase_starts_of(history: Sequence[dict]) -> list[tuple[int, str]]:
    """``(epoch, phase name)`` where each phase of a training history begins.

    Args:
        history: one dict per epoch with ``epoch`` and ``phase``, in epoch order (the
            ``history.json`` the train stage writes).
    """
    return [
        (row["epoch"], row["phase"])
        for i, row in enumerate(history)
        if i == 0 or history[i - 1]["phase"] != row["phase"]
    ]


def learning_curve_figure(
    history: Sequence[dict], phase_starts: Sequence[tuple[int, str]] = ()
) -> Figure:
    """Loss and the first metric per global epoch, train and validation, phases marked.

    Args:
        history: one dict per epoch with ``epoch`` and Keras's metric names.
        phase_starts: ``(epoch, phase name)`` where each phase begins (see `phase_starts_of`).
    """
    keys = [k for k in history[0] if k not in ("epoch", "phase", "lr")] if history else []
    train_keys = [k for k in keys if not k.startswith("val_")]
    panels = train_keys[:2] or ["loss"]
    fig = Figure(figsize=(5 * len(panels), 3.6), dpi=100)
    axes = fig.subplots(1, len(panels))
    axes = np.atleast_1d(axes)
    epochs = [row["epoch"] for row in history]
    for ax, key in zip(axes, panels, strict=False):
        for name, style in ((key, "-"), (f"val_{key}", "--")):
            if history and name in history[0]:
                ax.plot(epochs, [row[name] for row in history], style, marker="o", label=name)
        for start, phase in phase_starts:
            ax.axvline(start - 0.5, color="gray", linewidth=0.8, linestyle=":")
            ax.text(start - 0.4, ax.get_ylim()[1], phase, fontsize=7, va="top", color="gray")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    return fig


def task_metrics(y_true: np.ndarray, outputs: np.ndarray, task: str) -> dict[str, float]:
    """Metrics computed from predictions, independent of the compiled Keras metrics.

    Classification: accuracy and per-class recall mean (balanced accuracy). Regression: MSE, MAE.
    """
    y_true = np.asarray(y_true)
    if task == "regression":
        error = np.asarray(outputs, dtype=float).reshape(y_true.shape) - y_true
        return {"mse": float(np.mean(error**2)), "mae": float(np.mean(np.abs(error)))}
    predicted = predict_labels(outputs, task)
    truth = y_true.astype(int).ravel()
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in np.unique(truth)]
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "balanced_accuracy": float(np.mean(recalls)),
    }


def confusion_rows(
    y_true: np.ndarray, y_pred: np.ndarray, *, class_names: Sequence[str] | None = None
) -> list[dict]:
    """``[{"actual": a, "predicted": p}, ...]``, the input of DVC's confusion template.

    With ``class_names`` the values are the classes' names (``names[label]``), so DVC's plot is
    labelled as the figure is; otherwise the integer class ids.
    """
    pairs = zip(np.asarray(y_true).astype(int).ravel(), np.asarray(y_pred).ravel(), strict=True)
    if class_names is None:
        return [{"actual": int(a), "predicted": int(p)} for a, p in pairs]
    names = [str(name) for name in class_names]
    return [{"actual": names[a], "predicted": names[p]} for a, p in pairs]


def _is_dataset(x) -> bool:
    """Whether ``x`` is a ``tf.data.Dataset`` (checked without importing TensorFlow first)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)
