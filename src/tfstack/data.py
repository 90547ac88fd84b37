"""Datasets as byte-stable .npz files, and their train/validation/test splits.

A dataset on disk is one ``.npz`` holding ``x_train``, ``y_train``, ``x_test`` and ``y_test``.
`load_npz` checks it and takes a seeded validation split from the training data (`split_off`,
also used for image files); whether labels fit the head is `tfstack.labels`. `save_npz` writes
``.npz`` files that are byte-identical on every machine and run, so DVC sees the same hash for
the same content. Serving samples as `tf.data` batches is `tfstack.datasets`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tfstack.errors import DataError
from tfstack.files import atomic_path
from tfstack.labels import first_values, is_label_array

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")

# A fixed timestamp and mode for every member, so that the bytes depend on the arrays only.
# 1980-01-01 is the earliest date the zip format can store.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_FILE_MODE = 0o644


@dataclass
class Splits:
    """Train, validation and test arrays of one dataset.

    Attributes:
        x_train: Training inputs, shape ``(n_train, *input_shape)``.
        y_train: Training targets, shape ``(n_train, ...)``.
        x_val: Validation inputs taken from the training data.
        y_val: Validation targets.
        x_test: Test inputs, as stored in the file.
        y_test: Test targets.
        class_names: The name of each class id (index ``i`` names label ``i``), or None when the
            data names no classes (an ``.npz`` without a ``class_names`` array, regression).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str] | None = None

    def summary(self) -> dict[str, Any]:
        """Sizes, shapes and classes of the splits, JSON-ready.

        Returns:
            A dict with ``sizes`` (samples per split), ``input_shape`` and ``target_shape``
            (per sample), ``x_dtype``, ``y_dtype``, and for integer targets ``classes`` (sorted
            distinct labels over all splits), ``num_classes`` and ``class_counts`` (per split,
            label -> count; JSON keys are strings).
        """
        splits = {
            "train": (self.x_train, self.y_train),
            "val": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }
        summary: dict[str, Any] = {
            "sizes": {name: int(len(x)) for name, (x, _) in splits.items()},
            "input_shape": [int(d) for d in self.x_train.shape[1:]],
            "target_shape": [int(d) for d in self.y_train.shape[1:]],
            "x_dtype": str(self.x_train.dtype),
            "y_dtype": str(self.y_train.dtype),
        }
        if is_label_array(self.y_train):
            all_labels = np.concatenate([y.reshape(-1) for _, y in splits.values()])
            summary["classes"] = [int(c) for c in np.unique(all_labels)]
            summary["num_classes"] = len(summary["classes"])
            summary["class_counts"] = {name: class_counts(y) for name, (_, y) in splits.items()}
        if self.class_names is not None:
            summary["class_names"] = list(self.class_names)
        return summary


def load_npz(
    path: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    key: str = "data.path",
) -> Splits:
    """Load a dataset ``.npz`` and split a validation set off its training data.

    The validation split is stratified by label when the targets are integer labels and every
    class has enough samples for both sides; otherwise it is a seeded random split. The same
    file and seed give the same split on every run.

    Args:
        path: An ``.npz`` file holding ``x_train``, ``y_train``, ``x_test``, ``y_test``.
        val_fraction: Fraction of the training samples moved to validation, in (0, 1).
            The number of validation samples is ``round(val_fraction * n_train)``.
        seed: Seed of the validation split.
        key: The config key that named ``path``, used in error messages.

    Returns:
        The six arrays as `Splits`.

    Raises:
        DataError: The file is missing or not an ``.npz``, a key is missing, inputs and targets
            differ in length, a split is empty (or the validation split would be), the inputs of
            train and test have different shapes, or the arrays hold NaN or infinity.

    Example:
        >>> import numpy as np
        >>> from tfstack import load_npz
        >>> x, y = np.random.rand(50, 8).astype("float32"), np.arange(50) % 3
        >>> np.savez("data.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
        >>> splits = load_npz("data.npz", val_fraction=0.25)
        >>> len(splits.x_train), len(splits.x_val), len(splits.x_test)
        (30, 10, 10)
    """
    where = f"{key}={path}"
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{where}: no such file. Expected an .npz holding {', '.join(REQUIRED_KEYS)}. "
            "Check the path, or run the pipeline stage that writes it (dvc repro prepare)."
        )
    arrays = _read_npz(path, where)

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 0 or y.ndim == 0:
            raise DataError(
                f"{where}: x_{split} and y_{split} must be arrays with one sample per row; "
                f"received shapes x_{split}={x.shape}, y_{split}={y.shape}."
            )
        if len(x) != len(y):
            raise DataError(
                f"{where}: x_{split} has {len(x)} samples but y_{split} has {len(y)}. "
                "Each input needs exactly one target."
            )
        if len(x) == 0:
            raise DataError(f"{where}: the {split} split is empty (x_{split} has 0 samples).")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{where}: train and test inputs differ in shape: x_train has samples of shape "
            f"{arrays['x_train'].shape[1:]}, x_test of shape {arrays['x_test'].shape[1:]}."
        )
    for name in REQUIRED_KEYS:
        _check_finite(arrays[name], name, where)

    x_train, y_train, x_val, y_val = _split_validation(
        arrays["x_train"], arrays["y_train"], val_fraction=val_fraction, seed=seed, where=where
    )
    class_names = _class_names(arrays.pop("class_names", None), where)
    splits = Splits(x_train, y_train, x_val, y_val, arrays["x_test"], arrays["y_test"], class_names)
    logger.info("Loaded %s: %s", path, splits.summary()["sizes"])
    return splits


