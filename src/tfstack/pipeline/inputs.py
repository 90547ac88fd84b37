"""What the stages read, from config to library values: components, models, data, phases.

Components load with their own trust (`load_components`); a model an earlier stage wrote
reloads with the same per-component trust (`load_model`); the data is checked against the
stacked model's input and the head's output (`check_targets`); the schedule's phases are built
from the config's values (`make_phases`).
"""

from __future__ import annotations

from pathlib import Path

from tfstack.errors import DataError, describe_error
from tfstack.pipeline.config import Config
from tfstack.pipeline.paths import Paths


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


def _component_kwargs(component) -> dict:
    kwargs = {
        "cut_at": component.cut_at,
        "trust_code": component.trust_code,
        "modules": list(component.modules),
    }
    if component.path.startswith("keras_applications:"):
        kwargs.update(
            weights=component.weights,
            include_top=component.include_top,
            pooling=component.pooling,
            input_shape=tuple(component.input_shape) if component.input_shape is not None else None,
        )
    return kwargs


def load_components(config: Config, paths: Paths):
    """Load the feature extractors (base, then extra) and the head, each under its own name."""
    from tfstack.components import load_component

    def load(key: str, component):
        source = component.path
        if not source.startswith("keras_applications:"):
            source = str(paths.resolve(source))
        return load_component(
            source,
            name=component.name or key,
            key=f"components.{key}",
            **_component_kwargs(component),
        )

    bases = [load("base", config.components.base)]
    bases += [load(f"extra.{key}", c) for key, c in config.components.extra.items()]
    head = load("head", config.components.head)
    return bases, head


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
    from tfstack.data import load_npz

    return load_npz(
        paths.resolve(config.data.path),
        val_fraction=config.data.val_fraction,
        seed=config.seed,
    )


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
    from tfstack.pipeline.config import early_stopping_per_phase

    rules = early_stopping_per_phase(config, [phase.name for phase in phases])
    return [None if rule is None else EarlyStoppingSpec(**rule) for rule in rules]


def feature_extractor_names(config: Config) -> list[str]:
    names = [config.components.base.name or "base"]
    names += [c.name or f"extra.{k}" for k, c in config.components.extra.items()]
    return names
