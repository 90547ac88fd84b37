"""Predictions of a trained model on new inputs: image files, folders, CSVs of paths, ``.npz``.

`find_inputs` turns the paths a user gives into input blocks, in the order given: image files
(a file, every image under a folder, or the rows of a CSV's path column) and arrays (an
``.npz``'s ``x``, or the ``x_test`` of a tfstack dataset file). `predict_blocks` runs the model
on them: images are decoded as the pipeline decodes them for training and evaluation
(`tfstack.images.decode_image`: float32 pixels 0..255, at the model's input size, in the color
mode of its input channels), arrays are taken as stored, as evaluation takes them. The stacked
model holds its own preprocessing in front, so nothing else is done to the inputs.

`output_columns` names what a row holds: ``label`` and ``p_<class>`` for a classifier with class
names, ``prediction`` (or ``prediction_<i>``) for a regression head.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfstack.errors import DataError
from tfstack.image_files import CHANNELS, IMAGE_FORMATS, ImageOptions, _check_signature

logger = logging.getLogger(__name__)

NPZ_KEYS = ("x", "x_test")
"""The array of an ``.npz`` that is predicted: ``x``, else a tfstack dataset's ``x_test``."""

PATH_COLUMN = "path"


@dataclass
class InputBlock:
    """Inputs that come from one PATH argument, predicted together.

    Attributes:
        names: What each row is called in the output: the image's path as given (joined to the
            folder or CSV it came from), or ``FILE.npz[i]``.
        files: The image files to decode (one per name), or empty for an array block.
        x: The stored inputs of an array block (``(n, *input_shape)``), else None.
        source: The PATH argument, for messages.
    """

    names: list[str]
    files: list[str] = field(default_factory=list)
    x: np.ndarray | None = None
    source: str = ""


def find_inputs(paths: Sequence[str], *, path_column: str = PATH_COLUMN) -> list[InputBlock]:
    """The input blocks of the PATH arguments, in the order given.

    Args:
        paths: Image files, folders of images (searched recursively: flat or class folders),
            CSV files with a path column (paths relative to the CSV's folder), ``.npz`` files.
        path_column: The CSV column holding the image paths.

    Returns:
        One `InputBlock` per argument.

    Raises:
        DataError: A path does not exist, is of no kind above, is not an image, or holds no
            input (an empty folder, a CSV without rows, an ``.npz`` without ``x``/``x_test``).
    """
    if not paths:
        raise DataError("no PATH given: name image files, folders, CSV files or .npz files.")
    return [_block(str(path), path_column) for path in paths]


def _block(path: str, path_column: str) -> InputBlock:
    if not os.path.exists(path):
        raise DataError(
            f"{path}: no such file or folder (working directory: {os.getcwd()}). Give image "
            "files, folders of images, CSV files of paths or .npz files."
        )
    if os.path.isdir(path):
        return _folder(path)
    lower = path.lower()
    if lower.endswith(IMAGE_FORMATS):
        _check_signature(path)
        return InputBlock([path], [path], source=path)
    if lower.endswith(".csv"):
        return _csv(path, path_column)
    if lower.endswith(".npz"):
        return _npz(path)
    raise DataError(
        f"{path} is not an image ({', '.join(IMAGE_FORMATS)}), a folder, a .csv or a .npz: "
        "tfstack predict cannot read it. Convert it, or leave it out."
    )


def _folder(path: str) -> InputBlock:
    names, files = [], []
    for directory, subfolders, entries in os.walk(path):
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
        for entry in sorted(entries):
            if entry.lower().endswith(IMAGE_FORMATS):
                file = os.path.join(directory, entry)
                _check_signature(file)
                names.append(file)
                files.append(file)
    if not files:
        raise DataError(
            f"{path}: the folder holds no image ({', '.join(IMAGE_FORMATS)}), also not in its "
            "subfolders. Point at the folder that holds the images."
        )
    return InputBlock(names, files, source=path)