def file_hash(path: str | os.PathLike[str]) -> str:
    """MD5 of a file's bytes as a hex string, the same value DVC 3 records for the file.

    Args:
        path: A file.

    Returns:
        32 lowercase hex digits.

    Raises:
        DataError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Cannot hash {path}: no such file.")
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays as an uncompressed ``.npz`` whose bytes depend on the arrays only.

    `np.savez` stamps each member with the current time, so two writes of the same data differ.
    Here every member gets a fixed date and mode, the arrays are stored little-endian in C order
    without compression (deflate output may vary between zlib builds), and the members are
    written in the order given. The file is written to a temporary name and moved into place.

    Args:
        path: Output file; its parent directory is created.
        arrays: Name -> array; object arrays are refused.

    Returns:
        The path written.

    Raises:
        DataError: An array has dtype object (it would need pickle to load).
    """
    path = Path(path)
    # Written beside the final name and renamed (`atomic_path`), so parallel writers and a killed
    # process never leave half a file; the archive is closed before the rename.
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.dtype.hasobject:
                raise DataError(f"{path}: array {name!r} has dtype object; save numbers only.")
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # Unix, so the mode below is read as permissions.
            info.external_attr = _ZIP_FILE_MODE << 16
            archive.writestr(info, buffer.getvalue())
    return path


def _read_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    """Read the required arrays of a dataset file, with messages that name the file."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{where}: not an .npz file ({type(err).__name__}: {err}). "
            f"Save the dataset with np.savez(path, {', '.join(f'{k}=...' for k in REQUIRED_KEYS)})."
        ) from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{where}: holds a single array (.npy), not an .npz archive. "
            f"Save the dataset with np.savez(path, {', '.join(f'{k}=...' for k in REQUIRED_KEYS)})."
        )
    with loaded:
        present = sorted(loaded.files)
        missing = [k for k in REQUIRED_KEYS if k not in present]
        if missing:
            raise DataError(
                f"{where}: missing {', '.join(missing)}. The file holds: "
                f"{', '.join(present) if present else 'nothing'}. "
                f"Expected {', '.join(REQUIRED_KEYS)}."
            )
        arrays = {}
        optional = ["class_names"] if "class_names" in present else []
        for k in [*REQUIRED_KEYS, *optional]:
            try:
                arrays[k] = loaded[k]
            except (ValueError, OSError, zipfile.BadZipFile) as err:
                if k == "class_names":
                    raise DataError(
                        f"{where}: class_names cannot be read ({err}). Store them as an array of "
                        "strings: np.savez(..., class_names=np.array(['cat', 'dog']))."
                    ) from err
                raise DataError(f"{where}: cannot read {k} ({err}). Save numeric arrays.") from err
    return arrays


def _class_names(names: np.ndarray | None, where: str) -> list[str] | None:
    """The optional ``class_names`` array of a dataset file (one string per class id).

    The only reader of it: `tfstack.pipeline.inputs.class_names` takes them from `Splits`.
    """
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(
            f"{where}: class_names must be a 1-D array of strings; received dtype {names.dtype} "
            f"and shape {names.shape}. Store np.array(['cat', 'dog', ...]), one per class."
        )
    return [str(n) for n in names.astype(str)]


def _check_finite(array: np.ndarray, name: str, where: str) -> None:
    """Refuse NaN and infinity, which would turn every loss into NaN."""
    if array.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(array), -1).any(axis=1))
        raise DataError(
            f"{where}: {name} holds {int(bad.sum())} non-finite values (NaN or infinity) in "
            f"{len(rows)} samples, first at index {first_values(rows.tolist(), 5)}. "
            "Clean or drop those samples."
        )


def _split_validation(
    x: np.ndarray, y: np.ndarray, *, val_fraction: float, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Move a seeded, stratified-if-possible fraction of the training data to validation."""
    (x_train, y_train), (x_val, y_val) = split_off(
        x, y, fraction=val_fraction, seed=seed, key="data.val_fraction", where=where
    )
    return x_train, y_train, x_val, y_val


