"""What the stages read, from config to library values: components, models, data, phases.

Components load with their own trust (`load_components`); the preprocessing and augmentation
blocks in front of them come from the ``preprocess`` and ``augment`` groups (`make_front`); a
model an earlier stage wrote reloads with the same per-component trust (`load_model`); the data
is checked against the stacked model's input and the head's output (`check_targets`); the
schedule's phases are built from the config's values (`make_phases`).
"""

from __future__ import annotations

from pathlib import Path

from tfstack.errors import ConfigError, DataError, describe_error
from tfstack.pipeline.paths import Paths
from tfstack.pipeline.schema import Config
from tfstack.vocabulary import APPLICATIONS_PREFIX, NAMED_WEIGHTS


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; turn on op determinism when asked."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # Op determinism is process-wide and the demo's pretraining turns it on; honour false.
        from tfstack._keras_compat import disable_op_determinism

        disable_op_determinism()


def _component_kwargs(component, paths: Paths) -> dict:
    kwargs = {
        "cut_at": component.cut_at,
        "trust_code": component.trust_code,
        "modules": list(component.modules),
    }
    if component.path.startswith(APPLICATIONS_PREFIX):
        weights = component.weights
        if weights not in (None, NAMED_WEIGHTS):
            # Relative to the project root, as preflight checked it.
            weights = str(paths.resolve(weights))
        kwargs.update(
            weights=weights,
            include_top=component.include_top,
            pooling=component.pooling,
            input_shape=tuple(component.input_shape) if component.input_shape is not None else None,
            builder_kwargs=dict(component.kwargs or {}),
        )
    return kwargs


def load_components(config: Config, paths: Paths):
    """Load the feature extractors (base, then extra) and the head, each under its own name."""
    from tfstack.components import load_component

    def load(key: str, component):
        source = component.path
        if not source.startswith(APPLICATIONS_PREFIX):
            source = str(paths.resolve(source))
        return load_component(
            source,
            name=component.name or key,
            key=f"components.{key}",
            **_component_kwargs(component, paths),
        )

    bases = [load("base", config.components.base)]
    bases += [load(f"extra.{key}", c) for key, c in config.components.extra.items()]
    head = load("head", config.components.head)
    return bases, head


def check_pretrained_weights(config: Config, paths: Paths) -> None:
    """Refuse ImageNet weights that cannot be had, before any run starts and before the demo.

    Each ``keras_applications:NAME`` component with ``weights: imagenet`` is checked as
    `load_components` would load it (`tfstack.components.check_pretrained_weights`: the
    builder runs and stops at its weights request). It imports TensorFlow, so it runs only when
    such a component is configured.

    Raises:
        ComponentError: A weights file is neither in the Keras cache nor downloadable.
    """
    from tfstack.pipeline.preflight import components

    named = {
        key: component
        for key, component in components(config).items()
        if component.path.startswith(APPLICATIONS_PREFIX) and component.weights == NAMED_WEIGHTS
    }
    if not named:
        return
    from tfstack.components import check_pretrained_weights as check

    for key, component in named.items():
        kwargs = _component_kwargs(component, paths)
        for unused in ("cut_at", "trust_code", "modules"):
            kwargs.pop(unused)
        check(component.path, key=key, **kwargs)


def make_front(config: Config, paths: Paths, base) -> list:
    """The ``preprocess`` and ``augment`` blocks for `tfstack.stacking.build_stacked`'s front.

    ``preprocess=normalize`` adapts on the training split, read here batch by batch.
    """
    from tfstack.augmentation import build_augmentation
    from tfstack.images import naming_unreadable_files
    from tfstack.preprocessing import build_preprocessing
    from tfstack.shapes import input_specs, output_specs

    p = config.preprocess
    train_inputs, train_data = None, None
    if p.kind == "normalize":
        train_inputs, train_data = _normalize_inputs(config, paths, base)
    with naming_unreadable_files(train_data):  # a damaged image found while adapting
        preprocess = build_preprocessing(
            p.kind,
            base,
            scale=p.scale,
            offset=p.offset,
            family=application_family(config) if p.kind == "applications" else None,
            resize=p.resize,
            force=p.force,
            train_inputs=train_inputs,
        )
    spec = (output_specs if preprocess is not None else input_specs)(preprocess or base)[0]
    augment = build_augmentation(list(config.augment.layers), spec, seed=config.seed)
    return [block for block in (preprocess, augment) if block is not None]


