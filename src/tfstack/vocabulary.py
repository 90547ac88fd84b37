"""The config vocabulary: every choice list of tfstack, defined once.

The config schema (``config.py``, which must not import TensorFlow) and the library registries
(``stacking.STRATEGIES``, ``schedules.SCHEDULES``, ``freezing.FreezePolicy``,
``distribute.KINDS``, ``data.check_labels``) both use these names, and a unit test checks that
each registry's keys equal its list here, so they cannot drift apart.

The ``*_OPTIONS`` tables say which options of a group each choice uses. A builder, preset or
policy refuses an option that is set but unused (`unused_option`), so a value is never silently
dropped: ``stacking=adapter stacking.intermediate=[...]`` fails, naming the key.

This module imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("sequential", "adapter", "functional")
"""Stacking strategies (``stacking=NAME``, ``stacking.strategy``)."""

MERGES = ("concatenate", "average")
"""How ``stacking=functional`` merges several feature extractors (``stacking.merge``)."""

FREEZE_POLICIES = ("frozen", "joint", "partial")
"""Freeze policies (``freeze=NAME``, ``freeze.policy``)."""

BN_MODES = ("freeze", "train")
"""BatchNormalization modes of the feature extractors (``freeze.bn``; null: the policy's)."""

SCHEDULES = ("single", "two_phase", "gradual")
"""Fine-tuning schedule presets (``schedule=NAME``, ``schedule.name``)."""

TASKS = ("classification", "binary", "regression")
"""Learning tasks (``train.task``): softmax classes 0..K-1, one sigmoid output, numbers."""

DISTRIBUTE_KINDS = ("none", "mirrored", "multi_worker")
"""TensorFlow distribution strategies (``distribute=NAME``, ``distribute.kind``)."""

APPLICATIONS_PREFIX = "keras_applications:"
"""A component that Keras builds: ``components.<key>.path=keras_applications:NAME``."""

NAMED_WEIGHTS = "imagenet"
"""Named weights of ``keras_applications:NAME`` (``components.<key>.weights``; or null, a file)."""

CACHE_MODES = ("auto", "off")
"""Frozen-feature caching (``train.cache_frozen``)."""

FEATURE_CACHE_MODES = ("shared", "off")
"""The shared on-disk frozen-feature cache (``train.feature_cache``, `tfstack.feature_cache`)."""

RESUME_MODES = ("auto", "off")
"""Per-epoch checkpoints and resuming a killed run (``train.resume``)."""

PREPROCESS_KINDS = ("none", "rescale", "normalize", "applications")
"""Input preprocessing inside the stacked model (``preprocess=NAME``, ``preprocess.kind``)."""

APPLICATION_FAMILIES = (
    "convnext",
    "densenet",
    "efficientnet",
    "efficientnet_v2",
    "inception_resnet_v2",
    "inception_v3",
    "mobilenet",
    "mobilenet_v2",
    "mobilenet_v3",
    "nasnet",
    "resnet",
    "resnet50",
    "resnet_v2",
    "vgg16",
    "vgg19",
    "xception",
)
"""Keras Applications modules whose ``preprocess_input`` ``preprocess=applications`` matches
(``preprocess.family``; the module of ``keras.applications.<family>``)."""

AUGMENT_LAYERS: Mapping[str, tuple[str, ...]] = {
    "RandomFlip": ("mode",),
    "RandomRotation": ("factor", "fill_mode", "interpolation", "fill_value"),
    "RandomZoom": ("height_factor", "width_factor", "fill_mode", "interpolation", "fill_value"),
    "RandomTranslation": (
        "height_factor",
        "width_factor",
        "fill_mode",
        "interpolation",
        "fill_value",
    ),
    "RandomContrast": ("factor", "value_range"),
    "RandomBrightness": ("factor", "value_range"),
    "RandomCrop": ("height", "width"),
}
"""The Keras augmentation layers ``augment.layers`` may list, and the parameters each takes
(``seed`` aside: it is derived from the run's seed and the layer's position)."""

PREPROCESS_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "none": (),
    "rescale": ("scale", "offset", "force"),
    "normalize": ("force",),
    "applications": ("family", "force"),
}
"""The ``preprocess.*`` options each kind uses besides ``resize`` (which all use)."""