def split_off(
    x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int, key: str, where: str
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Split a seeded, stratified-if-possible fraction of the samples off, in input order.

    Stratified when the targets are integer labels and every class can give a sample to both
    sides; otherwise a seeded random split. The same samples and seed give the same split.

    Args:
        x: Inputs (arrays, or an array of file paths), one row per sample.
        y: Targets, one row per sample.
        fraction: Fraction of the samples split off, in (0, 1); ``round(fraction * n)`` samples.
        seed: Seed of the split.
        key: The config key of ``fraction``: ``data.val_fraction`` (the split off is the
            validation split) or ``data.test_fraction`` (the test split).
        where: The data's config key and value, for messages.

    Returns:
        ``((x_kept, y_kept), (x_split_off, y_split_off))``.

    Raises:
        DataError: ``fraction`` is not in (0, 1), or either side would be empty.
    """
    if not (isinstance(fraction, int | float) and 0 < fraction < 1):
        raise DataError(
            f"{key} must be a number between 0 and 1 (exclusive). Received: {key}={fraction}"
        )
    validation = key == "data.val_fraction"
    n = len(x)
    n_off = round(fraction * n)
    if n_off == 0 or n_off == n:
        if validation:
            side = "validation" if n_off == 0 else "training"
        else:
            side = "test" if n_off == 0 else "training"
        samples = "training samples" if validation else "samples"
        raise DataError(
            f"{where}: the {side} split would be empty: {key}={fraction} of "
            f"{n} {samples} is {fraction * n:.2f} samples, rounded to {n_off}. "
            f"Add {samples} or change {key}."
        )
    rng = np.random.default_rng(seed)
    off_index = None
    if is_label_array(y) and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        off_index = _stratified_index(y.reshape(-1), n_off, rng)
    if off_index is None:
        logger.info("%s split is random (not stratified)", "Validation" if validation else "Test")
        off_index = np.sort(rng.permutation(n)[:n_off])
    is_off = np.zeros(n, dtype=bool)
    is_off[off_index] = True
    return (x[~is_off], y[~is_off]), (x[is_off], y[is_off])


def _stratified_index(y: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray | None:
    """Indices of ``n_val`` samples with the class proportions of ``y``, or None if impossible.

    Stratified means every class keeps at least one sample on each side and the validation
    counts follow the class proportions (largest remainders get the leftover samples).
    """
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    if counts.min() < 2 or n_val < len(classes) or len(y) - n_val < len(classes):
        logger.info(
            "Validation split is random (not stratified): %d classes, smallest has %d samples, "
            "%d validation samples",
            len(classes),
            counts.min(),
            n_val,
        )
        return None
    exact = counts * n_val / len(y)
    per_class = np.clip(np.floor(exact).astype(int), 1, counts - 1)
    # Hand out (or take back) the remaining samples by largest fractional part, within limits.
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while per_class.sum() != n_val:
        step = 1 if per_class.sum() < n_val else -1
        for c in order if step == 1 else order[::-1]:
            if per_class.sum() == n_val:
                break
            if 1 <= per_class[c] + step <= counts[c] - 1:
                per_class[c] += step
    chosen = [
        rng.permutation(np.flatnonzero(inverse == c))[: per_class[c]] for c in range(len(classes))
    ]
    return np.sort(np.concatenate(chosen))


def class_counts(y: np.ndarray) -> dict[str, int]:
    """Label -> number of samples, with string keys so the dict is JSON-ready."""
    labels, counts = np.unique(y, return_counts=True)
    return {str(int(label)): int(count) for label, count in zip(labels, counts, strict=True)}


__all__ = [
    "REQUIRED_KEYS",
    "Splits",
    "file_hash",
    "load_npz",
    "class_counts",
    "save_npz",
    "split_off",
]
