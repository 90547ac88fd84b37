"""Fine-tuning schedules: phases, their presets and the optimizers they compile with.

A schedule is a list of phases. Each phase has its own freeze policy, learning rate and optimizer;
the training loop recompiles with a fresh optimizer at every phase (Keras 3 ignores a ``trainable``
change made after ``compile``, and an optimizer built for one set of variables refuses another).

Presets:
- ``single``: one phase with the given freeze policy.
- ``two_phase``: the Keras transfer-learning recipe. Train the head with the base frozen, then
  unfreeze the top of the base and continue at a lower rate.
- ``gradual``: ULMFiT-style gradual unfreezing. Head first, then each phase unfreezes one more
  block of the base (``unfreeze_step`` layers with weights) at a decaying rate.

Discriminative fine-tuning (per-component learning-rate multipliers, e.g. the base at a tenth of
the head's rate) has no built-in in Keras 3 (keras#21741). ``make_optimizer`` implements it by
scaling the learning rate per variable inside the optimizer's ``update_step``. Scaling the
gradients instead would be wrong for Adam and RMSprop, which normalise gradient magnitude away.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import keras

from tfstack.errors import ScheduleError
from tfstack.freezing import FreezePolicy, get_component
from tfstack.vocabulary import SCHEDULE_OPTIONS, unused_across_groups, unused_option

logger = logging.getLogger(__name__)

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "nadam": keras.optimizers.Nadam,
    "adamax": keras.optimizers.Adamax,
    "adagrad": keras.optimizers.Adagrad,
}


@dataclass(frozen=True)
class Phase:
    """One phase of a fine-tuning schedule.

    Args:
        name: shown in logs and recorded with every metric of the phase.
        epochs: epochs in this phase (the global epoch count continues across phases).
        freeze: the freeze policy applied before the phase compiles.
        lr: the learning rate of the head (and of every component without a multiplier).
        optimizer: an optimizer name from ``OPTIMIZERS``.
        lr_multipliers: component name -> factor on ``lr`` (discriminative fine-tuning).

    Example:
        >>> from tfstack import FreezePolicy, Phase
        >>> Phase("head", epochs=3, freeze=FreezePolicy("frozen"), lr=1e-3).optimizer
        'adam'
    """

    name: str
    epochs: int
    freeze: FreezePolicy
    lr: float
    optimizer: str = "adam"
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ScheduleError(
                f"Phase {self.name!r} has epochs={self.epochs}; every phase needs at least 1 epoch."
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ScheduleError(
                f"Phase {self.name!r} has lr={self.lr}; it must be a positive finite number."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ScheduleError(
                f"Phase {self.name!r}: train.optimizer={self.optimizer!r} is not supported. "
                f"Expected one of {sorted(OPTIMIZERS)}."
            )
        for component, factor in self.lr_multipliers.items():
            if not (math.isfinite(factor) and factor > 0):
                raise ScheduleError(
                    f"Phase {self.name!r}: lr multiplier for {component!r} is {factor}; "
                    "it must be positive (use a freeze policy to stop a component training)."
                )

    def to_dict(self) -> dict:
        """JSON-ready description of the phase."""
        return {
            "name": self.name,
            "epochs": self.epochs,
            "freeze": self.freeze.describe(),
            "lr": self.lr,
            "optimizer": self.optimizer,
            "lr_multipliers": dict(self.lr_multipliers),
        }


def single(
    *, epochs: int, lr: float, optimizer: str, freeze: FreezePolicy, lr_multipliers=None
) -> list[Phase]:
    """One phase with the given freeze policy.

    Raises:
        ScheduleError: ``freeze=frozen`` with ``freeze.bn`` or ``freeze.components`` set: only a
            schedule that unfreezes later (two_phase, gradual) uses them with a frozen policy.
    """
    unused = unused_across_groups(
        "single", freeze.kind, bn=freeze.bn, components=freeze.components, unfreeze_last=None
    )
    if unused:
        raise ScheduleError(unused)
    return [Phase("train", epochs, freeze, lr, optimizer, dict(lr_multipliers or {}))]


def two_phase(
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    freeze: FreezePolicy,
    fine_tune_epochs: int | None = None,
    fine_tune_lr_factor: float = 0.1,
    unfreeze_last: int | None = None,
    lr_multipliers=None,
) -> list[Phase]:
    """Head with the base frozen, then fine-tune the top of the base at a lower rate.

    The second phase uses ``freeze`` when it is ``partial`` or ``joint``; with ``frozen`` it
    unfreezes the last ``unfreeze_last`` (None: 2) layers with weights (BatchNormalization stays
    frozen) of ``freeze.components`` (all feature extractors when None). ``fine_tune_epochs=None``
    gives it ``epochs``; ``0`` means no fine-tuning phase, as ``fit(epochs=0)`` trains nothing:
    the phase is left out and a warning says so.

    Raises:
        ScheduleError: a value out of range, named by its config key, or ``unfreeze_last`` set
            with a ``partial`` or ``joint`` policy, which decides the fine-tuning phase itself.
    """
    unused = unused_across_groups(
        "two_phase", freeze.kind, bn=None, components=None, unfreeze_last=unfreeze_last
    )
    if unused:
        raise ScheduleError(unused)
    if unfreeze_last is None:
        unfreeze_last = 2
    _check_positive("schedule.fine_tune_lr_factor", fine_tune_lr_factor)
    if fine_tune_epochs is not None and fine_tune_epochs < 0:
        raise ScheduleError(
            f"schedule.fine_tune_epochs={fine_tune_epochs} must be at least 0 (0: no "
            "fine-tuning phase; null: train.epochs)."
        )
    head = Phase("head", epochs, FreezePolicy("frozen"), lr, optimizer)
    if fine_tune_epochs == 0:
        logger.warning(
            "schedule.fine_tune_epochs=0: two_phase skips its fine-tuning phase and trains the "
            "head only (%d epochs).",
            epochs,
        )
        return [head]
    fine_tune = freeze
    if freeze.kind == "frozen":
        if unfreeze_last < 1:
            raise ScheduleError(
                f"schedule.unfreeze_last={unfreeze_last} must be at least 1: two_phase "
                "fine-tunes that many layers with weights of the base."
            )
        fine_tune = FreezePolicy(
            "partial",
            unfreeze_last=unfreeze_last,
            bn=freeze.bn,
            components=freeze.components,
            unfreeze_last_setting=f"schedule.unfreeze_last={unfreeze_last}",
        )
    return [
        head,
        Phase(
            "fine_tune",
            epochs if fine_tune_epochs is None else fine_tune_epochs,
            fine_tune,
            lr * fine_tune_lr_factor,
            optimizer,
            dict(lr_multipliers or {}),
        ),
    ]


def gradual(
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    freeze: FreezePolicy,
    stages: int = 3,
    unfreeze_step: int = 1,
    lr_decay: float = 0.5,
    lr_multipliers=None,
) -> list[Phase]:
    """ULMFiT-style gradual unfreezing: the head first, then one more block per phase.

    Phase k (k >= 1) unfreezes the last ``k * unfreeze_step`` layers with weights of each
    feature extractor in ``freeze.components`` (all when None) at ``lr * lr_decay**k``.

    Raises:
        ScheduleError: a value out of range, named by its config key.
    """
    if stages < 2:
        raise ScheduleError(
            f"schedule.stages={stages}: gradual unfreezing needs at least 2 phases. "
            "Use schedule=single for one."
        )
    if unfreeze_step < 1:
        raise ScheduleError(
            f"schedule.unfreeze_step={unfreeze_step} must be at least 1: each gradual phase "
            "unfreezes that many more layers with weights."
        )
    _check_positive("schedule.lr_decay", lr_decay)
    if freeze.kind == "partial":
        logger.warning(
            "schedule=gradual unfreezes schedule.unfreeze_step=%d more layers per phase; "
            "freeze=partial's unfreeze_last/unfreeze_pattern are not used (bn and components "
            "are).",
            unfreeze_step,
        )
    phases = [Phase("head", epochs, FreezePolicy("frozen"), lr, optimizer)]
    for k in range(1, stages):
        policy = FreezePolicy(
            "partial",
            unfreeze_last=k * unfreeze_step,
            bn=freeze.bn,
            components=freeze.components,
            unfreeze_last_setting=(
                f"schedule.unfreeze_step={unfreeze_step} (phase unfreeze_{k} of "
                f"schedule.stages={stages} unfreezes the last {k * unfreeze_step})"
            ),
        )
        phases.append(
            Phase(
                f"unfreeze_{k}",
                epochs,
                policy,
                lr * lr_decay**k,
                optimizer,
                dict(lr_multipliers or {}),
            )
        )
    return phases


def _check_positive(key: str, value: float) -> None:
    """A rate or factor must be a positive finite number; the message names its config key."""
    if not (math.isfinite(value) and value > 0):
        raise ScheduleError(f"{key}={value} must be a positive finite number.")


# Keyed by vocabulary.SCHEDULES (tests/test_vocabulary.py checks they agree).
SCHEDULES = {"single": single, "two_phase": two_phase, "gradual": gradual}
# The arguments every preset takes; the others are its own options (vocabulary.SCHEDULE_OPTIONS).
COMMON_ARGUMENTS = ("epochs", "lr", "optimizer", "freeze", "lr_multipliers")


def make_schedule(name: str, **kwargs) -> list[Phase]:
    """Build a preset schedule by name.

    An option given as None is the preset's default; an option set for a preset that does not
    use it (``vocabulary.SCHEDULE_OPTIONS``) is refused, never dropped.

    Args:
        name: ``single``, ``two_phase`` or ``gradual``.
        **kwargs: the preset's arguments (``epochs``, ``lr``, ``optimizer``, ``freeze``,
            ``lr_multipliers``) and options of any preset (``fine_tune_epochs``,
            ``fine_tune_lr_factor``, ``unfreeze_last``, ``stages``, ``unfreeze_step``,
            ``lr_decay``).

    Returns:
        The phases, in order.

    Raises:
        ScheduleError: an unknown schedule name or option, an option the preset does not use,
            or invalid phase values.

    Example:
        >>> from tfstack import FreezePolicy, make_schedule
        >>> phases = make_schedule(
        ...     "two_phase", epochs=5, lr=1e-3, optimizer="adam", freeze=FreezePolicy("frozen")
        ... )
        >>> [(p.name, p.epochs, p.lr) for p in phases]
        [('head', 5, 0.001), ('fine_tune', 5, 0.0001)]
    """
    if name not in SCHEDULES:
        raise ScheduleError(
            f"schedule={name!r} is not a schedule. Expected one of {sorted(SCHEDULES)}."
        )
    known = {*COMMON_ARGUMENTS, *(key for keys in SCHEDULE_OPTIONS.values() for key in keys)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ScheduleError(
            f"make_schedule got unknown option(s) {unknown}. Options: {sorted(known)}."
        )
    options = {key: value for key, value in kwargs.items() if key not in COMMON_ARGUMENTS}
    unused = unused_option("schedule", name, options, SCHEDULE_OPTIONS)
    if unused:
        raise ScheduleError(unused)
    # None is "the preset's default": leave it to the preset function's signature.
    kwargs = {k: v for k, v in kwargs.items() if k in COMMON_ARGUMENTS or v is not None}
    if kwargs.get("epochs", 1) < 1:
        raise ScheduleError(f"train.epochs={kwargs['epochs']} must be at least 1.")
    if "lr" in kwargs:
        _check_positive("train.lr", kwargs["lr"])
    if kwargs.get("optimizer", "adam") not in OPTIMIZERS:
        raise ScheduleError(
            f"train.optimizer={kwargs['optimizer']!r} is not supported. "
            f"Expected one of {sorted(OPTIMIZERS)}."
        )
    for component, factor in (kwargs.get("lr_multipliers") or {}).items():
        _check_positive(f"schedule.lr_multipliers.{component}", factor)
    phases = SCHEDULES[name](**kwargs)
    logger.info("Schedule %s: %s", name, [p.to_dict() for p in phases])
    return phases


def with_epochs(phases: list[Phase], epochs: int) -> list[Phase]:
    """The same schedule with every phase shortened to ``epochs`` (tests, smoke runs)."""
    return [replace(p, epochs=epochs) for p in phases]


class _ScaledLearningRates:
    """Mixin: multiply the learning rate of chosen variables by a constant factor.

    ``variable_multipliers`` maps Keras variables to factors; variables not in it use the plain
    rate. The factor is applied inside ``update_step`` so every optimizer's own normalisation
    (Adam's moments, RMSprop's running average) sees the true gradient.
    """

    def __init__(self, *args, lr_multipliers=None, variable_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Component-level factors, kept for the config; variable-level ones do the work.
        self.lr_multipliers = dict(lr_multipliers or {})
        # Keyed by the optimizer's own variable key, never holding the variables themselves:
        # Keras tracks variables stored on an optimizer and would save them as its state.
        self._scale_by_key = {
            self._var_key(v): float(factor) for v, factor in (variable_multipliers or [])
        }

    def update_step(self, gradient, variable, learning_rate):
        factor = self._scale_by_key.get(self._var_key(variable), 1.0)
        if factor != 1.0:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["lr_multipliers"] = dict(self.lr_multipliers)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if config.get("lr_multipliers"):
            logger.warning(
                "Reloaded a discriminative optimizer (%s); its per-component rates apply only "
                "when tfstack compiles the model, so this copy uses the plain rate.",
                config["lr_multipliers"],
            )
        return super().from_config(config, custom_objects=custom_objects)


def _register_scaled_optimizers() -> dict[str, type]:
    """One registered subclass per optimizer, so a saved model's optimizer reloads."""
    classes = {}
    for key, base in OPTIMIZERS.items():
        cls = type(f"Discriminative{base.__name__}", (_ScaledLearningRates, base), {})
        classes[key] = keras.saving.register_keras_serializable(package="tfstack")(cls)
    return classes