def _normalize_inputs(config: Config, paths: Paths, base):
    """The training inputs ``preprocess=normalize`` adapts on, in batches; and their dataset.

    Arrays are sliced into batches; image files are decoded batch by batch in tf.data, at the
    size `make_dataset` gives them (``data.image_size``, else the base's input size), so they
    are never all in memory (an `.npz` is in memory already).
    """
    splits = load_splits(config, paths)
    if _is_files(splits):
        images = make_dataset(config, base, splits, "train", shuffle=False)
        return images.input_batches(), images
    import tensorflow as tf

    inputs = tf.data.Dataset.from_tensor_slices(splits.x_train).batch(config.train.batch_size)
    return inputs, None


def application_family(config: Config) -> str:
    """``preprocess.family``, or the family of ``components.base.path=keras_applications:NAME``.

    Raises:
        ConfigError: no family is set and the base is not a Keras Applications model.
    """
    from tfstack.vocabulary import APPLICATION_FAMILIES

    if config.preprocess.family is not None:
        return config.preprocess.family
    path = config.components.base.path
    if path.startswith(APPLICATIONS_PREFIX):
        import keras

        builder = getattr(keras.applications, path.split(":", 1)[1], None)
        # keras.applications.MobileNetV2 is defined in keras.src.applications.mobilenet_v2.
        family = getattr(builder, "__module__", "").rsplit(".", 1)[-1]
        if family in APPLICATION_FAMILIES:
            return family
    raise ConfigError(
        f"preprocess=applications needs preprocess.family=FAMILY, since components.base.path="
        f"{path} is not a Keras Applications model whose family tfstack can tell. Use one of "
        f"{list(APPLICATION_FAMILIES)}."
    )


def _components_by_name(config: Config) -> dict:
    """Component name (the stacked model's sub-model) -> (config key, component config)."""
    components = {"base": config.components.base, "head": config.components.head}
    components.update({f"extra.{k}": c for k, c in config.components.extra.items()})
    return {c.name or key: (f"components.{key}", c) for key, c in components.items()}


def _reload_safe_mode(path: Path, config: Config, *, stage: str, compile: bool) -> bool:
    """Keep per-component trust when reloading a stacked model a previous stage wrote.

    Code in a component's sub-model is allowed only when that component trusts code (its
    modules are imported first); code anywhere else is refused. Keras then loads with
    safe_mode=False only when there is code and all of it is trusted, never for everything
    because one component is trusted.
    """
    from tfstack.components import read_model_config
    from tfstack.errors import ComponentError
    from tfstack.trust import (
        TrustOptions,
        describe_code,
        find_code_by_component,
        import_modules,
        refusal_message,
        unknown_class_message,
        unresolved,
    )

    try:
        model_config = read_model_config(str(path), key=stage)
    except ComponentError as err:
        reason = str(err).removeprefix(f"{stage}.path={path} ")
        raise DataError(
            f"{path} cannot be loaded ({reason}): it is damaged or was written by another "
            f"version. Write it again: dvc repro -f {stage} (or tfstack run)."
        ) from err
    components = _components_by_name(config)
    owned = find_code_by_component(model_config, components, include_compile=compile)
    for owner, elements in owned.items():
        if owner is None:
            raise ComponentError(
                f"{path} holds {describe_code(elements)} outside every component (base, head, "
                f"extra); tfstack trusts code only per component and refuses it. Rebuild it "
                f"from trusted components: dvc repro -f {stage} (or tfstack run)."
            )
        key, component = components[owner]
        subject = f"{path}: component {owner!r}"
        options = TrustOptions.for_key(key)
        if not component.trust_code:
            raise ComponentError(refusal_message(subject, elements, options=options))
        import_modules(component.modules, trusted=True, options=options)
        if missing := unresolved(elements):
            raise ComponentError(unknown_class_message(subject, missing, options=options))
    return not owned


