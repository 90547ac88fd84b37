"""Image files on disk named as samples: class folders or a CSV, split into train/val/test.

Two ways to name the samples, both giving `FileSplits` (file paths and labels per split; no
pixels):

- `find_image_folder`: a folder of class subfolders, as ``keras.utils.image_dataset_from_directory``
  reads it. Either ``ROOT/train/<class>/`` with optional ``ROOT/val/<class>/`` and
  ``ROOT/test/<class>/``, or one ``ROOT/<class>/`` folder split into train, validation and test
  by fractions. Class names are the sorted subfolder names of the training folder; files are
  found recursively, sorted, and kept when their extension is an image format (case-insensitive);
  other files are ignored, as Keras does.
- `load_csv`: a CSV with a path column (relative to the CSV's folder) and a label column. Labels
  are class names (sorted, then indexed), integers (class ids) or, when any is a fraction,
  regression targets.

Splits taken by fraction are seeded, stratified per class when every class can give a sample to
each side, and stable: they depend on the sorted file list and the seed only. Files that are not
images at all (by their first bytes) are refused up front. `FileSplits.content_hash` hashes the
file list (relative path, size, sha256 of the bytes) for the run's data hash. Decoding them is
`tfstack.images`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tfstack.data import class_counts, split_off
from tfstack.errors import DataError
from tfstack.labels import first_values
from tfstack.vocabulary import COLOR_MODES, INTERPOLATIONS

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
"""File extensions read as images (compared in lower case), as in Keras."""

CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}
"""Channels of each ``color_mode``."""

# The first bytes of each format: a file that starts otherwise is not an image of that kind.
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
}
_SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageOptions:
    """How image files become input arrays.

    Attributes:
        image_size: ``(height, width)`` of every decoded image.
        color_mode: ``grayscale`` (1 channel), ``rgb`` (3) or ``rgba`` (4).
        interpolation: The resize method (`tf.image.resize`), e.g. ``bilinear``.
        crop_to_aspect_ratio: Center-crop to the aspect ratio of ``image_size`` before resizing,
            so images are not distorted (Keras's ``crop_to_aspect_ratio``).
    """

    image_size: tuple[int, int]
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False

    def __post_init__(self):
        size = tuple(self.image_size)
        if len(size) != 2 or any(not isinstance(d, int) or d < 1 for d in size):
            raise DataError(
                f"data.image_size={list(size)} is not an image size: give [height, width] as two "
                "positive integers, e.g. [224, 224]."
            )
        object.__setattr__(self, "image_size", size)
        if self.color_mode not in COLOR_MODES:
            raise DataError(
                f"data.color_mode={self.color_mode!r} is not valid. Expected one of "
                f"{list(COLOR_MODES)}."
            )
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(
                f"data.interpolation={self.interpolation!r} is not valid. Expected one of "
                f"{list(INTERPOLATIONS)}."
            )

    @property
    def channels(self) -> int:
        """Channels of the decoded images."""
        return CHANNELS[self.color_mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one decoded image."""
        return (*self.image_size, self.channels)


@dataclass
class FileSplits:
    """Train, validation and test files of one dataset, with their targets.

    Attributes:
        root: The folder (or the CSV's folder) that relative paths in messages and the content
            hash start from.
        train_files, val_files, test_files: Absolute file paths, one per sample.
        y_train, y_val, y_test: Targets: int64 class ids, or float32 regression targets.
        class_names: The name of each class id, or None (integer labels, regression).
        extra_files: Files that belong to the dataset without being samples (the CSV itself),
            hashed with them.
    """

    root: Path
    train_files: list[str]
    y_train: np.ndarray
    val_files: list[str]
    y_val: np.ndarray
    test_files: list[str]
    y_test: np.ndarray
    class_names: list[str] | None = None
    extra_files: list[str] = field(default_factory=list)

    def files(self, split: str) -> list[str]:
        """The files of ``split`` (``train``, ``val`` or ``test``)."""
        return getattr(self, f"{split}_files")

    def summary(self) -> dict[str, Any]:
        """Sizes and classes of the splits, JSON-ready, as `tfstack.data.Splits.summary`.

        The inputs are files, so ``input_shape`` is empty and ``x_dtype`` is ``file``; the
        decoded shape is the `ImageOptions`' to say.
        """
        splits = {name: getattr(self, f"y_{name}") for name in _SPLIT_FOLDERS}
        summary: dict[str, Any] = {
            "sizes": {name: int(len(y)) for name, y in splits.items()},
            "input_shape": [],
            "target_shape": [int(d) for d in self.y_train.shape[1:]],
            "x_dtype": "file",
            "y_dtype": str(self.y_train.dtype),
        }
        if self.y_train.dtype.kind in "iu":
            all_labels = np.concatenate(list(splits.values()))
            summary["classes"] = [int(c) for c in np.unique(all_labels)]
            summary["num_classes"] = len(summary["classes"])
            summary["class_counts"] = {name: class_counts(y) for name, y in splits.items()}
        if self.class_names is not None:
            summary["class_names"] = list(self.class_names)
        return summary

    def content_hash(self) -> str:
        """sha256 over every file's relative path, size and sha256 of its bytes, in sorted order.

        The same files with the same bytes give the same hash wherever the folder lies; a changed,
        added, removed or renamed file changes it.
        """
        every = sorted({*self.train_files, *self.val_files, *self.test_files, *self.extra_files})
        digest = hashlib.sha256()
        for path in every:
            stat = os.stat(path)
            relative = os.path.relpath(path, self.root).replace(os.sep, "/")
            content = _file_sha256(path, stat.st_size, stat.st_mtime_ns)
            digest.update(f"{relative}\t{stat.st_size}\t{content}\n".encode())
        return digest.hexdigest()


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; cached per (path, size, mtime) since every stage asks again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding the samples
# ---------------------------------------------------------------------------------------------


def find_image_folder(
    path: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    key: str = "data.path",
) -> FileSplits:
    """The samples of a folder of class subfolders.

    With a ``train/`` subfolder, ``train/<class>/`` holds the training images; ``val/<class>/``
    and ``test/<class>/`` are used when present, otherwise validation (by ``val_fraction``) and
    test (by ``test_fraction``) are taken from the training images. Without ``train/``, every
    subfolder is a class and test, then validation, are taken from them by fraction.

    Args:
        path: The folder.
        val_fraction: Fraction of the training images moved to validation when there is no
            ``val/`` folder, in (0, 1).
        test_fraction: Fraction of the images moved to test when there is no ``test/`` folder,
            in [0, 1); 0 requires a ``test/`` folder.
        seed: Seed of the splits taken by fraction.
        key: The config key that named ``path``, for messages.

    Returns:
        The `FileSplits`, with the class names.

    Raises:
        DataError: The folder is missing or holds no class folder; a class folder is empty; a
            class of ``val/`` or ``test/`` is not in ``train/``; a file is not an image; there
            is no test split (no ``test/`` and ``test_fraction`` is 0), or ``test_fraction`` is
            set beside a ``test/`` folder; a split by fraction would be empty.
    """
    root = Path(path).resolve()
    where = f"{key}={path}"
    if not root.is_dir():
        raise DataError(
            f"{where}: no such folder. Expected a folder of class subfolders (ROOT/<class>/*.png) "
            "or ROOT/train/<class>/ with optional ROOT/val/ and ROOT/test/."
        )
    _check_fraction("data.test_fraction", test_fraction, allow_zero=True)
    if (root / "train").is_dir():
        others = [name for name in _subfolders(root) if name not in _SPLIT_FOLDERS]
        if others:
            raise DataError(
                f"{where} has a train/ folder and also {first_values(others, 5)}: with train/, "
                "classes go inside train/ (and val/, test/). Move those folders there."
            )
        class_names, train = _class_folders(root / "train", where)
        val = _split_folder(root, "val", class_names, where)
        test = _split_folder(root, "test", class_names, where)
    else:
        class_names, train = _class_folders(root, where)
        val = test = None
    if test is not None and test_fraction > 0:
        raise DataError(
            f"{where} has a test/ folder, so data.test_fraction={test_fraction} would be "
            "ignored. Set data.test_fraction=0 to test on test/, or remove the folder."
        )
    if test is None and test_fraction == 0:
        raise DataError(
            f"{where} has no test split: add ROOT/test/<class>/ folders beside ROOT/train/, or "
            "set data.test_fraction (e.g. data.test_fraction=0.2) to take one from the images."
        )
    if test is None:
        train, test = split_off(
            *train, fraction=test_fraction, seed=seed, key="data.test_fraction", where=where
        )
    if val is None:
        train, val = split_off(
            *train, fraction=val_fraction, seed=seed, key="data.val_fraction", where=where
        )
    elif val_fraction:
        logger.info("%s has a val/ folder: validating on it (data.val_fraction is not used)", where)
    splits = FileSplits(root, *_listed(train), *_listed(val), *_listed(test), class_names)
    logger.info("Found %s: %s, classes %s", root, splits.summary()["sizes"], class_names)
    return splits


def _class_folders(folder: Path, where: str) -> tuple[list[str], tuple[np.ndarray, np.ndarray]]:
    """Sorted class names and ``(files, labels)`` of one folder of class subfolders."""
    class_names = _subfolders(folder)
    if not class_names:
        raise DataError(
            f"{where}: {folder} holds no class folder. Put each class's images in a subfolder "
            f"named after the class ({folder}/<class>/*.png)."
        )
    return class_names, _index_classes(folder, class_names, where)


def _subfolders(folder: Path) -> list[str]:
    """Sorted subfolder names, without hidden ones (``.ipynb_checkpoints``), as Keras lists them."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_folder(
    root: Path, split: str, class_names: list[str], where: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(files, labels)`` of ``root/split`` (``val`` or ``test``), or None if it is absent."""
    folder = root / split
    if not folder.is_dir():
        return None
    names = _subfolders(folder)
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise DataError(
            f"{where}: {folder / unknown[0]} is a class that train/ lacks (train/ has "
            f"{first_values(class_names, 10)}). Rename the folder, or add {unknown[0]}/ to train/."
        )
    if not names:
        raise DataError(f"{where}: {folder} holds no class folder; add {split}/<class>/ folders.")
    return _index_classes(folder, names, where, class_ids={n: class_names.index(n) for n in names})


def _index_classes(
    folder: Path, names: list[str], where: str, class_ids: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    files, labels = [], []
    for index, name in enumerate(names):
        found = _image_files(folder / name)
        if not found:
            raise DataError(
                f"{where}: the class folder {folder / name} holds no image "
                f"({', '.join(IMAGE_FORMATS)}). Add images or remove the folder."
            )
        files += found
        labels += [class_ids[name] if class_ids else index] * len(found)
    return np.array(files, dtype=str), np.array(labels, dtype=np.int64)


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, each checked to start like an image."""
    found = []
    for directory, _, names in sorted(os.walk(folder), key=lambda walked: walked[0]):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_FORMATS):
                path = os.path.join(directory, name)
                _check_signature(path)
                found.append(path)
    return found


def _check_signature(path: str, where: str = "") -> None:
    """Refuse a file that does not start like a PNG, JPEG, GIF or BMP (cheap: 8 bytes)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not any(head.startswith(s) for signatures in _SIGNATURES.values() for s in signatures):
        what = "is empty" if not head else "is not an image (it starts like no PNG/JPEG/GIF/BMP)"
        raise DataError(f"{where}{path} {what}. Replace it with an image, or remove it.")


def _listed(pair: tuple[np.ndarray, np.ndarray]) -> tuple[list[str], np.ndarray]:
    files, y = pair
    return [str(f) for f in files], y


def _check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, int | float) and math.isfinite(value) and low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise DataError(f"{key}={value} must be a number in {interval}.")


def load_csv(
    path: str | os.PathLike[str],
    *,
    path_column: str = "path",
    label_column: str = "label",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    key: str = "data.path",
) -> FileSplits:
    """The samples a CSV lists: one row per image, its path and its label.

    Paths are relative to the CSV's folder (absolute paths are kept). Labels that are all
    integers are class ids; any fraction (``0.5``, ``1e-3``) makes every label a regression
    target; otherwise labels are class names, sorted and numbered from 0. Test, then
    validation, are split off by fraction (seeded, stratified for classes).

    Args:
        path: The CSV file (with a header row).
        path_column: The column holding the image paths (``data.path_column``).
        label_column: The column holding the labels (``data.label_column``).
        val_fraction: Fraction moved to validation, in (0, 1).
        test_fraction: Fraction moved to test, in (0, 1).
        seed: Seed of the splits.
        key: The config key that named ``path``, for messages.

    Returns:
        The `FileSplits` (class names for named labels, else None).

    Raises:
        DataError: The CSV is missing or lacks a column; a row has no label, a missing file or
            a file that is not an image; ``test_fraction`` is 0; a split would be empty.
    """
    csv_path = Path(path).resolve()
    where = f"{key}={path}"
    if not csv_path.is_file():
        raise DataError(f"{where}: no such file. Expected a CSV with a header row.")
    if test_fraction == 0:
        raise DataError(
            f"{where}: a CSV gives one list of images, so the test split is taken from it: set "
            "data.test_fraction (e.g. data.test_fraction=0.2)."
        )
    _check_fraction("data.test_fraction", test_fraction, allow_zero=False)
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column, column_key in ((path_column, "path_column"), (label_column, "label_column")):
            if column not in columns:
                raise DataError(
                    f"{where}: no column {column!r} (data.{column_key}); the CSV's columns are "
                    f"{columns}. Set data.{column_key} to one of them."
                )
        files, raw_labels = [], []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            file_value, label = (row.get(path_column) or "").strip(), row.get(label_column)
            label = (label or "").strip()
            if not file_value or not label:
                empty = path_column if not file_value else label_column
                raise DataError(f"{csv_path} line {line}: column {empty!r} is empty.")
            file = csv_path.parent / file_value
            if not file.is_file():
                raise DataError(
                    f"{csv_path} line {line}: {file_value} does not exist (looked for {file}). "
                    "Fix the path (relative to the CSV's folder) or remove the row."
                )
            if not file.name.lower().endswith(IMAGE_FORMATS):
                raise DataError(
                    f"{csv_path} line {line}: {file_value} is not a {'/'.join(IMAGE_FORMATS)} "
                    "file. Convert it, or remove the row."
                )
            _check_signature(str(file), where=f"{csv_path} line {line}: ")
            files.append(str(file))
            raw_labels.append(label)
    if not files:
        raise DataError(f"{where}: the CSV lists no image; add one row per image.")
    y, class_names = _parse_labels(raw_labels)
    samples = (np.array(files, dtype=str), y)
    train, test = split_off(
        *samples, fraction=test_fraction, seed=seed, key="data.test_fraction", where=where
    )
    train, val = split_off(
        *train, fraction=val_fraction, seed=seed, key="data.val_fraction", where=where
    )
    splits = FileSplits(
        csv_path.parent,
        *_listed(train),
        *_listed(val),
        *_listed(test),
        class_names,
        extra_files=[str(csv_path)],
    )
    logger.info("Read %s: %s, classes %s", csv_path, splits.summary()["sizes"], class_names)
    return splits


def _parse_labels(labels: Sequence[str]) -> tuple[np.ndarray, list[str] | None]:
    """Class ids from integers or names, or float targets when any label is a fraction."""
    try:
        return np.array([int(label) for label in labels], dtype=np.int64), None
    except ValueError:
        pass
    try:
        values = [float(label) for label in labels]
    except ValueError:
        names = sorted(set(labels))
        ids = {name: i for i, name in enumerate(names)}
        return np.array([ids[label] for label in labels], dtype=np.int64), names
    return np.array(values, dtype=np.float32), None


# ---------------------------------------------------------------------------------------------
# Decoding, in tf.data
# ---------------------------------------------------------------------------------------------


__all__ = [
    "CHANNELS",
    "IMAGE_FORMATS",
    "FileSplits",
    "ImageOptions",
    "find_image_folder",
    "load_csv",
]
