"""Load a pretrained component (.keras, legacy .h5, Keras Applications, SavedModel) as a model.

Every component comes back as a `keras.Model` renamed to its component name, so two files that were
both saved as `sequential` can be stacked. Anything the user can get wrong raises `ComponentError`
whose message names the config key, the file, what was found, and the fix.
"""

import difflib
import inspect
import logging
import os
import types
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from tfstack.errors import ComponentError, describe_error
from tfstack.model_files import read_h5_config, read_keras_config
from tfstack.pretrained_weights import WeightsAvailable, weights_requests
from tfstack.trust import (
    TrustOptions,
    find_code,
    import_modules,
    refusal_message,
    unknown_class_message,
    unresolved,
)
from tfstack.vocabulary import APPLICATIONS_PREFIX, NAMED_WEIGHTS

logger = logging.getLogger(__name__)

KERAS_EXTENSIONS = (".keras",)
H5_EXTENSIONS = (".h5", ".hdf5")
SAVEDMODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
SERVING_ENDPOINT = "serving_default"
OPAQUE_ATTRIBUTE = "_tfstack_opaque"
SOURCE_FILE_ATTRIBUTE = "_tfstack_source_file"
# Builder arguments that load_component takes by name (and the config by key), not in kwargs.
NAMED_ARGUMENTS = ("weights", "include_top", "pooling", "input_shape")


def load_component(
    source: str,
    *,
    name: str,
    cut_at: str | None = None,
    trust_code: bool = False,
    modules: Sequence[str] = (),
    key: str | None = None,
    trust_options: TrustOptions | None = None,
    weights: str | None = None,
    include_top: bool = False,
    pooling: str | None = None,
    input_shape: tuple | None = None,
    classes: int | None = None,
    builder_kwargs: Mapping[str, object] | None = None,
) -> keras.Model:
    """Load a pretrained model as a component named `name`.

    Args:
        source: Path to a `.keras` file, a legacy `.h5`/`.hdf5` file or a TensorFlow SavedModel
            directory, or `keras_applications:NAME` (e.g. `keras_applications:MobileNetV2`).
        name: Component name; the returned model carries it.
        cut_at: Name of a top-level layer; the model is cut after that layer's output
            (e.g. a classifier's penultimate features).
        trust_code: Allow code in the source: Lambda layers, custom classes, a `TFSMLayer`, a
            SavedModel directory (the file then loads with `safe_mode=False`). Only for files you
            trust; without it, a source that carries code is refused before Keras or TensorFlow
            deserializes anything.
        modules: Python modules to import first, which register the file's custom classes with
            `keras.saving.register_keras_serializable`. Needs `trust_code` (importing runs code).
        key: Config key prefix used in error messages; defaults to `components.<name>`.
        trust_options: How the user sets trust and modules, for the fixes messages name;
            defaults to the config keys `<key>.trust_code=true` and `<key>.modules=[...]`.
        weights: Keras Applications only: None (random init), "imagenet" (from the Keras cache
            `$KERAS_HOME/models`, downloaded by Keras only where the machine is online; see
            `tfstack.pretrained_weights`) or a local weights file path.
        include_top: Keras Applications only: keep the classifier on top.
        pooling: Keras Applications only: None, "avg" or "max".
        input_shape: Keras Applications only: input shape without the batch dimension.
        classes: Keras Applications only: number of classes of the top classifier.
        builder_kwargs: Keras Applications only: further builder arguments, e.g.
            `{"alpha": 0.35}` for MobileNetV2 or `{"include_preprocessing": False}` for
            EfficientNet (messages name them `<key>.kwargs.<argument>`).

    Returns:
        A `keras.Model` named `name`; `component_file` tells which file it came from.

    Raises:
        ComponentError: The source is missing, unreadable, not a model, carries code without
            `trust_code`, uses a class no module registers, has no defined input, or `cut_at`
            names no layer; or `modules` are given without trust or cannot be imported; or
            a builder argument is unknown, or ImageNet weights are neither cached nor
            downloadable.

    Example:
        >>> import keras
        >>> from tfstack import load_component
        >>> keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save("head.keras")
        >>> head = load_component("head.keras", name="head")
        >>> head.name, head.output_shape
        ('head', (None, 2))
    """
    key = key or f"components.{name}"
    trust_options = trust_options or TrustOptions.for_key(key)
    import_modules(modules, trusted=trust_code, options=trust_options)
    application_kwargs = {
        "weights": weights,
        "include_top": include_top,
        "pooling": pooling,
        "input_shape": tuple(input_shape) if input_shape is not None else None,
        "classes": classes,
    }
    if source.startswith(APPLICATIONS_PREFIX):
        model, source_file = _load_application(
            source, key=key, builder_kwargs=dict(builder_kwargs or {}), **application_kwargs
        )
    else:
        _reject_application_kwargs(
            source, key=key, kwargs=dict(builder_kwargs or {}) or None, **application_kwargs
        )
        model = _load_path(
            source, name=name, trust_code=trust_code, key=key, trust_options=trust_options
        )
        source_file = os.path.abspath(source)

    _require_defined_input(model, source=source, key=key)
    if cut_at is not None:
        model = _cut(model, cut_at, source=source, key=key)
    model.name = name
    setattr(model, SOURCE_FILE_ATTRIBUTE, source_file)
    logger.info(
        "Loaded component %s from %s: inputs %s -> outputs %s (%d layers%s)",
        name,
        source,
        [tuple(tensor.shape) for tensor in model.inputs],
        [tuple(tensor.shape) for tensor in model.outputs],
        len(model.layers),
        ", opaque SavedModel" if is_opaque(model) else "",
    )
    return model


