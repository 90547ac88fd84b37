"""Frozen features too big for memory: extracted batch by batch to files, read back by rows.

`write_outputs` runs a frozen part over streamed input batches and appends each batch's
outputs to one ``.npy`` file per output (row-major, one row per sample in input order: the
layout of the shared cache's entries, `tfstack.feature_cache`), so only a batch is ever held.
`StoredFeatures` reads rows of those files by sample index with ``os.preadv`` into fresh
buffers (a contiguous run of rows, e.g. an unshuffled batch, is one read); pages of a
``np.memmap`` would count in the process's RSS as they are touched, and the whole file would
end up there after an epoch. `IndexedDataset.with_inputs` turns them into the shared order's
batches (`batches`).

Picked by measuring (``benchmarks/feature_streaming.py``, README "Performance"): on a shuffled
head fit over 20,000 x 2,048 float32 features, preadv rows ran at in-memory speed with 36 MB of
RSS growth, against 198 MB for ``np.memmap`` and 387 MB for ``tf.data.Dataset.load`` with a
full shuffle buffer; a saved dataset (or TFRecord) is read in sequence, so the shared
(shuffled, epoch-seeded) index order needs that buffer, and a small one only shuffles locally.

`expected_bytes` says what the outputs would take in memory, from the frozen part's static
output shapes, so a phase can choose between today's in-memory features and these files
(``train.feature_memory_mb``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tfstack.errors import TrainingError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = "tfstack-features-"


def expected_bytes(frozen: keras.Model, n: int) -> int | None:
    """Bytes of the frozen part's outputs for ``n`` samples, or None if a shape is unknown."""
    total = 0
    for output in _as_list(frozen.outputs):
        row = output.shape[1:]
        if any(d is None for d in row):
            return None
        total += n * math.prod(row) * np.dtype(_numpy_dtype(output.dtype)).itemsize
    return total


def over_budget(frozen: keras.Model, rows: Sequence[int], memory_mb: float | None) -> bool:
    """Whether the frozen part's outputs for splits of ``rows`` samples, together, exceed the
    budget of ``memory_mb`` MB and can be streamed (None: no budget, always in memory)."""
    if memory_mb is None:
        return False
    sizes = [expected_bytes(frozen, n) for n in rows]
    if None in sizes or not can_stream(frozen):
        return False  # unknown output shapes, or a distribution strategy: in memory as before
    total = sum(sizes)
    if total <= memory_mb * 1e6:
        return False
    logger.info(
        "Frozen features of %.1f MB exceed train.feature_memory_mb=%g: streaming them from disk",
        total / 1e6,
        memory_mb,
    )
    return True


def can_stream(frozen: keras.Model) -> bool:
    """Whether `write_outputs` may run ``frozen`` batch by batch (one device, one step a call).

    Under a distribution strategy Keras's predict distributes the batches itself; there the
    outputs stay in memory (`tfstack.frozen_features.frozen_outputs`).
    """
    import tensorflow as tf

    strategy = getattr(frozen, "_distribute_strategy", None)
    return (
        strategy is None
        and not tf.distribute.has_strategy()
        and getattr(frozen, "steps_per_execution", 1) == 1
    )


def write_outputs(
    frozen: keras.Model, input_batches: tf.data.Dataset, n: int, directory: Path
) -> list[str]:
    """Run ``frozen`` over ``input_batches`` and write its outputs, batch by batch, to files.

    The batches go through the model's own predict function (`keras.Model.predict`'s, traced
    once and kept on the model, so a later ``predict`` of the same part reuses the trace), in
    inference mode; each batch's outputs are appended to ``directory/<i>.npy``, one file per
    output, and dropped.

    Args:
        frozen: The frozen part (`tfstack.frozen_features.FrozenSplit.frozen`).
        input_batches: Batches of its inputs, in input order.
        n: The number of samples the batches hold.
        directory: Where the files go (it exists).

    Returns:
        The outputs' dtypes (``"float32"``, ``"bfloat16"``), one per file.

    Raises:
        TrainingError: the batches held another number of samples than ``n``.
    """
    from tfstack.feature_cache import _storable

    predict = frozen.make_predict_function() or frozen.predict_function
    files: list = []
    dtypes: list[str] = []
    rows = 0
    touched = time.monotonic()
    try:
        for batch in input_batches:
            if time.monotonic() - touched > 60:
                # Still being written: a directory of a job that died is removed once stale.
                os.utime(directory)
                touched = time.monotonic()
            outputs = [np.asarray(o) for o in _as_list(predict([batch]))]
            if not files:
                for i, output in enumerate(outputs):
                    dtypes.append(str(output.dtype))
                    handle = open(directory / f"{i}.npy", "wb")  # noqa: SIM115 (closed below)
                    files.append(handle)
                    stored = _storable(output[:0])
                    header = {
                        "descr": np.lib.format.dtype_to_descr(stored.dtype),
                        "fortran_order": False,
                        "shape": (n, *output.shape[1:]),
                    }
                    np.lib.format.write_array_header_2_0(handle, header)
            if rows + len(outputs[0]) > n:
                break
            for handle, output in zip(files, outputs, strict=True):
                handle.write(np.ascontiguousarray(_storable(output)).data)
            rows += len(outputs[0])
        if rows != n:
            raise TrainingError(
                f"the frozen part gave outputs for {rows} or more samples of a split of {n}; "
                "its inputs must give one row per sample"
            )
        for handle in files:
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in files:
            handle.close()
    return dtypes


