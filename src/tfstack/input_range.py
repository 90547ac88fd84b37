"""Input range checks: does the data's value range fit what the model's first layers expect?

A model trained on images in [0, 1] still trains on uint8 images in 0..255, only worse, and
without a word. `check_input_range` compares the training inputs with the model before training
and returns warnings that name the fix; it never changes the data.

How it decides. It walks the model's layers from the input (into nested models, in the graph's
topological order) up to the first layer that computes with weights (a Conv2D, a Dense, ...),
and follows the data's range through the affine preprocessing layers it passes on the way
(`keras.layers.Rescaling`, `keras.layers.Normalization`, also the ones Keras Applications add
with ``include_preprocessing=True``). The range that reaches that first layer should be of
order one. Three findings:

- ``unscaled_images``: images whose values reach past 10 (0..255 pixels, say) and no rescaling
  layer before the first layer;
- ``large_values``: values beyond +-10 reach the first layer (raw features, or a rescaling too
  weak for the data);
- ``scaled_twice``: the model's own rescaling shrinks data that was already scaled (images in
  [0, 1] into a model that divides by 255) to a span under 0.05.

No finding, by design, where the range says nothing: a model whose first layers normalize each
input by its own statistics (BatchNormalization, LayerNormalization, ...), take category ids
(Embedding, lookups, hashing), or hide their layers (a SavedModel's `TFSMLayer`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Values beyond this reach the first weighted layer: far from the [0, 1] / [-1, 1] that
# initialisations and pretrained weights assume. 10 keeps standardized data (|z| up to a few)
# and the output of any Keras Applications preprocessing (about +-2.6) clear of it.
LARGE = 10.0
# A span under this after the model's own rescaling means the data was scaled once too often
# ([0, 1] / 255 spans 0.004); 0.05 is far below the span of any sensible preprocessed input.
TINY_SPAN = 0.05
# Elements per chunk when scanning the inputs: a float copy of one chunk is at most 32 MB.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ValueRange:
    """The range of an input array.

    Attributes:
        dtype: The array's dtype, as text (``"uint8"``).
        minimum: Smallest value.
        maximum: Largest value.
        integral: Whether every value is a whole number (always true for integer dtypes).
    """

    dtype: str
    minimum: float
    maximum: float
    integral: bool


@dataclass(frozen=True)
class InputRangeWarning:
    """One way the data's range does not fit the model.

    Attributes:
        kind: ``"unscaled_images"``, ``"large_values"`` or ``"scaled_twice"``.
        message: The whole warning: what was found, where, and the fix.
        summary: A few words for a run tag (``input_range_warning``).
    """

    kind: str
    message: str
    summary: str


@dataclass(frozen=True)
class _FirstLayers:
    """What the model does to its input before the first layer with weights."""

    rescaling: list[str]  # names of the affine preprocessing layers passed, in order
    minimum: float  # the data's range after them
    maximum: float
    span: float  # the widest per-element (per-channel) span after them
    first: str | None  # the first layer with weights, None when nothing is to be checked
    reason: str = ""  # why nothing is checked, when first is None


def value_range(x: np.ndarray, *, chunk_elements: int = CHUNK_ELEMENTS) -> ValueRange:
    """Minimum, maximum and integrality of an array, scanned in chunks of samples.

    Integer arrays are reduced in their own dtype (no float copy); a float array's integrality
    test copies one chunk at a time.

    Args:
        x: Inputs, shape ``(n, ...)`` with ``n > 0``, of a numeric or bool dtype.
        chunk_elements: About how many elements to reduce at once.

    Returns:
        The `ValueRange` of ``x``.

    Raises:
        ValueError: ``x`` is empty.
    """
    if x.size == 0:
        raise ValueError("value_range needs at least one value; received an empty array.")
    rows = max(1, chunk_elements // max(1, int(np.prod(x.shape[1:]))))
    minimum, maximum = np.inf, -np.inf
    integral = True  # whole numbers by dtype, or tested chunk by chunk for floats
    for start in range(0, len(x), rows):
        chunk = x[start : start + rows]
        minimum = min(minimum, float(chunk.min()))
        maximum = max(maximum, float(chunk.max()))
        if integral and x.dtype.kind == "f":
            integral = bool(np.all(np.mod(chunk, 1) == 0))
    return ValueRange(str(x.dtype), minimum, maximum, integral)


def check_input_range(
    x: np.ndarray, model: Any, *, key: str = "x_train"
) -> list[InputRangeWarning]:
    """Warnings when the inputs' range does not fit what the model's first layers expect.

    Args:
        x: The training inputs, shape ``(n, *input_shape)``.
        model: The Keras model that will be trained on ``x`` (one input).
        key: What the inputs are called in messages (e.g. ``data.path=d.npz x_train``).

    Returns:
        At most one `InputRangeWarning` (see the module docstring); empty when the range fits,
        when the model has several inputs, or when its first layers say nothing about a range.
    """
    if len(getattr(model, "inputs", None) or []) != 1 or x.size == 0 or x.dtype.kind not in "biuf":
        return []
    found = value_range(x)
    first = _first_layers(model, found.minimum, found.maximum)
    logger.info(
        "Input range of %s: %s from %g to %g; %s",
        key,
        found.dtype,
        found.minimum,
        found.maximum,
        first.reason
        or (
            f"after {', '.join(first.rescaling) or 'no rescaling layer'}, "
            f"{first.first!r} receives {first.minimum:.4g} to {first.maximum:.4g}"
        ),
    )
    if first.first is None:
        return []
    warning = _judge(found, first, key, is_image=x.ndim >= 3)
    return [warning] if warning else []


def _judge(
    found: ValueRange, first: _FirstLayers, key: str, *, is_image: bool
) -> InputRangeWarning | None:
    """The finding, if any, for a range that reaches the first weighted layer."""
    whole = "whole-number " if found.integral and found.dtype.startswith("float") else ""
    values = f"{whole}{found.dtype} values from {found.minimum:g} to {found.maximum:g}"
    reach = max(abs(first.minimum), abs(first.maximum))
    if not first.rescaling and is_image and found.minimum >= 0 and LARGE < found.maximum <= 255:
        full_scale = 255 if found.maximum > 127 else round(found.maximum)
        return InputRangeWarning(
            "unscaled_images",
            f"{key} holds images with {values}, and the model has no rescaling layer before its "
            f"first layer {first.first!r}, so it trains on pixel values about {full_scale} times "
            "larger than the usual [0, 1]. Add keras.layers.Rescaling("
            f"1/{full_scale}) as the base's first layer, use a base with its own preprocessing "
            "(a Keras Applications model with include_preprocessing=True), or convert the data: "
            f"x.astype('float32') / {full_scale}.",
            f"{found.dtype} images {found.minimum:g}..{found.maximum:g}, no rescaling layer",
        )
    if reach > LARGE:
        after = (
            f"after the model's {', '.join(repr(n) for n in first.rescaling)} still "
            f"{first.minimum:.4g} to {first.maximum:.4g}"
            if first.rescaling
            else "with no rescaling or normalization layer in the model"
        )
        return InputRangeWarning(
            "large_values",
            f"{key} holds {values}, which reach the model's first layer {first.first!r} {after}; "
            "models expect values of about [0, 1] or [-1, 1]. Standardize the data "
            "((x - x_train.mean()) / x_train.std(), in float32) or add a "
            "keras.layers.Normalization adapted to x_train (or a Rescaling) as the base's first "
            "layer.",
            f"values {found.minimum:g}..{found.maximum:g} reach {first.first}",
        )
    data_span = found.maximum - found.minimum
    span = first.span  # per channel: ImageNet normalization shifts each channel differently
    if first.rescaling and 0 < span < TINY_SPAN and span < data_span / 10:
        return InputRangeWarning(
            "scaled_twice",
            f"{key} holds {values}; after the model's "
            f"{', '.join(repr(n) for n in first.rescaling)} they span only {span:.2g} at its "
            f"first layer {first.first!r}: the data is scaled once too often. If it is already "
            "scaled (e.g. images divided by 255), give the model the unscaled data its "
            "preprocessing expects (drop the / 255 from the data preparation), or use a base "
            "without its own preprocessing (include_preprocessing=False).",
            f"scaled twice: {', '.join(first.rescaling)} on {found.minimum:g}..{found.maximum:g}",
        )
    return None


def _first_layers(model: Any, minimum: float, maximum: float) -> _FirstLayers:
    """Follow the range ``[minimum, maximum]`` from the input to the first layer with weights."""
    import keras

    normalizing = tuple(
        getattr(keras.layers, name)
        for name in (
            "BatchNormalization",
            "LayerNormalization",
            "GroupNormalization",
            "UnitNormalization",
            "RMSNormalization",
        )
        if hasattr(keras.layers, name)
    )
    categorical = (
        keras.layers.Embedding,
        keras.layers.StringLookup,
        keras.layers.IntegerLookup,
        keras.layers.CategoryEncoding,
        keras.layers.Hashing,
        keras.layers.HashedCrossing,
        keras.layers.Discretization,
    )
    # Per-element bounds, broadcast to per-channel arrays by per-channel layers.
    low, high = np.asarray(minimum, dtype=np.float64), np.asarray(maximum, dtype=np.float64)
    rescaling: list[str] = []

    def stop(first=None, reason=""):
        bounds = float(np.min(low)), float(np.max(high)), float(np.max(high - low))
        return _FirstLayers(rescaling, *bounds, first, reason)

    for layer in layers_from_input(model):
        if isinstance(layer, keras.layers.TFSMLayer):
            return stop(reason=f"{layer.name!r} is a SavedModel whose layers are hidden")
        if isinstance(layer, categorical):
            return stop(reason=f"{layer.name!r} takes category ids, not magnitudes")
        if isinstance(layer, normalizing):
            return stop(reason=f"{layer.name!r} normalizes its input by its own statistics")
        if isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization):
            bounds = _affine_bounds(layer, low, high)
            if bounds is None:
                return stop(reason=f"the range after {layer.name!r} is unknown (not built)")
            low, high = bounds
            rescaling.append(layer.name)
        elif layer.weights:
            return stop(layer.name)
    return stop(reason="the model has no layer with weights")


def layers_from_input(model: Any) -> Iterator[Any]:
    """The model's layers in topological order, nested models expanded, input layers skipped."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from layers_from_input(layer)
        else:
            yield layer