DATA_FORMATS = ("npz", "images", "csv")
"""How a dataset is stored (``data.format``): an ``.npz`` of arrays, a folder of class
subfolders of images, or a CSV of image paths and labels."""

COLOR_MODES = ("grayscale", "rgb", "rgba")
"""Channels of decoded images (``data.color_mode``): 1, 3 or 4."""

INTERPOLATIONS = (
    "bilinear",
    "nearest",
    "bicubic",
    "area",
    "lanczos3",
    "lanczos5",
    "gaussian",
    "mitchellcubic",
)
"""Resize methods of ``tf.image.resize`` (``data.interpolation``), as Keras offers them."""

EARLY_STOPPING_MODES = ("auto", "min", "max")
"""How early stopping reads its monitored value (``train.early_stopping.mode``), as Keras's."""

# Mixed precision (issue 14).
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
"""Keras dtype policies of the stacked model (``train.precision``)."""

STRATEGY_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "sequential": (),
    "adapter": ("adapter",),
    "functional": ("adapter", "intermediate", "merge"),
}
"""The ``stacking.*`` options each strategy uses (``name`` aside)."""

SCHEDULE_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "single": (),
    "two_phase": ("fine_tune_epochs", "fine_tune_lr_factor", "unfreeze_last"),
    "gradual": ("stages", "unfreeze_step", "lr_decay"),
}
"""The ``schedule.*`` options each preset uses besides ``lr_multipliers`` (which all use)."""

_IMAGE_OPTIONS = (
    "test_fraction",
    "image_size",
    "color_mode",
    "interpolation",
    "crop_to_aspect_ratio",
)
DATA_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "npz": (),
    "images": _IMAGE_OPTIONS,
    "csv": (*_IMAGE_OPTIONS, "path_column", "label_column"),
}
"""The ``data.*`` options each format uses besides ``path`` and ``val_fraction`` (which all use).

``image_size`` may be null (the base's input size) and is then "not set" for every format."""

FREEZE_OPTIONS: Mapping[str, tuple[str, ...]] = {
    # bn and components matter under frozen when a schedule unfreezes later (two_phase,
    # gradual); schedules.single refuses them with frozen.
    "frozen": ("bn", "components"),
    "joint": ("bn",),
    "partial": ("unfreeze_last", "unfreeze_pattern", "bn", "components"),
}
"""The ``freeze.*`` options each policy uses."""


def phase_names(
    schedule: str, *, stages: int | None = None, fine_tune_epochs: int | None = None
) -> list[str]:
    """The names of a preset's phases (``schedules.make_schedule``'s; a test checks they agree).

    For the keys of ``schedule.early_stopping``, checked before TensorFlow is imported.
    """
    if schedule == "single":
        return ["train"]
    if schedule == "two_phase":
        return ["head"] if fine_tune_epochs == 0 else ["head", "fine_tune"]
    return ["head", *(f"unfreeze_{k}" for k in range(1, 3 if stages is None else stages))]


def is_set(value: Any) -> bool:
    """Whether an option holds a value, rather than its "unset" null, ``[]`` or ``{}``."""
    return value is not None and not (isinstance(value, list | tuple | dict) and not value)


def shown(value: Any) -> str:
    """The value as in a Hydra override; long lists of layer configs shortened to ``[...]``."""
    if isinstance(value, list | tuple):
        text = "[" + ", ".join(map(str, value)) + "]"
        return text if len(text) <= 40 else "[...]"
    return repr(value)


def unused_option(
    group: str, choice: str, options: Mapping[str, Any], uses: Mapping[str, tuple[str, ...]]
) -> str | None:
    """The message for the first set option that ``choice`` does not use, or None.

    Args:
        group: the config group, e.g. ``stacking``.
        choice: the chosen strategy, preset or policy, e.g. ``adapter``.
        options: option name (without the group) -> value, as the user set it.
        uses: a ``*_OPTIONS`` table of this module.

    Returns:
        ``stacking.intermediate=[...] applies only to stacking=functional, and stacking is
        'adapter', so it would be ignored. ...``, or None when every set option is used.
    """
    for key, value in options.items():
        if not is_set(value) or key in uses[choice]:
            continue
        users = [name for name, used in uses.items() if key in used]
        only = " or ".join(f"{group}={name}" for name in users)
        return (
            f"{group}.{key}={shown(value)} applies only to {only}, and {group} is {choice!r}, "
            f"so it would be ignored. Add {group}={users[0]}, or remove {group}.{key}."
        )
    return None


