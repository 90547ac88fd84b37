"""The structured-config schema of tfstack: one dataclass per config group, and key lookups.

The YAML under ``conf/`` stays plain so that DVC's Hydra composition (which knows nothing of this
package) can compose it into ``params.yaml``; whatever the source, the config is merged onto
these dataclasses (`tfstack.pipeline.config.validate`). `known_keys`, `first_unknown`,
`in_schema` and `adds_to_mapping` answer questions about the schema's keys for error messages.
This module imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from tfstack.vocabulary import LrScheduleOptions

# Schema defaults are the YAML defaults of conf/: a field whose value differs between the options
# of its group (the option names themselves, train.epochs, ...) has no default here and is
# MISSING ("???"), so conf/ is the one place that sets it (tests/test_config.py checks this).


@dataclass
class ComponentConfig:
    """One pretrained component: a file, a SavedModel directory or ``keras_applications:NAME``."""

    path: str = "???"
    name: str | None = None
    cut_at: str | None = None
    trust_code: bool = False
    # Python modules that register the file's custom Keras classes; importing needs trust_code.
    modules: list[str] = field(default_factory=list)
    # keras_applications:NAME only: null, imagenet (the Keras cache, downloaded where online)
    # or a weights file; the builder's other arguments (alpha, include_preprocessing, ...).
    weights: str | None = None
    include_top: bool = False
    pooling: str | None = None
    input_shape: list[int] | None = None
    # null, not {}: Hydra then takes `kwargs={alpha:0.35}` without '+' (it merges a mapping
    # given for an existing {} and refuses its new keys).
    kwargs: dict[str, Any] | None = None


@dataclass
class ComponentsConfig:
    """model_1 (``base``, the feature extractor), model_2 (``head``) and optional extra bases."""

    base: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="base"))
    head: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="head"))
    extra: dict[str, ComponentConfig] = field(default_factory=dict)


@dataclass
class DataConfig:
    """A dataset: an ``.npz`` of arrays, a folder of class folders of images, or a CSV of images.

    ``format`` says which (``vocabulary.DATA_FORMATS``). The image options are set by the
    packaged ``data/images.yaml`` and ``csv.yaml`` (``tfstack/conf/``) and null in the ``npz``
    options; a format that does not use one refuses it when set (``vocabulary.DATA_OPTIONS``).
    """

    name: str = MISSING
    format: str = MISSING
    # Mandatory: merging a YAML "???" onto a default would silently keep the default.
    path: str = "???"
    val_fraction: float = 0.2
    # The image options: set by each option of conf/data/ (null where its format does not use
    # them), so MISSING here.
    test_fraction: float | None = MISSING
    # null: the stacked model's input size.
    image_size: list[int] | None = None
    color_mode: str | None = MISSING
    interpolation: str | None = MISSING
    crop_to_aspect_ratio: bool | None = MISSING
    path_column: str | None = MISSING
    label_column: str | None = MISSING


@dataclass
class StackingConfig:
    """How components are put together; null options are the strategy's default."""

    strategy: str = MISSING
    adapter: Any = MISSING
    intermediate: list[Any] = field(default_factory=list)
    # null: concatenate (stacking=functional only).
    merge: str | None = None


@dataclass
class PreprocessConfig:
    """Preprocessing layers in front of the base (``tfstack.preprocessing``).

    ``scale``/``offset``: rescale only; ``family``: applications only (null: the family of
    ``components.base.path=keras_applications:NAME``); ``resize``: any kind; ``force``: scale
    even when the base preprocesses its input itself.
    """

    kind: str = MISSING
    scale: float | None = MISSING
    offset: float | None = MISSING
    family: str | None = None
    resize: bool = False
    force: bool = False


@dataclass
class AugmentConfig:
    """Augmentation layers after the preprocessing (``tfstack.augmentation``)."""

    # Entries {class_name: RandomFlip, config: {mode: horizontal}}; [] is none.
    layers: list[Any] = MISSING


@dataclass
class FreezeConfig:
    """What trains inside the feature extractors."""

    policy: str = MISSING
    unfreeze_last: int | None = MISSING
    unfreeze_pattern: str | None = None
    bn: str | None = MISSING
    components: list[str] | None = None


