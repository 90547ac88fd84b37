"""Samples served as batched, prefetched tf.data pipelines in one shared, seeded order.

`IndexedDataset` is the interface the phase loop and the frozen-feature cache rely on: a seeded
index order (`sample_order`, optionally a function of the epoch, for exact resume), batches of
the samples, and `with_inputs` to serve precomputed features of the same samples in the same
order. `ArrayDataset` serves in-memory arrays (and `make_dataset`, its ``(x, y)`` view);
`tfstack.images.ImageDataset` serves image files decoded batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tfstack.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)


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
    `tfstack.epoch_callbacks.EpochOrder` that the phase loop attaches): a run resumed at epoch
    ``k`` sees exactly the order an uninterrupted run saw at epoch ``k``, however many epochs
    (or iterators) came before.

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
                (e.g. a feature extractor's outputs for `input_batches`); or those rows in
                files (`tfstack.feature_streaming.StoredFeatures`), read batch by batch.

        Returns:
            A dataset of ``(inputs_batch, y_batch)``; a list of arrays gives a tuple of batches.

        Raises:
            DataError: an array does not have one row per sample.
        """
        import tensorflow as tf

        if hasattr(inputs, "batches") and hasattr(inputs, "rows"):
            # Features in files (tfstack.feature_streaming.StoredFeatures): each index batch
            # of the shared order is read from them, so they never are all in memory.
            if len(inputs) != self._n:
                raise DataError(
                    f"inputs have {len(inputs)} rows but the dataset has {self._n} samples; "
                    "give one row per sample, in the order of x."
                )
            return shard_by_data(inputs.batches(self._order, self._y))
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