def unused_across_groups(
    schedule: str, policy: str, *, bn: Any, components: Any, unfreeze_last: Any
) -> str | None:
    """The message for an option the schedule and freeze policy together would not use, or None.

    ``freeze.bn`` and ``freeze.components`` with ``freeze=frozen`` matter only for the phases a
    schedule unfreezes (``single`` has none); ``schedule.unfreeze_last`` matters only when
    two_phase's policy is ``frozen`` (``partial`` and ``joint`` decide the fine-tuning phase).
    """
    if schedule == "single" and policy == "frozen":
        for key, value in (("bn", bn), ("components", components)):
            if is_set(value):
                return (
                    f"freeze.{key}={shown(value)} with freeze=frozen applies only to the phases "
                    "that schedule=two_phase or schedule=gradual unfreezes; schedule=single "
                    "trains the head only, so it would be ignored. Add schedule=two_phase, use "
                    f"freeze=partial, or remove freeze.{key}."
                )
    if schedule == "two_phase" and policy != "frozen" and is_set(unfreeze_last):
        return (
            f"schedule.unfreeze_last={unfreeze_last} applies only to schedule=two_phase with "
            f"freeze=frozen, and freeze is {policy!r} (its own settings decide what the "
            "fine-tuning phase trains), so it would be ignored. Remove schedule.unfreeze_last, "
            "or set freeze.unfreeze_last with freeze=partial."
        )
    return None


def augment_layer_problem(layers: Any, *, key: str = "augment.layers") -> str | None:
    """The message for the first invalid entry of an augmentation layer list, or None.

    Each entry is ``{class_name: RandomFlip, config: {mode: horizontal}}`` (``config`` may be
    left out), as for ``stacking.intermediate``; the class and its parameters must be in
    `AUGMENT_LAYERS`.

    Args:
        layers: the list as the user wrote it.
        key: the config key, for the message.

    Returns:
        ``augment.layers[1]: RandomZom is not an augmentation layer. ...``, or None.
    """
    if not isinstance(layers, list | tuple):
        return f"{key}={shown(layers)} is not a list. Give a list such as {_AUGMENT_EXAMPLE}."
    for index, entry in enumerate(layers):
        where = f"{key}[{index}]"
        if not isinstance(entry, Mapping) or set(entry) - {"class_name", "config"}:
            return (
                f"{where}={entry!r} is not a layer entry. Write it as {_AUGMENT_EXAMPLE}, with "
                "the keys class_name and config only."
            )
        name = entry.get("class_name")
        if name not in AUGMENT_LAYERS:
            return (
                f"{where}: {name!r} is not an augmentation layer tfstack builds. Use one of "
                f"{list(AUGMENT_LAYERS)}."
            )
        config = entry.get("config") or {}
        if not isinstance(config, Mapping):
            return f"{where}.config={config!r} is not a mapping of {name}'s parameters."
        allowed = AUGMENT_LAYERS[name]
        for parameter in config:
            if parameter not in allowed:
                why = (
                    " (seeds come from the run's `seed` and the layer's position)"
                    if parameter == "seed"
                    else ""
                )
                return (
                    f"{where}: {parameter!r} is not a parameter of {name}{why}. "
                    f"Its parameters: {list(allowed)}."
                )
    return None


_AUGMENT_EXAMPLE = "[{class_name: RandomFlip, config: {mode: horizontal}}]"

# Learning-rate schedules within a phase (train.lr_schedule, tfstack.lr_schedules).
LR_SCHEDULE_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "constant": (),
    "cosine": ("warmup_epochs", "warmup_steps", "final_fraction"),
    "exponential": ("decay_rate", "decay_epochs", "staircase"),
    "step": ("step_epochs", "factor"),
    "reduce_on_plateau": (
        "monitor",
        "mode",
        "factor",
        "patience",
        "min_delta",
        "cooldown",
        "min_lr",
    ),
}
"""The ``train.lr_schedule.*`` options each schedule uses besides ``name``."""


