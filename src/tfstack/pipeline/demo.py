"""The demo: a transfer task on scikit-learn's bundled 8x8 digits, and two pretrained components.

Nothing is downloaded: `sklearn.datasets.load_digits` reads a file shipped inside scikit-learn.

- `write_raw_digits` writes ``digits/<digit>/<index>.png`` (1797 8x8 grayscale PNGs in class
  folders 0..9, pixel values 0..16 stored as round(v * 255 / 16)), byte-identical on every
  machine and run.
- `make_transfer_task` splits them into a source task (digits 0-4, 80% train / 20% test) and a
  target task (digits 5-9, class names "5".."9", only a few labelled training images per
  class), each an image folder ``{train,test}/<digit>/`` that ``data=images`` reads.
- `pretrain_components` trains a small CNN on the source task and saves it as two components:
  ``base.keras`` (the feature extractor) and ``head.keras`` (the classifier), plus
  ``head_wide.keras``, a head that expects 64 features instead of 32 (a real shape mismatch).

Layers of ``base`` (input ``(None, 8, 8, 1)``, output ``(None, 32)``), in order::

    image     InputLayer          (None, 8, 8, 1)
    conv1     Conv2D 16, 3x3      (None, 8, 8, 16)
    bn1       BatchNormalization  (None, 8, 8, 16)
    relu1     ReLU                (None, 8, 8, 16)
    conv2     Conv2D 32, 3x3      (None, 8, 8, 32)   <- cut here for a 4-D feature map
    bn2       BatchNormalization  (None, 8, 8, 32)
    relu2     ReLU                (None, 8, 8, 32)
    pool      MaxPooling2D 2x2    (None, 4, 4, 32)
    flatten   Flatten             (None, 512)
    features  Dense 32, ReLU      (None, 32)

``head``: ``features_in`` InputLayer ``(None, 32)`` -> ``classifier`` Dense 5 softmax.
``head_wide``: ``features_in`` InputLayer ``(None, 64)`` -> ``classifier`` Dense 5 softmax; it was
trained on a 64-wide projection of the base features that is not shipped, so stacking it needs an
adapter (``stacking=adapter``) that learns a new ``(None, 32) -> (None, 64)`` projection.

What to expect on the target task (40 training + 10 validation images, 846 test images; base
pretrained 20 epochs; batch 16; accuracy on the test images, seeds 0-2 of the split and shuffle)::

    pretrained head as is (classes differ)                  0.19
    frozen base, head 60 epochs at lr 1e-2                  0.83-0.87
    joint from the start, 60 epochs at lr 1e-3              0.90-0.92
    two-phase: 30 epochs frozen at 1e-2, 30 joint at 1e-3   0.90-0.93
    the same CNN from scratch, 60 epochs at 1e-3            0.73-0.91

Frozen is capped by features learned for digits 0-4 (a logistic regression on them reaches 0.89);
joint adapts them but starts from a head that maps to the wrong classes; two-phase first fits
the head, then adapts the base from there. With 4 labels per class the gap to training from
scratch widens (joint 0.80-0.88 against scratch 0.68-0.82).

Command line (the data stage of the pipeline)::

    python -m tfstack.pipeline.demo write-raw data/
    python -m tfstack.pipeline.demo prepare data/digits prepared/ --seed 0
    python -m tfstack.pipeline.demo pretrain prepared/source models/ --seed 0 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tfstack.data import save_npz
from tfstack.errors import DataError, TfstackError
from tfstack.file_hashes import sha256_of
from tfstack.files import atomic_path
from tfstack.png_files import write_gray_png

logger = logging.getLogger(__name__)

RAW_DIR = "digits"
SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
SOURCE_TEST_FRACTION = 0.2
PIXEL_MAX = 16.0
IMAGE_SHAPE = (8, 8, 1)
FEATURE_SIZE = 32
WIDE_FEATURE_SIZE = 64
BASE_LAYERS = (
    "image",
    "conv1",
    "bn1",
    "relu1",
    "conv2",
    "bn2",
    "relu2",
    "pool",
    "flatten",
    "features",
)
HEAD_LAYERS = ("features_in", "classifier")


def write_raw_digits(out_dir: str | os.PathLike[str]) -> Path:
    """Write scikit-learn's bundled digits as PNG files in class folders, byte-identical every time.

    ``out_dir/digits/<digit>/<index>.png``: one 8x8 8-bit grayscale PNG per image, named by its
    index in scikit-learn's order (``0000.png`` .. ``1796.png``), in the folder of its digit.
    Pixels 0..16 are stored as ``round(v * 255 / 16)`` (0, 16, 32, ..., 239, 255), so the
    files look like ordinary images and `pixels_to_digits` gives the values back exactly. The
    files are written by `tfstack.png_files` (no compression choices, no time stamps) in sorted
    order into a fresh folder, which then replaces ``out_dir/digits`` whole.

    Args:
        out_dir: Directory to write into; created if missing.

    Returns:
        The folder written (``out_dir/digits``).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = digits.images.astype(np.uint8)  # integral pixel values 0..16 stored as float64
    if not np.array_equal(values, digits.images):
        raise DataError("scikit-learn's digits are no longer integral pixel values 0..16.")
    pixels = digits_to_pixels(values)
    folder = Path(out_dir) / RAW_DIR
    scratch = folder.with_name(f".{RAW_DIR}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    for index, (image, digit) in enumerate(zip(pixels, digits.target, strict=True)):
        (scratch / str(digit)).mkdir(parents=True, exist_ok=True)
        write_gray_png(scratch / str(digit) / f"{index:04d}.png", image)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)  # a killed write leaves the hidden scratch folder, never half of data/
    logger.info("Wrote %s (%d images, sha256 %s)", folder, len(pixels), sha256_of(folder))
    return folder


