"""Datasets as tf.data pipelines and byte-stable .npz files.

A dataset on disk is one ``.npz`` holding ``x_train``, ``y_train``, ``x_test`` and ``y_test``.
`load_npz` checks it and takes a seeded validation split from the training data; `ArrayDataset`
(and `make_dataset`, its ``(x, y)`` view) serves arrays as batched, prefetched `tf.data` pipelines
whose seeded order is shared with precomputed features of the same samples (whether labels fit
the head is `tfstack.labels`). `save_npz` writes ``.npz`` files that are
byte-identical on every machine and run, so DVC sees the same hash for the same content.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tfstack.errors import DataError
from tfstack.files import atomic_path
from tfstack.labels import first_values, is_label_array

if TYPE_CHECKING:
    import tensorflow as tf

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


class IndexedDataset:
    """Samples served as batches in a seeded index order that every view of them shares.

    The order is a `tf.data` pipeline of sample indices (`sample_order`): ``range(n)``, shuffled
    with ``seed`` (reshuffled every epoch) when ``shuffle``, then batched. A subclass says what a
    sample's inputs are (`batches`, `input_batches`): arrays in memory (`ArrayDataset`) or files
    decoded on the fly (`tfstack.images.ImageDataset`). `with_inputs` gathers other inputs of
    the same samples (the outputs of a frozen feature extractor, say) with the same ``y``. Every
    view draws its epochs from the one shuffle stream, so a phase trained on precomputed
    features sees exactly the batches, in exactly the order, that training on the inputs would
    have seen, and the phases after it continue that stream.

    With ``epoch_seeded``, each epoch's order is instead a function of ``(seed, epoch)`` only,
    where ``epoch`` is what `set_epoch` last set (at the start of every epoch, by the callback
    `tfstack.training.EpochOrder` that the phase loop attaches): a run resumed at epoch ``k`` sees
    exactly the order an uninterrupted run saw at epoch ``k``, however many epochs (or
    iterators) came before.

    Args:
        n: Number of samples.
        y: Targets, shape ``(n, ...)``.
        batch_size: Samples per batch (the last batch may be smaller).
        shuffle: Whether to shuffle (training) or keep the order (validation, test).
        seed: Seed of the shuffle.
        epoch_seeded: Shuffle each epoch by ``(seed, epoch)`` (see above) instead of drawing
            epochs from one stateful shuffle stream.

    Raises:
        DataError: ``y`` does not have ``n`` rows, or ``batch_size`` is not positive.
    """

    def __init__(
        self,
        n: int,
        y: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch_seeded: bool = False,
    ):
        import tensorflow as tf  # here, not at the top: the prepare stage needs no TensorFlow

        if len(y) != n:
            raise DataError(f"x has {n} samples but y has {len(y)}; they must match.")
        if batch_size < 1:
            raise DataError(
                f"batch_size must be a positive integer. Received: batch_size={batch_size}"
            )
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._n = n
        self._indices, self._epoch = sample_order(
            n, shuffle=shuffle, seed=seed, epoch_seeded=epoch_seeded
        )
        self._order = self._indices.batch(batch_size)  # (batch,) int64 indices
        self._y = tf.convert_to_tensor(y)
        self._batches: tf.data.Dataset | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration the given epoch's order (``epoch_seeded`` datasets only)."""
        if self._epoch is not None:
            self._epoch.assign(int(epoch))

    def __len__(self) -> int:
        return self._n

    @property
    def steps(self) -> int:
        """Batches per epoch."""
        return -(-self._n // self.batch_size)

    def batches(self) -> tf.data.Dataset:
        """The ``(x_batch, y_batch)`` dataset (the same object on every call)."""
        if self._batches is None:
            self._batches = self._make_batches()
        return self._batches

    def _make_batches(self) -> tf.data.Dataset:
        raise NotImplementedError

    def input_batches(self) -> tf.data.Dataset:
        """The inputs alone, in input order (unshuffled), in batches of ``batch_size``."""
        raise NotImplementedError

    def with_inputs(self, inputs: np.ndarray | Sequence[np.ndarray]) -> tf.data.Dataset:
        """``(inputs_batch, y_batch)`` batches in the shared order.

        Args:
            inputs: One array, or a list of arrays, with one row per sample in input order
                (e.g. a feature extractor's outputs for `input_batches`).

        Returns:
            A dataset of ``(inputs_batch, y_batch)``; a list of arrays gives a tuple of batches.

        Raises:
            DataError: an array does not have one row per sample.
        """
        import tensorflow as tf

        arrays = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        for array in arrays:
            if len(array) != self._n:
                raise DataError(
                    f"inputs have {len(array)} rows but the dataset has {self._n} samples; "
                    "give one row per sample, in the order of x."
                )
        tensors = [tf.convert_to_tensor(a) for a in arrays]
        return self._gather(tensors[0] if len(tensors) == 1 else tuple(tensors))

    def _gather(self, inputs) -> tf.data.Dataset:
        import tensorflow as tf

        y = self._y
        if not self.shuffle:
            # Input order every epoch: plain slices, without the per-epoch cost of a map
            # function (about 3 ms per iteration on the demo, paid again by every validation).
            batches = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(self.batch_size)
            return shard_by_data(batches.prefetch(tf.data.AUTOTUNE))

        def take(index):
            # index: (batch,) -> inputs (batch, ...), y (batch, ...)
            picked = tf.nest.map_structure(lambda t: tf.gather(t, index), inputs)
            return picked, tf.gather(y, index)

        return shard_by_data(
            self._order.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
                tf.data.AUTOTUNE
            )
        )


