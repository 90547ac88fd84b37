"""Architecture diagrams of a stacked model: `keras.utils.model_to_dot`, written as PNG and SVG.

A diagram shows every layer with its input and output shapes and dtypes and its trainable flag,
and draws each nested model (a component, an adapter, the preprocessing and augmentation blocks)
as a dashed box named after it, so a reader sees what was stacked and what a phase trains.

Drawing needs pydot (PyPI) and Graphviz's ``dot`` program (Debian's ``graphviz``). Without them
`draw` logs one line and returns no files: a diagram is a convenience, the text summaries stay.

`trainable_signature` tells whether two phases train the same layers, so the train stage draws
one diagram per phase whose trainable set differs from the phase before.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import keras

from tfstack.files import atomic_path

logger = logging.getLogger(__name__)

FORMATS = ("png", "svg")
# A readable PNG of a 150-layer MobileNetV2 stays under ~5 MB at this resolution.
PNG_DPI = 96


def missing_tools() -> str | None:
    """What is missing to draw diagrams (one line with the fix), or None when all is there."""
    from keras.src.utils import model_visualization

    if not model_visualization.check_pydot():
        return "pydot is not installed (pip install pydot)"
    try:
        works = model_visualization.check_graphviz()
    except Exception as err:  # pydot's AssertionError when dot dies (e.g. killed by a signal)
        return f"Graphviz's `dot` program failed ({str(err).strip()[:200]})"
    if not works:
        return (
            "Graphviz's `dot` program is not installed "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"
        )
    return None


def draw(
    model: keras.Model,
    stem: Path,
    *,
    title: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Write the model's diagram as ``stem.png`` and ``stem.svg`` (nested models expanded).

    Each file is written atomically. The layout is computed once and rendered in each format.

    Args:
        model: a built Keras model (the stacked model, or any component).
        stem: the path of the files without their suffix.
        title: a caption drawn above the diagram (e.g. the phase and its trainable count).
        formats: Graphviz output formats to write.

    Returns:
        The files written, or ``[]`` when pydot or Graphviz is missing (one warning says which).

    Example:
        >>> import keras, tempfile
        >>> from pathlib import Path
        >>> from tfstack.diagrams import draw, missing_tools
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> files = draw(model, Path(tempfile.mkdtemp()) / "tiny")
        >>> [f.suffix for f in files] == ([".png", ".svg"] if missing_tools() is None else [])
        True
    """
    if not _tools_present():
        return []
    dot = keras.utils.model_to_dot(
        model,
        show_shapes=True,
        show_dtype=True,
        show_layer_names=True,
        expand_nested=True,
        show_trainable=True,
        dpi=PNG_DPI,
    )
    if title:
        dot.set("label", title)
        dot.set("labelloc", "t")
        dot.set("fontsize", "20")
    stem = Path(stem)
    written = []
    source = canonical_source(dot)
    for extension in formats:
        path = stem.with_name(f"{stem.name}.{extension}")
        try:
            picture = _render(dot, source, extension)
            with atomic_path(path) as tmp:
                tmp.write_bytes(picture)
        except Exception as err:  # pydot raises what Graphviz's dot said (killed, out of memory)
            # A picture is not worth a run: say so once, keep the text summaries.
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            logger.warning(
                "No %s diagram %s: Graphviz's dot failed (%s). The text summaries stay.",
                extension,
                path.name,
                first,
            )
            continue
        written.append(path)
    return written


