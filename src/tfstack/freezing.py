"""Freeze policies: which layers of a stacked model train, checked against Keras's own counts.

A stacked model is made of named components: one or more feature extractors and a head, plus the
layers tfstack adds between them (adapters, merge, intermediate layers). Those added layers and the
head always train. A policy decides what happens inside the feature extractors:

- ``frozen``: nothing in them trains. A non-trainable BatchNormalization layer runs in
  inference mode in Keras 3 (its ``call`` updates statistics only ``if training and
  self.trainable``). That is what calling the base with ``training=False`` buys in the Keras
  transfer-learning guide, and it holds in every strategy, including ``keras.Sequential`` where
  no call argument can be passed.
- ``joint``: everything trains (``bn`` defaults to ``train``).
- ``partial``: the last N layers with weights of a component, and/or the layers whose path matches a
  regex, train; BatchNormalization layers stay frozen unless ``bn="train"``.

After setting the flags, the parameter counts the policy implies are computed from the decision
itself and compared with ``model.trainable_weights``; a disagreement is an error, as is a policy
that matches no layer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import keras

from tfstack.components import is_opaque
from tfstack.errors import FreezeError, TfstackError
from tfstack.vocabulary import BN_MODES, FREEZE_OPTIONS, FREEZE_POLICIES, unused_option

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezePolicy:
    """What trains inside the feature extractors.

    Args:
        kind: ``frozen``, ``joint`` or ``partial``.
        unfreeze_last: with ``partial``, unfreeze the last N layers that own weights in each
            targeted component.
        unfreeze_pattern: with ``partial``, unfreeze the layers whose path (``base/conv2``) matches
            this regex (``re.search``). May be combined with ``unfreeze_last`` (union).
        bn: ``freeze`` keeps BatchNormalization layers of the feature extractors frozen (inference
            mode); ``train`` lets them train. ``None`` means ``train`` for ``joint`` and ``freeze``
            otherwise.
        components: the feature extractors ``partial`` applies to; ``None`` means all of them.
        unfreeze_last_setting: the config setting ``unfreeze_last`` came from, for messages
            (e.g. ``schedule.unfreeze_last=2``); ``None`` means ``freeze.unfreeze_last``.

    Each selector (``unfreeze_last``, ``unfreeze_pattern``, ``components``) must select something
    on its own: a pattern that matches nothing is an error even when ``unfreeze_last`` selects
    layers, so a typo in it is never trained past.

    Example:
        >>> from tfstack import FreezePolicy
        >>> policy = FreezePolicy("partial", unfreeze_last=2)
        >>> policy.kind, policy.unfreeze_last
        ('partial', 2)
    """

    kind: str = "frozen"
    unfreeze_last: int | None = None
    unfreeze_pattern: str | None = None
    bn: str | None = None
    components: tuple[str, ...] | None = None
    unfreeze_last_setting: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FREEZE_POLICIES:
            raise FreezeError(
                f"freeze={self.kind!r} is not a freeze policy. "
                f"Expected one of {list(FREEZE_POLICIES)}."
            )
        if self.bn is not None and self.bn not in BN_MODES:
            raise FreezeError(
                f"freeze.bn={self.bn!r} is not valid. Expected one of {list(BN_MODES)}."
            )
        options = {
            "unfreeze_last": self.unfreeze_last,
            "unfreeze_pattern": self.unfreeze_pattern,
            "bn": self.bn,
            "components": self.components,
        }
        unused = unused_option("freeze", self.kind, options, FREEZE_OPTIONS)
        if unused:
            raise FreezeError(unused)
        if self.kind != "partial":
            return
        if self.unfreeze_last is None and self.unfreeze_pattern is None:
            raise FreezeError(
                "freeze=partial needs freeze.unfreeze_last=N or freeze.unfreeze_pattern=REGEX; "
                "received neither."
            )
        if self.unfreeze_pattern is not None and not self.unfreeze_pattern:
            raise FreezeError(
                "freeze.unfreeze_pattern='' is empty; it would match every layer. Give a regex, "
                "or use freeze=joint to train everything."
            )
        if self.components is not None and not self.components:
            raise FreezeError(
                "freeze.components=[] names no feature extractor. List the ones to unfreeze, or "
                "set freeze.components=null for all of them."
            )
        if self.unfreeze_last is not None and self.unfreeze_last < 1:
            raise FreezeError(
                f"{self.last_setting} must be at least 1. Use freeze=frozen to train the head only."
            )
        if self.unfreeze_pattern:
            try:
                re.compile(self.unfreeze_pattern)
            except re.error as err:
                raise FreezeError(
                    f"freeze.unfreeze_pattern={self.unfreeze_pattern!r} is not a valid regex: "
                    f"{err}. Example: freeze.unfreeze_pattern='conv2|dense'."
                ) from err

    @property
    def last_setting(self) -> str:
        """The config setting that asked for ``unfreeze_last``, as the user wrote it."""
        return self.unfreeze_last_setting or f"freeze.unfreeze_last={self.unfreeze_last}"

    @property
    def bn_mode(self) -> str:
        """The effective BatchNormalization mode (``freeze`` or ``train``)."""
        if self.bn is not None:
            return self.bn
        return "train" if self.kind == "joint" else "freeze"

    def describe(self) -> str:
        """One-line description, e.g. ``partial(last=2, bn=freeze)``."""
        if self.kind != "partial":
            return f"{self.kind}(bn={self.bn_mode})" if self.kind == "joint" else self.kind
        parts = []
        if self.unfreeze_last is not None:
            parts.append(f"last={self.unfreeze_last}")
        if self.unfreeze_pattern:
            parts.append(f"pattern={self.unfreeze_pattern!r}")
        parts.append(f"bn={self.bn_mode}")
        return f"partial({', '.join(parts)})"


@dataclass(frozen=True)
class ParamCounts:
    """Trainable and non-trainable parameter counts of a model."""

    trainable: int
    non_trainable: int

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable

    def to_dict(self) -> dict[str, int]:
        return {
            "trainable": self.trainable,
            "non_trainable": self.non_trainable,
            "total": self.total,
        }


@dataclass
class FreezeReport:
    """What a policy did: the checked counts and the paths of the layers left trainable."""

    policy: FreezePolicy
    counts: ParamCounts
    trainable_layers: list[str] = field(default_factory=list)


def is_container(layer: keras.layers.Layer) -> bool:
    """True for layers that hold other layers (nested models)."""
    return isinstance(layer, keras.Model)


def get_component(
    model: keras.Model, name: str, *, error: type[TfstackError], setting: str
) -> keras.layers.Layer:
    """The direct sub-layer ``name`` of a stacked model, or ``error`` listing the components.

    Args:
        model: the stacked model.
        name: the component name.
        error: the TfstackError subclass to raise.
        setting: what named the component, for the message (e.g. ``schedule.lr_multipliers``).
    """
    try:
        return model.get_layer(name)
    except ValueError as err:
        names = [layer.name for layer in model.layers]
        raise error(
            f"{setting} names {name!r}, which is not a layer of model {model.name!r}. "
            f"Its layers are {names}."
        ) from err


def leaf_layers(
    layer: keras.layers.Layer, prefix: str = ""
) -> list[tuple[str, keras.layers.Layer]]:
    """All non-container layers under ``layer``, in order, with their ``a/b/c`` paths.

    Args:
        layer: a layer or (nested) model.
        prefix: the path of ``layer`` itself.

    Returns:
        ``(path, layer)`` pairs; InputLayers are left out.
    """
    if not is_container(layer) or isinstance(layer, keras.layers.TFSMLayer):
        return [(prefix or layer.name, layer)]
    out = []
    for inner in layer.layers:
        if isinstance(inner, keras.layers.InputLayer):
            continue
        path = f"{prefix}/{inner.name}" if prefix else inner.name
        out.extend(leaf_layers(inner, path))
    return out


def _trainable_kind_variables(layer: keras.layers.Layer) -> list:
    """Variables a layer would train when trainable (BN moving statistics excluded)."""
    return list(getattr(layer, "_trainable_variables", []))


def count_params(model: keras.Model) -> ParamCounts:
    """Keras's own trainable / non-trainable counts, each variable counted once."""
    trainable_ids = {id(v) for v in model.trainable_weights}
    trainable = non_trainable = 0
    seen = set()
    for v in model.weights:
        if id(v) in seen:
            continue
        seen.add(id(v))
        size = _size(v.shape)
        if id(v) in trainable_ids:
            trainable += size
        else:
            non_trainable += size
    return ParamCounts(trainable, non_trainable)


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _select_partial(component: keras.Model, policy: FreezePolicy) -> set[str]:
    """Paths of the layers ``partial`` unfreezes inside one component.

    Raises:
        FreezeError: ``unfreeze_last`` asks for more layers than the component has, or
            ``unfreeze_pattern`` selects no layer that can train (checked on its own, whatever
            ``unfreeze_last`` selects).
    """
    leaves = leaf_layers(component, component.name)
    # With bn=freeze a BatchNormalization layer cannot train, so it does not count as one of the
    # "last N layers"; otherwise gradual unfreezing would spend whole phases on no-op steps.
    weighted = [
        (p, layer)
        for p, layer in leaves
        if layer.weights
        and not (policy.bn_mode == "freeze" and isinstance(layer, keras.layers.BatchNormalization))
    ]
    selected: set[str] = set()
    if policy.unfreeze_last is not None:
        if policy.unfreeze_last > len(weighted):
            raise FreezeError(
                f"{policy.last_setting} but component {component.name!r} has only "
                f"{len(weighted)} layers with weights that can train (BatchNormalization counts "
                "only with freeze.bn=train). Use freeze=joint to train all of it, or a number "
                f"up to {len(weighted)}."
            )
        selected.update(p for p, _ in weighted[-policy.unfreeze_last :])
    if policy.unfreeze_pattern is not None:
        pattern = re.compile(policy.unfreeze_pattern)
        matched = {p for p, _ in weighted if pattern.search(p)}
        if not matched:
            _raise_pattern_matches_nothing(policy, component.name, leaves, weighted, pattern)
        selected.update(matched)
    return selected