def sample_order(
    n: int, *, shuffle: bool, seed: int, epoch_seeded: bool = False
) -> tuple[tf.data.Dataset, tf.Variable | None]:
    """The sample indices of one epoch, in training order, as a `tf.data` pipeline.

    Args:
        n: Number of samples.
        shuffle: Shuffle (else ``0..n-1``).
        seed: Seed of the shuffle.
        epoch_seeded: Shuffle by ``(seed, epoch)``, where ``epoch`` is the returned variable's
            value when an iteration starts (see `IndexedDataset`); else one stateful stream
            reshuffled every iteration.

    Returns:
        ``(indices, epoch)``: a dataset of scalar int64 indices, and the epoch variable (None
        unless shuffled by epoch).
    """
    import tensorflow as tf

    order = tf.data.Dataset.range(n)
    if not shuffle:
        return order, None
    if not epoch_seeded:
        return order.shuffle(buffer_size=max(n, 1), seed=seed, reshuffle_each_iteration=True), None
    # Read by the pipeline each time an epoch's iteration starts, so set_epoch() before it
    # decides the order; stateless, so nothing else (other iterators, restarts) moves it.
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")

    def permutation(_):
        # () -> (n,): the indices in this epoch's order
        key = tf.stack([tf.constant(seed, tf.int64), epoch.read_value()])
        return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), key)

    order = tf.data.Dataset.from_tensors(tf.constant(0)).map(permutation).unbatch()
    return order.apply(tf.data.experimental.assert_cardinality(n)), epoch


class ArrayDataset(IndexedDataset):
    """Arrays served as batches in a seeded order that every view of them shares.

    The order and its views are `IndexedDataset`'s: `batches` gathers ``(x, y)`` by the shared
    index batches. Shuffling indices instead of samples keeps the shuffle buffer small (``n``
    integers), and gathering a whole batch at once keeps Python out of the per-batch work.

    Args:
        x: Inputs, shape ``(n, ...)``.
        y: Targets, shape ``(n, ...)``.
        batch_size: Samples per batch (the last batch may be smaller).
        shuffle: Whether to shuffle (training) or keep the order (validation, test).
        seed: Seed of the shuffle.
        epoch_seeded: Shuffle each epoch by ``(seed, epoch)`` (see `IndexedDataset`).

    Raises:
        DataError: ``x`` and ``y`` differ in length, or ``batch_size`` is not positive.

    Example:
        >>> import numpy as np
        >>> from tfstack import ArrayDataset
        >>> data = ArrayDataset(np.zeros((10, 3)), np.arange(10), batch_size=4, shuffle=True,
        ...                     seed=0, epoch_seeded=True)
        >>> len(data), data.steps, [len(y) for _, y in data.batches()]
        (10, 3, [4, 4, 2])
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch_seeded: bool = False,
    ):
        super().__init__(
            len(x), y, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch_seeded=epoch_seeded
        )
        self.x = x

    def _make_batches(self) -> tf.data.Dataset:
        import tensorflow as tf

        return self._gather(tf.convert_to_tensor(self.x))

    def input_batches(self) -> tf.data.Dataset:
        """``x`` alone, in input order, in batches of ``batch_size``."""
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices(self.x).batch(self.batch_size)


def shard_by_data(batches: tf.data.Dataset) -> tf.data.Dataset:
    """Under a multi-worker strategy, split every batch among the workers.

    The arrays are in memory, so there are no files to shard by (``AUTO`` would try files and
    warn); each worker takes its part of every global batch, as one process would see it.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options)


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
    """Turn arrays into a batched, prefetched `tf.data.Dataset` of ``(x, y)`` pairs.

    With ``shuffle`` the whole dataset is reshuffled every epoch, in an order fixed by ``seed``:
    the same seed gives the same sequence of epochs. The pipeline runs in TensorFlow only (no
    Python per batch). Use `ArrayDataset` to also train on precomputed features in that order.

    Args:
        x, y, batch_size, shuffle, seed: As for `ArrayDataset`.

    Returns:
        A dataset of ``(x_batch, y_batch)``.

    Raises:
        DataError: ``x`` and ``y`` differ in length, or ``batch_size`` is not positive.
    """
    return ArrayDataset(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed).batches()


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
                raise DataError(f"{where}: cannot read {k} ({err}). Save numeric arrays.") from err
    return arrays


def _class_names(names: np.ndarray | None, where: str) -> list[str] | None:
    """The optional ``class_names`` array of a dataset file (one string per class id)."""
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(
            f"{where}: class_names must be a 1-D array of strings, one per class id; received "
            f"dtype {names.dtype}, shape {names.shape}."
        )
    return [str(n) for n in names]


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
    "ArrayDataset",
    "IndexedDataset",
    "Splits",
    "file_hash",
    "load_npz",
    "class_counts",
    "make_dataset",
    "sample_order",
    "save_npz",
    "shard_by_data",
    "split_off",
]