def _affine_bounds(layer: Any, low: np.ndarray, high: np.ndarray):
    """The bounds after a Rescaling or Normalization layer, or None if it is not built.

    Both layers are affine per element (``x * scale + offset``), so the images of the two
    bounds bound the output; a negative scale swaps them, hence the elementwise min and max.
    """
    import keras

    if isinstance(layer, keras.layers.Rescaling):
        scale = np.asarray(layer.scale, dtype=np.float64)
        offset = np.asarray(layer.offset, dtype=np.float64)
    else:
        if getattr(layer, "mean", None) is None:
            return None
        mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), dtype=np.float64)
        variance = np.asarray(keras.ops.convert_to_numpy(layer.variance), dtype=np.float64)
        std = np.maximum(np.sqrt(variance), keras.config.epsilon())
        # Normalization computes (x - mean) / std, or mean + x * std with invert=True.
        scale, offset = (std, mean) if layer.invert else (1 / std, -mean / std)
    try:
        a, b = low * scale + offset, high * scale + offset
    except ValueError:  # per-channel arrays that do not broadcast: bound over all channels
        a = np.min(low) * scale.reshape(-1) + offset.reshape(-1)
        b = np.max(high) * scale.reshape(-1) + offset.reshape(-1)
        return np.minimum(a, b).min(), np.maximum(a, b).max()
    return np.minimum(a, b), np.maximum(a, b)


__all__ = [
    "InputRangeWarning",
    "ValueRange",
    "check_input_range",
    "layers_from_input",
    "value_range",
]