def safe_mode_for(path: Path, config: Config, *, stage: str) -> bool:
    """Whether a model an earlier stage wrote loads with Keras's safe mode (see `load_model`)."""
    return _reload_safe_mode(path, config, stage=stage, compile=False)


def load_model(path: Path, config: Config, *, stage: str, compile: bool = False):
    """Load a model a previous stage wrote, with a clear message when it is missing or damaged.

    Raises:
        DataError: The file is missing or damaged.
        ComponentError: It holds code of a component that does not trust code, or code outside
            every component.
    """
    import keras

    if not path.is_file():
        raise DataError(f"{path} is missing; run the {stage} stage first (dvc repro {stage}).")
    safe_mode = _reload_safe_mode(path, config, stage=stage, compile=compile)
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    except Exception as err:  # Keras raises many types for a damaged file
        raise DataError(
            f"{path} cannot be loaded ({describe_error(err)}): it is damaged or was "
            f"written by another version. Write it again: dvc repro -f {stage} (or tfstack run)."
        ) from err


def load_splits(config: Config, paths: Paths):
    """The data's splits: `tfstack.data.Splits` (arrays) or `tfstack.image_files.FileSplits`."""
    data = config.data
    where = paths.resolve(data.path)
    if data.format in ("images", "csv"):
        from tfstack.image_files import find_image_folder, load_csv

        split = {"val_fraction": data.val_fraction, "test_fraction": data.test_fraction}
        if data.format == "images":
            return find_image_folder(where, **split, seed=config.seed)
        columns = {"path_column": data.path_column, "label_column": data.label_column}
        return load_csv(where, **columns, **split, seed=config.seed)
    from tfstack.data import load_npz

    return load_npz(where, val_fraction=data.val_fraction, seed=config.seed)


def data_hash(config: Config, paths: Paths) -> str | None:
    """The hash runs record for the data (``data_hash`` tag, checkpoints, reproduce), or None.

    An ``.npz`` hashes as DVC does (md5 of its bytes); image folders and CSVs hash their file
    list (`tfstack.image_files.FileSplits.content_hash`: relative paths, sizes, bytes). None when
    the data is missing or cannot be read (the stage that reads it says why).
    """
    path = paths.resolve(config.data.path)
    if config.data.format == "npz":
        from tfstack.data import file_hash

        return file_hash(path) if path.is_file() else None
    if not path.exists():
        return None
    try:
        return load_splits(config, paths).content_hash()
    except DataError:
        return None


def image_options(config: Config, model):
    """How the data's images decode, the size defaulting to the stacked model's input size."""
    from tfstack.image_files import ImageOptions

    size = config.data.image_size
    if size is None:
        shape = tuple(model.inputs[0].shape[1:]) if len(model.inputs) == 1 else ()
        if len(shape) != 3 or None in shape[:2]:
            raise DataError(
                f"data.image_size is null, so images take the stacked model's input size, but "
                f"it takes {shape}. Set data.image_size=[HEIGHT, WIDTH]."
            )
        size = shape[:2]
    return ImageOptions(
        tuple(int(d) for d in size),
        color_mode=config.data.color_mode,
        interpolation=config.data.interpolation,
        crop_to_aspect_ratio=bool(config.data.crop_to_aspect_ratio),
    )


def make_dataset(config: Config, model, splits, split: str, *, shuffle: bool):
    """One split as a dataset in the shared seeded order (an `IndexedDataset`).

    Training (``shuffle``) is epoch-seeded: epoch k's order depends on (seed, k) only, so a
    resumed run sees the same; a cached frozen phase replays that order on its cached outputs.
    """
    batch = config.train.batch_size
    seed = config.seed if shuffle else 0
    y = getattr(splits, f"y_{split}")
    if _is_files(splits):
        from tfstack.images import ImageDataset

        options = image_options(config, model)
        files = splits.files(split)
        return ImageDataset(
            files, y, options, batch_size=batch, shuffle=shuffle, seed=seed, epoch_seeded=shuffle
        )
    from tfstack.datasets import ArrayDataset

    x = getattr(splits, f"x_{split}")
    return ArrayDataset(x, y, batch_size=batch, shuffle=shuffle, seed=seed, epoch_seeded=shuffle)