class StoredFeatures:
    """A split's frozen features in ``.npy`` files, read by rows (one row per sample).

    The files are opened once: rows stay readable while the directory is renamed or removed
    (another job evicting a shared-cache entry, say) until `close`.

    Args:
        paths: One ``.npy`` file per output of the frozen part, each with ``n`` rows.
        dtypes: The dtype each file stands for (a bfloat16 file stores its bits as uint16).
        cleanup: Called by `close` after the files are closed (removes a temporary directory).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        dtypes: Sequence[str] | None = None,
        cleanup: Callable[[], None] | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self._cleanup = cleanup
        self._fds: list[int] = []
        self.offsets, self.shapes, self.dtypes = [], [], []
        try:
            for i, path in enumerate(self.paths):
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read(f)
                    offset = f.tell()
                if fortran:
                    raise ValueError(f"{path} is in Fortran order; expected rows")
                if dtypes is not None and str(dtype) != dtypes[i]:
                    dtype = _view_dtype(dtypes[i], dtype)
                self.offsets.append(offset)
                self.shapes.append(tuple(shape))
                self.dtypes.append(np.dtype(dtype))
                self._fds.append(os.open(path, os.O_RDONLY))
                expected = offset + math.prod(shape) * np.dtype(dtype).itemsize
                size = os.fstat(self._fds[-1]).st_size
                if size < expected:  # copied or written partway: rows would be missing
                    raise ValueError(f"{path} is truncated: {size} bytes of {expected}")
        except BaseException:
            self.close()
            raise
        if len({s[0] for s in self.shapes}) > 1:
            self.close()
            raise ValueError(f"the files {self.paths} have different numbers of rows")

    def __len__(self) -> int:
        return self.shapes[0][0]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes, strict=True))

    def rows(self, indices: np.ndarray) -> list[np.ndarray]:
        """The rows ``indices`` of every file, in that order, as fresh arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        # Runs of consecutive indices: one read each (an unshuffled batch is one run).
        starts = np.flatnonzero(np.diff(indices, prepend=-2) != 1)
        ends = np.append(starts[1:], len(indices))
        arrays = []
        for fd, offset, shape, dtype in zip(
            self._fds, self.offsets, self.shapes, self.dtypes, strict=True
        ):
            out = np.empty((len(indices), *shape[1:]), dtype=dtype)
            row = out[0].nbytes if len(out) else 0
            flat = out.reshape(len(indices), -1).view(np.uint8)
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                _read_exactly(fd, flat[start:end].reshape(-1), offset + int(indices[start]) * row)
            arrays.append(out)
        return arrays

    def batches(self, order: tf.data.Dataset, y: tf.Tensor) -> tf.data.Dataset:
        """``(features_batch, y_batch)`` for each index batch of ``order``, read from the files.

        One file gives a tensor per batch, several a tuple (as in-memory features do).
        """
        import tensorflow as tf

        specs = [(tf.as_dtype(d), s[1:]) for d, s in zip(self.dtypes, self.shapes, strict=True)]

        def read(index):
            # (batch,) int64 -> per file (batch, *row) and y (batch, ...)
            arrays = tf.numpy_function(
                self.rows, [index], [dtype for dtype, _ in specs], stateful=False
            )
            for array, (_, row) in zip(arrays, specs, strict=True):
                array.set_shape((None, *row))
            features = arrays[0] if len(arrays) == 1 else tuple(arrays)
            return features, tf.gather(y, index)

        return order.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )

    def close(self) -> None:
        """Close the files; then remove what was temporary."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()


def temporary_features(
    frozen: keras.Model, input_batches: tf.data.Dataset, n: int, *, name: str
) -> StoredFeatures:
    """`write_outputs` into a temporary directory of this run, removed by `StoredFeatures.close`.

    The directory is under ``$TMPDIR`` (``/tmp``); a failure removes it at once.
    """
    directory = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{name}-"))
    try:
        dtypes = write_outputs(frozen, input_batches, n, directory)
        paths = [directory / f"{i}.npy" for i in range(len(dtypes))]
        stored = StoredFeatures(
            paths, dtypes, cleanup=lambda: shutil.rmtree(directory, ignore_errors=True)
        )
    except OSError as err:  # a full disk, a size limit
        shutil.rmtree(directory, ignore_errors=True)
        raise TrainingError(
            f"Could not write the {name} split's frozen features to {directory} "
            f"({err.strerror or err}): free space there or set TMPDIR to a larger disk, "
            "or raise train.feature_memory_mb to keep them in memory."
        ) from err
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    logger.info("Wrote %.1f MB of %s features to %s", stored.nbytes / 1e6, name, directory)
    return stored


def _read_exactly(fd: int, buffer: np.ndarray, offset: int) -> None:
    """Fill ``buffer`` (bytes) from ``fd`` at ``offset``; a short read continues."""
    view = memoryview(buffer)
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError(f"feature file ended at byte {offset}; it is truncated")
        view, offset = view[got:], offset + got


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, list | tuple) else [outputs]


def _numpy_dtype(name: str):
    """A Keras dtype name as NumPy's (bfloat16 through ml_dtypes)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return getattr(ml_dtypes, name)


def _view_dtype(name: str, stored: np.dtype):
    """The dtype a file of ``stored`` (e.g. uint16) stands for (``name``, e.g. bfloat16)."""
    dtype = np.dtype(_numpy_dtype(name))
    if dtype.itemsize != stored.itemsize:
        raise ValueError(f"a file of {stored} cannot hold {name}")
    return dtype
