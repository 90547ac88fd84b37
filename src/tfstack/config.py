"""Structured-config schemas for tfstack and their validation.

The YAML under ``conf/`` stays plain so that DVC's Hydra composition (which knows nothing of this
package) can compose it into ``params.yaml``. Whatever the source (a Hydra compose in ``tfstack
run`` or the ``params.yaml`` a DVC stage reads), the config is merged onto these dataclasses, so a
mistyped key or a value of the wrong type fails here, with the key named, before any TensorFlow
work. This module imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tfstack.errors import ConfigError

STRATEGIES = ("sequential", "adapter", "functional")
FREEZE_POLICIES = ("frozen", "joint", "partial")
SCHEDULES = ("single", "two_phase", "gradual")
TASKS = ("classification", "binary", "regression")
MERGES = ("concatenate", "average")
BN_MODES = ("freeze", "train")
CACHE_MODES = ("auto", "off")
RESUME_MODES = ("auto", "off")
# Component names become file and artifact names (summary_<name>.txt, shapes/<name>_layers.json):
# no path separators, no leading dot.
COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
DISTRIBUTE_KINDS = ("none", "mirrored", "multi_worker")


@dataclass
class ComponentConfig:
    """One pretrained component: a file, a SavedModel directory or ``keras_applications:NAME``."""

    path: str = "???"
    name: str | None = None
    cut_at: str | None = None
    trust_code: bool = False
    # Python modules that register the file's custom Keras classes; importing needs trust_code.
    modules: list[str] = field(default_factory=list)
    weights: str | None = None
    include_top: bool = False
    pooling: str | None = None
    input_shape: list[int] | None = None


@dataclass
class ComponentsConfig:
    """model_1 (``base``, the feature extractor), model_2 (``head``) and optional extra bases."""

    base: ComponentConfig = field(default_factory=ComponentConfig)
    head: ComponentConfig = field(default_factory=ComponentConfig)
    extra: dict[str, ComponentConfig] = field(default_factory=dict)


@dataclass
class DataConfig:
    """A dataset: an ``.npz`` holding x_train, y_train, x_test, y_test."""

    name: str = "digits"
    # Mandatory: merging a YAML "???" onto a default would silently keep the default.
    path: str = "???"
    val_fraction: float = 0.2


@dataclass
class StackingConfig:
    """How components are put together."""

    strategy: str = "sequential"
    adapter: Any = None
    intermediate: list[Any] = field(default_factory=list)
    merge: str = "concatenate"


@dataclass
class FreezeConfig:
    """What trains inside the feature extractors."""

    policy: str = "frozen"
    unfreeze_last: int | None = None
    unfreeze_pattern: str | None = None
    bn: str | None = None
    components: list[str] | None = None


@dataclass
class ScheduleConfig:
    """The fine-tuning schedule preset and its options."""

    name: str = "single"
    fine_tune_epochs: int | None = None
    fine_tune_lr_factor: float = 0.1
    unfreeze_last: int = 2
    stages: int = 3
    unfreeze_step: int = 1
    lr_decay: float = 0.5
    lr_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Training: task, loss, metrics, optimizer and loop settings."""

    task: str = "classification"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    loss: str = "sparse_categorical_crossentropy"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    cache_frozen: str = "auto"
    deterministic: bool = True
    verbose: int = 1
    # auto: checkpoint every epoch and resume a killed run of the same config; off: neither.
    resume: str = "auto"


@dataclass
class TrackingConfig:
    """Where runs are recorded. ``uri: null`` means sqlite at the repository root."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "tfstack"
    run_name: str | None = None
    log_model: bool = True


@dataclass
class DistributeConfig:
    """The TensorFlow distribution strategy training runs under."""

    kind: str = "none"
    cpu_replicas: int = 0
    # Trainable BatchNormalization normalizes over the global batch, not each replica's part.
    sync_batchnorm: bool = True


@dataclass
class DemoConfig:
    """The demo's prepare and pretrain stages (digits 0-4 -> 5-9)."""

    raw: str = "data/digits.npz"
    target_train_per_class: int = 10
    pretrain_epochs: int = 15