def component_file(model: keras.Model) -> str | None:
    """The file a component was loaded from, as `load_component` recorded it.

    Args:
        model: A model `load_component` returned.

    Returns:
        The absolute path of its `.keras`/`.h5` file or SavedModel directory; for
        `keras_applications:NAME`, of the weights file it was given (the Keras cache's file
        for "imagenet"); None for random initialisation or a model from elsewhere.
    """
    return getattr(model, SOURCE_FILE_ATTRIBUTE, None)


def is_opaque(model: keras.Model) -> bool:
    """Tell whether a model wraps a SavedModel whose internal layers Keras cannot see.

    Args:
        model: Any Keras model or layer.

    Returns:
        True if the model was built by `load_component` from a SavedModel, or contains a
        `keras.layers.TFSMLayer` at any depth (which still holds after a `.keras` reload).
    """
    if getattr(model, OPAQUE_ATTRIBUTE, False):
        return True
    pending = [model]
    while pending:
        layer = pending.pop()
        if isinstance(layer, keras.layers.TFSMLayer):
            return True
        pending.extend(getattr(layer, "layers", []))
    return False


def _load_path(
    path: str, *, name: str, trust_code: bool, key: str, trust_options: TrustOptions
) -> keras.Model:
    """Load a `.keras`, `.h5`/`.hdf5` file or a SavedModel directory."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, file)) for file in SAVEDMODEL_FILES):
            if not trust_code:
                # Refused before tf.saved_model.load: loading and calling it runs its graph.
                raise ComponentError(
                    f"{key}.path={path} is a TensorFlow SavedModel directory, whose graph is "
                    f"code (it can read and write files with tf.io.read_file, tf.io.write_file "
                    f"and more) that runs when tfstack loads and calls it; tfstack refuses code "
                    f"in untrusted components. If you trust this SavedModel, set "
                    f"{trust_options.trust_code}."
                )
            return _load_savedmodel(path, name=name, key=key)
        entries = sorted(os.listdir(path))[:5]
        raise ComponentError(
            f"{key}.path={path} is a directory but not a TensorFlow SavedModel: expected "
            f"saved_model.pb inside, found {entries or 'nothing'}. Point {key}.path at the "
            f"SavedModel directory itself, or at a .keras/.h5 file."
        )
    if not os.path.exists(path):
        raise ComponentError(
            f"{key}.path={path} does not exist (working directory: {os.getcwd()}). "
            f"Fix the path, or use {key}.path=keras_applications:NAME for a Keras application."
        )
    config = read_model_config(path, key=key)

    # Decided on the config alone, before Keras deserializes (and so imports or runs) anything.
    code = find_code(config, include_compile=False)
    if code and not trust_code:
        raise ComponentError(refusal_message(f"{key}.path={path}", code, options=trust_options))
    if missing := unresolved(code):
        raise ComponentError(
            unknown_class_message(f"{key}.path={path}", missing, options=trust_options)
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not trust_code)
    except ValueError as err:
        if "safe_mode" in str(err):
            raise ComponentError(
                _unsafe_message(path, key=key, fix=trust_options.trust_code, err=err)
            ) from err
        raise _load_failed(path, key=key, err=err) from err
    except Exception as err:  # Keras raises many types; all mean "cannot load".
        raise _load_failed(path, key=key, err=err) from err

    if not isinstance(model, keras.Model):
        raise ComponentError(
            f"{key}.path={path} holds a {type(model).__name__}, expected a keras.Model. "
            f"Wrap it in a model (keras.Sequential([keras.Input(...), layer])) and save that."
        )
    return model


def read_model_config(path: str, *, key: str) -> object:
    """The serialized model config of a `.keras` or `.h5`/`.hdf5` file, read without Keras.

    Args:
        path: The model file.
        key: Config key prefix for messages (`<key>.path=...`).

    Returns:
        The config as JSON values (a dict for any file Keras wrote).

    Raises:
        ComponentError: Another extension, or a file that cannot be read.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension in KERAS_EXTENSIONS:
        # Keras 3.15 reports a corrupt .keras as "File not found", so check the archive first.
        return read_keras_config(path, key=key)
    if extension in H5_EXTENSIONS:
        return read_h5_config(path, key=key)
    raise ComponentError(
        f"{key}.path={path} has extension {extension!r}; expected .keras, .h5, .hdf5, "
        f"a SavedModel directory, or keras_applications:NAME. Save the model with "
        f"model.save('model.keras') and point {key}.path at that file."
    )


