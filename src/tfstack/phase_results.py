"""What a phase of training leaves: `PhaseResult`, and its histories as per-epoch rows.

A phase may run fewer epochs than planned (early stopping, or a callback that stops it), or
none: `epochs_in` counts the epochs a history holds, and `history_rows` lays every phase's
epochs on one global axis, as `history.json`, the tracking callback and `phases.json` use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tfstack.freezing import ParamCounts

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """What one phase did.

    ``epochs`` counts the epochs the phase ran, which is fewer than ``planned_epochs`` when a
    callback (early stopping) stopped it; the next phase starts at the next global epoch.
    ``stopped_epoch``, ``best_epoch`` and ``restored_epoch`` (global epochs, or None) say what
    the phase's early stopping did: where it stopped, its best epoch, and whose weights it
    ended on (with ``restore_best_weights``).
    """

    name: str
    index: int
    initial_epoch: int
    epochs: int
    lr: float
    freeze: str
    counts: ParamCounts
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    cache_note: str = ""
    # The shared feature cache (`tfstack.feature_cache`): hit, miss or off; each split's key.
    cache: str = "off"
    cache_keys: dict[str, str] = field(default_factory=dict)
    inference_mode: list[str] = field(default_factory=list)
    planned_epochs: int | None = None
    early_stopping: dict[str, Any] | None = None
    stopped_epoch: int | None = None
    best_epoch: int | None = None
    restored_epoch: int | None = None
    # The phase's learning-rate schedule (`tfstack.lr_schedules.LrScheduleSpec.to_dict`).
    lr_schedule: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.planned_epochs is None:
            self.planned_epochs = self.epochs

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "name": self.name,
            "index": self.index,
            "initial_epoch": self.initial_epoch,
            "epochs": self.epochs,
            "planned_epochs": self.planned_epochs,
            "lr": self.lr,
            "freeze": self.freeze,
            "counts": self.counts.to_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "cached": self.cached,
            "cache_note": self.cache_note,
            "cache": self.cache,
            "cache_keys": self.cache_keys,
            "inference_mode": self.inference_mode,
            "early_stopping": self.early_stopping,
            "stopped_epoch": self.stopped_epoch,
            "best_epoch": self.best_epoch,
            "restored_epoch": self.restored_epoch,
            "lr_schedule": self.lr_schedule,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> PhaseResult:
        """The result `to_dict` gave (as a checkpoint keeps the phases finished before a kill)."""
        counts = record["counts"]
        history = {k: list(v) for k, v in record["history"].items()}
        return cls(
            name=record["name"],
            index=record["index"],
            initial_epoch=record["initial_epoch"],
            epochs=epochs_in(history) if "planned_epochs" not in record else record["epochs"],
            lr=record["lr"],
            freeze=record["freeze"],
            counts=ParamCounts(counts["trainable"], counts["non_trainable"]),
            history=history,
            seconds=record.get("seconds", 0.0),
            cached=record.get("cached", False),
            cache_note=record.get("cache_note", ""),
            cache=record.get("cache", "off"),
            cache_keys=dict(record.get("cache_keys", {})),
            inference_mode=list(record.get("inference_mode", [])),
            planned_epochs=record.get("planned_epochs", record["epochs"]),
            early_stopping=record.get("early_stopping"),
            stopped_epoch=record.get("stopped_epoch"),
            best_epoch=record.get("best_epoch"),
            restored_epoch=record.get("restored_epoch"),
            lr_schedule=record.get("lr_schedule"),
        )


def epochs_in(history: dict[str, list[float]]) -> int:
    """How many epochs a Keras history holds (every key has one value per epoch that ended)."""
    return max((len(values) for values in history.values()), default=0)


def history_rows(results: Sequence[PhaseResult]) -> list[dict[str, Any]]:
    """One row per epoch over all phases: ``{"epoch", "phase", <metric>: value, ...}``.

    What the pipeline writes as ``history.json`` and draws as the learning curve. A phase that
    stopped early has rows for the epochs it ran only; one that ran none has none.
    """
    rows = []
    for result in results:
        for i in range(epochs_in(result.history)):
            row: dict[str, Any] = {"epoch": result.initial_epoch + i, "phase": result.name}
            row.update({k: values[i] for k, values in result.history.items() if i < len(values)})
            rows.append(row)
    return rows