@dataclass
class ScheduleConfig:
    """The fine-tuning schedule preset and its options; null is the preset's default.

    two_phase uses fine_tune_epochs (null: train.epochs), fine_tune_lr_factor (null: 0.1) and,
    with freeze=frozen, unfreeze_last (null: 2); gradual uses stages (null: 3), unfreeze_step
    (null: 1) and lr_decay (null: 0.5). The defaults are those of ``tfstack.schedules``.
    """

    name: str = MISSING
    fine_tune_epochs: int | None = None
    fine_tune_lr_factor: float | None = None
    unfreeze_last: int | None = None
    stages: int | None = None
    unfreeze_step: int | None = None
    lr_decay: float | None = None
    lr_multipliers: dict[str, float] = MISSING
    # Phase name -> null (no early stopping in that phase) or keys of train.early_stopping that
    # the phase sets otherwise, e.g. {fine_tune: {patience: 5}}.
    early_stopping: dict[str, Any] = field(default_factory=dict)
    # Learning-rate schedules: phase name -> null (constant in that phase) or keys of
    # train.lr_schedule that the phase sets otherwise (a new name starts from that name's
    # defaults), e.g. {fine_tune: {name: cosine, warmup_epochs: 2}}.
    lr_schedule: dict[str, Any] = field(default_factory=dict)


@dataclass
class EarlyStoppingConfig:
    """Early stopping in every phase (Keras's EarlyStopping); off while ``patience`` is null.

    ``monitor`` is a key of the training history (loss, val_loss, a metric, val_<metric>);
    ``start_from_epoch`` counts from each phase's first epoch.
    """

    monitor: str = "val_loss"
    mode: str = "auto"
    patience: int | None = None
    min_delta: float = 0.0
    restore_best_weights: bool = False
    start_from_epoch: int = 0


# Learning-rate schedules (tfstack.lr_schedules).
@dataclass
class LrScheduleConfig(LrScheduleOptions):
    """How the learning rate moves within each phase; options null are the schedule's default.

    ``name`` is constant, cosine (``warmup_epochs`` or ``warmup_steps``, ``final_fraction``),
    exponential (``decay_rate``, ``decay_epochs``, ``staircase``), step (``step_epochs``,
    ``factor``) or reduce_on_plateau (``monitor``, ``mode``, ``factor``, ``patience``,
    ``min_delta``, ``cooldown``, ``min_lr``); an option the name does not use is refused.
    The keys are `tfstack.vocabulary.LrScheduleOptions`', shared with the library.
    """


@dataclass
class TrainConfig:
    """Training: task, loss, metrics, optimizer and loop settings."""

    task: str = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    optimizer: str = "adam"
    loss: str = MISSING
    metrics: list[str] = MISSING
    cache_frozen: str = "auto"
    # The shared on-disk cache of those features (shared | off); its directory (null:
    # $TFSTACK_FEATURE_CACHE, else ~/.cache/tfstack/features) and size limit (LRU eviction).
    feature_cache: str = "shared"
    feature_cache_dir: str | None = None
    feature_cache_max_gb: float = 10.0
    # Frozen features larger than this (MB, train + validation; test in evaluate) are extracted
    # batch by batch to disk and read back by batches, never held whole (issue 16).
    feature_memory_mb: float = 1024.0
    deterministic: bool = True
    verbose: int = 1
    # auto: checkpoint every epoch and resume a killed run of the same config; off: neither.
    resume: str = "auto"
    # null, or patience null: every phase runs all its epochs (schedule.early_stopping aside).
    early_stopping: EarlyStoppingConfig | None = field(default_factory=EarlyStoppingConfig)
    # Learning-rate schedules: how the rate moves within every phase (constant: it does not).
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    # Class weights and mixed precision (issue 14). class_weight: null, balanced (from the
    # training split) or {class name or index: weight}; precision: vocabulary.PRECISIONS.
    class_weight: Any = None
    precision: str = "float32"
    # User callbacks (issue 14): {class_name: EarlyStopping, config: {...}} entries naming
    # keras.callbacks classes, or {_target_: my.module.Class, ...} (needs trust_code=true).
    callbacks: list[Any] = field(default_factory=list)
    # XLA (issue 16): auto (Keras's default), true or false; passed to model.compile.
    jit_compile: Any = "auto"