@dataclass
class LrScheduleOptions:
    """The ``train.lr_schedule`` keys, written once: the config schema
    (`tfstack.pipeline.schema.LrScheduleConfig`) and the library's
    `tfstack.lr_schedules.LrScheduleSpec` both extend it. None is the schedule's default."""

    name: str = "constant"
    warmup_epochs: int | None = None
    warmup_steps: int | None = None
    final_fraction: float | None = None
    decay_rate: float | None = None
    decay_epochs: int | None = None
    staircase: bool | None = None
    step_epochs: int | None = None
    factor: float | None = None
    monitor: str | None = None
    mode: str | None = None
    patience: int | None = None
    min_delta: float | None = None
    cooldown: int | None = None
    min_lr: float | None = None


LR_SCHEDULES = tuple(LR_SCHEDULE_OPTIONS)
"""How the rate moves within a phase (``train.lr_schedule.name``)."""

# Whole numbers of epochs or steps, and the least each may be; the other numbers' ranges.
_LR_SCHEDULE_COUNTS = {
    "warmup_epochs": 0,
    "warmup_steps": 0,
    "decay_epochs": 1,
    "step_epochs": 1,
    "patience": 0,
    "cooldown": 0,
}
_LR_SCHEDULE_NUMBERS = {  # key -> (lowest, lowest allowed, highest or None)
    "final_fraction": (0, True, 1),
    "decay_rate": (0, False, None),
    "factor": (0, False, None),
    "min_delta": (0, True, None),
    "min_lr": (0, True, None),
}


def lr_schedule_problem(values: Mapping[str, Any], where: str) -> str | None:
    """The message for the first wrong entry of a learning-rate schedule setting, or None.

    Pure Python, for the config's check before TensorFlow is imported and for
    `tfstack.lr_schedules.LrScheduleSpec` alike; options set to None are unset.

    Args:
        values: ``name`` and the options that are set (others None or absent).
        where: the config key of the setting, e.g. ``train.lr_schedule``.
    """
    name = values.get("name", "constant")
    if name not in LR_SCHEDULE_OPTIONS:
        return f"{where}.name={name!r} is not a schedule. Expected one of {list(LR_SCHEDULES)}."
    known = {key for keys in LR_SCHEDULE_OPTIONS.values() for key in keys}
    for key, value in values.items():
        if key == "name" or value is None:
            continue
        if key not in known:
            return f"{where}.{key} is not a config key. Valid keys here: {['name', *known]}."
        if key not in LR_SCHEDULE_OPTIONS[name]:
            users = " and ".join(n for n, keys in LR_SCHEDULE_OPTIONS.items() if key in keys)
            return (
                f"{where}.{key}={shown(value)} applies only to {where}.name={users}, and the "
                f"name is {name!r}, so it would be ignored. Remove it, or set the name."
            )
        problem = _lr_schedule_value_problem(key, value, f"{where}.{key}", name)
        if problem:
            return problem
    if values.get("warmup_epochs") is not None and values.get("warmup_steps") is not None:
        return f"{where}.warmup_epochs and {where}.warmup_steps are both set: set one of them."
    return None


def _lr_schedule_value_problem(key: str, value: Any, setting: str, name: str) -> str | None:
    if key == "staircase":
        return None if isinstance(value, bool) else f"{setting}={value!r} must be true or false."
    if key == "mode":
        ok = value in EARLY_STOPPING_MODES
        return (
            None
            if ok
            else f"{setting}={value!r} is not valid. Expected one of {list(EARLY_STOPPING_MODES)}."
        )
    if key == "monitor":
        return None if isinstance(value, str) else f"{setting}={value!r} must be a metric name."
    if key in _LR_SCHEDULE_COUNTS:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{setting}={value!r} must be a whole number."
        least = _LR_SCHEDULE_COUNTS[key]
        return None if value >= least else f"{setting}={value} must be at least {least}."
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{setting}={value!r} must be a finite number."
    lowest, inclusive, highest = _LR_SCHEDULE_NUMBERS[key]
    if value < lowest or (value == lowest and not inclusive):
        return f"{setting}={value} must be {'at least' if inclusive else 'above'} {lowest}."
    if highest is not None and value > highest:
        return f"{setting}={value} must be at most {highest}."
    if key == "factor" and name == "reduce_on_plateau" and value >= 1:
        return f"{setting}={value} must be below 1 (it reduces the rate)."
