"""Test metrics and the plots that fit the task.

Classification (multi-class and binary) gets a confusion matrix; regression gets predicted
against true. Every run gets a learning curve over the global epoch, with phase boundaries
marked. Figures are `matplotlib.figure.Figure` objects made without pyplot, so importing this
module never switches a notebook's backend and nothing needs closing; tables are JSON-ready lists
of dicts that DVC's plot templates read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


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


def confusion_figure(matrix: np.ndarray, title: str = "Confusion matrix"):
    """A labelled heat map of a confusion matrix."""
    classes = matrix.shape[0]
    fig = Figure(figsize=(1.0 + 0.6 * classes, 0.8 + 0.6 * classes), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
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


def regression_figure(y_true: np.ndarray, y_pred: np.ndarray, title: str = "Predicted vs true"):
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


def learning_curve_figure(history: Sequence[dict], phase_starts: Sequence[tuple[int, str]] = ()):
    """Loss and the first metric per global epoch, train and validation, phases marked.

    Args:
        history: one dict per epoch with ``epoch`` and Keras's metric names.
        phase_starts: ``(epoch, phase name)`` where each phase begins.
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


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray) -> list[dict]:
    """``[{"actual": a, "predicted": p}, ...]``, the input of DVC's confusion template."""
    return [
        {"actual": int(a), "predicted": int(p)}
        for a, p in zip(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel(), strict=True)
    ]
