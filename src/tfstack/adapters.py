"""Compatibility verdicts, and adapters: the layers placed between two components that do not fit.

`check_compatibility` compares an upstream output spec with a downstream input spec and, when
they do not fit, names the adapter `plan_adapter` would build.

An adapter is a list of Keras layer configs, `{"class_name": ..., "config": {..., "name": ...}}`,
so the same value can come from `plan_adapter` (automatic, `stacking=adapter`) or from the user
(`stacking.adapter=[...]` in YAML), be logged as JSON, and be built by `build_adapter_layers`.
No Lambda layers: everything built here saves and reloads.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import keras

from tfstack.errors import ShapeError
from tfstack.shapes import TensorSpec

logger = logging.getLogger(__name__)

__all__ = [
    "Cast",
    "Verdict",
    "build_adapter_layers",
    "check_compatibility",
    "describe_adapter",
    "plan_adapter",
]

_EXPLICIT_HINT = (
    "Give an explicit adapter instead: stacking.adapter=[{class_name: ..., config: {...}}, ...]"
)
_CONFIG_KEYS = {"class_name", "config", "reason", "module", "registered_name"}


@keras.saving.register_keras_serializable(package="tfstack")
class Cast(keras.layers.Layer):
    """Cast its input to `target_dtype` (no autocasting, no weights).

    Args:
        target_dtype: Name of the dtype to cast to, e.g. "float16" or "int32".
        **kwargs: Base layer arguments (`name`, ...).
    """

    def __init__(self, target_dtype: str, **kwargs: Any) -> None:
        # Autocasting would convert float inputs to the compute dtype before the cast.
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.target_dtype = keras.backend.standardize_dtype(target_dtype)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return keras.ops.cast(inputs, self.target_dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def compute_output_spec(self, inputs: Any) -> keras.KerasTensor:
        # Needed: with compute_output_shape overridden, Keras would give the compute dtype.
        return keras.KerasTensor(inputs.shape, dtype=self.target_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["target_dtype"] = self.target_dtype
        return config


def _snake_case(class_name: str) -> str:
    # Same rule as Keras's auto names: GlobalAveragePooling2D -> global_average_pooling2d.
    intermediate = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", intermediate).lower()


def _layer_name(name_prefix: str, index: int, class_name: str) -> str:
    return f"{name_prefix}_{index}_{_snake_case(class_name.split('>')[-1])}"


# --- planning ----------------------------------------------------------------------------------


def _impossible(upstream_spec: TensorSpec, downstream_spec: TensorSpec, why: str) -> ShapeError:
    return ShapeError(
        f"No standard adapter turns {upstream_spec} into {downstream_spec}: {why}. {_EXPLICIT_HINT}"
    )


def _to_features(
    upstream_spec: TensorSpec, downstream_spec: TensorSpec
) -> list[tuple[str, dict[str, Any], str]]:
    """Layers (class, config, reason) turning the upstream shape into the downstream shape."""
    given, expected = upstream_spec.shape[1:], downstream_spec.shape[1:]
    rank_given, rank_expected = upstream_spec.rank, downstream_spec.rank
    steps: list[tuple[str, dict[str, Any], str]] = []

    def last_dimension(size: int | None, units: int | None) -> None:
        # An unknown size on either side counts as compatible, as in check_compatibility.
        if units is None or size is None or size == units:
            return
        steps.append(
            ("Dense", {"units": units}, f"last dimension {size} != {units}: Dense({units})")
        )

    if rank_given == 4 and rank_expected == 2:
        # (batch, h, w, c) -> (batch, units)
        units = expected[0]
        flat_size = math.prod(given) if None not in given else None
        sizes = "*".join(str(dim) for dim in given)
        if units is not None and flat_size == units:
            steps.append(
                ("Flatten", {}, f"rank 4 -> 2: Flatten (flattened size {sizes} = {units})")
            )
            return steps
        why = "unknown" if flat_size is None else f"{flat_size} != {units}"
        steps.append(
            (
                "GlobalAveragePooling2D",
                {},
                f"rank 4 -> 2: GlobalAveragePooling2D (flattened size {why})",
            )
        )
        last_dimension(given[2], units)
    elif rank_given == 3 and rank_expected == 2:
        # (batch, steps, c) -> (batch, units)
        steps.append(("GlobalAveragePooling1D", {}, "rank 3 -> 2: GlobalAveragePooling1D"))
        last_dimension(given[1], expected[0])
    elif rank_given == 2 and rank_expected == 4:
        # (batch, n) -> (batch, h, w, c)
        if None in expected:
            raise _impossible(
                upstream_spec, downstream_spec, "Reshape needs a fully known target shape"
            )
        target_size = math.prod(expected)
        target = list(expected)
        sizes = "*".join(str(dim) for dim in expected)
        if given[0] != target_size:
            if given[0] is None:
                raise _impossible(
                    upstream_spec, downstream_spec, "Dense before Reshape needs a known input size"
                )
            steps.append(
                (
                    "Dense",
                    {"units": target_size},
                    f"rank 2 -> 4: Dense({target_size}) before Reshape "
                    f"(size {given[0]} != {sizes} = {target_size})",
                )
            )
        steps.append(
            ("Reshape", {"target_shape": target}, f"rank 2 -> 4: Reshape to {tuple(target)}")
        )
    elif rank_given == rank_expected == 4:
        # (batch, h, w, c) -> (batch, h', w', c)
        spatial_given, spatial_expected = given[:2], expected[:2]
        mismatch = any(
            have is not None and want is not None and have != want
            for have, want in zip(spatial_given, spatial_expected, strict=True)
        )
        if mismatch:
            height, width = (
                want if want is not None else have
                for have, want in zip(spatial_given, spatial_expected, strict=True)
            )
            if height is None or width is None:
                raise _impossible(
                    upstream_spec, downstream_spec, "Resizing needs a known height and width"
                )
            steps.append(
                (
                    "Resizing",
                    {"height": height, "width": width},
                    f"spatial size {tuple(spatial_given)} != {tuple(spatial_expected)}: "
                    f"Resizing({height}, {width})",
                )
            )
        last_dimension(given[2], expected[2])
    elif rank_given == rank_expected and rank_given in (2, 3):
        middle = [
            axis + 1
            for axis, (have, want) in enumerate(zip(given[:-1], expected[:-1], strict=True))
            if have is not None and want is not None and have != want
        ]
        if middle:
            raise _impossible(
                upstream_spec, downstream_spec, f"dimension(s) {middle} differ, not only the last"
            )
        last_dimension(given[-1], expected[-1])
    else:
        raise _impossible(
            upstream_spec,
            downstream_spec,
            f"rank {rank_given} -> {rank_expected} has no standard adapter "
            "(supported: 4 -> 2, 3 -> 2, 2 -> 4, and same rank 2, 3 or 4)",
        )
    return steps


def plan_adapter(
    upstream_spec: TensorSpec, downstream_spec: TensorSpec, *, name_prefix: str = "adapter"
) -> list[dict[str, Any]]:
    """Smallest standard adapter from an upstream output to a downstream input.

    Rules: rank 4 -> 2 by Flatten when h*w*c equals the downstream size, else
    GlobalAveragePooling2D (then Dense if the channels differ); rank 3 -> 2 by
    GlobalAveragePooling1D (then Dense); rank 2 -> 4 by Reshape, with Dense first when the sizes
    differ; same rank 4 with another height/width by Resizing; another last dimension by Dense;
    another dtype by Cast (last).

    Args:
        upstream_spec: Output spec of the upstream component.
        downstream_spec: Input spec of the downstream component.
        name_prefix: Layer names are f"{name_prefix}_{i}_{class}" with i from 1.

    Returns:
        Layer configs `{"class_name", "config", "reason"}`; [] when already compatible.

    Raises:
        ShapeError: no standard adapter fits (other ranks, unknown sizes where needed).
    """
    steps = _to_features(upstream_spec, downstream_spec)
    configs = [
        {"class_name": class_name, "config": dict(config), "reason": reason}
        for class_name, config, reason in steps
    ]
    dtype = _dtype_after([entry["class_name"] for entry in configs], upstream_spec.dtype)
    if dtype != downstream_spec.dtype:
        configs.append(
            {
                "class_name": "Cast",
                "config": {"target_dtype": downstream_spec.dtype},
                "reason": f"dtype {dtype} != {downstream_spec.dtype}: "
                f"Cast({downstream_spec.dtype})",
            }
        )
    for index, entry in enumerate(configs, start=1):
        entry["config"]["name"] = _layer_name(name_prefix, index, entry["class_name"])
    if configs:
        logger.debug(
            "Adapter %s -> %s: %s", upstream_spec, downstream_spec, describe_adapter(configs)
        )
    return configs


def _dtype_after(class_names: list[str], upstream_dtype: str) -> str:
    """Output dtype of the shape layers, by Keras's autocasting rule (checked in the tests).

    Not traced by calling the layers: that would allocate their weights just to plan
    (Dense(150528) before a Reshape to (224, 224, 3) is 600 MB).
    """
    if not class_names:
        return upstream_dtype
    # Flatten and Reshape keep a non-float dtype; every layer casts float inputs to its compute
    # dtype, and pooling, Resizing and Dense compute in it.
    if not keras.backend.is_float_dtype(upstream_dtype) and set(class_names) <= {
        "Flatten",
        "Reshape",
    }:
        return upstream_dtype
    return keras.backend.standardize_dtype(keras.config.dtype_policy().compute_dtype)


# --- building from configs ---------------------------------------------------------------------


def _known_layer_classes() -> list[str]:
    return [
        name
        for name in dir(keras.layers)
        if isinstance(getattr(keras.layers, name), type)
        and issubclass(getattr(keras.layers, name), keras.layers.Layer)
    ]


def _resolve(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """Full serialized form Keras 3.15 can deserialize (it no longer guesses `module`)."""
    class_name = entry["class_name"]
    serialized = {"class_name": class_name, "config": entry["config"]}
    if class_name in ("Cast", "tfstack>Cast"):
        serialized.update(class_name="Cast", module=None, registered_name="tfstack>Cast")
    elif ">" in class_name or entry.get("registered_name"):
        # A user's own layer registered with @keras.saving.register_keras_serializable.
        serialized.update(
            class_name=class_name.split(">")[-1],
            module=entry.get("module"),
            registered_name=entry.get("registered_name") or class_name,
        )
    else:
        layer_class = getattr(keras.layers, class_name, None)
        if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
            close = difflib.get_close_matches(class_name, _known_layer_classes(), n=3)
            suggestion = f" Did you mean {', '.join(close)}?" if close else ""
            raise ShapeError(
                f"{where}: unknown layer class_name={class_name!r}; expected a keras.layers "
                f"class such as Dense, Flatten or GlobalAveragePooling2D.{suggestion}"
            )
        serialized.update(module=entry.get("module") or "keras.layers", registered_name=None)
    return serialized


def _short_error(error: Exception) -> str:
    # Keras appends the full object config to some messages; the user already sees theirs.
    return str(error).split(" Full object config:")[0].strip()


def build_adapter_layers(
    configs: list[dict[str, Any]],
    *,
    name_prefix: str = "adapter",
    key: str = "stacking.adapter",
) -> list[keras.layers.Layer]:
    """Build adapter layers from configs (from `plan_adapter` or the user's YAML).

    Args:
        configs: `[{"class_name": "Dense", "config": {"units": 12}}, ...]`; a `reason` key is
            ignored; `config` may be omitted for layers without arguments.
        name_prefix: Unnamed layers are named f"{name_prefix}_{i}_{class}", i from 1.
        key: Config key named in error messages.

    Returns:
        New, unbuilt layers in order.

    Raises:
        ShapeError: `configs` is not a list, or an entry has an unknown class, a bad config, is a
            Lambda layer or repeats a name; the message names `{key}[i]` and what was received.
    """
    if not isinstance(configs, list | tuple):
        raise ShapeError(
            f"{key} must be a list of layer configs such as "
            f'[{{"class_name": "Dense", "config": {{"units": 12}}}}]. Received: {configs!r}'
        )
    layers: list[keras.layers.Layer] = []
    for position, entry in enumerate(configs):
        where = f"{key}[{position}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str):
            raise ShapeError(
                f"{where} must be a mapping with a class_name, such as "
                f'{{"class_name": "Dense", "config": {{"units": 12}}}}. Received: {entry!r}'
            )
        unexpected = sorted(set(entry) - _CONFIG_KEYS)
        if unexpected:
            raise ShapeError(
                f"{where} has unexpected key(s) {unexpected}: layer arguments go under 'config', "
                f"as in {{class_name: {entry['class_name']}, config: {{...}}}}. Received: {entry!r}"
            )
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            raise ShapeError(
                f"{where}.config must be a mapping of {entry['class_name']} arguments. "
                f"Received: {config!r}"
            )
        class_name = entry["class_name"]
        if class_name.split(">")[-1] == "Lambda":
            raise ShapeError(
                f"{where}: Lambda layers are not allowed in adapters (they do not reload safely). "
                "Use a standard keras.layers class or a registered custom layer. "
                f"Received: {entry!r}"
            )
        config = copy.deepcopy(config)
        if not config.get("name"):
            config["name"] = _layer_name(name_prefix, position + 1, class_name)
        serialized = _resolve({**entry, "config": config}, where)
        try:
            layer = keras.saving.deserialize_keras_object(serialized)
        except Exception as error:  # Keras raises TypeError/ValueError/others from __init__.
            raise ShapeError(
                f"{where}: cannot build {class_name} from config {entry.get('config')!r}: "
                f"{_short_error(error)}"
            ) from error
        if not isinstance(layer, keras.layers.Layer):
            raise ShapeError(
                f"{where}: class_name={class_name!r} is not a Keras layer "
                f"(got {type(layer).__name__})."
            )
        layers.append(layer)
    names = [layer.name for layer in layers]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ShapeError(f"{key}: layer names must be unique; repeated: {repeated}.")
    return layers


# --- description -------------------------------------------------------------------------------


def _describe_one(entry: dict[str, Any]) -> str:
    class_name = str(entry.get("class_name", "?")).split(">")[-1]
    config = entry.get("config") or {}
    if class_name == "Dense" and "units" in config:
        return f"Dense({config['units']})"
    if class_name == "Reshape" and "target_shape" in config:
        return f"Reshape({tuple(config['target_shape'])})"
    if class_name == "Resizing" and "height" in config and "width" in config:
        return f"Resizing({config['height']}, {config['width']})"
    if class_name == "Cast" and "target_dtype" in config:
        return f"Cast({config['target_dtype']})"
    return class_name


def describe_adapter(configs: list[dict[str, Any]]) -> str:
    """One-line summary such as "GlobalAveragePooling2D -> Dense(12)" ("no adapter" if empty)."""
    if not configs:
        return "no adapter"
    return " -> ".join(_describe_one(entry) for entry in configs)


# --- compatibility -----------------------------------------------------------------------------


@dataclass
class Verdict:
    """Whether an upstream component's output fits a downstream component's input."""

    compatible: bool
    upstream: str
    downstream: str
    upstream_spec: TensorSpec
    downstream_spec: TensorSpec
    problems: list[str] = field(default_factory=list)
    fix: str = ""

    def __str__(self) -> str:
        shapes = (
            f"{self.downstream} expects {self.downstream_spec}; "
            f"{self.upstream} gives {self.upstream_spec}"
        )
        if self.compatible:
            return f"{shapes}: compatible."
        message = f"{shapes}: {'; '.join(self.problems)}."
        if self.fix:
            message += f" Fix: {self.fix}"
        return message


def _dimension_label(axis: int, rank: int) -> str:
    return "last dimension" if axis == rank - 1 else f"dimension {axis}"


def _problems(upstream_spec: TensorSpec, downstream_spec: TensorSpec) -> list[str]:
    problems = []
    if upstream_spec.rank != downstream_spec.rank:
        problems.append(f"rank {upstream_spec.rank} != {downstream_spec.rank}")
    else:
        # Axis 0 is the batch: it never has to match.
        for axis in range(1, upstream_spec.rank):
            given, expected = upstream_spec.shape[axis], downstream_spec.shape[axis]
            if given is not None and expected is not None and given != expected:
                label = _dimension_label(axis, upstream_spec.rank)
                problems.append(f"{label} {given} != {expected}")
    if upstream_spec.dtype != downstream_spec.dtype:
        problems.append(f"dtype {upstream_spec.dtype} != {downstream_spec.dtype}")
    return problems


def check_compatibility(
    upstream_name: str,
    upstream_spec: TensorSpec,
    downstream_name: str,
    downstream_spec: TensorSpec,
) -> Verdict:
    """Compare rank, every static non-batch dimension and dtype of two specs.

    An unknown dimension (None) on either side is compatible with any size.

    Args:
        upstream_name: Component whose output is fed on, e.g. "base".
        upstream_spec: That output's spec.
        downstream_name: Component receiving it, e.g. "head".
        downstream_spec: That input's spec.

    Returns:
        A Verdict; when incompatible, `fix` names the adapter `plan_adapter` would build and the
        settings `stacking=adapter` / `stacking.adapter=[...]`.
    """
    problems = _problems(upstream_spec, downstream_spec)
    fix = ""
    if problems:
        try:
            plan = plan_adapter(upstream_spec, downstream_spec)
        except ShapeError as error:
            # The error already says why and how to give stacking.adapter=[...] explicitly.
            fix = str(error)
        else:
            fix = (
                f"use stacking=adapter (adapter: auto adds {describe_adapter(plan)}), "
                "or set stacking.adapter=[...]"
            )
    return Verdict(
        compatible=not problems,
        upstream=upstream_name,
        downstream=downstream_name,
        upstream_spec=upstream_spec,
        downstream_spec=downstream_spec,
        problems=problems,
        fix=fix,
    )
