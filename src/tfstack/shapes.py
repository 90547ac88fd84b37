"""Tensor specs, per-layer tables and model summaries.

Everything here inspects models; nothing builds or changes one. Whether two specs fit, and the
adapter that makes them fit, is `tfstack.adapters` (`check_compatibility`, `plan_adapter`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras

from tfstack.errors import ShapeError

logger = logging.getLogger(__name__)

__all__ = [
    "TensorSpec",
    "input_specs",
    "layer_table",
    "output_specs",
    "summary_text",
]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one model input or output.

    Attributes:
        shape: Full shape including the batch dimension; `None` marks an unknown dimension.
        dtype: Canonical Keras dtype name, e.g. `"float32"`.
    """

    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        shape = tuple(None if dim is None else int(dim) for dim in self.shape)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", keras.backend.standardize_dtype(self.dtype))

    @classmethod
    def from_tensor(cls, tensor: Any) -> TensorSpec:
        """Spec of a KerasTensor (or any object with `shape` and `dtype`)."""
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def rank(self) -> int:
        """Number of dimensions, batch included."""
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: `{"shape": [None, 4], "dtype": "float32"}`."""
        return {"shape": list(self.shape), "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{_format_shape(self.shape)} {self.dtype}"


def _format_shape(shape: tuple[int | None, ...]) -> str:
    # Python's tuple repr, so "(None, 10)" and "(None,)" read like Keras's own messages.
    return str(tuple(shape))


def _specs(model: keras.Model, attribute: str) -> list[TensorSpec]:
    try:
        tensors = getattr(model, attribute)
    except (AttributeError, ValueError):
        tensors = None
    if not tensors:
        name = getattr(model, "name", type(model).__name__)
        raise ShapeError(
            f"Model '{name}' has no defined {attribute[:-1]}: it was never built or called on a "
            "tensor. Add keras.Input(shape=...) as its first layer (or build it as a functional "
            "model) before saving it."
        )
    return [TensorSpec.from_tensor(tensor) for tensor in keras.tree.flatten(tensors)]


def input_specs(model: keras.Model) -> list[TensorSpec]:
    """Specs of a model's inputs, in `model.inputs` order.

    Raises:
        ShapeError: the model has no defined input (e.g. a Sequential without keras.Input).
    """
    return _specs(model, "inputs")


def output_specs(model: keras.Model) -> list[TensorSpec]:
    """Specs of a model's outputs, in `model.outputs` order.

    Raises:
        ShapeError: the model has no defined output (e.g. a Sequential without keras.Input).
    """
    return _specs(model, "outputs")


# --- per-layer table ---------------------------------------------------------------------------


def _shape_of(value: Any) -> Any:
    """JSON-ready shape(s) of a tensor or a nested structure of tensors; None when unknown."""
    if value is None:
        return None
    if hasattr(value, "shape") and not isinstance(value, list | tuple | dict):
        return [None if dim is None else int(dim) for dim in value.shape]
    if isinstance(value, dict):
        return {str(key): _shape_of(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        if not value:
            return None
        if len(value) == 1:
            return _shape_of(value[0])
        return [_shape_of(item) for item in value]
    return None


def _call_site_shapes(layer: keras.layers.Layer) -> tuple[Any, Any, str | None]:
    """Input shape, output shape and output dtype of a layer's call site(s).

    Keras 3 `layer.input`/`layer.output` silently return the first call site when a layer is
    called several times (Keras 2 raised), so the nodes are read directly: one call site, or
    several that agree, give shapes; disagreeing call sites or none give None.
    """
    if isinstance(layer, keras.layers.InputLayer):
        shape = _shape_of(layer.output)
        return shape, shape, layer.output.dtype
    nodes = getattr(layer, "_inbound_nodes", None)
    if nodes is None:  # Not a Keras 3 operation: fall back on the public attributes.
        try:
            return _shape_of(layer.input), _shape_of(layer.output), None
        except (AttributeError, ValueError):
            return None, None, None
    input_shapes = {repr(_shape_of(node.input_tensors)) for node in nodes}
    output_shapes = {repr(_shape_of(node.output_tensors)) for node in nodes}
    input_shape = _shape_of(nodes[0].input_tensors) if len(input_shapes) == 1 else None
    output_shape = _shape_of(nodes[0].output_tensors) if len(output_shapes) == 1 else None
    output_dtypes = {tensor.dtype for node in nodes for tensor in node.output_tensors}
    dtype = output_dtypes.pop() if len(output_dtypes) == 1 else None
    return input_shape, output_shape, dtype


def _count_params(layer: keras.layers.Layer) -> int:
    if not layer.built:
        return 0
    try:
        return int(layer.count_params())
    except ValueError:  # Built flag set but weights not created (some custom layers).
        return 0


def _effectively_trainable(layer: keras.layers.Layer, parent_trainable: bool) -> bool:
    # A frozen parent freezes its children whatever their own flag says; a container whose
    # flag says trainable but whose weights are all frozen (seen after reload) is not trainable.
    if not (parent_trainable and layer.trainable):
        return False
    if layer.weights and not layer.trainable_weights:
        return False
    return True


def _rows(
    layers: list[keras.layers.Layer], prefix: str, depth: int, parent_trainable: bool
) -> Iterator[dict[str, Any]]:
    for layer in layers:
        name = f"{prefix}{layer.name}"
        input_shape, output_shape, dtype = _call_site_shapes(layer)
        trainable = _effectively_trainable(layer, parent_trainable)
        yield {
            "name": name,
            "class": type(layer).__name__,
            "input_shape": input_shape,
            "output_shape": output_shape,
            "dtype": dtype or layer.compute_dtype,
            "params": _count_params(layer),
            "trainable": trainable,
            "depth": depth,
        }
        if isinstance(layer, keras.Model):
            yield from _rows(layer.layers, f"{name}/", depth + 1, parent_trainable and trainable)


def layer_table(model: keras.Model) -> list[dict[str, Any]]:
    """One JSON-ready row per layer, nested models expanded after their own row.

    Row keys: `name` (path, "base/dense" inside nested model "base"), `class`, `input_shape`,
    `output_shape` (lists, None when the layer has no call site or call sites that disagree),
    `dtype` (output dtype, else the layer's compute dtype), `params` (the layer's own
    `count_params()`, nested weights included, 0 when unbuilt), `trainable` (effective: False
    when the layer or any enclosing model is frozen), `depth` (0 for the model's own layers).

    Args:
        model: Any Keras model; Sequential and functional models are expanded recursively.

    Returns:
        Rows in the order of `model.layers`, each nested model followed by its children.
    """
    return list(_rows(model.layers, "", 0, model.trainable))


# --- model summary -----------------------------------------------------------------------------


def _longest_label(model: keras.Model, depth: int = 0) -> int:
    longest = 0
    for layer in model.layers:
        # Keras prints "   " * depth + "└ " + "name (Class)".
        label = 3 * depth + 2 + len(layer.name) + len(type(layer).__name__) + 3
        longest = max(longest, label)
        if isinstance(layer, keras.Model):
            longest = max(longest, _longest_label(layer, depth + 1))
    return longest


def summary_text(model: keras.Model, *, line_length: int | None = None) -> str:
    """Text of `model.summary(expand_nested=True, show_trainable=True)`, captured.

    Keras 3.15 renders the summary with rich and calls `print_fn` once with the whole text;
    rich crops it to the console width (80 when not a terminal) whatever `line_length` says,
    so the width is raised through `COLUMNS` for the duration of the call.

    Args:
        model: The model to summarize.
        line_length: Table width; by default wide enough that no layer name is cut.

    Returns:
        The summary text, nested models expanded, with a Trainable column.
    """
    if line_length is None:
        # The name column takes 0.3 * 0.9 of the width in Keras's widest (functional) layout.
        line_length = max(160, int(_longest_label(model) / 0.27) + 8)
    captured: list[str] = []

    def collect(text: Any, *args: Any, **kwargs: Any) -> None:
        # Some Keras 3 versions call print_fn(line, line_break=...) per line, 3.15 once.
        captured.append(str(text))

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(line_length + 4)
    try:
        model.summary(
            line_length=line_length,
            expand_nested=True,
            show_trainable=True,
            print_fn=collect,
        )
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(text.rstrip("\n") for text in captured) + "\n"