def digits_to_pixels(values: np.ndarray) -> np.ndarray:
    """Digit pixel values 0..16 -> uint8 0..255 (``round(v * 255 / 16)``), as the PNGs hold."""
    return np.round(np.asarray(values, np.float64) * 255 / PIXEL_MAX).astype(np.uint8)


def pixels_to_digits(pixels: np.ndarray) -> np.ndarray:
    """The inverse of `digits_to_pixels`: uint8 0..255 -> the original values 0..16."""
    return np.round(np.asarray(pixels, np.float64) * PIXEL_MAX / 255).astype(np.uint8)


def make_transfer_task(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    target_train_per_class: int = 10,
) -> dict[str, Any]:
    """Split the raw digit PNGs into a source task and a small-data target task.

    Both tasks are image folders of copies of the raw PNGs, read by ``data=images``:

    - ``source/{train,test}/<digit>/``: digits 0-4; 80% of each digit for training, 20% for test.
    - ``target/{train,test}/<digit>/``: digits 5-9 (class names "5".."9", ids 0-4);
      ``target_train_per_class`` training images per class, all others for test.

    ``source.npz`` and ``target.npz`` hold the same tasks as arrays (``data=npz``): uint8 images
    (n, 8, 8, 1) with pixels 0..255 as in the PNGs, int64 labels 0-4 and ``class_names``. The
    same raw folder and seed give byte-identical outputs.

    Args:
        raw_dir: The folder written by `write_raw_digits`.
        out_dir: Directory for the two tasks; created if missing.
        seed: Seed of both splits.
        target_train_per_class: Labelled training images per target class.

    Returns:
        ``{"source": Path, "target": Path, "sizes": {"source": {"train": n, "test": n},
        "target": {...}}}`` (the two image folders).

    Raises:
        DataError: The raw folder is missing or malformed, or ``target_train_per_class`` leaves
            no test images.
    """
    files, y = _raw_files(Path(raw_dir))
    rng = np.random.default_rng(seed)

    source_train, source_test = [], []
    target_train, target_test = [], []
    for digit in SOURCE_DIGITS:
        index = rng.permutation(np.flatnonzero(y == digit))
        n_test = round(SOURCE_TEST_FRACTION * len(index))
        source_test.append(index[:n_test])
        source_train.append(index[n_test:])
    for digit in TARGET_DIGITS:
        index = rng.permutation(np.flatnonzero(y == digit))
        if not 1 <= target_train_per_class < len(index):
            raise DataError(
                f"target_train_per_class must be between 1 and {len(index) - 1} (digit {digit} "
                f"has {len(index)} samples). Received: target_train_per_class="
                f"{target_train_per_class}"
            )
        target_train.append(index[:target_train_per_class])
        target_test.append(index[target_train_per_class:])

    out_dir = Path(out_dir)
    sizes: dict[str, dict[str, int]] = {}
    paths: dict[str, Path] = {}
    for name, digits, splits in (
        ("source", SOURCE_DIGITS, {"train": source_train, "test": source_test}),
        ("target", TARGET_DIGITS, {"train": target_train, "test": target_test}),
    ):
        relabel = {digit: label for label, digit in enumerate(digits)}
        folder = out_dir / name
        shutil.rmtree(folder, ignore_errors=True)
        arrays: dict[str, np.ndarray] = {"class_names": np.array([str(d) for d in digits])}
        for split, parts in splits.items():
            # Sorted indices keep scikit-learn's order inside each split: stable, easy to inspect.
            chosen = np.sort(np.concatenate(parts))
            for i in chosen:
                _copy(files[i], folder / split / str(y[i]) / files[i].name)
            pixels = np.stack([_read_png(files[i]) for i in chosen])
            arrays[f"x_{split}"] = pixels[..., np.newaxis]  # (n, 8, 8) -> (n, 8, 8, 1)
            arrays[f"y_{split}"] = np.array([relabel[d] for d in y[chosen]], dtype=np.int64)
        save_npz(out_dir / f"{name}.npz", arrays)
        paths[name] = folder
        sizes[name] = {split: len(arrays[f"y_{split}"]) for split in splits}
    logger.info("Wrote transfer task to %s: %s", out_dir, sizes)
    return {"source": paths["source"], "target": paths["target"], "sizes": sizes}


