"""Stacking strategies: one builder per strategy, chosen by name from ``STRATEGIES``.

- ``sequential``: ``keras.Sequential`` of the components. Refuses a shape mismatch with a verdict
  that names both components and the setting that fixes it.
- ``adapter``: the components in sequence, with an adapter between each pair that does not fit
  (``adapter="auto"`` plans the smallest standard fix; an explicit list of layer configs is used
  before the head).
- ``functional``: one shared ``keras.Input``; each feature extractor is called as a nested layer
  on it (never rebuilt from ``base.output``, which copies its layers and defeats freezing,
  keras#18092); several feature extractors are merged (concatenate or average); optional
  intermediate layers from config sit between the features and the head.

Every component keeps its own name in the stacked model, so freeze policies, tables and
per-component learning rates refer to it.

Every strategy puts the same front in front of its first component (`_model_input`): the
``front`` blocks, in order, usually ``preprocess`` (`tfstack.preprocessing`) then ``augment``
(`tfstack.augmentation`). The stacked model's input is then the front's input (raw pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras

from tfstack.adapters import (
    build_adapter_layers,
    check_compatibility,
    describe_adapter,
    plan_adapter,
)
from tfstack.errors import ShapeError
from tfstack.shapes import TensorSpec, input_specs, output_specs
from tfstack.vocabulary import MERGES, STRATEGY_OPTIONS, is_set, unused_option

logger = logging.getLogger(__name__)


@dataclass
class StackResult:
    """A stacked model and how it was put together.

    Attributes:
        model: the stacked Keras model.
        strategy: the strategy name.
        feature_extractors: names of the feature-extractor components, in order.
        head: name of the head component.
        adapters: per junction, the adapter layer configs used (with the reason for each).
    """

    model: keras.Model
    strategy: str
    feature_extractors: list[str]
    head: str
    adapters: list[dict] = field(default_factory=list)

    def describe_adapters(self) -> str:
        """One line per junction that has an adapter."""
        return "; ".join(
            f"{a['upstream']} -> {a['downstream']}: {describe_adapter(a['layers'])}"
            for a in self.adapters
            if a["layers"]
        )


def _single_spec(specs: list[TensorSpec], component: str, side: str) -> TensorSpec:
    if len(specs) != 1:
        raise ShapeError(
            f"Component {component!r} has {len(specs)} {side}s; tfstack stacks components "
            f"with exactly one {side}. Use cut_at to pick one output, or wrap the model."
        )
    return specs[0]


def _input_layer(spec: TensorSpec) -> keras.KerasTensor:
    # (batch, *dims) -> keras.Input takes the dims without the batch axis.
    return keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name="input")


def _model_input(
    first: keras.Model, front: Sequence[keras.Model]
) -> tuple[keras.KerasTensor, list[keras.Model]]:
    """The stacked model's input and the front blocks every strategy puts before ``first``.

    Without a front the input is ``first``'s; with one, it is the front's, and the front's
    output must fit ``first``.

    Raises:
        ShapeError: the front's output does not fit ``first``'s input.
    """
    first_spec = _single_spec(input_specs(first), first.name, "input")
    if not front:
        return _input_layer(first_spec), []
    spec = _single_spec(input_specs(front[0]), front[0].name, "input")
    got = _single_spec(output_specs(front[-1]), front[-1].name, "output")
    verdict = check_compatibility(front[-1].name, got, first.name, first_spec)
    if not verdict.compatible:
        raise ShapeError(str(verdict))
    return _input_layer(spec), list(front)


def _check_unique_names(components: Sequence[keras.Model]) -> None:
    names = [c.name for c in components]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ShapeError(
            f"Components share the name(s) {duplicates}; every component needs a unique name "
            "(set components.<key>.name). Saved models are often all called 'sequential'."
        )


def _output_spec_after(layers: list[keras.layers.Layer], spec: TensorSpec) -> TensorSpec:
    """The spec a tensor of ``spec`` has after passing through ``layers``."""
    x = keras.KerasTensor(spec.shape, dtype=spec.dtype)
    for layer in layers:
        x = layer.compute_output_spec(x) if layer.built else layer(x)
    return TensorSpec(tuple(x.shape), str(x.dtype))


def _adapter_block(
    upstream: str,
    up_spec: TensorSpec,
    downstream: str,
    down_spec: TensorSpec,
    adapter: str | list[dict] | None,
    index: int,
) -> tuple[keras.Model | None, dict]:
    """A named nested model holding the adapter layers for one junction (or None)."""
    prefix = f"adapter_{index}"
    if adapter == "auto":
        configs = plan_adapter(up_spec, down_spec, name_prefix=prefix)
    elif adapter:
        configs = list(adapter)
    else:
        configs = []
    record = {"upstream": upstream, "downstream": downstream, "layers": configs}
    if not configs:
        return None, record
    layers = build_adapter_layers(configs, name_prefix=prefix)
    inputs = _input_layer(up_spec)
    x = inputs
    for layer in layers:
        x = layer(x)
    block = keras.Model(inputs, x, name=prefix)
    got = _single_spec(output_specs(block), prefix, "output")
    verdict = check_compatibility(prefix, got, downstream, down_spec)
    if not verdict.compatible:
        raise ShapeError(
            f"stacking.adapter between {upstream!r} and {downstream!r} gives {got}, but "
            f"{downstream!r} expects {down_spec}: {'; '.join(verdict.problems)}. "
            "Fix the adapter list, or use stacking.adapter=auto."
        )
    logger.info("Adapter %s between %s and %s: %s", prefix, upstream, downstream, configs)
    return block, record


def build_sequential(
    feature_extractors: Sequence[keras.Model],
    head: keras.Model,
    *,
    name: str = "stacked",
    front: Sequence[keras.Model] = (),
) -> StackResult:
    """``keras.Sequential`` of the components; refuses any junction that does not fit.

    It inserts no adapters: ``build_stacked`` refuses ``adapter`` with this strategy. ``front``:
    blocks before the first component (see `build_stacked`).

    Raises:
        ShapeError: with the verdict naming both components, both shapes and the fix.
    """
    chain = [*feature_extractors, head]
    _check_unique_names([*front, *chain])
    for up, down in zip(chain, chain[1:], strict=False):
        verdict = check_compatibility(
            up.name,
            _single_spec(output_specs(up), up.name, "output"),
            down.name,
            _single_spec(input_specs(down), down.name, "input"),
        )
        if not verdict.compatible:
            raise ShapeError(str(verdict))
    inputs, blocks = _model_input(chain[0], front)
    model = keras.Sequential([inputs, *blocks, *chain], name=name)
    return StackResult(model, "sequential", [m.name for m in feature_extractors], head.name)


def build_adapter(
    feature_extractors: Sequence[keras.Model],
    head: keras.Model,
    *,
    name: str = "stacked",
    adapter: str | list[dict] | None = "auto",
    front: Sequence[keras.Model] = (),
) -> StackResult:
    """The components in sequence, with an adapter wherever a junction does not fit.

    Args:
        feature_extractors: the feature extractors, chained in order.
        head: the head.
        name: the stacked model's name.
        adapter: ``auto`` to plan each adapter, or an explicit list of Keras layer configs used
            at the junction into the head (other junctions use ``auto``).
        front: blocks before the first component (see `build_stacked`).
    """
    chain = [*feature_extractors, head]
    _check_unique_names([*front, *chain])
    layers: list[keras.layers.Layer] = [chain[0]]
    records = []
    for index, (up, down) in enumerate(zip(chain, chain[1:], strict=False), start=1):
        up_spec = _single_spec(output_specs(up), up.name, "output")
        down_spec = _single_spec(input_specs(down), down.name, "input")
        junction_adapter = adapter if (down is head or adapter == "auto") else "auto"
        block, record = _adapter_block(
            up.name, up_spec, down.name, down_spec, junction_adapter or "auto", index
        )
        records.append(record)
        if block is not None:
            layers.append(block)
        layers.append(down)
    inputs, blocks = _model_input(chain[0], front)
    model = keras.Sequential([inputs, *blocks, *layers], name=name)
    return StackResult(
        model, "adapter", [m.name for m in feature_extractors], head.name, adapters=records
    )


def build_functional(
    feature_extractors: Sequence[keras.Model],
    head: keras.Model,
    *,
    name: str = "stacked",
    adapter: str | list[dict] | None = None,
    intermediate: list[dict] | None = None,
    merge: str = "concatenate",
    front: Sequence[keras.Model] = (),
) -> StackResult:
    """One shared input, each feature extractor called on it, merged, then the head.

    Args:
        feature_extractors: one or more feature extractors, all taking the same input.
        head: the head.
        name: the stacked model's name.
        adapter: ``auto``, an explicit list of layer configs, or None (a mismatch is refused)
            for the junction between the (merged, intermediate) features and the head.
        intermediate: Keras layer configs placed between the features and the head.
        merge: ``concatenate`` or ``average`` when there are several feature extractors.
        front: blocks before the feature extractors (see `build_stacked`).
    """
    if merge not in MERGES:
        raise ShapeError(f"stacking.merge={merge!r} is not valid. Expected one of {list(MERGES)}.")
    _check_unique_names([*front, *feature_extractors, head])
    in_specs = [_single_spec(input_specs(m), m.name, "input") for m in feature_extractors]
    if any(spec.shape[1:] != in_specs[0].shape[1:] for spec in in_specs):
        pairs = zip(feature_extractors, in_specs, strict=True)
        listing = ", ".join(f"{m.name} {s}" for m, s in pairs)
        raise ShapeError(
            f"stacking=functional feeds one input to every feature extractor, but they expect "
            f"different inputs: {listing}. Give them the same input_shape."
        )
    inputs, blocks = _model_input(feature_extractors[0], front)
    shared = inputs
    for block in blocks:
        shared = block(shared)
    # Each extractor is called as a nested layer on the shared input, so its trainable flag and
    # its BatchNormalization mode keep working (keras#18092).
    features = [m(shared) for m in feature_extractors]
    if len(features) > 1:
        if merge == "average":
            shapes = {tuple(f.shape[1:]) for f in features}
            if len(shapes) > 1:
                raise ShapeError(
                    "stacking.merge=average needs equal feature shapes; "
                    f"received {sorted(shapes)}. Use stacking.merge=concatenate."
                )
            x = keras.layers.Average(name="merge")(features)
        else:
            x = keras.layers.Concatenate(axis=-1, name="merge")(features)  # (batch, sum of dims)
    else:
        x = features[0]
    upstream = "merge" if len(features) > 1 else feature_extractors[0].name
    if intermediate:
        for layer in build_adapter_layers(
            intermediate, name_prefix="intermediate", key="stacking.intermediate"
        ):
            x = layer(x)
        upstream = "intermediate"
    up_spec = TensorSpec(tuple(x.shape), str(x.dtype))
    down_spec = _single_spec(input_specs(head), head.name, "input")
    records = []
    verdict = check_compatibility(upstream, up_spec, head.name, down_spec)
    if not verdict.compatible:
        if not adapter:
            raise ShapeError(str(verdict))
        block, record = _adapter_block(upstream, up_spec, head.name, down_spec, adapter, 1)
        records.append(record)
        x = block(x)
    outputs = head(x)
    model = keras.Model(inputs, outputs, name=name)
    return StackResult(
        model, "functional", [m.name for m in feature_extractors], head.name, adapters=records
    )


# Keyed by vocabulary.STRATEGIES (tests/test_vocabulary.py checks they agree).
STRATEGIES = {
    "sequential": build_sequential,
    "adapter": build_adapter,
    "functional": build_functional,
}


def build_stacked(
    strategy: str,
    feature_extractors: Sequence[keras.Model] | keras.Model,
    head: keras.Model,
    *,
    name: str = "stacked",
    adapter: str | list[dict] | None = None,
    intermediate: list[dict] | None = None,
    merge: str | None = None,
    front: Sequence[keras.Model] | None = None,
) -> StackResult:
    """Build a stacked model by strategy name.

    An option left at None (or ``[]``) is the strategy's default; an option set for a strategy
    that does not use it (``vocabulary.STRATEGY_OPTIONS``) is refused, never dropped.

    Args:
        strategy: ``sequential``, ``adapter`` or ``functional``.
        feature_extractors: one model or a list of models (model_1, ...).
        head: the head (model_2).
        name: the stacked model's name.
        adapter: ``auto`` or a list of Keras layer configs (``adapter``, ``functional``).
        intermediate: Keras layer configs before the head (``functional``).
        merge: ``concatenate`` (its default) or ``average`` (``functional``).
        front: nested models applied, in order, to the input before the first component, in
            every strategy: the ``preprocess`` and ``augment`` blocks
            (`tfstack.preprocessing.build_preprocessing`,
            `tfstack.augmentation.build_augmentation`). The stacked model takes the first
            block's input; None blocks are left out.

    Returns:
        The StackResult.

    Raises:
        ShapeError: an unknown strategy, an option the strategy does not use, or components
            that do not fit.

    Example:
        >>> import keras
        >>> from tfstack import build_stacked
        >>> base = keras.Sequential(
        ...     [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv")], name="base"
        ... )
        >>> head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="head")
        >>> result = build_stacked("adapter", base, head, adapter="auto")
        >>> result.model.output_shape, [a["layers"][0]["class_name"] for a in result.adapters]
        ((None, 3), ['GlobalAveragePooling2D'])
    """
    if strategy not in STRATEGIES:
        raise ShapeError(
            f"stacking={strategy!r} is not a strategy. Expected one of {sorted(STRATEGIES)}."
        )
    options = {"adapter": adapter, "intermediate": intermediate, "merge": merge}
    unused = unused_option("stacking", strategy, options, STRATEGY_OPTIONS)
    if unused:
        raise ShapeError(unused)
    if isinstance(feature_extractors, keras.Model):
        feature_extractors = [feature_extractors]
    if not feature_extractors:
        raise ShapeError("Stacking needs at least one feature extractor before the head.")
    # Only the options that are set: an unset one takes the builder's own default.
    chosen = {key: value for key, value in options.items() if is_set(value)}
    blocks = [block for block in front or () if block is not None]
    result = STRATEGIES[strategy](list(feature_extractors), head, name=name, front=blocks, **chosen)
    logger.info(
        "Built %s model %r: %s -> %s",
        strategy,
        result.model.name,
        result.feature_extractors,
        result.head,
    )
    return result
