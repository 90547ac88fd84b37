"""Per-phase training settings: early stopping and learning-rate schedules, each set in
``train.<setting>`` for every phase and overridden per phase in ``schedule.<setting>.<phase>``.

Checked here, naming the key, before TensorFlow is imported; `tfstack.pipeline.inputs` turns the
checked settings into the library's `EarlyStoppingSpec` and `LrScheduleSpec`.
"""

from __future__ import annotations

from typing import Any

from tfstack.errors import ConfigError
from tfstack.pipeline.schema import Config, EarlyStoppingConfig, TrainConfig
from tfstack.pipeline.value_checks import Bound, check_choice, check_number
from tfstack.vocabulary import EARLY_STOPPING_MODES, lr_schedule_problem


def history_keys(train: TrainConfig) -> list[str]:
    """The keys of the Keras history this config's training produces (loss, metrics, val_*)."""
    names = ["loss", *(str(m) for m in train.metrics)]
    return names + [f"val_{name}" for name in names]


def early_stopping_per_phase(config: Config, phases: list[str]) -> list[dict[str, Any] | None]:
    """The early-stopping settings of each phase (None: off), ``train.early_stopping`` with the
    phase's ``schedule.early_stopping`` entry over it; checked, naming the key.

    Args:
        config: the config.
        phases: the schedule's phase names, in order.

    Raises:
        ConfigError: an unknown phase or key, or a value out of range.
    """
    fields = list(EarlyStoppingConfig.__dataclass_fields__)
    default = vars(EarlyStoppingConfig())
    base = config.train.early_stopping
    common = None if base is None else vars(base)
    overrides = config.schedule.early_stopping
    for name, override in overrides.items():
        key = f"schedule.early_stopping.{name}"
        _check_phase_override(
            config, key, name, override, phases, "no early stopping", f"{fields}", "patience: 3"
        )
        unknown = sorted(set(override or {}) - set(fields))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]} is not a config key. Valid keys here: {fields}.")
    rules = []
    for name in phases:
        if name in overrides:
            override = overrides[name]
            rule = None if override is None else {**(common or default), **override}
            where = f"schedule.early_stopping.{name}"
        else:
            rule, where = common, "train.early_stopping"
        if rule is not None:
            _check_early_stopping(rule, where, config.train)
        rules.append(rule if rule is not None and rule["patience"] is not None else None)
    if common is not None and common["patience"] is None and not any(rules):
        changed = [k for k in fields if common[k] != default[k]]
        if changed:
            value = common[changed[0]]
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            raise ConfigError(
                f"train.early_stopping.{changed[0]}={shown} would be ignored: "
                "early stopping is off while train.early_stopping.patience is null. Set "
                "train.early_stopping.patience=N to stop after N epochs without improvement."
            )
    return rules


def _check_early_stopping(rule: dict[str, Any], where: str, train: TrainConfig) -> None:
    known = history_keys(train)
    if rule["monitor"] not in known:
        raise ConfigError(
            f"{where}.monitor={rule['monitor']!r} is not in the training history. Expected one "
            f"of {known}."
        )
    check_choice(rule["mode"], EARLY_STOPPING_MODES, f"{where}.mode")
    for field_name, value in rule.items():
        key = f"{where}.{field_name}"
        if field_name == "restore_best_weights":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} must be true or false.")
        elif field_name in ("patience", "start_from_epoch"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{key}={value!r} must be a whole number of epochs.")
            if value is not None:
                check_number(key, value, Bound(0, True, "epochs"))
        elif field_name == "min_delta":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{key}={value!r} must be a number.")
            check_number(key, value, Bound(0, True, "the smallest change that improves"))


def lr_schedule_per_phase(config: Config, phases: list[str]) -> list[tuple[dict[str, Any], str]]:
    """Each phase's learning-rate schedule: its set values and the config key they come from.

    ``train.lr_schedule``, with the phase's ``schedule.lr_schedule`` entry over it; an entry
    that sets ``name`` starts from that schedule's defaults instead, and null is constant.

    Args:
        config: the config.
        phases: the schedule's phase names, in order.

    Raises:
        ConfigError: an unknown phase or key, an option the schedule does not use, or a value
            out of range, naming the key.
    """
    base = {k: v for k, v in vars(config.train.lr_schedule).items() if v is not None}
    _check_lr_schedule(base, "train.lr_schedule", config.train)
    overrides = config.schedule.lr_schedule
    for name, override in overrides.items():
        key = f"schedule.lr_schedule.{name}"
        _check_phase_override(
            config,
            key,
            name,
            override,
            phases,
            "a constant rate",
            "train.lr_schedule's keys",
            "name: cosine",
        )
    per_phase = []
    for name in phases:
        values, where = base, "train.lr_schedule"
        if name in overrides:
            override, where = (
                overrides[name] or {"name": "constant"},
                f"schedule.lr_schedule.{name}",
            )
            values = dict(override) if "name" in override else {**base, **override}
            _check_lr_schedule(values, where, config.train)
        per_phase.append((values, where))
    return per_phase


def _check_phase_override(
    config: Config,
    key: str,
    name: str,
    override: Any,
    phases: list[str],
    null_means: str,
    keys: str,
    example: str,
) -> None:
    """A per-phase entry (``schedule.<setting>.<phase>``) names a phase and is null or a mapping."""
    if name not in phases:
        raise ConfigError(
            f"{key}: schedule={config.schedule.name} has no phase {name!r}. Its phases: {phases}."
        )
    if override is not None and not isinstance(override, dict):
        raise ConfigError(
            f"{key}={override!r} is not valid. Use null ({null_means} in that phase) or "
            f"a mapping of {keys}, e.g. {key}={{{example}}}."
        )


def _check_lr_schedule(values: dict[str, Any], where: str, train: TrainConfig) -> None:
    problem = lr_schedule_problem(values, where)
    if problem:
        raise ConfigError(problem)
    known = history_keys(train)
    if values.get("name") == "reduce_on_plateau" and values.get("monitor", "val_loss") not in known:
        raise ConfigError(
            f"{where}.monitor={values['monitor']!r} is not in the training history. Expected one "
            f"of {known}."
        )