@dataclass
class RegisterConfig:
    """``tracking.register``: register a successful run's model in the MLflow Model Registry."""

    name: str | None = None  # the registered model; null: no registration
    alias: str | None = None  # moved to the new version (e.g. champion); null: none


@dataclass
class TrackingConfig:
    """Where runs are recorded. ``uri: null`` means sqlite at the repository root."""

    enabled: bool = MISSING
    uri: str | None = MISSING
    experiment: str = "tfstack"
    run_name: str | None = None
    log_model: bool = MISSING
    # TensorBoard (issue 14): Keras TensorBoard logs under outputs/train/tensorboard/.
    tensorboard: bool = False
    register: RegisterConfig = field(default_factory=RegisterConfig)


@dataclass
class DistributeConfig:
    """The TensorFlow distribution strategy training runs under."""

    kind: str = MISSING
    cpu_replicas: int = 0
    # Trainable BatchNormalization normalizes over the global batch, not each replica's part.
    sync_batchnorm: bool = True


@dataclass
class DemoConfig:
    """The demo's prepare and pretrain stages (digits 0-4 -> 5-9)."""

    raw: str = "data/digits"
    target_train_per_class: int = 10
    pretrain_epochs: int = 15


@dataclass
class DvcDepsConfig:
    """The user's files as ``dvc.yaml`` dependencies, set in conf/config.yaml only.

    Each is ``${tfstack_dep:${<the input's key>}}`` (hydra_plugins.tfstack_resolvers): the
    configured file, or ``params.yaml`` for an input that is not a file.
    """

    data: str = MISSING
    base: str = MISSING
    base_weights: str = MISSING
    head: str = MISSING
    head_weights: str = MISSING


@dataclass
class Config:
    """The whole tfstack config."""

    # What goes in: the data, the components, and how the stacked model is put together.
    data: DataConfig = field(default_factory=DataConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    stacking: StackingConfig = field(default_factory=StackingConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # How it trains.
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    seed: int = 42
    # Where it is recorded, and the project around it.
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "outputs"
    dvc_deps: DvcDepsConfig = field(default_factory=DvcDepsConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # User code (issue 14): importing a train.callbacks _target_ class needs trust_code=true.
    trust_code: bool = False


def known_keys(full_key: str) -> list[str]:
    """The valid keys next to ``full_key`` in the schema, for "did you mean" messages."""
    node: Any = OmegaConf.structured(Config)
    parts = full_key.split(".")[:-1]
    for part in parts:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def first_unknown(full_key: str) -> str:
    """The shortest prefix of a dotted key that is not in the schema (``trian.lr`` -> ``trian``)."""
    node: Any = OmegaConf.structured(Config)
    parts = full_key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return full_key


def in_schema(full_key: str) -> bool:
    """Whether a dotted key names a field of the schema (``components.base.input_shape``)."""
    node: Any = OmegaConf.structured(Config)
    parts = full_key.split(".")
    if parts[:2] == ["components", "extra"] and len(parts) == 4:
        parts = ["components", "base", parts[3]]  # extra.<name>.<field>: a ComponentConfig
    for part in parts:
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def adds_to_mapping(full_key: str) -> bool:
    """Whether ``full_key`` is, or is inside, a free-form mapping of the schema.

    Such as ``schedule.lr_multipliers`` (or ``schedule.lr_multipliers.base``): Hydra refuses a
    new entry there unless the override starts with ``+``.
    """
    node: Any = OmegaConf.structured(Config)
    for part in full_key.split("."):
        # `_get_node`, not `in`/`[]`: a mandatory (???) mapping is "not in" its parent; a
        # mandatory mapping's own entries are unknown, so any name may be added to it.
        if isinstance(node, DictConfig) and (node._is_missing() or node._is_none()):
            # A null mapping (components.<key>.kwargs) takes new entries the same way.
            return node._metadata.object_type in (None, dict)
        child = (
            node._get_node(part, validate_access=False) if isinstance(node, DictConfig) else None
        )
        if child is None:
            return isinstance(node, DictConfig) and node._metadata.object_type in (None, dict)
        node = child
    return isinstance(node, DictConfig) and node._metadata.object_type in (None, dict)