def _csv(path: str, path_column: str) -> InputBlock:
    folder = Path(path).parent
    names, files = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if path_column not in columns:
            raise DataError(
                f"{path}: no column {path_column!r}; the CSV's columns are {columns}. Name the "
                f"image column {path_column!r}, or pass --path-column with one of them."
            )
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            value = (row.get(path_column) or "").strip()
            if not value:
                raise DataError(f"{path} line {line}: column {path_column!r} is empty.")
            file = folder / value
            if not file.is_file():
                raise DataError(
                    f"{path} line {line}: {value} does not exist (looked for {file}). Fix the "
                    "path (relative to the CSV's folder) or remove the row."
                )
            if not value.lower().endswith(IMAGE_FORMATS):
                raise DataError(
                    f"{path} line {line}: {value} is not a {'/'.join(IMAGE_FORMATS)} file. "
                    "Convert it, or remove the row."
                )
            _check_signature(str(file), where=f"{path} line {line}: ")
            names.append(os.path.join(os.path.dirname(path), value))
            files.append(str(file))
    if not files:
        raise DataError(f"{path}: the CSV lists no image; add one row per image.")
    return InputBlock(names, files, source=path)


def _npz(path: str) -> InputBlock:
    try:
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in NPZ_KEYS if k in archive.files), None)
            if key is None:
                raise DataError(
                    f"{path} holds {sorted(archive.files)[:10]}, but no {' or '.join(NPZ_KEYS)} "
                    "array: save the inputs to predict as x (np.savez(path, x=images))."
                )
            x = archive[key]
    except DataError:
        raise
    except Exception as err:  # zipfile, numpy raise many types for a damaged file
        raise DataError(
            f"{path} is not a readable .npz ({type(err).__name__}: {err}); write it again with "
            "np.savez(path, x=images)."
        ) from err
    if x.ndim < 1 or len(x) == 0:
        raise DataError(f"{path}: its {key} array holds no sample (shape {x.shape}).")
    return InputBlock([f"{path}[{i}]" for i in range(len(x))], x=x, source=path)


def model_input(model) -> tuple[tuple, str]:
    """The model's one input: its shape without the batch, and its dtype.

    Raises:
        DataError: The model takes several inputs.
    """
    if len(model.inputs) != 1:
        raise DataError(
            f"the model takes {len(model.inputs)} inputs; tfstack predict feeds one (images or "
            "an array)."
        )
    tensor = model.inputs[0]
    return tuple(tensor.shape[1:]), str(tensor.dtype)


def image_options_for(model, *, source: str) -> ImageOptions:
    """How images decode for the model: its input size, and the color mode of its channels.

    Raises:
        DataError: The model does not take images of a fixed size with 1, 3 or 4 channels.
    """
    shape, _ = model_input(model)
    modes = {channels: mode for mode, channels in CHANNELS.items()}
    if len(shape) != 3 or None in shape or shape[-1] not in modes:
        raise DataError(
            f"{source} is images, but the model takes inputs of shape {shape}, not images of a "
            "fixed (height, width, channels) with 1, 3 or 4 channels: give it an .npz of "
            "arrays of that shape."
        )
    return ImageOptions((int(shape[0]), int(shape[1])), color_mode=modes[shape[-1]])


def check_array(model, block: InputBlock) -> None:
    """An array block's samples must have the model's input shape.

    Raises:
        DataError: The shape differs, naming both (for images: the channels).
    """
    shape, _ = model_input(model)
    per_sample = tuple(block.x.shape[1:])
    fits = len(per_sample) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, per_sample, strict=True)
    )
    if not fits:
        what = ""
        if len(shape) == 3 and len(per_sample) == 3 and shape[:2] == per_sample[:2]:
            what = f" ({per_sample[-1]} channels; the model takes {shape[-1]})"
        raise DataError(
            f"{block.source}: its samples have shape {per_sample}, but the model takes {shape}"
            f"{what}. Give arrays of the model's input shape."
        )


