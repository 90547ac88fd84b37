"""Validation of a composed config against the schema (`tfstack.pipeline.schema`).

Whatever the source (a Hydra compose in ``tfstack run`` or the ``params.yaml`` a DVC stage
reads), `validate` merges the config onto the schema's dataclasses, so a mistyped key or a value
of the wrong type fails here, with the key named, before any TensorFlow work; then it checks
choices, ranges, options a choice does not use, and Keras names. The schema's names are
re-exported here, where most callers import them from. This module imports neither TensorFlow
nor MLflow.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tfstack import keras_names
from tfstack.class_weights import check_setting as check_class_weight
from tfstack.errors import ConfigError
from tfstack.keras_names import callback_entry_problem
from tfstack.pipeline.phase_settings import (
    early_stopping_per_phase,
    lr_schedule_per_phase,
)
from tfstack.pipeline.schema import (
    Config,
    TrainConfig,
    known_keys,
)
from tfstack.pipeline.value_checks import (
    Bound,
    check_choice,
    check_finite_everywhere,
    check_jit_compile,
    check_number,
)
from tfstack.vocabulary import (
    APPLICATION_FAMILIES,
    APPLICATIONS_PREFIX,
    BN_MODES,
    CACHE_MODES,
    COLOR_MODES,
    DATA_FORMATS,
    DATA_OPTIONS,
    DISTRIBUTE_KINDS,
    FEATURE_CACHE_MODES,
    FREEZE_OPTIONS,
    FREEZE_POLICIES,
    INTERPOLATIONS,
    MERGES,
    PRECISIONS,
    PREPROCESS_KINDS,
    PREPROCESS_OPTIONS,
    RESUME_MODES,
    SCHEDULE_OPTIONS,
    SCHEDULES,
    STRATEGIES,
    STRATEGY_OPTIONS,
    TASKS,
    augment_layer_problem,
    phase_names,
    unused_across_groups,
    unused_option,
)

# Component names become file and artifact names (summary_<name>.txt, shapes/<name>_layers.json):
# no path separators, no leading dot.
COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    text = str(err).splitlines()[0]
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{full_key} is not set ({source}). Set {full_key}=VALUE.")
    if "not in" in text or "Key" in text and "not" in text:
        known = known_keys(str(full_key))
        leaf = str(full_key).split(".")[-1]
        close = difflib.get_close_matches(leaf, known, n=1)
        prefix = str(full_key).rsplit(".", 1)[0] if "." in str(full_key) else ""
        hint = f" Did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
        return ConfigError(
            f"{full_key} is not a config key ({source}).{hint} Valid keys here: {known}."
        )
    return ConfigError(f"{full_key}: {text} ({source}).")


# Floats must also be finite: `train.lr=inf` would otherwise pass and fail later as "the loss
# became nan". `None` (where the schema allows it) is not checked.
_LOWER_BOUNDS: dict[str, Bound] = {
    "train.epochs": Bound(1, True),
    "train.batch_size": Bound(1, True),
    "train.lr": Bound(0, False, "e.g. train.lr=0.001"),
    # 0 is honoured: two_phase then has no fine-tuning phase (the phase is skipped and logged).
    "schedule.fine_tune_epochs": Bound(0, True),
    "schedule.fine_tune_lr_factor": Bound(0, False, "e.g. 0.1 fine-tunes at a tenth of train.lr"),
    "schedule.unfreeze_last": Bound(1, True, "the layers with weights that two_phase unfreezes"),
    "schedule.stages": Bound(
        2, True, "gradual unfreezing is the head phase, then at least one unfreezing phase"
    ),
    "schedule.unfreeze_step": Bound(
        1, True, "the layers with weights each gradual phase unfreezes in addition"
    ),
    "schedule.lr_decay": Bound(0, False, "phase k trains at train.lr * lr_decay**k, e.g. 0.5"),
    "freeze.unfreeze_last": Bound(1, True, "use freeze=frozen to train the head only"),
    "train.feature_cache_max_gb": Bound(0, False, "e.g. 10; train.feature_cache=off turns it off"),
    "train.feature_memory_mb": Bound(0, True, "0 streams every frozen feature from disk"),
    "distribute.cpu_replicas": Bound(0, True, "0 keeps the devices as they are"),
    "demo.target_train_per_class": Bound(1, True),
    "demo.pretrain_epochs": Bound(1, True),
}


def _value(config: Config, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_numbers(config: Config) -> None:
    """Every number of the config is finite and within its range."""
    for key, bound in _LOWER_BOUNDS.items():
        value = _value(config, key)
        if value is not None:
            check_number(key, value, bound)
    for name, factor in config.schedule.lr_multipliers.items():
        key = f"schedule.lr_multipliers.{name}"
        if not math.isfinite(factor):
            raise ConfigError(
                f"{key}={factor} is not a finite number. Set {key} to a finite number."
            )
        if not factor > 0:
            raise ConfigError(
                f"{key}={factor} must be positive; to stop a component training, use a freeze "
                "policy (freeze=frozen, or freeze.components=[...] with freeze=partial)."
            )
    fraction = config.data.val_fraction
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise ConfigError(f"data.val_fraction={fraction} must be between 0 and 1 (exclusive).")
    test_fraction = config.data.test_fraction
    if test_fraction is not None:
        if not (math.isfinite(test_fraction) and 0 <= test_fraction < 1):
            raise ConfigError(
                f"data.test_fraction={test_fraction} must be at least 0 and below 1 (0: the "
                "data has its own test split)."
            )
        if fraction + test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction={fraction} and data.test_fraction={test_fraction} leave no "
                "training samples: make their sum below 1."
            )
    size = config.data.image_size
    if size is not None and (len(size) != 2 or any(d < 1 for d in size)):
        raise ConfigError(
            f"data.image_size={list(size)} is not an image size: give [height, width] as two "
            "positive integers, e.g. [224, 224], or null for the base's input size."
        )
    if config.train.verbose not in (0, 1, 2):
        raise ConfigError(
            f"train.verbose={config.train.verbose} is not a Keras verbosity: use 0 (silent), "
            "1 (progress bar) or 2 (one line per epoch)."
        )
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed={config.seed} must be between 0 and 2**32 - 1.")
    components = {"base": config.components.base, "head": config.components.head}
    components.update({f"extra.{k}": c for k, c in config.components.extra.items()})
    for name, component in components.items():
        shape = component.input_shape
        if shape is not None and (not shape or any(d < 1 for d in shape)):
            raise ConfigError(
                f"components.{name}.input_shape={list(shape)} is not a shape: give every "
                "dimension but the batch as a positive number, e.g. [96, 96, 3], or null for the "
                "application's default."
            )


def _check_no_ops(config: Config) -> None:
    """Refuse values that would be silently ignored, or silently replaced by a default.

    An empty string or list where null means "not set" would be read as null (``if x:``), so
    ``freeze.components=[]`` would mean every feature extractor and ``stacking.adapter=[]`` would
    mean ``auto``. A partial-freeze selector under another policy would be ignored.
    """
    optional_strings = {
        "freeze.unfreeze_pattern": config.freeze.unfreeze_pattern,
        "tracking.uri": config.tracking.uri,
        "tracking.run_name": config.tracking.run_name,
        "tracking.experiment": config.tracking.experiment,
        "data.path": config.data.path,
        "data.path_column": config.data.path_column,
        "data.label_column": config.data.label_column,
        "output_dir": config.output_dir,  # '' would write the outputs into the project root
    }
    components = {"base": config.components.base, "head": config.components.head}
    components.update({f"extra.{k}": c for k, c in config.components.extra.items()})
    for name, component in components.items():
        for attribute in ("cut_at", "weights", "pooling"):
            optional_strings[f"components.{name}.{attribute}"] = getattr(component, attribute)
        if component.kwargs and not component.path.startswith(APPLICATIONS_PREFIX):
            arguments = ", ".join(f"{k}={v!r}" for k, v in component.kwargs.items())
            raise ConfigError(
                f"components.{name}.kwargs ({arguments}) passes arguments to a Keras "
                f"Applications builder, but components.{name}.path={component.path} is not "
                f"keras_applications:NAME, so they would be ignored. Remove them "
                f"(components.{name}.kwargs=null), or load an application."
            )
        if component.modules and not component.trust_code:
            # Importing a module runs its code: as for the file itself, only with trust.
            modules = ",".join(component.modules)
            raise ConfigError(
                f"components.{name}.modules=[{modules}] imports Python code, which needs "
                f"components.{name}.trust_code=true; set it only if you trust these modules and "
                "the component's file."
            )
    for key, value in optional_strings.items():
        if value is not None and not str(value).strip():
            raise ConfigError(
                f"{key}={value!r} is empty. Set it to a value, or to null where it may be unset "
                f"({key}=null)."
            )
    if config.freeze.components is not None and not config.freeze.components:
        raise ConfigError(
            "freeze.components=[] names no feature extractor. List the ones to unfreeze, e.g. "
            "freeze.components=[base], or set freeze.components=null for all of them."
        )
    if config.stacking.adapter == []:
        raise ConfigError(
            "stacking.adapter=[] holds no layer. Use null (no adapter: a mismatch is refused), "
            "auto, or a list of Keras layer configs such as [{class_name: Dense, config: "
            "{units: 12}}]."
        )
    pattern = config.freeze.unfreeze_pattern
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"freeze.unfreeze_pattern={pattern!r} is not a valid regex: {err}. Example: "
                """'freeze.unfreeze_pattern="conv2|dense"' (quoted for Hydra and the shell)."""
            ) from err
    _check_unused_options(config)


def _check_unused_options(config: Config) -> None:
    """Refuse an option that the chosen strategy, policy or preset would not use.

    The same tables and message as the library's builders (``tfstack.vocabulary``), checked here
    so the run fails before any stage starts.
    """
    groups = (
        ("stacking", config.stacking.strategy, STRATEGY_OPTIONS),
        ("freeze", config.freeze.policy, FREEZE_OPTIONS),
        ("schedule", config.schedule.name, SCHEDULE_OPTIONS),
        ("data", config.data.format, DATA_OPTIONS),
    )
    for group, choice, uses in groups:
        section = getattr(config, group)
        options = {key: getattr(section, key) for keys in uses.values() for key in keys}
        unused = unused_option(group, choice, options, uses)
        if unused:
            raise ConfigError(unused)
    unused = unused_across_groups(
        config.schedule.name,
        config.freeze.policy,
        bn=config.freeze.bn,
        components=config.freeze.components,
        unfreeze_last=config.schedule.unfreeze_last,
    )
    if unused:
        raise ConfigError(unused)
    _check_preprocess_and_augment(config)


def _check_preprocess_and_augment(config: Config) -> None:
    """The preprocess options the kind uses, a known family, valid augmentation layers."""
    p = config.preprocess
    # force=false is the "unset" value of a bool; only force=true can be ignored.
    options = {"scale": p.scale, "offset": p.offset, "family": p.family, "force": p.force or None}
    unused = unused_option("preprocess", p.kind, options, PREPROCESS_OPTIONS)
    if unused:
        raise ConfigError(unused)
    if p.family is not None:
        check_choice(p.family, APPLICATION_FAMILIES, "preprocess.family")
    if p.scale is not None and not (math.isfinite(p.scale) and p.scale != 0):
        raise ConfigError(
            f"preprocess.scale={p.scale} must be a finite, non-zero factor, e.g. "
            "preprocess.scale=0.00392156862745098 (1/255)."
        )
    problem = augment_layer_problem(config.augment.layers)
    if problem:
        raise ConfigError(problem)


def _check_keras_names(train: TrainConfig) -> None:
    """Optimizer, loss and metric names Keras accepts, checked without importing Keras."""
    if train.optimizer not in keras_names.SUPPORTED_OPTIMIZERS:
        other = train.optimizer.lower() in keras_names.KERAS_OPTIMIZERS
        close = difflib.get_close_matches(train.optimizer, keras_names.SUPPORTED_OPTIMIZERS, n=1)
        what = (
            "is a Keras optimizer that tfstack does not support"
            if other
            else "is not a Keras optimizer"
        )
        hint = f" Did you mean train.optimizer={close[0]}?" if close else ""
        raise ConfigError(
            f"train.optimizer={train.optimizer!r} {what}.{hint} Use one of "
            f"{list(keras_names.SUPPORTED_OPTIMIZERS)}."
        )
    if not keras_names.is_loss(train.loss):
        close = difflib.get_close_matches(train.loss, keras_names.KERAS_LOSSES, n=1)
        hint = f" Did you mean train.loss={close[0]}?" if close else ""
        raise ConfigError(
            f"train.loss={train.loss!r} is not a Keras loss.{hint} Use a Keras loss name such as "
            "sparse_categorical_crossentropy, binary_crossentropy or mse (names are "
            "case-sensitive)."
        )
    for metric in train.metrics:
        if not keras_names.is_metric(metric):
            close = difflib.get_close_matches(metric, keras_names.KERAS_METRICS, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"train.metrics: {metric!r} is not a Keras metric.{hint} Use Keras metric names "
                "such as accuracy, auc or mae (names are case-sensitive)."
            )


def validate(cfg: Any, *, source: str = "config") -> Config:
    """Merge a config onto the schema and check every value that has a fixed set of choices.

    Args:
        cfg: a DictConfig or plain dict (a Hydra compose, or a loaded ``params.yaml``).
        source: where the config came from, for messages.

    Returns:
        The validated config as a ``Config`` dataclass instance.

    Raises:
        ConfigError: an unknown key, a wrong type, a missing value or an invalid choice.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, source) from err
    check_choice(config.stacking.strategy, STRATEGIES, "stacking.strategy", "stacking")
    check_choice(config.freeze.policy, FREEZE_POLICIES, "freeze.policy", "freeze")
    check_choice(config.schedule.name, SCHEDULES, "schedule.name", "schedule")
    check_choice(config.train.task, TASKS, "train.task")
    check_choice(config.preprocess.kind, PREPROCESS_KINDS, "preprocess.kind", "preprocess")
    if config.stacking.merge is not None:
        check_choice(config.stacking.merge, MERGES, "stacking.merge")
    check_choice(config.train.cache_frozen, CACHE_MODES, "train.cache_frozen")
    check_choice(config.train.feature_cache, FEATURE_CACHE_MODES, "train.feature_cache")
    check_choice(config.train.resume, RESUME_MODES, "train.resume")
    check_jit_compile(config.train)
    check_choice(config.distribute.kind, DISTRIBUTE_KINDS, "distribute.kind", "distribute")
    check_choice(config.data.format, DATA_FORMATS, "data.format", "data")
    if config.data.color_mode is not None:
        check_choice(config.data.color_mode, COLOR_MODES, "data.color_mode")
    if config.data.interpolation is not None:
        check_choice(config.data.interpolation, INTERPOLATIONS, "data.interpolation")
    if config.freeze.bn is not None:
        check_choice(config.freeze.bn, BN_MODES, "freeze.bn")
    adapter = config.stacking.adapter
    if not (adapter is None or adapter == "auto" or isinstance(adapter, list)):
        raise ConfigError(
            f"stacking.adapter={adapter!r} is not valid. Use null, auto, or a list of Keras layer "
            "configs such as [{class_name: Dense, config: {units: 12}}]."
        )
    for key in ("base", "head"):
        if getattr(config.components, key).path in ("???", "", None):
            raise ConfigError(
                f"components.{key}.path is not set. Point it at a .keras/.h5 file, a SavedModel "
                "directory or keras_applications:NAME."
            )
    _check_numbers(config)
    _check_no_ops(config)
    schedule = config.schedule
    phases = phase_names(
        schedule.name, stages=schedule.stages, fine_tune_epochs=schedule.fine_tune_epochs
    )
    early_stopping_per_phase(config, phases)
    lr_schedule_per_phase(config, phases)
    _check_keras_names(config.train)
    names = {f"components.{k}.name": getattr(config.components, k).name for k in ("base", "head")}
    for key, component in config.components.extra.items():
        names[f"components.extra.{key}"] = key
        names[f"components.extra.{key}.name"] = component.name
    for key, name in names.items():
        if name is not None and not COMPONENT_NAME.fullmatch(str(name)):
            raise ConfigError(
                f"{key}={name!r} is not a valid component name: it names files and MLflow "
                "artifacts, so use letters, digits, '_', '.' and '-' only (no '/', no leading '.')."
            )
    # Class weights and mixed precision (issue 14); class names are checked with the data.
    check_class_weight(config.train.class_weight, task=config.train.task, key="train.class_weight")
    check_choice(config.train.precision, PRECISIONS, "train.precision")
    _check_callbacks_and_tensorboard(config)
    from tfstack.pipeline.promote import check_register

    check_register(config.tracking)
    check_finite_everywhere(config)  # the numbers no check above names, e.g. in layer configs
    return config


def _check_callbacks_and_tensorboard(config: Config) -> None:
    """train.callbacks entries (issue 14) and, with tracking.tensorboard, its package."""
    problem = callback_entry_problem(list(config.train.callbacks), trust_code=config.trust_code)
    if problem:
        raise ConfigError(problem)
    if config.tracking.tensorboard and not _installed("tensorboard"):
        raise ConfigError(
            "tracking.tensorboard=true needs the tensorboard package, which is not installed. "
            "Install tfstack's extra (pip install 'tfstack[tensorboard]'), or set "
            "tracking.tensorboard=false."
        )


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (found, not imported: no TensorFlow here)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def to_dict(config: Config) -> dict:
    """The config as a plain dict (for params.yaml, MLflow params and run records)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


# Learning-rate schedules (tfstack.lr_schedules).