def _raise_pattern_matches_nothing(policy, name, leaves, weighted, pattern: re.Pattern) -> None:
    """The error for ``freeze.unfreeze_pattern`` selecting no trainable layer of a component."""
    also = (
        f" (freeze.unfreeze_last={policy.unfreeze_last} alone would select layers, but each "
        "selector must match on its own, so a typo in the pattern is not trained past)"
        if policy.unfreeze_last is not None
        else ""
    )
    bn_matches = [
        p
        for p, layer in leaves
        if isinstance(layer, keras.layers.BatchNormalization) and pattern.search(p)
    ]
    if bn_matches:
        raise FreezeError(
            f"freeze.unfreeze_pattern={policy.unfreeze_pattern!r} selects only "
            f"BatchNormalization layers {bn_matches}, which stay frozen unless freeze.bn=train"
            f"{also}. Select more layers or set freeze.bn=train."
        )
    sample = [p for p, _ in weighted[-8:]]
    raise FreezeError(
        f"freeze.unfreeze_pattern={policy.unfreeze_pattern!r} matches no layer with weights in "
        f"component {name!r}{also}. Some of its layers: {sample}."
    )


def apply_freeze_policy(
    model: keras.Model,
    policy: FreezePolicy,
    *,
    feature_extractors: list[str],
) -> FreezeReport:
    """Set trainable flags on a stacked model by policy and check the resulting counts.

    Everything outside the named feature extractors (head, adapters, merge and intermediate
    layers) trains. SavedModel components stay frozen whatever the policy.

    Args:
        model: the stacked model; its feature extractors are direct sub-layers.
        policy: the freeze policy.
        feature_extractors: names of the feature-extractor components in ``model``.

    Returns:
        A FreezeReport with Keras's counts, verified against the counts the policy implies.

    Raises:
        FreezeError: an unknown component, a policy that matches no layer, a partial unfreeze of
            a SavedModel component, or counts that disagree with Keras.
    """
    components = {
        name: get_component(model, name, error=FreezeError, setting="feature_extractors")
        for name in feature_extractors
    }
    targets = set(policy.components) if policy.components is not None else set(components)
    unknown = targets - set(components)
    if unknown:
        raise FreezeError(
            f"freeze.components={sorted(unknown)} names no feature extractor. "
            f"Feature extractors: {sorted(components)}."
        )

    # Decide per leaf layer; everything outside the feature extractors trains.
    decision: dict[int, bool] = {}
    paths: dict[int, str] = {}
    for path, layer in leaf_layers(model):
        decision[id(layer)] = True
        paths[id(layer)] = path

    for name, component in components.items():
        leaves = leaf_layers(component, name)
        opaque = is_opaque(component)
        if policy.kind == "frozen" or opaque:
            if opaque and policy.kind == "partial" and name in targets:
                raise FreezeError(
                    f"Component {name!r} is a TensorFlow SavedModel, loaded as an opaque "
                    "TFSMLayer that is always frozen; freeze=partial cannot unfreeze part of it. "
                    f"Exclude it with freeze.components=[...] or use a .keras file for {name!r}."
                )
            if opaque and policy.kind == "joint":
                logger.warning(
                    "Component %r is a SavedModel (opaque TFSMLayer): it stays frozen under "
                    "freeze=joint.",
                    name,
                )
            for _, layer in leaves:
                decision[id(layer)] = False
            continue
        if policy.kind == "joint":
            selected = {p for p, _ in leaves}
        elif name in targets:
            selected = _select_partial(component, policy)
        else:
            selected = set()
        for path, layer in leaves:
            unfreeze = path in selected
            if isinstance(layer, keras.layers.BatchNormalization) and policy.bn_mode == "freeze":
                unfreeze = False
            decision[id(layer)] = unfreeze

    _set_flags(model, decision)
    expected = _expected_counts(model, decision)
    actual = count_params(model)
    if expected != actual:
        raise FreezeError(
            f"freeze={policy.describe()} implies {expected.trainable} trainable and "
            f"{expected.non_trainable} non-trainable parameters, but Keras reports "
            f"{actual.trainable} and {actual.non_trainable}. A component may share layers with "
            "another or set its own trainable flags; inspect it with `tfstack inspect`."
        )
    trainable_layers = [paths[i] for i, on in decision.items() if on and i in paths]
    logger.info(
        "Applied freeze=%s: %d trainable / %d non-trainable parameters",
        policy.describe(),
        actual.trainable,
        actual.non_trainable,
    )
    return FreezeReport(policy=policy, counts=actual, trainable_layers=trainable_layers)