@dataclass
class Config:
    """The whole tfstack config."""

    data: DataConfig = field(default_factory=DataConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    stacking: StackingConfig = field(default_factory=StackingConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    seed: int = 42
    output_dir: str = "outputs"


def _known_keys(full_key: str) -> list[str]:
    """The valid keys next to ``full_key`` in the schema, for "did you mean" messages."""
    node: Any = OmegaConf.structured(Config)
    parts = full_key.split(".")[:-1]
    for part in parts:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _first_unknown(full_key: str) -> str:
    """The shortest prefix of a dotted key that is not in the schema (``trian.lr`` -> ``trian``)."""
    node: Any = OmegaConf.structured(Config)
    parts = full_key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return full_key


def _adds_to_mapping(full_key: str) -> bool:
    """Whether ``full_key`` is, or is inside, a free-form mapping of the schema.

    Such as ``schedule.lr_multipliers`` (or ``schedule.lr_multipliers.base``): Hydra refuses a
    new entry there unless the override starts with ``+``.
    """
    node: Any = OmegaConf.structured(Config)
    for part in full_key.split("."):
        if not isinstance(node, DictConfig):
            return False
        if part not in node:
            return node._metadata.object_type in (None, dict)
        node = node[part]
    return isinstance(node, DictConfig) and node._metadata.object_type in (None, dict)


def _config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    text = str(err).splitlines()[0]
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{full_key} is not set ({source}). Set {full_key}=VALUE.")
    if "not in" in text or "Key" in text and "not" in text:
        known = _known_keys(str(full_key))
        leaf = str(full_key).split(".")[-1]
        close = difflib.get_close_matches(leaf, known, n=1)
        prefix = str(full_key).rsplit(".", 1)[0] if "." in str(full_key) else ""
        hint = f" Did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
        return ConfigError(
            f"{full_key} is not a config key ({source}).{hint} Valid keys here: {known}."
        )
    return ConfigError(f"{full_key}: {text} ({source}).")


def _check_choice(value: Any, choices: tuple[str, ...], key: str, group: str | None = None):
    if value not in choices:
        how = f"{group}=NAME" if group else f"{key}=VALUE"
        raise ConfigError(
            f"{key}={value!r} is not valid. Expected one of {list(choices)} (set {how})."
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
    _check_choice(config.stacking.strategy, STRATEGIES, "stacking.strategy", "stacking")
    _check_choice(config.freeze.policy, FREEZE_POLICIES, "freeze.policy", "freeze")
    _check_choice(config.schedule.name, SCHEDULES, "schedule.name", "schedule")
    _check_choice(config.train.task, TASKS, "train.task")
    _check_choice(config.stacking.merge, MERGES, "stacking.merge")
    _check_choice(config.train.cache_frozen, CACHE_MODES, "train.cache_frozen")
    _check_choice(config.train.resume, RESUME_MODES, "train.resume")
    _check_choice(config.distribute.kind, DISTRIBUTE_KINDS, "distribute.kind", "distribute")
    if config.freeze.bn is not None:
        _check_choice(config.freeze.bn, BN_MODES, "freeze.bn")
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
    for key, value in {
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
    }.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1.")
    if not config.train.lr > 0:
        raise ConfigError(f"train.lr={config.train.lr} must be positive.")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed={config.seed} must be between 0 and 2**32 - 1.")
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
    if not 0 < config.data.val_fraction < 1:
        raise ConfigError(
            f"data.val_fraction={config.data.val_fraction} must be between 0 and 1 (exclusive)."
        )
    return config


def load_params(path: str | Path) -> Config:
    """Load and validate a composed config file (DVC's ``params.yaml``).

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid config.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} does not exist. Run `dvc exp run` (which composes it from conf/) "
            "or pass overrides to `tfstack run`."
        )
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # YAML errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return validate(raw, source=str(path))


def compose(overrides: list[str], *, config_dir: str | Path) -> Config:
    """Compose ``conf/`` with Hydra overrides and validate it.

    Args:
        overrides: Hydra overrides such as ``["stacking=adapter", "train.epochs=3"]``.
        config_dir: the ``conf/`` directory.

    Raises:
        ConfigError: an unknown group option, a bad override or an invalid config.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir).resolve()
    if not (config_dir / "config.yaml").is_file():
        raise ConfigError(f"No config.yaml in {config_dir}; run tfstack from the project root.")
    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise _compose_error(err, config_dir) from err
    return validate(cfg, source="overrides " + " ".join(overrides) if overrides else "conf/")


def _compose_error(err: Exception, config_dir: Path) -> ConfigError:
    """Turn Hydra's compose errors into a message that lists the valid choices."""
    text = str(err).strip()
    missing = re.search(r"Could not find '([\w/]+)/([\w.-]+)'", text)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        if options:
            return ConfigError(
                f"{group}={option} is not an option of config group {group!r}. "
                f"Options: {options} (files in {config_dir / group})."
            )
        groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir())
        return ConfigError(f"{group!r} is not a config group. Groups: {groups}.")
    bad_key = re.search(r"Could not override '([\w.]+)'", text)
    if bad_key and _adds_to_mapping(bad_key.group(1)):
        full_key = bad_key.group(1)
        cause = str(err.__cause__ or "").strip().splitlines()[:1] or ["a new key"]
        append = re.search(r"To append to your config use (.+)", text)
        how = append.group(1).strip() if append else f"+{full_key}=VALUE"
        return ConfigError(
            f"Cannot override {full_key}: {cause[0]}. A new entry in a mapping needs Hydra's "
            f"'+' prefix: {how}"
        )
    if bad_key:
        full_key = bad_key.group(1)
        full_key = _first_unknown(full_key)
        known = _known_keys(full_key)
        close = difflib.get_close_matches(full_key.split(".")[-1], known, n=1)
        parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        hint = f" Did you mean {parent}{close[0]}?" if close else ""
        return ConfigError(f"{full_key} is not a config key.{hint} Valid keys here: {known}.")
    if "LexerNoViableAltException" in text or "mismatched input" in text:
        bad = text.split(":", 1)[-1].strip().splitlines()[0]
        return ConfigError(
            f"Cannot parse the override {bad}. Quote values with special characters, "
            "e.g. freeze.unfreeze_pattern='^conv' (Hydra override grammar)."
        )
    return ConfigError(f"Cannot compose the config: {text.splitlines()[0]}")


def compose_yaml(config_dir: str | Path, overrides: list[str] | None = None) -> str:
    """``conf/`` composed and resolved exactly as DVC writes it into ``params.yaml``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def to_dict(config: Config) -> dict:
    """The config as a plain dict (for params.yaml, MLflow params and run records)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
