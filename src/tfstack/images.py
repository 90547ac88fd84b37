"""Image files decoded batch by batch in tf.data, with the interface of the array datasets.

`ImageDataset` serves the files of one split (`tfstack.image_files.FileSplits`) with the
interface of `tfstack.datasets.ArrayDataset` (the same seeded index order, `with_inputs` for
cached features): its inputs are paths, read and decoded inside `tf.data` (parallel,
deterministic, prefetched), so the images are never all in memory. Decoding follows Keras's
conventions: float32 pixels 0..255, ``image_size`` by ``interpolation``, optionally
center-cropped to the target aspect ratio first.

A damaged image fails inside TensorFlow without naming the file; `naming_unreadable_files`
turns that failure into a `DataError` naming it (by re-decoding the files to find it).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tfstack.datasets import IndexedDataset
from tfstack.errors import DataError
from tfstack.image_files import CHANNELS, ImageOptions

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)


def decode_image(path: tf.Tensor, options: ImageOptions) -> tf.Tensor:
    """Read and decode one image file: a scalar string tensor -> ``(height, width, channels)``.

    float32 pixels in 0..255 (Keras's convention). PNG (and JPEG, but for RGBA) decode straight
    to the channels of ``color_mode``, as Keras does; the others (GIF is always RGB, BMP RGB or
    RGBA, JPEG has no alpha) decode as stored and are converted, so every format works in every
    color mode (Keras refuses those combinations).
    """
    import tensorflow as tf

    raw = tf.io.read_file(path)
    channels = options.channels

    def as_stored():
        image = tf.image.decode_image(raw, channels=0, expand_animations=False)
        return _to_channels(image, channels)

    def as_asked():
        return tf.image.decode_image(raw, channels=channels, expand_animations=False)

    if channels == 3:
        image = as_asked()
    else:
        # PNG decodes to any channel count and JPEG to 1 or 3: those as asked (Keras's way).
        is_png = tf.equal(tf.strings.substr(raw, 0, 4), b"\x89PNG")
        decodes_as_asked = is_png
        if channels == 1:
            is_jpeg = tf.equal(tf.strings.substr(raw, 0, 2), b"\xff\xd8")
            decodes_as_asked = tf.logical_or(is_png, is_jpeg)
        image = tf.cond(decodes_as_asked, as_asked, as_stored)
    image.set_shape((None, None, channels))
    if options.crop_to_aspect_ratio:
        image = _center_crop(image, options.image_size)
    # Resizing gives float32 (nearest keeps uint8): float32 0..255 either way.
    image = tf.image.resize(image, options.image_size, method=options.interpolation)
    image = tf.cast(image, tf.float32)
    image.set_shape(options.shape)
    return image


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """(h, w, 1..4) uint8 -> (h, w, channels): gray <-> RGB, alpha dropped or made opaque."""
    import tensorflow as tf

    stored = tf.shape(image)[-1]
    gray = image[..., :1]
    rgb = tf.cond(stored >= 3, lambda: image[..., :3], lambda: tf.repeat(gray, 3, axis=-1))
    if channels == 3:
        return rgb
    if channels == 1:
        return tf.cond(stored >= 3, lambda: tf.image.rgb_to_grayscale(rgb), lambda: gray)
    # 2 or 4 channels stored: the last is alpha.
    opaque = tf.fill(tf.shape(gray), tf.constant(255, image.dtype))
    alpha = tf.cond(stored % 2 == 0, lambda: image[..., -1:], lambda: opaque)
    return tf.concat([rgb, alpha], axis=-1)


def _center_crop(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """The largest centered window of ``image`` with the aspect ratio of ``size``.

    The window arithmetic is Keras's (``smart_resize``): truncated to whole pixels, at least
    one pixel, so cropped images equal ``image_dataset_from_directory``'s.
    """
    import tensorflow as tf

    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    target_height, target_width = size
    crop_height = tf.cast(tf.cast(width * target_height, tf.float32) / target_width, tf.int32)
    crop_width = tf.cast(tf.cast(height * target_width, tf.float32) / target_height, tf.int32)
    crop_height = tf.maximum(tf.minimum(height, crop_height), 1)
    crop_width = tf.maximum(tf.minimum(width, crop_width), 1)
    top = tf.cast(tf.cast(height - crop_height, tf.float32) / 2, tf.int32)
    left = tf.cast(tf.cast(width - crop_width, tf.float32) / 2, tf.int32)
    return image[top : top + crop_height, left : left + crop_width, :]


class ImageDataset(IndexedDataset):
    """Image files served as decoded batches in the seeded order of an `IndexedDataset`.

    Same interface as `tfstack.datasets.ArrayDataset`: ``len``, `steps`, `batches`, `with_inputs`,
    `set_epoch`, ``y``. The pipeline holds paths; each file is read and decoded when its batch
    is made (`decode_image`, ``num_parallel_calls=AUTOTUNE``, deterministic, prefetched), so
    memory holds a few batches, never the dataset. `with_inputs` gathers precomputed features
    (e.g. of `input_batches`) by the same index order, so a cached frozen phase sees the
    batches the uncached one would.

    Args:
        files: One image path per sample.
        y: Targets, one per file.
        options: How files are decoded (`ImageOptions`).
        batch_size, shuffle, seed, epoch_seeded: As for `tfstack.datasets.ArrayDataset`.

    Raises:
        DataError: ``files`` and ``y`` differ in length, or ``batch_size`` is not positive.

    Example:
        >>> from tfstack.images import ImageDataset
        >>> from tfstack.image_files import ImageOptions, find_image_folder
        >>> splits = find_image_folder("images", test_fraction=0.2)
        >>> data = ImageDataset(splits.train_files, splits.y_train, ImageOptions((64, 64)),
        ...                     batch_size=32, shuffle=True, seed=0, epoch_seeded=True)
    """

    def __init__(
        self,
        files: Sequence[str],
        y: np.ndarray,
        options: ImageOptions,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch_seeded: bool = False,
    ):
        import tensorflow as tf

        super().__init__(
            len(files),
            y,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch_seeded=epoch_seeded,
        )
        self.files = list(files)
        self.options = options
        self._paths = tf.constant(self.files, dtype=tf.string)

    def _make_batches(self) -> tf.data.Dataset:
        import tensorflow as tf

        from tfstack.datasets import shard_by_data

        paths, y, options = self._paths, self._y, self.options

        def load(index):
            # () int64 -> (height, width, channels) float32, ()
            return decode_image(tf.gather(paths, index), options), tf.gather(y, index)

        # The same index stream as the order's batches (the index batches of `with_inputs`),
        # decoded one file per parallel call and batched again at the same boundaries.
        decoded = self._indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return shard_by_data(decoded.batch(self.batch_size).prefetch(tf.data.AUTOTUNE))

    def input_batches(self) -> tf.data.Dataset:
        """The decoded images alone, in input order, in batches of ``batch_size``."""
        import tensorflow as tf

        options = self.options
        decoded = tf.data.Dataset.from_tensor_slices(self._paths).map(
            lambda path: decode_image(path, options),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return decoded.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def sample(self, limit: int) -> np.ndarray:
        """The first ``limit`` decoded images in input order, as one array (for range checks)."""
        batches = -(-limit // self.batch_size)
        with naming_unreadable_files(self):
            arrays = [b.numpy() for b in self.input_batches().take(batches)]
        return np.concatenate(arrays)[:limit]

    def find_unreadable(self) -> tuple[str, str] | None:
        """The first file that cannot be read or decoded, and TensorFlow's reason; or None.

        Decodes every file once (in parallel, dropping failures) and looks for the gap, then
        decodes that one file again for the reason.
        """
        import tensorflow as tf

        paths, options = self._paths, self.options
        # A value of the pixels (not the static shape), so the decoding cannot be optimized away.
        decoded = (
            tf.data.Dataset.range(len(self.files))
            .map(
                lambda i: (i, tf.reduce_sum(decode_image(tf.gather(paths, i), options))),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            .ignore_errors()
        )
        readable = {int(i) for i, _ in decoded.as_numpy_iterator()}
        for index, path in enumerate(self.files):
            if index not in readable:
                try:
                    decode_image(tf.constant(path), options)
                except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
                    return path, _reason(err.message)
                return path, "it fails to decode inside tf.data"
        return None


def _reason(message: str) -> str:
    """TensorFlow's error message without its op and node decorations."""
    text = re.sub(r"\{\{[^}]*\}\}", "", message.strip().splitlines()[0])
    return re.sub(r"\s*\[Op:.*$", "", text).strip() or "unreadable"


@contextlib.contextmanager
def naming_unreadable_files(*datasets: Any) -> Iterator[None]:
    """Turn TensorFlow's decoding failure of an image into a `DataError` naming the file.

    TensorFlow reports a damaged image as ``Invalid PNG data`` from inside the input pipeline,
    without the file. On such an error, the `ImageDataset` s among ``datasets`` are searched for
    the file that fails (`ImageDataset.find_unreadable`); other errors pass unchanged.

    Raises:
        DataError: A file of one of the datasets cannot be read or decoded.
    """
    import tensorflow as tf

    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
        for dataset in datasets:
            if isinstance(dataset, ImageDataset):
                found = dataset.find_unreadable()
                if found:
                    path, reason = found
                    raise DataError(
                        f"cannot decode {path} ({reason}): the file is damaged, truncated or "
                        "not a PNG/JPEG/GIF/BMP image. Replace it, or remove it."
                    ) from err
        raise


def check_fits(options: ImageOptions, input_shape: Sequence[int | None], *, model: str) -> None:
    """The decoded images must have the model input's size and channels.

    Args:
        options: The decoding options.
        input_shape: The model's input shape without the batch, e.g. ``(224, 224, 3)``.
        model: What the model is called in messages (e.g. the base's config key and path).

    Raises:
        DataError: The rank is not 3, the channels differ (naming ``data.color_mode``), or the
            size differs (naming ``data.image_size``).
    """
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise DataError(
            f"{model} takes inputs of shape {shape}, not images (height, width, channels); use "
            "a base that takes images, or data=npz with arrays of that shape."
        )
    if shape[-1] is not None and shape[-1] != options.channels:
        fit = [mode for mode, n in CHANNELS.items() if n == shape[-1]]
        how = f"set data.color_mode={fit[0]}" if fit else "use a base that takes 1, 3 or 4"
        raise DataError(
            f"data.color_mode={options.color_mode} gives {options.channels} channels, but "
            f"{model} takes {shape[-1]} (input {shape}): {how}."
        )
    size = shape[:2]
    if any(s is not None and s != t for s, t in zip(size, options.image_size, strict=True)):
        raise DataError(
            f"data.image_size={list(options.image_size)} gives images of {options.image_size}, "
            f"but {model} takes {size} (input {shape}): set data.image_size="
            f"[{size[0]}, {size[1]}], or null for the base's own size."
        )


__all__ = [
    "ImageDataset",
    "check_fits",
    "decode_image",
    "naming_unreadable_files",
]