def _unsafe_message(path: str, *, key: str, fix: str, err: Exception) -> str:
    """Explain a safe-mode refusal by Keras of something `find_code` does not know as code."""
    return (
        f"{key}.path={path} holds something Keras refuses to load in safe mode "
        f"({describe_error(err)}); "
        f"tfstack loads untrusted files with safe_mode=True. If you trust this file, set {fix}."
    )


def _load_failed(path: str, *, key: str, err: Exception) -> ComponentError:
    """Wrap any other Keras loading failure."""
    # Keras messages can be multi-line config dumps: keep the first line, shortened.
    return ComponentError(
        f"{key}.path={path} could not be loaded by Keras {keras.__version__} "
        f"({describe_error(err)}). Check that it was saved with model.save() from Keras "
        f"or tf_keras, and that custom layers are registered."
    )


def _load_savedmodel(path: str, *, name: str, key: str) -> keras.Model:
    """Wrap a SavedModel's `serving_default` signature in a frozen, opaque Keras model."""
    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # TensorFlow raises many types here.
        raise ComponentError(
            f"{key}.path={path} is a SavedModel TensorFlow {tf.__version__} cannot load "
            f"({describe_error(err)}). Re-export it with model.export(path), or save a "
            f".keras file instead."
        ) from err
    if SERVING_ENDPOINT not in loaded.signatures:
        raise ComponentError(
            f"{key}.path={path} is a SavedModel without a {SERVING_ENDPOINT!r} signature; "
            f"found {sorted(loaded.signatures) or 'none'}. Re-export it with model.export(path)."
        )
    signature = loaded.signatures[SERVING_ENDPOINT]
    input_specs = tf.nest.flatten(signature.structured_input_signature)
    if len(input_specs) != 1:
        raise ComponentError(
            f"{key}.path={path} is a SavedModel whose {SERVING_ENDPOINT!r} signature takes "
            f"{len(input_specs)} inputs ({[spec.name for spec in input_specs]}); tfstack wraps "
            f"SavedModels with one input only. Save the model as .keras instead."
        )
    output_specs = signature.structured_outputs
    if isinstance(output_specs, dict) and len(output_specs) != 1:
        raise ComponentError(
            f"{key}.path={path} is a SavedModel whose {SERVING_ENDPOINT!r} signature returns "
            f"{len(output_specs)} outputs ({sorted(output_specs)}); tfstack wraps SavedModels "
            f"with one output only. Save the model as .keras instead."
        )
    (input_spec,) = input_specs
    if input_spec.shape.rank is None:
        raise ComponentError(
            f"{key}.path={path} is a SavedModel whose input has unknown rank; expected a fixed "
            f"rank such as (None, 224, 224, 3). Re-export it with a concrete input signature."
        )

    inputs = keras.Input(
        shape=tuple(input_spec.shape[1:]), dtype=input_spec.dtype.name, name=f"{name}_input"
    )
    savedmodel_layer = keras.layers.TFSMLayer(
        path, call_endpoint=SERVING_ENDPOINT, trainable=False, name=f"{name}_savedmodel"
    )
    outputs = savedmodel_layer(inputs)
    if isinstance(outputs, dict):
        # The signature returns {"output_0": tensor}; a component has one plain output.
        (outputs,) = outputs.values()
    model = keras.Model(inputs=inputs, outputs=outputs, name=name)
    setattr(model, OPAQUE_ATTRIBUTE, True)
    return model