DISCRIMINATIVE_OPTIMIZERS = _register_scaled_optimizers()


def make_optimizer(
    name: str,
    lr: float,
    *,
    model: keras.Model | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
) -> keras.optimizers.Optimizer:
    """A fresh optimizer, with per-component learning-rate multipliers when asked.

    Args:
        name: an optimizer name from ``OPTIMIZERS``.
        lr: the base learning rate.
        model: the stacked model whose components ``lr_multipliers`` name.
        lr_multipliers: component name -> factor on ``lr``.

    Returns:
        A new, unbuilt Keras optimizer.

    Raises:
        ScheduleError: an unknown optimizer or component name.
    """
    if name not in OPTIMIZERS:
        raise ScheduleError(
            f"train.optimizer={name!r} is not supported. Expected one of {sorted(OPTIMIZERS)}."
        )
    if not lr_multipliers:
        return OPTIMIZERS[name](learning_rate=lr)
    if model is None:
        raise ScheduleError("Per-component learning rates need the model to find the components.")
    pairs = []
    for component, factor in lr_multipliers.items():
        layer = get_component(
            model, component, error=ScheduleError, setting="schedule.lr_multipliers"
        )
        pairs.extend((v, factor) for v in layer.weights)
    return DISCRIMINATIVE_OPTIMIZERS[name](
        learning_rate=lr, lr_multipliers=dict(lr_multipliers), variable_multipliers=pairs
    )