def _set_flags(layer: keras.layers.Layer, decision: dict[int, bool]) -> bool:
    """Apply per-leaf decisions; containers train when any leaf inside them does.

    Keras propagates a container's flag to every child, so containers are set first and their
    children after. Returns whether anything under ``layer`` trains.
    """
    if not is_container(layer) or isinstance(layer, keras.layers.TFSMLayer):
        on = decision.get(id(layer), False)
        layer.trainable = on
        return on
    layer.trainable = True
    any_on = False
    for inner in layer.layers:
        if isinstance(inner, keras.layers.InputLayer):
            continue
        any_on = _set_flags(inner, decision) or any_on
    if not any_on:
        layer.trainable = False
    return any_on


def _expected_counts(model: keras.Model, decision: dict[int, bool]) -> ParamCounts:
    """Counts implied by the per-leaf decision, independent of Keras's trainable collection."""
    trainable = non_trainable = 0
    seen: set[int] = set()
    for _, layer in leaf_layers(model):
        trainable_kind = {id(v) for v in _trainable_kind_variables(layer)}
        for v in layer.weights:
            if id(v) in seen:
                continue
            seen.add(id(v))
            size = _size(v.shape)
            if decision.get(id(layer), False) and id(v) in trainable_kind:
                trainable += size
            else:
                non_trainable += size
    return ParamCounts(trainable, non_trainable)
