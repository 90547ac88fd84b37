"""Frozen-feature caching and the inference view of a phase's frozen feature extractors.

Frozen means inference mode: a frozen feature extractor is called with ``training=False``, as in
Keras's transfer-learning guide, so its Dropout, noise and random augmentation are off. Keras 3
does not do this by itself: a frozen Dropout still drops under ``fit``, and a ``training=False``
written into a functional graph is overridden by the outer call's ``training=True``. A phase
with such a component fits `inference_view`, the stacked model with those components wrapped to
be called in inference mode (same layers, same variables, never saved).

Frozen-feature caching (``cache_frozen=True`` in `tfstack.training.fit_phase`): when a phase
leaves every feature extractor frozen (so called in inference mode) and none adds an
activity-regularization loss, the frozen part gives the same output for a sample in every
epoch. `split_frozen` cuts the stacked model after that part into a ``frozen`` model (run once
per split, in inference mode, `frozen_outputs`) and a ``trainable`` model that shares the
stacked model's layers and variables, so fitting it trains the stacked model's head in place.
The trainable part is compiled like the stacked model (`compiled_like`: same loss, metrics and
fresh optimizer, discriminative rates included) and fitted on the cached outputs in the batches
and order the uncached phase would use (`tfstack.datasets.IndexedDataset`: arrays or image files),
so history, metric names and per-epoch logs are the same. Where the frozen part's outputs come
from (the shared cache, memory, or files streamed over the memory budget) is
`tfstack.cached_features`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import keras

from tfstack import _keras_compat
from tfstack.datasets import IndexedDataset
from tfstack.errors import TrainingError
from tfstack.freezing import get_component

logger = logging.getLogger(__name__)


@dataclass
class FrozenSplit:
    """A stacked model cut after its frozen part.

    Attributes:
        frozen: the model's inputs -> the frozen part's outputs (run once, in inference mode).
        trainable: those outputs -> the model's outputs. It shares the stacked model's layers and
            variables: fitting it trains the stacked model in place.
        cut: the layers whose outputs are the cut, e.g. ``["base"]`` or ``["merge"]``.
    """

    frozen: keras.Model
    trainable: keras.Model
    cut: list[str]


def _random_or_training_dependent(
    layer: keras.layers.Layer, *, inference: bool = False
) -> str | None:
    """Why ``layer`` (or a layer inside it) may give another output in training mode, or None.

    A frozen layer is not an inference-mode layer: Keras 3 runs Dropout, noise and random
    augmentation whenever ``training=True``, trainable or not, and adds activity-regularization
    losses. Only a non-trainable BatchNormalization switches to inference mode. With
    ``inference`` (a frozen feature extractor, always called with ``training=False``) only the
    activity-regularization losses remain: Keras adds them in either mode.
    """
    for sub in _keras_compat.flatten_layers(layer):
        if getattr(sub, "activity_regularizer", None) is not None:
            kind = type(sub).__name__
            return f"layer {sub.name!r} ({kind}) adds an activity-regularization loss in training"
        reason = None if inference else _training_mode_reason(sub)
        if reason:
            return reason
    return None


def _training_mode_reason(layer: keras.layers.Layer) -> str | None:
    """Why this one layer computes something else when ``training=True``, or None."""
    kind = type(layer).__name__
    if _keras_compat.uses_seed_generators(layer) or kind.startswith("Random"):
        return (
            f"layer {layer.name!r} ({kind}) draws random numbers whenever training=True, "
            "frozen or not, so its output differs every epoch"
        )
    if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
        return f"layer {layer.name!r} (BatchNormalization) is trainable and runs in training mode"
    if isinstance(layer, keras.layers.TFSMLayer) and layer.call_training_endpoint:
        return f"layer {layer.name!r} (TFSMLayer) calls a training endpoint in training mode"
    return None


def split_frozen(
    model: keras.Model, feature_extractors: Sequence[str]
) -> tuple[FrozenSplit | None, str]:
    """Cut a stacked model after its frozen part, or say why it cannot be cut.

    Call it after the phase's freeze policy is applied. The frozen part is every layer reachable
    from the inputs through layers without trainable weights whose output does not depend on
    training mode (the frozen feature extractors, and weightless layers after them such as an
    adapter's pooling or a merge). The cut is where it feeds a layer that trains.

    Args:
        model: the stacked model (``keras.Sequential`` or functional).
        feature_extractors: names of the feature-extractor components.

    Returns:
        ``(split, note)``: the split and a note naming the cut, or ``(None, reason)``.
    """
    extractors = set()
    for name in feature_extractors:
        component = get_component(model, name, error=TrainingError, setting="feature_extractors")
        trainable = sum(int(math.prod(v.shape)) for v in component.trainable_weights)
        if trainable:
            return None, f"feature extractor {name!r} trains {trainable} parameters in this phase"
        # Frozen, so called in inference mode (see inference_view): random layers are off.
        reason = _random_or_training_dependent(component, inference=True)
        if reason:
            return None, f"feature extractor {name!r} is not deterministic: {reason}"
        extractors.add(id(component))
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError):
        return None, f"model {model.name!r} has no functional graph (subclassed or never built)"

    checked: dict[int, bool] = {}

    def frozen_operation(operation) -> bool:
        if id(operation) not in checked:
            inference = id(operation) in extractors
            checked[id(operation)] = (
                not operation.trainable_weights
                and _random_or_training_dependent(operation, inference=inference) is None
            )
        return checked[id(operation)]

    is_frozen: dict[int, bool] = {}

    def frozen_tensor(tensor) -> bool:
        if id(tensor) not in is_frozen:
            operation, node = _keras_compat.producer(tensor)
            is_frozen[id(tensor)] = node.is_input or (
                frozen_operation(operation) and all(frozen_tensor(t) for t in node.input_tensors)
            )
        return is_frozen[id(tensor)]

    varying = _varying_input(outputs, extractors, frozen_tensor, frozen_operation)
    if varying:
        return None, varying

    cut: list = []

    def collect(tensor) -> None:
        if frozen_tensor(tensor):
            if all(tensor is not t for t in cut):
                cut.append(tensor)
            return
        for parent in _keras_compat.producer(tensor)[1].input_tensors:
            collect(parent)

    for tensor in outputs:
        collect(tensor)
    if any(frozen_tensor(t) for t in outputs):
        return None, "nothing after the frozen part trains"
    raw = [_keras_compat.producer(t)[0].name for t in cut if _keras_compat.producer(t)[1].is_input]
    if raw:
        return None, f"layers that train take the model input {raw} directly"
    names = [_keras_compat.producer(t)[0].name for t in cut]
    single = len(cut) == 1
    frozen = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        cut[0] if single else cut,
        name=f"{model.name}_frozen_part",
    )
    trainable = keras.Model(
        cut[0] if single else cut,
        outputs[0] if len(outputs) == 1 else outputs,
        name=f"{model.name}_trainable_part",
    )
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, cut, strict=True))
    return FrozenSplit(frozen, trainable, names), f"cached the outputs of {shapes}"


def _varying_input(outputs, extractors: set[int], frozen_tensor, frozen_operation) -> str | None:
    """Why a frozen feature extractor's input differs between epochs, or None.

    Augmentation (or any layer that trains or draws random numbers) in front of a frozen
    feature extractor changes what it sees every epoch, so its outputs cannot be computed once.
    """
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        operation, node = _keras_compat.producer(tensor)
        if node.is_input:
            continue
        if id(operation) in extractors:
            for parent in node.input_tensors:
                if not frozen_tensor(parent):
                    cause = _first_varying(parent, frozen_operation)
                    return (
                        f"the input of frozen feature extractor {operation.name!r} changes every "
                        f"epoch, and so do its outputs: {cause}"
                    )
        stack.extend(node.input_tensors)
    return None


def _first_varying(tensor, frozen_operation) -> str:
    """The first layer upstream of ``tensor`` that trains or depends on training mode."""
    operation, node = _keras_compat.producer(tensor)
    for parent in node.input_tensors:
        operation_parent, parent_node = _keras_compat.producer(parent)
        if not parent_node.is_input and not frozen_operation(operation_parent):
            return _first_varying(parent, frozen_operation)
    reason = _random_or_training_dependent(operation)
    if reason:
        return reason
    return f"layer {operation.name!r} ({type(operation).__name__}) trains in this phase"


def training_mode_layers(component: keras.layers.Layer) -> list[str]:
    """The layers inside a component that compute something else in training mode.

    ``["dropout (Dropout)", "random_flip (RandomFlip)"]``: a frozen component is called in
    inference mode (`inference_view`), so these are off while it is frozen.
    """
    return [
        f"{sub.name} ({type(sub).__name__})"
        for sub in _keras_compat.flatten_layers(component)
        if sub is not component and _training_mode_reason(sub)
    ]


class _InferenceCall(keras.layers.Layer):
    """Calls a component with ``training=False`` whatever the outer call says.

    ``call`` takes no ``training`` argument, so a functional graph cannot pass the outer value
    on. Exists only inside a phase's `inference_view`; never saved.
    """

    def __init__(self, inner: keras.layers.Layer):
        super().__init__(name=f"{inner.name}_inference_mode", dtype=inner.dtype_policy)
        self.inner = inner

    def call(self, *args, **kwargs):
        kwargs.pop("training", None)
        return self.inner(*args, training=False, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        kwargs.pop("training", None)
        return self.inner.compute_output_spec(*args, **kwargs)


def frozen_in_training_mode(model: keras.Model, feature_extractors: Sequence[str]) -> list[str]:
    """The frozen feature extractors that would compute something else in training mode.

    Dropout, noise, random augmentation or a SavedModel's training endpoint inside them: these
    must be called in inference mode (`inference_view`) to be frozen.
    """
    names = []
    for name in feature_extractors:
        component = get_component(model, name, error=TrainingError, setting="feature_extractors")
        if not component.trainable_weights and any(
            _training_mode_reason(sub) for sub in _keras_compat.flatten_layers(component)
        ):
            names.append(name)
    return names


def inference_view(model: keras.Model, names: Sequence[str]) -> keras.Model:
    """``model`` with the named components always called with ``training=False``.

    Every layer (so every variable) is the model's own: fitting the view trains the model in
    place. Functional models are re-traced with `keras.models.clone_model`'s ``call_function``;
    a ``keras.Sequential`` is chained again as a functional model.

    Args:
        model: the stacked model.
        names: components to run in inference mode.

    Returns:
        A model with ``model``'s inputs, outputs and name.
    """
    wrapped = set(names)

    def call(layer, *args, **kwargs):
        if layer.name in wrapped:
            return _InferenceCall(layer)(*args, **kwargs)
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        spec = model.inputs[0]
        inputs = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name)
        x = inputs
        for layer in model.layers:
            x = call(layer, x)
        return keras.Model(inputs, x, name=model.name)
    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def plan_cache(
    model: keras.Model, feature_extractors: Sequence[str], train_data, val_data
) -> tuple[FrozenSplit | None, str]:
    """The split to train on cached outputs in this phase, or None and why not.

    Args:
        model: the stacked model, with the phase's freeze policy applied.
        feature_extractors: names of the feature-extractor components.
        train_data: the phase's training data (caching needs an `IndexedDataset`, such as an
            `ArrayDataset` or a `tfstack.images.ImageDataset`).
        val_data: the phase's validation data, or None.

    Returns:
        ``(split, note)`` as `split_frozen` gives them, or ``(None, reason)``.
    """
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None and not isinstance(data, IndexedDataset):
            return None, (
                f"{name} is a {type(data).__name__}, whose batch order cannot be replayed on "
                "cached outputs; pass a tfstack.datasets.ArrayDataset or a "
                "tfstack.images.ImageDataset"
            )
    return split_frozen(model, feature_extractors)


def compiled_like(
    model: keras.Model, other: keras.Model, *, loss, metrics, steps_per_execution: int = 1
) -> keras.Model:
    """``other`` (made of ``model``'s layers) compiled with ``model``'s fresh optimizer.

    The optimizer is built on the stacked model's variables, in its order, so the optimizer
    state saved with the stacked model reloads onto the right variables. ``steps_per_execution``
    is Keras's (`cached_steps_per_execution` picks it for a cached phase).
    """
    model.optimizer.build(model.trainable_variables)
    # XLA as the model was compiled (train.jit_compile).
    other.compile(
        optimizer=model.optimizer,
        loss=loss,
        metrics=list(metrics),
        jit_compile=model.jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return other


def cached_steps_per_execution(callbacks: Sequence, steps: int | None) -> tuple[int, str]:
    """How many batches a cached phase's ``fit`` runs per call, and why.

    On cached features a step is a small head's, and Keras's per-step work (a Python call,
    the callbacks, the logs) outweighs it: 700 steps of a 20-epoch phase took seconds. With
    ``steps_per_execution`` = one epoch's batches, Keras runs the epoch's steps in one
    ``tf.while_loop`` (keras/src/backend/tensorflow/trainer.py: the same traced step, the same
    batches in the same order, the last execution of an epoch stops when the data does), so
    the weights and the per-epoch logs are those of one call per batch. What it changes: batch
    hooks run once per execution. So it stays 1 when a callback has a batch hook (a user's
    ``train.callbacks`` entry that does per-batch work, ModelCheckpoint, TensorBoard,
    TerminateOnNaN...), under a distribution strategy (not measured there), and when the
    number of batches is unknown. The phase loop's own `StopOnNonFiniteLoss` checks the loss
    once per execution and names the batches of that execution.

    Args:
        callbacks: the phase's callbacks (a `tfstack.user_callbacks.FullModelCallbacks` is
            looked into).
        steps: batches per epoch of the training data (None: unknown).

    Returns:
        ``(n, reason)``: n is 1 with the reason, else the epoch's batches.
    """
    import tensorflow as tf

    if not steps or steps <= 1:
        return 1, "one batch per epoch" if steps else "the number of batches is unknown"
    if tf.distribute.has_strategy():
        return 1, "a distribution strategy is in scope"
    for callback in _flat_callbacks(callbacks):
        if getattr(callback, "batch_hooks_per_execution", False):  # StopOnNonFiniteLoss
            continue
        hooks = [h for h in _BATCH_HOOKS if not _is_default(getattr(callback, h, None))]
        if hooks:
            return 1, f"callback {type(callback).__name__} has a batch hook ({hooks[0]})"
    return int(steps), f"{steps} batches per execution (one epoch)"


_BATCH_HOOKS = (
    "on_batch_begin",
    "on_batch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_batch_begin",
    "on_test_batch_end",
)


def _is_default(method) -> bool:
    """Keras marks the hooks a callback does not override (``keras.src.utils.python_utils``)."""
    return method is None or getattr(method, "_is_default", False)


def _flat_callbacks(callbacks: Sequence) -> list:
    """The callbacks, with those a `FullModelCallbacks` forwards to in its place."""
    from tfstack.user_callbacks import FullModelCallbacks

    flat = []
    for callback in callbacks:
        inner = callback.callbacks if isinstance(callback, FullModelCallbacks) else [callback]
        flat.extend(inner)
    return flat


def frozen_outputs(frozen: keras.Model, data: IndexedDataset):
    """The frozen part's outputs for every sample of ``data``, in input order.

    The inputs stream through `IndexedDataset.input_batches` (image files are decoded batch by
    batch), so only the outputs are held in memory.
    """
    # Inference mode, the training batch size: the frozen part is deterministic and its
    # BatchNormalization runs in inference mode under fit too, so the outputs are what the
    # uncached phase computes batch by batch. Batches of unknown size: one trace serves the
    # last, smaller batch and the other split.
    return frozen.predict(data.input_batches(), verbose=0)


# The split each stacked model's last cached phase trained on, in this process.
_TRAINED_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_split(model: keras.Model, split: FrozenSplit) -> None:
    """Keep the split a cached phase of ``model`` trained on, for `inference_split`."""
    _TRAINED_SPLITS[model] = split


def inference_split(model: keras.Model, feature_extractors: Sequence[str]) -> FrozenSplit | None:
    """``model`` cut after its frozen part, to run that part once over new data (evaluation).

    When a cached phase of this process trained ``model`` on the same cut, its split is given:
    its frozen part's predict function is traced already (for a MobileNetV2, seconds saved).
    The frozen part shares the model's layers and variables, so either split computes the
    same. None when the model cannot be cut (`split_frozen`'s reasons).
    """
    split, _ = split_frozen(model, feature_extractors)
    trained = _TRAINED_SPLITS.get(model)
    if split is not None and trained is not None and trained.cut == split.cut:
        return trained
    return split
