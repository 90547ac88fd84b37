"""Learning-rate schedules within a phase: Keras's own schedules and ReduceLROnPlateau.

`LrScheduleSpec` is the setting (``train.lr_schedule`` in the pipeline, overridable per phase);
`LrScheduleSpec.build` turns it into what the phase's optimizer is given as ``learning_rate``:
the plain rate, or a `keras.optimizers.schedules.LearningRateSchedule` over the phase's steps.

- ``constant``: the phase's rate throughout (the default, as without a schedule).
- ``cosine``: `keras.optimizers.schedules.CosineDecay` from the phase's rate to
  ``rate * final_fraction`` over the phase's steps; with ``warmup_epochs`` or ``warmup_steps``
  (W steps), first a linear rise, ``rate * (s + 1) / (W + 1)`` at step s, to the phase's rate at
  step W, then the decay over the remaining steps.
- ``exponential``: `keras.optimizers.schedules.ExponentialDecay`, ``rate * decay_rate ** (step
  / (decay_epochs * steps_per_epoch))``, per step, or per ``decay_epochs`` with ``staircase``.
- ``step``: `keras.optimizers.schedules.PiecewiseConstantDecay`, the rate times ``factor``
  every ``step_epochs`` epochs (``rate * factor ** (epoch_in_phase // step_epochs)``).
- ``reduce_on_plateau``: `keras.callbacks.ReduceLROnPlateau` (`PhasePlateau`): the rate times
  ``factor`` after ``patience`` epochs without improvement of ``monitor``, not below ``min_lr``.

Schedules are relative to the phase: each phase compiles a fresh optimizer, whose step count
(``optimizer.iterations``, what a Keras schedule is evaluated at) starts at 0 with the phase and
is restored with the optimizer when a phase resumes from a checkpoint. tfstack's discriminative
optimizers (`tfstack.schedules.make_optimizer`) multiply the scheduled rate of each step by the
component's factor, so a component at 0.1x follows the schedule at a tenth of it. The plateau
rule's state (best value, wait and cooldown counts) is kept in the checkpoint's phase record
(`STATE_KEY`); its current rate is an optimizer variable, saved with the optimizer.

`EpochStartRate` makes the rate logged per epoch (``lr``) the rate of the epoch's first step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import keras
import tensorflow as tf

from tfstack.epoch_metrics import current_learning_rate
from tfstack.errors import ScheduleError
from tfstack.vocabulary import LR_SCHEDULE_OPTIONS, LrScheduleOptions, lr_schedule_problem

# Where a checkpoint's record of the current phase keeps `PhasePlateau.state`.
STATE_KEY = "lr_schedule_state"

# The value of an option left unset (None), per option (Keras's defaults for the plateau rule).
DEFAULTS: dict[str, Any] = {
    "warmup_epochs": 0,
    "warmup_steps": None,
    "final_fraction": 0.0,
    "decay_rate": 0.9,
    "decay_epochs": 1,
    "staircase": False,
    "step_epochs": 10,
    "factor": 0.1,
    "monitor": "val_loss",
    "mode": "auto",
    "patience": 10,
    "min_delta": 1e-4,
    "cooldown": 0,
    "min_lr": 0.0,
}


@dataclass
class LrScheduleSpec(LrScheduleOptions):
    """How the learning rate moves within a phase (see the module docstring for each name).

    Options left None take their default (`DEFAULTS`); an option the schedule does not use
    (``vocabulary.LR_SCHEDULE_OPTIONS``) is refused, never dropped.

    Args:
        name: one of ``vocabulary.LR_SCHEDULES``.
        warmup_epochs: cosine: epochs of linear warmup (not with ``warmup_steps``).
        warmup_steps: cosine: steps (batches) of linear warmup (not with ``warmup_epochs``).
        final_fraction: cosine: the last rate as a fraction of the phase's rate (Keras's alpha).
        decay_rate: exponential: the factor per ``decay_epochs``.
        decay_epochs: exponential: epochs over which the rate falls by ``decay_rate``.
        staircase: exponential: fall in steps every ``decay_epochs`` instead of every batch.
        step_epochs: step: epochs between two reductions.
        factor: step and reduce_on_plateau: the factor of each reduction.
        monitor: reduce_on_plateau: a key of Keras's epoch logs.
        mode: reduce_on_plateau: ``auto``, ``min`` or ``max``.
        patience: reduce_on_plateau: epochs without improvement before a reduction.
        min_delta: reduce_on_plateau: the smallest change that counts as an improvement.
        cooldown: reduce_on_plateau: epochs after a reduction before counting again.
        min_lr: reduce_on_plateau: the lowest rate.
        setting: the config key messages name (e.g. ``schedule.lr_schedule.fine_tune``).

    Example:
        >>> LrScheduleSpec("step", step_epochs=2).build(0.1, steps_per_epoch=3, epochs=5).values
        [0.1, 0.010000000000000002, 0.0010000000000000002]
    """

    setting: str = "train.lr_schedule"

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "setting"}
        problem = lr_schedule_problem(values, self.setting)
        if problem:
            raise ScheduleError(problem)

    def value(self, key: str) -> Any:
        """The option's value, its default when unset."""
        value = getattr(self, key)
        return DEFAULTS[key] if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """The name and the options it uses, defaults filled in (JSON-ready, for the records)."""
        uses = LR_SCHEDULE_OPTIONS[self.name]
        options = {key: self.value(key) for key in uses}
        if self.name == "cosine":  # the warmup is one of two keys; show the one that applies
            options.pop("warmup_steps" if self.warmup_steps is None else "warmup_epochs")
        return {"name": self.name, **options}

    def describe(self) -> str:
        """One line, as the run's tag shows it (see `describe`)."""
        return describe(self.to_dict())

    def build(self, lr: float, *, steps_per_epoch: int | None, epochs: int):
        """What the phase's optimizer takes as ``learning_rate``: ``lr``, or a Keras schedule.

        Args:
            lr: the phase's learning rate (the schedule's peak).
            steps_per_epoch: batches per epoch (None: unknown; then only constant and
                reduce_on_plateau can be built).
            epochs: the phase's planned epochs (all of them, also when it resumes).

        Raises:
            ScheduleError: the steps per epoch are unknown, or the warmup fills the phase.
        """
        if self.name in ("constant", "reduce_on_plateau"):
            return lr
        if not steps_per_epoch:
            raise ScheduleError(
                f"{self.setting}.name={self.name} needs the number of batches per epoch, which "
                "this dataset does not know (its cardinality is unknown). Use an ArrayDataset, "
                "or a constant or reduce_on_plateau schedule."
            )
        schedules = keras.optimizers.schedules
        total = steps_per_epoch * epochs
        if self.name == "cosine":
            warmup = self.warmup_steps
            if warmup is None:
                warmup = self.value("warmup_epochs") * steps_per_epoch
            if warmup >= total:
                raise ScheduleError(
                    f"{self.setting}: the warmup ({warmup} steps) fills the whole phase "
                    f"({epochs} epochs of {steps_per_epoch} steps). Shorten the warmup."
                )
            alpha = self.value("final_fraction")
            if not warmup:
                return schedules.CosineDecay(lr, total, alpha=alpha)
            # From lr / (warmup + 1), so that step s of the warmup has lr * (s + 1) / (warmup + 1)
            # and no step is wasted at 0: a straight line to lr at step `warmup`.
            return schedules.CosineDecay(
                lr / (warmup + 1),
                total - warmup,
                alpha=alpha,
                warmup_target=lr,
                warmup_steps=warmup,
            )
        if self.name == "exponential":
            return schedules.ExponentialDecay(
                lr,
                self.value("decay_epochs") * steps_per_epoch,
                self.value("decay_rate"),
                staircase=self.value("staircase"),
            )
        # step: Keras's boundary b keeps values[i] for step <= b, so the rate changes at the
        # first step of epoch k * step_epochs when the boundary is that step - 1.
        every, factor = self.value("step_epochs"), self.value("factor")
        reductions = range(1, -(-epochs // every))
        if not reductions:
            return lr
        boundaries = [k * every * steps_per_epoch - 1 for k in reductions]
        values = [lr * factor**k for k in range(len(boundaries) + 1)]
        return schedules.PiecewiseConstantDecay(boundaries, values)


def describe(values: dict[str, Any] | None) -> str:
    """`LrScheduleSpec.to_dict` in one line: ``cosine(warmup_epochs=2, final_fraction=0.0)``.

    Example:
        >>> describe({"name": "step", "step_epochs": 10, "factor": 0.1})
        'step(step_epochs=10, factor=0.1)'
    """
    values = dict(values or {"name": "constant"})
    name = values.pop("name")
    return f"{name}({', '.join(f'{k}={v}' for k, v in values.items())})"


def steps_per_epoch(data) -> int | None:
    """Batches per epoch of an `IndexedDataset` or a batched ``tf.data.Dataset`` (None: unknown)."""
    steps = getattr(data, "steps", None)
    if isinstance(steps, int):
        return steps
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        return cardinality if cardinality > 0 else None
    return None


class EpochStartRate(keras.callbacks.Callback):
    """Put the rate of the epoch's first step into its logs as ``lr``.

    Read at ``on_epoch_begin`` (after a resumed phase restored its optimizer): the rate a
    schedule gives that step, or the plateau rule's rate for the whole epoch (it changes the
    rate at an epoch's end). Put it before the callbacks that log the epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rate: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = current_learning_rate(self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.rate is not None:
            logs["lr"] = self.rate


class PhasePlateau(keras.callbacks.ReduceLROnPlateau):
    """`keras.callbacks.ReduceLROnPlateau` for one phase, whose state a checkpoint keeps.

    After every epoch its state goes into the phase's checkpoint record (``record[STATE_KEY]``),
    so put it before the checkpoint's callback; ``resume`` gives a resumed phase that state back.
    The rate itself is the optimizer's variable, restored with the optimizer.

    Args:
        spec: a ``reduce_on_plateau`` setting.
        record: the phase's record in the checkpoint's state (None: no checkpoint).
        resume: the record's `STATE_KEY` entry at the checkpoint (None: a fresh phase).
    """

    def __init__(
        self,
        spec: LrScheduleSpec,
        *,
        record: dict[str, Any] | None = None,
        resume: dict[str, Any] | None = None,
    ):
        super().__init__(
            monitor=spec.value("monitor"),
            factor=spec.value("factor"),
            patience=spec.value("patience"),
            mode=spec.value("mode"),
            min_delta=spec.value("min_delta"),
            cooldown=spec.value("cooldown"),
            min_lr=spec.value("min_lr"),
        )
        self.record = record
        self._resume = resume

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._resume:
            self.best = self._resume["best"]
            self.wait = int(self._resume["wait"])
            self.cooldown_counter = int(self._resume["cooldown_counter"])

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if logs is not None:
            logs.pop("learning_rate", None)  # Keras's copy of the rate; ``lr`` is logged
        if self.record is not None:
            self.record[STATE_KEY] = self.state()

    def state(self) -> dict[str, Any]:
        """The JSON-ready state after the last epoch."""
        return {
            "best": None if self.best is None else float(self.best),
            "wait": int(self.wait),
            "cooldown_counter": int(self.cooldown_counter),
            "lr": current_learning_rate(self.model.optimizer) if self.model else None,
        }


def for_phase(
    spec: LrScheduleSpec | None,
    lr: float,
    *,
    steps_per_epoch: int | None,
    epochs: int,
    record: dict[str, Any] | None,
    resumed: bool,
) -> tuple[Any, list[keras.callbacks.Callback]]:
    """The learning rate a phase compiles with and the callbacks it fits with.

    Args:
        spec: the phase's schedule (None: constant).
        lr: the phase's rate.
        steps_per_epoch: batches per epoch (see `steps_per_epoch`).
        epochs: the phase's planned epochs.
        record: the phase's checkpoint record (None: no checkpoint).
        resumed: whether the phase continues from a checkpoint inside it.

    Returns:
        ``(learning_rate, callbacks)``; no callbacks for a constant rate, whose logged ``lr``
        is the optimizer's at the epoch's end, as without a schedule.
    """
    if spec is None or spec.name == "constant":
        return lr, []
    callbacks: list[keras.callbacks.Callback] = [EpochStartRate()]
    if spec.name == "reduce_on_plateau":
        saved = (record or {}).get(STATE_KEY) if resumed else None
        callbacks.append(PhasePlateau(spec, record=record, resume=saved))
    return spec.build(lr, steps_per_epoch=steps_per_epoch, epochs=epochs), callbacks