def draw_phases(
    model: keras.Model,
    phases: Sequence,
    directory: Path,
    *,
    feature_extractors: list[str],
) -> list[Path]:
    """One diagram per phase whose trainable layers differ from the phase before.

    Each phase's freeze policy is applied to ``model`` to read its trainable flags (the phase
    loop applies it again before the phase compiles), and the diagram is captioned with the
    phase and its trainable parameter count. Files are ``phase_<i>_<name>.svg``: SVG only,
    because Graphviz lays out a MobileNetV2 in 0.3 s but rasterizes its PNG in about 4 s (the
    MLflow UI shows SVG artifacts as pictures too).

    Args:
        model: the stacked model.
        phases: the schedule's `tfstack.schedules.Phase` objects.
        directory: where the files go.
        feature_extractors: names of the feature-extractor components.

    Returns:
        The files written (``[]`` without pydot or Graphviz).
    """
    from tfstack.freezing import apply_freeze_policy

    if not _tools_present():
        return []
    written: list[Path] = []
    previous = None
    for index, phase in enumerate(phases):
        report = apply_freeze_policy(model, phase.freeze, feature_extractors=feature_extractors)
        signature = trainable_signature(model)
        if signature == previous:
            continue
        previous = signature
        title = (
            f"phase {index} '{phase.name}': freeze={phase.freeze.kind}, "
            f"{report.counts.trainable:,} trainable of {report.counts.total:,} parameters"
        )
        stem = Path(directory) / f"phase_{index}_{phase.name}"
        written += draw(model, stem, title=title, formats=("svg",))
    return written


def trainable_signature(model: keras.Model) -> tuple[tuple[str, bool], ...]:
    """Every layer's name in the (nested) model with its trainable flag, in order.

    Two phases with the same signature train the same layers and share a diagram.
    """
    return tuple((layer.name, bool(layer.trainable)) for layer in _all_layers(model))


def canonical_source(dot) -> str:
    """The diagram's Graphviz source with its node ids numbered in order of appearance.

    `keras.utils.model_to_dot` names each node by its layer's ``id()``, a memory address that
    differs in every process and job; the drawing does not show it (an SVG keeps it as each
    node's ``<title>``). Numbered ``n0, n1, ...`` instead, the same architecture gives the same
    source, so the same file, in every run, and a sweep's jobs draw it once (`_render`).
    """
    source = dot.to_string()
    names = _node_names(dot)
    numbers: dict[str, str] = {}

    def number(match: re.Match) -> str:
        name = match.group(0)
        if name not in names:
            return name
        return numbers.setdefault(name, f"n{len(numbers)}")

    # Node ids are bare integers of a dozen digits; labels are quoted and hold none this long.
    return re.sub(r"(?<![\w.])\d{8,}(?![\w.])", number, source)


def _node_names(graph) -> set[str]:
    names = {node.get_name() for node in graph.get_nodes()}
    for subgraph in graph.get_subgraphs():
        names |= _node_names(subgraph)
    return {name for name in names if name.isdigit()}


# Pictures rendered in this process: (Graphviz source, format, the dot program) -> bytes. A
# sweep's jobs draw the same few architectures; the last few (a MobileNetV2 PNG is about 1 MB)
# are kept.
_RENDERED: OrderedDict[tuple[str, str, str | None], bytes] = OrderedDict()
_RENDERED_KEPT = 8


def _render(dot, source: str, extension: str) -> bytes:
    """Graphviz's ``dot -T<extension>`` of ``source``, the same as earlier in the process."""
    key = (source, extension, shutil.which("dot"))
    if key in _RENDERED:
        _RENDERED.move_to_end(key)
        return _RENDERED[key]
    dot.to_string = lambda: source  # what pydot's create writes for dot to read
    try:
        picture = dot.create(format=extension)
    finally:
        del dot.to_string
    _RENDERED[key] = picture
    while len(_RENDERED) > _RENDERED_KEPT:
        _RENDERED.popitem(last=False)
    return picture


# The `dot` program that passed the check in this process (a missing or failing one, or
# another one on the PATH, is checked again).
_CHECKED_DOT: list[str] = []


def _tools_present() -> bool:
    dot = shutil.which("dot")
    if dot is not None and dot in _CHECKED_DOT:  # the check runs dot: 0.05-0.1 s per diagram
        return True
    missing = missing_tools()
    if missing:
        logger.warning("No architecture diagram: %s. The text summaries stay.", missing)
    elif dot is not None:
        _CHECKED_DOT[:] = [dot]
    return missing is None


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
