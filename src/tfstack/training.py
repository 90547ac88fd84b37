"""Run a schedule's phases: apply the freeze policy, recompile, fit, continue the epoch count.

Every phase recompiles with a fresh optimizer (a ``trainable`` change made after ``compile`` does
nothing in Keras 3, and an optimizer built for one set of variables refuses another), then calls
``fit`` with ``initial_epoch`` so that epochs, and anything logged per epoch, form one global
sequence across phases.

Frozen-feature caching (``cache_frozen=True``): when a phase leaves every feature extractor frozen
(so called in inference mode, see below) and none adds an activity-regularization loss, the
frozen part gives the same output for a sample in every epoch. `split_frozen` cuts the stacked
model after that part into a ``frozen`` model (run once per split, in inference mode) and a
``trainable`` model that shares the stacked model's layers and variables, so fitting it trains
the stacked model's head in place. The trainable part is compiled like the stacked model (same
loss, metrics and fresh optimizer, discriminative rates included) and fitted on the cached
outputs in the batches and order the uncached phase would use (`tfstack.data.ArrayDataset`),
so history, metric names and per-epoch logs are the same.

Frozen means inference mode: a frozen feature extractor is called with ``training=False``, as in
Keras's transfer-learning guide, so its Dropout, noise and random augmentation are off. Keras 3
does not do this by itself: a frozen Dropout still drops under ``fit``, and a ``training=False``
written into a functional graph is overridden by the outer call's ``training=True``. A phase
with such a component fits `inference_view`, the stacked model with those components wrapped to
be called in inference mode (same layers, same variables, never saved).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from tfstack import _keras_compat
from tfstack.data import ArrayDataset
from tfstack.errors import TrainingError
from tfstack.freezing import FreezeReport, ParamCounts, apply_freeze_policy, get_component
from tfstack.schedules import Phase, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """What one phase did."""

    name: str
    index: int
    initial_epoch: int
    epochs: int
    lr: float
    freeze: str
    counts: ParamCounts
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    cache_note: str = ""
    inference_mode: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "name": self.name,
            "index": self.index,
            "initial_epoch": self.initial_epoch,
            "epochs": self.epochs,
            "lr": self.lr,
            "freeze": self.freeze,
            "counts": self.counts.to_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "cached": self.cached,
            "cache_note": self.cache_note,
            "inference_mode": self.inference_mode,
        }


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


def _plan_cache(
    model: keras.Model, feature_extractors: Sequence[str], train_data, val_data
) -> tuple[FrozenSplit | None, str]:
    """The split to train on cached outputs in this phase, or None and why not."""
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None and not isinstance(data, ArrayDataset):
            return None, (
                f"{name} is a {type(data).__name__}, whose batch order cannot be replayed on "
                "cached outputs; pass a tfstack.data.ArrayDataset"
            )
    return split_frozen(model, feature_extractors)


def _batches(data):
    return data.batches() if isinstance(data, ArrayDataset) else data


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise a TrainingError naming the phase, epoch and batch when the loss is NaN or infinite.

    The loss is checked after every batch, on Keras's callback thread (``async_safe``): reading it
    does not hold up the next step, and the error surfaces in ``fit`` one batch later at most,
    and always before the epoch's ``on_epoch_end`` callbacks (so no checkpoint records a diverged
    epoch). Measured: no cost over an epoch-end check, within the run-to-run noise of about 10%
    (benchmarks/reliability.py, section (a)).
    """

    async_safe = True

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._check((logs or {}).get("loss"), f"epoch {self.epoch + 1}, batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._check((logs or {}).get("loss"), f"epoch {epoch + 1}")

    def _check(self, loss, where: str) -> None:
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(
                f"The loss became {float(loss)} in phase {self.phase!r} at {where}. "
                "Lower train.lr, check the data for extreme values, or check train.loss fits "
                "the head's output."
            )


def compile_phase(
    model: keras.Model,
    phase: Phase,
    *,
    loss,
    metrics: Sequence,
    feature_extractors: list[str],
) -> FreezeReport:
    """Apply a phase's freeze policy, then compile with a fresh optimizer.

    Args:
        model: the stacked model.
        phase: the phase to prepare.
        loss: a Keras loss (name or object).
        metrics: Keras metrics (names or objects).
        feature_extractors: names of the feature-extractor components.

    Returns:
        The freeze report with the checked parameter counts.
    """
    report = apply_freeze_policy(model, phase.freeze, feature_extractors=feature_extractors)
    optimizer = make_optimizer(
        phase.optimizer, phase.lr, model=model, lr_multipliers=phase.lr_multipliers
    )
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return report


def fit_phase(
    model: keras.Model,
    phase: Phase,
    train_data,
    val_data=None,
    *,
    loss,
    metrics: Sequence = (),
    feature_extractors: list[str],
    index: int = 0,
    initial_epoch: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
    cache_frozen: bool = False,
) -> PhaseResult:
    """Freeze, recompile and fit one phase.

    Frozen feature extractors are called with ``training=False`` (their Dropout, noise and
    random augmentation off; ``inference_mode`` in the result names those it changed): the
    phase fits `inference_view`, whose layers are the model's.

    With ``cache_frozen``, a phase whose feature extractors are all frozen computes the frozen
    part's outputs once per split and fits the trainable part on them (see the module
    docstring); the result's ``cached`` and ``cache_note`` say whether and why. In a cached or
    inference-mode phase the callbacks are attached to that model, which shares the stacked
    model's variables and optimizer. Activity regularizers in a feature extractor, a training
    extractor, and random layers between it and the trainable layers prevent caching; a custom
    layer that changes its output with ``training`` in some other way is not detected, so turn
    caching off for it.

    Args:
        model: the stacked model.
        phase: the phase.
        train_data: an `ArrayDataset` or a batched ``tf.data.Dataset`` of ``(x, y)`` (caching
            needs an `ArrayDataset`, whose order it can replay).
        val_data: an optional validation `ArrayDataset` or batched dataset.
        loss: a Keras loss.
        metrics: Keras metrics.
        feature_extractors: names of the feature-extractor components.
        index: the phase's position in the schedule.
        initial_epoch: the global epoch this phase starts at.
        callbacks: Keras callbacks for this phase.
        verbose: Keras ``fit`` verbosity.
        cache_frozen: train on cached outputs of the frozen part when the phase allows it.

    Returns:
        The phase result, with Keras's history for the phase.

    Raises:
        TrainingError: the loss became non-finite.
    """
    report = compile_phase(
        model, phase, loss=loss, metrics=metrics, feature_extractors=feature_extractors
    )
    logger.info(
        "Phase %d %r: %d epochs from epoch %d, lr=%g, freeze=%s, trainable=%d",
        index,
        phase.name,
        phase.epochs,
        initial_epoch,
        phase.lr,
        phase.freeze.describe(),
        report.counts.trainable,
    )
    start = time.perf_counter()
    split, note = None, "cache_frozen is off"
    if cache_frozen:
        split, note = _plan_cache(model, feature_extractors, train_data, val_data)
    fit_model, fit_train, fit_val = model, _batches(train_data), _batches(val_data)
    if split is not None:
        fit_model = _compiled_like(model, split.trainable, loss=loss, metrics=metrics)
        fit_train = train_data.with_inputs(_frozen_outputs(split.frozen, train_data))
        if val_data is not None:
            fit_val = val_data.with_inputs(_frozen_outputs(split.frozen, val_data))
        logger.info(
            "Phase %d %r: %s once; training %r on them", index, phase.name, note, fit_model.name
        )
    elif cache_frozen:
        logger.info("Phase %d %r: not caching frozen outputs: %s", index, phase.name, note)
    # Cached phases run the frozen part in inference mode already (predict).
    inference = frozen_in_training_mode(model, feature_extractors)
    if inference and split is None:
        view = inference_view(model, inference)
        fit_model = _compiled_like(model, view, loss=loss, metrics=metrics)
        logger.info(
            "Phase %d %r: calling frozen %s with training=False", index, phase.name, inference
        )
    history = fit_model.fit(
        fit_train,
        validation_data=fit_val,
        epochs=initial_epoch + phase.epochs,
        initial_epoch=initial_epoch,
        callbacks=[StopOnNonFiniteLoss(phase.name), *callbacks],
        verbose=verbose,
        # A tf.data pipeline shuffles itself (seeded); Keras's own shuffle applies to arrays only.
        shuffle=not isinstance(fit_train, tf.data.Dataset),
    )
    seconds = time.perf_counter() - start
    return PhaseResult(
        name=phase.name,
        index=index,
        initial_epoch=initial_epoch,
        epochs=phase.epochs,
        lr=phase.lr,
        freeze=phase.freeze.describe(),
        counts=report.counts,
        history={k: [float(v) for v in values] for k, values in history.history.items()},
        seconds=seconds,
        cached=split is not None,
        cache_note=note,
        inference_mode=inference,
    )


def _compiled_like(model: keras.Model, other: keras.Model, *, loss, metrics) -> keras.Model:
    """``other`` (made of ``model``'s layers) compiled with ``model``'s fresh optimizer.

    The optimizer is built on the stacked model's variables, in its order, so the optimizer
    state saved with the stacked model reloads onto the right variables.
    """
    model.optimizer.build(model.trainable_variables)
    other.compile(optimizer=model.optimizer, loss=loss, metrics=list(metrics))
    return other


def _frozen_outputs(frozen: keras.Model, data: ArrayDataset):
    """The frozen part's outputs for every sample of ``data``, in input order."""
    # Inference mode, the training batch size: the frozen part is deterministic and its
    # BatchNormalization runs in inference mode under fit too, so the outputs are what the
    # uncached phase computes batch by batch. Batches of unknown size: one trace serves the
    # last, smaller batch and the other split.
    inputs = tf.data.Dataset.from_tensor_slices(data.x).batch(data.batch_size)
    return frozen.predict(inputs, verbose=0)


def run_schedule(
    model: keras.Model,
    phases: Sequence[Phase],
    train_data,
    val_data=None,
    *,
    loss,
    metrics: Sequence = (),
    feature_extractors: list[str],
    callbacks: Sequence[keras.callbacks.Callback] = (),
    callbacks_for_phase: Callable[[Phase, int], list] | None = None,
    initial_epoch: int = 0,
    verbose: int | str = "auto",
    cache_frozen: bool = False,
) -> list[PhaseResult]:
    """Run every phase in order, continuing the global epoch count.

    Args:
        model: the stacked model.
        phases: the schedule.
        train_data: an `ArrayDataset` or a batched ``tf.data.Dataset`` of ``(x, y)``. One
            dataset serves every phase, so its shuffle continues from phase to phase.
        val_data: an optional validation `ArrayDataset` or batched dataset.
        loss: a Keras loss.
        metrics: Keras metrics.
        feature_extractors: names of the feature-extractor components.
        callbacks: callbacks used in every phase.
        callbacks_for_phase: called with ``(phase, index)``; returns extra callbacks for that
            phase (e.g. a tracking hook that records the phase name).
        initial_epoch: the global epoch the first phase starts at.
        verbose: Keras ``fit`` verbosity.
        cache_frozen: in phases that allow it, train on cached outputs of the frozen part
            (see `fit_phase`).

    Returns:
        One PhaseResult per phase.
    """
    results = []
    epoch = initial_epoch
    for index, phase in enumerate(phases):
        extra = callbacks_for_phase(phase, index) if callbacks_for_phase else []
        result = fit_phase(
            model,
            phase,
            train_data,
            val_data,
            loss=loss,
            metrics=metrics,
            feature_extractors=feature_extractors,
            index=index,
            initial_epoch=epoch,
            callbacks=[*callbacks, *extra],
            verbose=verbose,
            cache_frozen=cache_frozen,
        )
        results.append(result)
        epoch += phase.epochs
    return results