def build_components(seed: int) -> tuple[Any, Any, Any]:
    """Build the untrained ``base``, ``head`` and ``head_wide`` models (see the module docstring).

    Args:
        seed: Seed of the weight initialisation.

    Returns:
        ``(base, head, head_wide)`` as functional Keras models.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    image = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(image)  # (b, 8, 8, 16)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)  # (b, 8, 8, 32)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)  # (b, 8, 8, 32) -> (b, 4, 4, 32)
    x = layers.Flatten(name="flatten")(x)  # (b, 4, 4, 32) -> (b, 512)
    features = layers.Dense(FEATURE_SIZE, activation="relu", name="features")(x)
    base = keras.Model(image, features, name="base")

    head = _build_head(FEATURE_SIZE, "head")
    head_wide = _build_head(WIDE_FEATURE_SIZE, "head_wide")
    return base, head, head_wide


def pretrain_components(
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    epochs: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
) -> dict[str, Any]:
    """Train the CNN on the source task and save its parts as separate components.

    ``base`` and ``head`` are trained together for ``epochs`` epochs. ``head_wide`` is then
    trained for ``epochs`` epochs on top of the frozen base through a 64-wide projection
    (``proj``), which is discarded. Seeds everything and enables TensorFlow's op determinism
    (for the whole process), so a run is repeatable on one machine.

    Args:
        source_dir: The ``source`` image folder of `make_transfer_task` (its PNGs are read,
            pixels scaled to [0, 1] as the stacked model's ``preprocess=rescale`` does).
        out_dir: Directory for ``base.keras``, ``head.keras``, ``head_wide.keras``.
        seed: Seed of initialisation, shuffling and the validation split.
        epochs: Training epochs (each stage).
        batch_size: Batch size.
        learning_rate: Adam learning rate.

    Returns:
        JSON-ready dict: ``source_test_accuracy``, ``source_test_loss``,
        ``head_wide_source_test_accuracy``, ``epochs``, ``seconds``, ``paths`` (name -> str),
        ``layers`` (model name -> layer names).

    Raises:
        DataError: ``source_dir`` is missing or malformed, or ``epochs`` < 1.
    """
    import keras
    import tensorflow as tf

    from tfstack.data import split_off
    from tfstack.datasets import make_dataset

    if epochs < 1:
        raise DataError(f"epochs must be at least 1. Received: epochs={epochs}")
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    source_dir = Path(source_dir)
    x, y = _read_split(source_dir / "train")
    (x_train, y_train), (x_val, y_val) = split_off(
        x, y, fraction=0.1, seed=seed, key="val_fraction", where=f"source_dir={source_dir}"
    )
    x_test, y_test = _read_split(source_dir / "test")
    train_ds = make_dataset(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed)
    val_ds = make_dataset(x_val, y_val, batch_size=256, shuffle=False, seed=seed)
    test_ds = make_dataset(x_test, y_test, batch_size=256, shuffle=False, seed=seed)

    base, head, head_wide = build_components(seed)
    image = keras.Input(IMAGE_SHAPE, name="image")
    classifier = keras.Model(image, head(base(image)), name="source_classifier")
    _compile(classifier, learning_rate)
    classifier.fit(train_ds, validation_data=val_ds, epochs=epochs, shuffle=False, verbose=0)
    loss, accuracy = classifier.evaluate(test_ds, verbose=0)

    # head_wide learns on a 64-wide projection of the frozen base's features.
    base.trainable = False
    projection = keras.layers.Dense(WIDE_FEATURE_SIZE, activation="relu", name="proj")
    wide = keras.Model(
        image, head_wide(projection(base(image, training=False))), name="wide_classifier"
    )
    _compile(wide, learning_rate)
    wide.fit(train_ds, validation_data=val_ds, epochs=epochs, shuffle=False, verbose=0)
    _, wide_accuracy = wide.evaluate(test_ds, verbose=0)
    base.trainable = True  # saved components carry no freeze state of the demo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for model in (base, head, head_wide):
        paths[model.name] = out_dir / f"{model.name}.keras"
        with atomic_path(paths[model.name]) as tmp:  # a killed pretrain leaves no half model
            model.save(tmp)
    result = {
        "source_test_accuracy": float(accuracy),
        "source_test_loss": float(loss),
        "head_wide_source_test_accuracy": float(wide_accuracy),
        "epochs": int(epochs),
        "seconds": round(time.perf_counter() - started, 2),
        "paths": {name: str(path) for name, path in paths.items()},
        "layers": {m.name: [layer.name for layer in m.layers] for m in (base, head, head_wide)},
    }
    logger.info(
        "Pretrained on %s: source test accuracy %.3f (head_wide %.3f) in %.1fs",
        source_dir,
        accuracy,
        wide_accuracy,
        result["seconds"],
    )
    return result


def _build_head(input_size: int, name: str) -> Any:
    """A softmax classifier over ``input_size`` features: (b, input_size) -> (b, 5)."""
    import keras

    features = keras.Input((input_size,), name="features_in")
    probabilities = keras.layers.Dense(len(SOURCE_DIGITS), activation="softmax", name="classifier")
    return keras.Model(features, probabilities(features), name=name)


def _compile(model: Any, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def read_raw_digits(raw_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The raw PNGs as arrays, in scikit-learn's order: uint8 pixels (n, 8, 8), digits (n,).

    Args:
        raw_dir: The folder written by `write_raw_digits`.

    Raises:
        DataError: The folder is missing or malformed.
    """
    files, digits = _raw_files(Path(raw_dir))
    return np.stack([_read_png(path) for path in files]), digits


def _raw_files(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The raw PNGs in scikit-learn's order (by file name) and their digits (folder names)."""
    rewrite = f"Rewrite it with `python -m tfstack.pipeline.demo write-raw {folder.parent}`."
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder. {rewrite}")
    found = sorted(
        (path.name, path, int(path.parent.name))
        for path in folder.glob("[0-9]/*.png")
        if path.is_file()
    )
    if sorted({digit for _, _, digit in found}) != list(range(10)):
        raise DataError(
            f"{folder}: expected PNGs in the class folders 0..9; found "
            f"{sorted({digit for _, _, digit in found})}. {rewrite}"
        )
    return [path for _, path, _ in found], np.array([digit for _, _, digit in found])


def _read_png(path: Path) -> np.ndarray:
    """An 8x8 grayscale PNG as a uint8 (8, 8) array, with a message naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: not a readable PNG ({err}).") from err
    if pixels.shape != IMAGE_SHAPE[:2]:
        raise DataError(f"{path}: expected an 8x8 image; received {pixels.shape}.")
    return pixels


def _read_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A split of the source task: images float32 in [0, 1], (n, 8, 8, 1), and labels 0-4."""
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder; run the prepare stage first (dvc repro prepare)."
        )
    x, y = [], []
    for label, digit in enumerate(SOURCE_DIGITS):
        for path in sorted((folder / str(digit)).glob("*.png")):
            x.append(_read_png(path))
            y.append(label)
    images = np.stack(x).astype(np.float32)[..., np.newaxis] / 255.0
    return images, np.array(y, dtype=np.int64)


def _copy(source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination``: a copy, not a hard link, so that editing a prepared
    image (or DVC checking one out) never changes the raw data."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


def main(argv: list[str] | None = None) -> int:
    """Command line of the demo data stages; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m tfstack.pipeline.demo", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write_raw = commands.add_parser(
        "write-raw", help="write digits/<digit>/*.png (byte-identical every run)"
    )
    write_raw.add_argument("out_dir", type=Path)
    prepare = commands.add_parser("prepare", help="write the source and target image folders")
    prepare.add_argument("raw_dir", type=Path)
    prepare.add_argument("out_dir", type=Path)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--target-train-per-class", type=int, default=10)
    pretrain = commands.add_parser("pretrain", help="train and save base/head/head_wide .keras")
    pretrain.add_argument("source_dir", type=Path)
    pretrain.add_argument("out_dir", type=Path)
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.command == "write-raw":
            path = write_raw_digits(args.out_dir)
            print(f"{path}  sha256 {sha256_of(path)}")
        elif args.command == "prepare":
            task = make_transfer_task(
                args.raw_dir,
                args.out_dir,
                seed=args.seed,
                target_train_per_class=args.target_train_per_class,
            )
            print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in task.items()}))
        else:
            result = pretrain_components(
                args.source_dir, args.out_dir, seed=args.seed, epochs=args.epochs
            )
            print(json.dumps(result, indent=2))
    except TfstackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