def _load_application(
    source: str,
    *,
    key: str,
    weights: str | None,
    include_top: bool,
    pooling: str | None,
    input_shape: tuple | None,
    classes: int | None,
    builder_kwargs: dict,
    check_only: bool = False,
) -> tuple[keras.Model | None, str | None]:
    """Build `keras.applications.NAME`; return it and the weights file it loaded, if any.

    With ``check_only``, the build stops at its weights request once the file is known to be
    available (`tfstack.pretrained_weights.WeightsAvailable`): ``(None, cached path or None)``.
    """
    application_name = source.removeprefix(APPLICATIONS_PREFIX)
    builder = getattr(keras.applications, application_name, None)
    if builder is None or isinstance(builder, types.ModuleType) or not callable(builder):
        available = [
            candidate
            for candidate in dir(keras.applications)
            if candidate[:1].isupper() and callable(getattr(keras.applications, candidate))
        ]
        closest = difflib.get_close_matches(application_name, available, n=3, cutoff=0.5)
        suggestion = f" Did you mean {' or '.join(closest)}?" if closest else ""
        raise ComponentError(
            f"{key}.path={source} names no Keras application; expected keras_applications:NAME "
            f"with NAME one of the {len(available)} builders of Keras {keras.__version__} "
            f"({available[0]}, ..., {available[-1]}).{suggestion} Names are case-sensitive."
        )
    if weights not in (None, NAMED_WEIGHTS) and not os.path.isfile(weights):
        raise ComponentError(
            f"{key}.weights={weights!r} is neither {NAMED_WEIGHTS} nor a local file. Set "
            f"{key}.weights={NAMED_WEIGHTS} for Keras's pretrained weights, null for random "
            f"initialisation, or the path of a weights file."
        )
    _check_builder_kwargs(builder, application_name, builder_kwargs, key=key, classes=classes)

    optional = {"pooling": pooling, "input_shape": input_shape, "classes": classes}
    application_kwargs = {
        "weights": weights,
        "include_top": include_top,
        **{argument: value for argument, value in optional.items() if value is not None},
        **builder_kwargs,
    }
    try:
        with weights_requests(key, check_only=check_only) as used:
            model = builder(**application_kwargs)
    except WeightsAvailable as available:
        return None, available.path
    except ComponentError:
        raise
    except Exception as err:  # applications raise ValueError, OSError, ...
        arguments = ", ".join(
            f"{argument}={value!r}" for argument, value in application_kwargs.items()
        )
        raise ComponentError(
            f"{key}.path={source} could not be built with {arguments} "
            f"({type(err).__name__}: {err}). Fix the {key} arguments named in that message."
        ) from err
    if used:
        return model, used[-1]
    return model, os.path.abspath(weights) if weights not in (None, NAMED_WEIGHTS) else None


