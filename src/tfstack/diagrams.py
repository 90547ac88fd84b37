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
    for extension in formats:
        path = stem.with_name(f"{stem.name}.{extension}")
        try:
            with atomic_path(path) as tmp:
                dot.write(str(tmp), format=extension)
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


def _tools_present() -> bool:
    missing = missing_tools()
    if missing:
        logger.warning("No architecture diagram: %s. The text summaries stay.", missing)
    return missing is None


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
