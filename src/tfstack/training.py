"""Run a schedule's phases: apply the freeze policy, recompile, fit, continue the epoch count.

Every phase recompiles with a fresh optimizer (a ``trainable`` change made after ``compile`` does
nothing in Keras 3, and an optimizer built for one set of variables refuses another), then calls
``fit`` with ``initial_epoch`` so that epochs, and anything logged per epoch, form one global
sequence across phases.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from tfstack.errors import TrainingError
from tfstack.freezing import FreezeReport, ParamCounts, apply_freeze_policy
from tfstack.schedules import Phase, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """What one phase did."""

    name: str
    index: int
    initial_epoch: int
    epochs: int
    lr: float
    freeze: str
    counts: ParamCounts
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "name": self.name,
            "index": self.index,
            "initial_epoch": self.initial_epoch,
            "epochs": self.epochs,
            "lr": self.lr,
            "freeze": self.freeze,
            "counts": self.counts.to_dict(),
            "history": self.history,
            "seconds": self.seconds,
        }


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise a TrainingError naming the phase and epoch when the loss is NaN or infinite."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(
                f"The loss became {float(loss)} in phase {self.phase!r} at epoch {epoch + 1}. "
                "Lower train.lr, check the data for extreme values, or check train.loss fits "
                "the head's output."
            )


def compile_phase(
    model: keras.Model,
    phase: Phase,
    *,
    loss,
    metrics: Sequence,
    feature_extractors: list[str],
) -> FreezeReport:
    """Apply a phase's freeze policy, then compile with a fresh optimizer.

    Args:
        model: the stacked model.
        phase: the phase to prepare.
        loss: a Keras loss (name or object).
        metrics: Keras metrics (names or objects).
        feature_extractors: names of the feature-extractor components.

    Returns:
        The freeze report with the checked parameter counts.
    """
    report = apply_freeze_policy(model, phase.freeze, feature_extractors=feature_extractors)
    optimizer = make_optimizer(
        phase.optimizer, phase.lr, model=model, lr_multipliers=phase.lr_multipliers
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return report


def fit_phase(
    model: keras.Model,
    phase: Phase,
    train_data,
    val_data=None,
    *,
    loss,
    metrics: Sequence = (),
    feature_extractors: list[str],
    index: int = 0,
    initial_epoch: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
) -> PhaseResult:
    """Freeze, recompile and fit one phase.

    Args:
        model: the stacked model.
        phase: the phase.
        train_data: a batched ``tf.data.Dataset`` of ``(x, y)``.
        val_data: an optional batched validation dataset.
        loss: a Keras loss.
        metrics: Keras metrics.
        feature_extractors: names of the feature-extractor components.
        index: the phase's position in the schedule.
        initial_epoch: the global epoch this phase starts at.
        callbacks: Keras callbacks for this phase.
        verbose: Keras ``fit`` verbosity.

    Returns:
        The phase result, with Keras's history for the phase.

    Raises:
        TrainingError: the loss became non-finite.
    """
    report = compile_phase(
        model, phase, loss=loss, metrics=metrics, feature_extractors=feature_extractors
    )
    logger.info(
        "Phase %d %r: %d epochs from epoch %d, lr=%g, freeze=%s, trainable=%d",
        index,
        phase.name,
        phase.epochs,
        initial_epoch,
        phase.lr,
        phase.freeze.describe(),
        report.counts.trainable,
    )
    start = time.perf_counter()
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=initial_epoch + phase.epochs,
        initial_epoch=initial_epoch,
        callbacks=[StopOnNonFiniteLoss(phase.name), *callbacks],
        verbose=verbose,
        # A tf.data pipeline shuffles itself (seeded); Keras's own shuffle applies to arrays only.
        shuffle=not isinstance(train_data, tf.data.Dataset),
    )
    seconds = time.perf_counter() - start
    return PhaseResult(
        name=phase.name,
        index=index,
        initial_epoch=initial_epoch,
        epochs=phase.epochs,
        lr=phase.lr,
        freeze=phase.freeze.describe(),
        counts=report.counts,
        history={k: [float(v) for v in values] for k, values in history.history.items()},
        seconds=seconds,
    )


def run_schedule(
    model: keras.Model,
    phases: Sequence[Phase],
    train_data,
    val_data=None,
    *,
    loss,
    metrics: Sequence = (),
    feature_extractors: list[str],
    callbacks: Sequence[keras.callbacks.Callback] = (),
    callbacks_for_phase: Callable[[Phase, int], list] | None = None,
    initial_epoch: int = 0,
    verbose: int | str = "auto",
) -> list[PhaseResult]:
    """Run every phase in order, continuing the global epoch count.

    Args:
        model: the stacked model.
        phases: the schedule.
        train_data: a batched ``tf.data.Dataset`` of ``(x, y)``.
        val_data: an optional batched validation dataset.
        loss: a Keras loss.
        metrics: Keras metrics.
        feature_extractors: names of the feature-extractor components.
        callbacks: callbacks used in every phase.
        callbacks_for_phase: called with ``(phase, index)``; returns extra callbacks for that
            phase (e.g. a tracking hook that records the phase name).
        initial_epoch: the global epoch the first phase starts at.
        verbose: Keras ``fit`` verbosity.

    Returns:
        One PhaseResult per phase.
    """
    results = []
    epoch = initial_epoch
    for index, phase in enumerate(phases):
        extra = callbacks_for_phase(phase, index) if callbacks_for_phase else []
        result = fit_phase(
            model,
            phase,
            train_data,
            val_data,
            loss=loss,
            metrics=metrics,
            feature_extractors=feature_extractors,
            index=index,
            initial_epoch=epoch,
            callbacks=[*callbacks, *extra],
            verbose=verbose,
        )
        results.append(result)
        epoch += phase.epochs
    return results
