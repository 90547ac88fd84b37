"""Early stopping per phase: Keras's `EarlyStopping` rule, with state a checkpoint can keep.

`EarlyStoppingSpec` is the setting (``train.early_stopping`` in the pipeline); `PhaseEarlyStopping`
is the callback one phase of `tfstack.training.run_schedule` trains with. The decision (the
monitored value, ``min_delta``, ``patience``, ``start_from_epoch``, ``mode``) is Keras's own
`keras.callbacks.EarlyStopping`, unchanged. What the subclass adds:

- Epochs are global (phases continue one epoch axis), so ``start_from_epoch`` counts from the
  phase's first epoch, and ``stopped_epoch``/``best_epoch`` are global epochs.
- The best weights are those of the stacked model, whichever model the phase fits (a cached
  phase fits only the part after the frozen features, sharing its variables), so a cached and
  an uncached phase keep and restore the same weights.
- Its state (best value, wait count, best and stopped epoch, best weights) can be read after any
  epoch (`state`, `best_weights`) and given back to a new instance (``resume=``), so a phase
  resumed from a checkpoint stops, and restores, as the uninterrupted phase would have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from tfstack.errors import ScheduleError
from tfstack.vocabulary import EARLY_STOPPING_MODES as MODES

# Where a checkpoint's record of the current phase keeps `PhaseEarlyStopping.state`.
STATE_KEY = "early_stopping_state"
# The prefix of the best weights' arrays in a checkpoint's weights file.
ARRAYS = "best"


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """When a phase stops early: the arguments of `keras.callbacks.EarlyStopping`.

    Args:
        monitor: a key of Keras's epoch logs, e.g. ``val_loss`` or ``val_accuracy``.
        mode: ``auto`` (from the metric), ``min`` or ``max``.
        patience: epochs without improvement after which the phase stops.
        min_delta: the smallest change that counts as an improvement.
        restore_best_weights: end the phase on the weights of its best epoch.
        start_from_epoch: epochs of the phase before the monitored value is looked at.

    Example:
        >>> EarlyStoppingSpec(patience=2).monitor
        'val_loss'
    """

    monitor: str = "val_loss"
    mode: str = "auto"
    patience: int = 0
    min_delta: float = 0.0
    restore_best_weights: bool = False
    start_from_epoch: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ScheduleError(f"early stopping mode={self.mode!r}: expected one of {MODES}.")
        if self.patience < 0 or self.start_from_epoch < 0:
            raise ScheduleError(
                f"early stopping patience={self.patience}, start_from_epoch="
                f"{self.start_from_epoch}: both must be at least 0."
            )
        if not math.isfinite(self.min_delta) or self.min_delta < 0:
            raise ScheduleError(f"early stopping min_delta={self.min_delta} must be >= 0.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


class PhaseEarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping` for one phase of a schedule, resumable.

    Put it before the checkpoint's callback: the checkpoint of an epoch then records the
    decision made at that epoch.

    Args:
        spec: the setting.
        stacked: the stacked model, whose weights are kept and restored.
        phase_start: the global epoch the phase starts at.
        resume: `state` of the same phase at the checkpoint (None: a fresh phase).
        best_weights: `best_weights` at the checkpoint (with ``resume``).
    """

    def __init__(
        self,
        spec: EarlyStoppingSpec,
        stacked: keras.Model,
        *,
        phase_start: int,
        resume: dict[str, Any] | None = None,
        best_weights: list[np.ndarray] | None = None,
    ):
        # Keras's own capture and restore are off: they would use the model being fitted, which
        # in a cached phase is only part of the stacked model.
        super().__init__(
            monitor=spec.monitor,
            min_delta=spec.min_delta,
            patience=spec.patience,
            mode=spec.mode,
            restore_best_weights=False,
            start_from_epoch=phase_start + spec.start_from_epoch,
        )
        self.spec = spec
        self.stacked = stacked
        self.keep_best = spec.restore_best_weights
        self._resume = resume
        self._resume_weights = best_weights
        self.restored_epoch: int | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.restored_epoch = None
        if self._resume:
            self.wait = int(self._resume["wait"])
            self.best = self._resume["best"]
            self.best_epoch = int(self._resume["best_epoch"])
            self.stopped_epoch = int(self._resume["stopped_epoch"])
            self.best_weights = self._resume_weights

    def on_epoch_end(self, epoch, logs=None):
        previous = self.best
        super().on_epoch_end(epoch, logs)
        # Keras assigns the epoch's value to `best` only when it improves.
        if self.keep_best and self.best is not previous:
            self.best_weights = self.stacked.get_weights()

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.restore()

    def restore(self) -> None:
        """Put the best epoch's weights into the stacked model (with restore_best_weights)."""
        if self.keep_best and self.best_weights is not None:
            self.stacked.set_weights(self.best_weights)
            self.restored_epoch = self.best_epoch

    @property
    def stopped(self) -> bool:
        """Whether the rule stopped the phase (Keras never stops at global epoch 0)."""
        return self.stopped_epoch > 0

    def state(self) -> dict[str, Any]:
        """The JSON-ready state after the last epoch (the best weights are `best_weights`)."""
        best = None if self.best is None else float(np.asarray(self.best))
        return {
            "wait": int(self.wait),
            "best": best,
            "best_epoch": int(self.best_epoch) if best is not None else None,
            "stopped_epoch": int(self.stopped_epoch),
            "best_weights": 0 if self.best_weights is None else len(self.best_weights),
        }

    def summary(self) -> dict[str, int | None]:
        """What the phase's result records: stopped, best and restored epoch (global)."""
        state = self.state()
        return {
            "stopped_epoch": state["stopped_epoch"] if self.stopped else None,
            "best_epoch": state["best_epoch"],
            "restored_epoch": self.restored_epoch,
        }


def stopped_at_checkpoint(record: dict[str, Any]) -> bool:
    """Whether a checkpoint's phase record shows early stopping ended the phase already."""
    state = record.get(STATE_KEY) or {}
    return int(state.get("stopped_epoch", 0) or 0) > 0