def predict_blocks(model, blocks: Sequence[InputBlock], *, batch_size: int = 32) -> np.ndarray:
    """The model's outputs on every block's inputs, rows in block order.

    Args:
        model: A Keras model with one input and one output.
        blocks: From `find_inputs`.
        batch_size: Images decoded and predicted per batch.

    Returns:
        ``(n, outputs)`` float64 outputs, one row per name of the blocks.

    Raises:
        DataError: The inputs do not fit the model, or an image cannot be decoded.
    """
    from tfstack.images import ImageDataset, naming_unreadable_files

    if batch_size < 1:
        raise DataError(f"--batch-size={batch_size} must be a positive number of images.")
    outputs = []
    for block in blocks:
        if block.x is not None:
            check_array(model, block)
            result = model.predict(block.x, batch_size=batch_size, verbose=0)
        else:
            options = image_options_for(model, source=block.source)
            dataset = ImageDataset(
                block.files,
                np.zeros(len(block.files), dtype=np.int64),
                options,
                batch_size=batch_size,
                shuffle=False,
                seed=0,
            )
            with naming_unreadable_files(dataset):
                result = model.predict(dataset.input_batches(), verbose=0)
        if isinstance(result, (list, tuple, dict)):
            raise DataError("the model has several outputs; tfstack predict reads one.")
        result = np.asarray(result, dtype=np.float64)
        outputs.append(result.reshape(len(result), -1))  # (n,) or (n, k, ...) -> (n, k)
    return np.concatenate(outputs)


def is_classifier(model) -> bool:
    """Whether the model's last layer ends in softmax or sigmoid (class probabilities)."""
    layer = _last_layer(model)
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None) or str(getattr(layer, "name", ""))
    return name in ("softmax", "sigmoid")


def _last_layer(model):
    """The layer that makes the model's output, looking inside nested models."""
    import keras

    layer = model
    while isinstance(layer, keras.Model):
        history = getattr(layer.outputs[0], "_keras_history", None)
        inner = history.operation if history is not None else None
        if inner is None or inner is layer:
            inner = layer.layers[-1] if layer.layers else None
        if inner is None:
            return layer
        layer = inner
    return layer


def class_probabilities(
    outputs: np.ndarray, class_names: Sequence[str], *, model: str = "the model"
) -> np.ndarray:
    """``(n, classes)`` probabilities of a classifier's outputs, as the served classifier gives.

    A binary head's ``(n, 1)`` probability of class 1 becomes ``[1 - p, p]``. (The same rule as
    `tfstack.tracking.classifier.probability_table`, which MLflow runs standalone, so it cannot
    import this module; importing it costs an MLflow warning.)

    Raises:
        DataError: The outputs do not hold one probability per class name.
    """
    names = list(class_names)
    if len(names) == 2 and outputs.shape[1] == 1:
        outputs = np.concatenate([1.0 - outputs, outputs], axis=1)  # (n, 1) -> (n, 2)
    if outputs.shape[1] != len(names):
        raise DataError(
            f"{model} gives {outputs.shape[1]} outputs per input, but there are {len(names)} "
            f"class names ({names}): pass one name per output with --class-names."
        )
    return outputs


def regression_columns(outputs: np.ndarray) -> list[str]:
    """``prediction`` for one output, ``prediction_0``.. for several."""
    count = outputs.shape[1]
    return ["prediction"] if count == 1 else [f"prediction_{i}" for i in range(count)]


def parse_class_names(text: str | None) -> list[str] | None:
    """``--class-names a,b,c`` as a list (None when not given).

    Raises:
        DataError: Empty or repeated names.
    """
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise DataError(
            f"--class-names {text!r}: give each class's name once, comma-separated, in class-id "
            "order (e.g. --class-names cat,dog)."
        )
    return names


__all__ = [
    "NPZ_KEYS",
    "InputBlock",
    "class_probabilities",
    "find_inputs",
    "image_options_for",
    "is_classifier",
    "model_input",
    "parse_class_names",
    "predict_blocks",
    "regression_columns",
]