def check_pretrained_weights(
    source: str,
    *,
    key: str,
    weights: str | None,
    include_top: bool = False,
    pooling: str | None = None,
    input_shape: tuple | None = None,
    classes: int | None = None,
    builder_kwargs: Mapping[str, object] | None = None,
) -> str | None:
    """Check that `load_component` will get a Keras application's ImageNet weights, quickly.

    Keras names the weights file only while it builds the architecture, so the builder runs
    with the arguments `load_component` would pass and is stopped at its weights request: the
    file is cached (and passes Keras's hash check) or its download host answers. Nothing is
    loaded or downloaded. Other sources and other ``weights`` need no check.

    Args:
        source: As for `load_component`; only ``keras_applications:NAME`` is checked.
        key: Config key prefix of the component, for messages (``components.base``).
        weights, include_top, pooling, input_shape, classes, builder_kwargs: As for
            `load_component`.

    Returns:
        The cached weights file, or None (it will be downloaded, or there is none to get).

    Raises:
        ComponentError: The weights file is neither cached nor downloadable (one line naming
            the file and the folder to put it in), the cached file fails Keras's hash check
            offline, or the builder refuses its arguments.

    Example:
        >>> from tfstack.components import check_pretrained_weights
        >>> check_pretrained_weights(
        ...     "keras_applications:MobileNetV2", key="components.base", weights="imagenet",
        ...     input_shape=(96, 96, 3), builder_kwargs={"alpha": 0.35},
        ... )  # doctest: +SKIP
        '/home/me/.keras/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5'
    """
    if not source.startswith(APPLICATIONS_PREFIX) or weights != NAMED_WEIGHTS:
        return None
    _, path = _load_application(
        source,
        key=key,
        weights=weights,
        include_top=include_top,
        pooling=pooling,
        input_shape=tuple(input_shape) if input_shape is not None else None,
        classes=classes,
        builder_kwargs=dict(builder_kwargs or {}),
        check_only=True,
    )
    return path


def _check_builder_kwargs(
    builder, application_name: str, builder_kwargs: dict, *, key: str, classes: int | None
) -> None:
    """Refuse a builder argument the builder does not take, or one set under its own key."""
    parameters = list(inspect.signature(builder).parameters)
    for argument, value in builder_kwargs.items():
        if argument in NAMED_ARGUMENTS:
            raise ComponentError(
                f"{key}.kwargs.{argument}={value!r} repeats {key}.{argument}, which tfstack "
                f"passes itself; set {key}.{argument}={value} and remove it from {key}.kwargs."
            )
        if argument == "classes" and classes is not None:
            raise ComponentError(
                f"{key}.kwargs.classes={value!r} repeats the classes={classes} given to "
                f"load_component; give it once."
            )
        if argument not in parameters:
            closest = difflib.get_close_matches(argument, parameters, n=1)
            suggestion = f" Did you mean {key}.kwargs.{closest[0]}?" if closest else ""
            raise ComponentError(
                f"{key}.kwargs.{argument} is not an argument of keras.applications."
                f"{application_name}, which takes: {', '.join(parameters)}.{suggestion}"
            )


def _reject_application_kwargs(source: str, *, key: str, **application_kwargs: object) -> None:
    """Refuse Keras Applications arguments for a file source, where they would be ignored."""
    given = {
        argument: value
        for argument, value in application_kwargs.items()
        if value is not None and not (argument == "include_top" and value is False)
    }
    if given:
        arguments = ", ".join(f"{key}.{argument}" for argument in given)
        raise ComponentError(
            f"{key}.path={source} is a file, but {arguments} only apply to "
            f"keras_applications:NAME and would be ignored. Remove them, or load an application."
        )


def _require_defined_input(model: keras.Model, *, source: str, key: str) -> None:
    """Refuse models without a defined input (a Sequential never built or called)."""
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs:
        raise ComponentError(
            f"{key}.path={source} holds a {type(model).__name__} with no defined input: it was "
            f"saved before it was built or called, so its input shape is unknown. Add "
            f"keras.Input(shape=...) as its first layer (or call model.build(input_shape)) and "
            f"save it again."
        )


def _cut(model: keras.Model, cut_at: str, *, source: str, key: str) -> keras.Model:
    """Keep the sub-graph from the model's inputs up to the output of layer `cut_at`."""
    if is_opaque(model):
        raise ComponentError(
            f"{key}.cut_at={cut_at} cannot apply to {key}.path={source}: a SavedModel is opaque "
            f"and has no layers to cut at. Remove {key}.cut_at, or save the model as .keras."
        )
    layer_names = [layer.name for layer in model.layers]
    if cut_at not in layer_names:
        shown = ", ".join(layer_names[-8:])
        raise ComponentError(
            f"{key}.cut_at={cut_at} names no layer of {key}.path={source}; its last layers are: "
            f"{shown} ({len(layer_names)} layers). Set {key}.cut_at to one of those names."
        )
    return keras.Model(inputs=model.inputs, outputs=model.get_layer(cut_at).output)