# Images whose range `tfstack.input_range` judges: enough to see the scale, read in seconds.
INPUT_RANGE_SAMPLES = 512


def input_sample(dataset, limit: int | None = None):
    """Inputs of a dataset as one array: an array dataset's (first ``limit``) samples, or the
    first ``limit`` (default `INPUT_RANGE_SAMPLES`) decoded images of a file dataset."""
    from tfstack.datasets import ArrayDataset

    if isinstance(dataset, ArrayDataset):
        return dataset.x if limit is None else dataset.x[:limit]
    return dataset.sample(INPUT_RANGE_SAMPLES if limit is None else limit)


# The input example's budget: MLflow stores it twice per logged model as JSON (about 5 bytes
# per uint8 value), so 5 samples of 64x64x3 fit (0.32 MB a file), one of 224x224x3 (0.79 MB).
SERVED_EXAMPLE_VALUES = 65536


def served_example(dataset, limit: int = 5):
    """The input example a logged model is signed with: raw inputs in their natural dtype.

    An array dataset's first samples as stored; decoded images (float32 0..255, as Keras decodes
    them) back as uint8, the dtype of the 8-bit image files a client sends. At most ``limit``
    samples and `SERVED_EXAMPLE_VALUES` values, and at least one sample.
    """
    import numpy as np

    from tfstack.datasets import ArrayDataset

    first = input_sample(dataset, limit=1)
    per_sample = max(1, int(np.prod(first.shape[1:])))
    limit = max(1, min(limit, SERVED_EXAMPLE_VALUES // per_sample))
    example = input_sample(dataset, limit=limit)
    if isinstance(dataset, ArrayDataset):
        return example
    return np.clip(np.round(example), 0, 255).astype(np.uint8)


def _is_files(splits) -> bool:
    from tfstack.image_files import FileSplits

    return isinstance(splits, FileSplits)


def check_targets(config: Config, model, splits) -> None:
    """Check the data fits the stacked model: input shapes and dtypes, labels or targets."""
    from tfstack.labels import check_labels

    _check_inputs(config, model, splits)
    outputs = int(model.outputs[0].shape[-1] or 1)
    task = config.train.task
    for name in ("y_train", "y_val", "y_test"):
        check_labels(getattr(splits, name), outputs, task=task, key=f"data.path {name}")
    if task == "regression":
        produced = tuple(model.outputs[0].shape[1:])
        for name in ("y_train", "y_val", "y_test"):
            per_sample = tuple(getattr(splits, name).shape[1:]) or (1,)
            if per_sample != produced:
                raise DataError(
                    f"data.path={config.data.path}: {name} has targets of shape {per_sample} per "
                    f"sample, but the head (components.head.path={config.components.head.path}) "
                    f"outputs {produced}. With train.task=regression the head needs one output per "
                    "target value: use a head with that many outputs, or reshape the targets."
                )


def _check_inputs(config: Config, model, splits) -> None:
    """The samples must have the shape and a numeric dtype the stacked model takes."""
    if len(model.inputs) != 1:
        return
    expected = tuple(model.inputs[0].shape[1:])
    if _is_files(splits):
        from tfstack.images import check_fits

        base = f"the stacked model (components.base.path={config.components.base.path})"
        check_fits(image_options(config, model), expected, model=base)
        return
    for name in ("x_train", "x_val", "x_test"):
        x = getattr(splits, name)
        if x.dtype.kind not in "biuf":
            raise DataError(
                f"data.path={config.data.path}: {name} has dtype {x.dtype}; the model takes "
                "numbers. Store numeric arrays, e.g. x.astype('float32')."
            )
        got = tuple(x.shape[1:])
        if len(got) != len(expected) or any(
            e is not None and e != g for e, g in zip(expected, got, strict=False)
        ):
            raise DataError(
                f"data.path={config.data.path}: {name} holds samples of shape {got}, but the "
                f"stacked model takes {expected} (the input of components.base.path="
                f"{config.components.base.path}). Resize or reshape the data to {expected}, or "
                "use a base whose input fits the data."
            )


def make_phases(config: Config):
    """The schedule's phases from config values."""
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import make_schedule

    f = config.freeze
    freeze = FreezePolicy(
        kind=f.policy,
        unfreeze_last=f.unfreeze_last,
        unfreeze_pattern=f.unfreeze_pattern,
        bn=f.bn,
        components=tuple(f.components) if f.components is not None else None,
    )
    s = config.schedule
    return make_schedule(
        s.name,
        epochs=config.train.epochs,
        lr=config.train.lr,
        optimizer=config.train.optimizer,
        freeze=freeze,
        fine_tune_epochs=s.fine_tune_epochs,
        fine_tune_lr_factor=s.fine_tune_lr_factor,
        unfreeze_last=s.unfreeze_last,
        stages=s.stages,
        unfreeze_step=s.unfreeze_step,
        lr_decay=s.lr_decay,
        lr_multipliers=dict(s.lr_multipliers),
    )


def early_stopping_rules(config: Config, phases) -> list:
    """Each phase's early stopping (`tfstack.early_stopping.EarlyStoppingSpec`, or None: off)."""
    from tfstack.early_stopping import EarlyStoppingSpec
    from tfstack.pipeline.phase_settings import early_stopping_per_phase

    rules = early_stopping_per_phase(config, [phase.name for phase in phases])
    return [None if rule is None else EarlyStoppingSpec(**rule) for rule in rules]


# Learning-rate schedules (tfstack.lr_schedules).
def lr_schedule_specs(config: Config, phases) -> list:
    """Each phase's learning-rate schedule (`tfstack.lr_schedules.LrScheduleSpec`)."""
    from tfstack.lr_schedules import LrScheduleSpec
    from tfstack.pipeline.phase_settings import lr_schedule_per_phase

    per_phase = lr_schedule_per_phase(config, [phase.name for phase in phases])
    return [LrScheduleSpec(**values, setting=where) for values, where in per_phase]


def feature_extractor_names(config: Config) -> list[str]:
    names = [config.components.base.name or "base"]
    names += [c.name or f"extra.{k}" for k, c in config.components.extra.items()]
    return names


def class_names(config: Config, paths: Paths, splits, model) -> list[str] | None:
    """The run's class names, one per class in class-id order; None for regression.

    They come from the data: the loader's ``class_names`` (image folders, a CSV), or an
    optional ``class_names`` array in a ``.npz`` (name ``i`` is label ``i``, so the file's order
    is kept); otherwise the class ids ``"0"`` .. ``"K-1"``. They label the confusion matrix and
    the served classifier's columns (`tfstack.tracking.classifier`).

    Args:
        config: The validated config.
        paths: The project's paths.
        splits: The data as `load_splits` gives it (its ``class_names``), or None to load it.
        model: The stacked model, whose head says how many classes there are.

    Raises:
        DataError: The names do not fit the head (one per class), repeat, are empty, or one is
            ``label`` (the served model's column of predicted names); or (loading the data) a
            ``.npz``'s ``class_names`` is not a 1-D array of strings.
    """
    from tfstack.tracking.classifier import LABEL_COLUMN

    if config.train.task == "regression":
        return None
    outputs = int(model.outputs[0].shape[-1] or 1)
    classes = 2 if config.train.task == "binary" else outputs
    where = f"data.path={config.data.path}"
    if splits is None:
        splits = load_splits(config, paths)  # the loader reads and checks a .npz's names
    names = splits.class_names
    if names is None:
        return [str(i) for i in range(classes)]
    from tfstack.data import Splits

    if isinstance(splits, Splits):  # an .npz's own class_names array, not folder names
        where += " class_names"
    names = [str(name) for name in names]
    if len(names) != classes:
        raise DataError(
            f"{where}: {len(names)} class names {names[:10]} for a head "
            f"(components.head.path={config.components.head.path}) with {classes} classes; "
            f"give one name per class, in label order (name i is label i)."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated or "" in names or LABEL_COLUMN in names:
        problem = (
            f"repeat {repeated}"
            if repeated
            else ("include an empty name" if "" in names else f"include {LABEL_COLUMN!r}")
        )
        raise DataError(
            f"{where}: the class names {names[:10]} {problem}; each class needs its own "
            f"non-empty name other than {LABEL_COLUMN!r} (the served model's column of "
            "predicted names). Rename that class."
        )
    return names
