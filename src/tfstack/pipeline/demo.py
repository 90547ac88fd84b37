"""The demo: a transfer task on scikit-learn's bundled 8x8 digits, and two pretrained components.

Nothing is downloaded: `sklearn.datasets.load_digits` reads a file shipped inside scikit-learn.

- `write_raw_digits` writes ``digits.npz`` (1797 images 8x8, pixel values 0..16 as uint8, and
  labels 0..9), byte-identical on every machine and run.
- `make_transfer_task` splits it into a source task (digits 0-4, 80% train / 20% test) and a
  target task (digits 5-9 relabelled 0-4, only a few labelled training samples per class).
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
    python -m tfstack.pipeline.demo prepare data/digits.npz prepared/ --seed 0
    python -m tfstack.pipeline.demo pretrain prepared/source.npz models/ --seed 0 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tfstack.data import file_hash, save_npz
from tfstack.errors import DataError, TfstackError
from tfstack.files import atomic_path

logger = logging.getLogger(__name__)

RAW_FILE = "digits.npz"
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
    """Write scikit-learn's bundled digits as ``out_dir/digits.npz``, byte-identical every time.

    The file holds ``x`` (uint8, shape (1797, 8, 8), values 0..16) and ``y`` (int64, digits 0..9),
    in scikit-learn's order, written by `tfstack.data.save_npz` (fixed zip dates and modes,
    no compression).

    Args:
        out_dir: Directory to write into; created if missing.

    Returns:
        The path of the file written.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.uint8)  # integral pixel values 0..16 stored as float64
    if not np.array_equal(x, digits.images):
        raise DataError("scikit-learn's digits are no longer integral pixel values 0..16.")
    y = digits.target.astype(np.int64)
    path = save_npz(Path(out_dir) / RAW_FILE, {"x": x, "y": y})
    logger.info("Wrote %s (%d images, md5 %s)", path, len(x), file_hash(path))
    return path


def make_transfer_task(
    raw_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    target_train_per_class: int = 10,
) -> dict[str, Any]:
    """Split the raw digits into a source task and a small-data target task.

    - ``source.npz``: digits 0-4 with labels 0-4; 80% of each digit for training, 20% for test.
    - ``target.npz``: digits 5-9 relabelled 0-4 (5 -> 0, ..., 9 -> 4); ``target_train_per_class``
      training samples per class, all others for test.

    Images are float32 in [0, 1] with shape (8, 8, 1); labels int64. The same raw file and seed
    give byte-identical outputs.

    Args:
        raw_path: The file written by `write_raw_digits`.
        out_dir: Directory for ``source.npz`` and ``target.npz``; created if missing.
        seed: Seed of both splits.
        target_train_per_class: Labelled training samples per target class.

    Returns:
        ``{"source": Path, "target": Path, "sizes": {"source": {"train": n, "test": n},
        "target": {...}}}``.

    Raises:
        DataError: The raw file is missing or malformed, or ``target_train_per_class`` leaves
            no test samples.
    """
    x, y = _load_raw(Path(raw_path))
    images = (x.astype(np.float32) / PIXEL_MAX).reshape(
        -1, *IMAGE_SHAPE
    )  # (n, 8, 8) -> (n, 8, 8, 1)
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
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[list(SOURCE_DIGITS)] = np.arange(len(SOURCE_DIGITS))
    relabel[list(TARGET_DIGITS)] = np.arange(len(TARGET_DIGITS))
    sizes: dict[str, dict[str, int]] = {}
    paths: dict[str, Path] = {}
    for name, train_parts, test_parts in (
        ("source", source_train, source_test),
        ("target", target_train, target_test),
    ):
        # Sorted indices keep scikit-learn's order inside each split: stable and easy to inspect.
        train = np.sort(np.concatenate(train_parts))
        test = np.sort(np.concatenate(test_parts))
        paths[name] = save_npz(
            out_dir / f"{name}.npz",
            {
                "x_train": images[train],
                "y_train": relabel[y[train]],
                "x_test": images[test],
                "y_test": relabel[y[test]],
            },
        )
        sizes[name] = {"train": int(len(train)), "test": int(len(test))}
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
    source_npz: str | os.PathLike[str],
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
        source_npz: ``source.npz`` from `make_transfer_task`.
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
        DataError: ``source_npz`` is missing or malformed, or ``epochs`` < 1.
    """
    import keras
    import tensorflow as tf

    from tfstack.data import load_npz
    from tfstack.datasets import make_dataset

    if epochs < 1:
        raise DataError(f"epochs must be at least 1. Received: epochs={epochs}")
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    splits = load_npz(source_npz, val_fraction=0.1, seed=seed, key="source_npz")
    train_ds = make_dataset(
        splits.x_train, splits.y_train, batch_size=batch_size, shuffle=True, seed=seed
    )
    val_ds = make_dataset(splits.x_val, splits.y_val, batch_size=256, shuffle=False, seed=seed)
    test_ds = make_dataset(splits.x_test, splits.y_test, batch_size=256, shuffle=False, seed=seed)

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
        source_npz,
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


def _load_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x`` and ``y`` of the raw digits file, with messages that name it."""
    if not path.is_file():
        raise DataError(
            f"{path}: no such file. Write it with "
            f"`python -m tfstack.pipeline.demo write-raw {path.parent}`."
        )
    try:
        with np.load(path, allow_pickle=False) as raw:
            x, y = raw["x"], raw["y"]
    except (KeyError, ValueError, OSError, AttributeError) as err:
        raise DataError(
            f"{path}: not a raw digits file with arrays x and y ({err}). "
            f"Rewrite it with `python -m tfstack.pipeline.demo write-raw {path.parent}`."
        ) from err
    if x.shape[1:] != (8, 8) or len(x) != len(y):
        raise DataError(
            f"{path}: expected x of shape (n, 8, 8) and y of shape (n,); "
            f"received x {x.shape} and y {y.shape}."
        )
    return x, y


def main(argv: list[str] | None = None) -> int:
    """Command line of the demo data stages; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m tfstack.pipeline.demo", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write_raw = commands.add_parser("write-raw", help="write digits.npz (byte-identical every run)")
    write_raw.add_argument("out_dir", type=Path)
    prepare = commands.add_parser("prepare", help="write source.npz and target.npz")
    prepare.add_argument("raw_path", type=Path)
    prepare.add_argument("out_dir", type=Path)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--target-train-per-class", type=int, default=10)
    pretrain = commands.add_parser("pretrain", help="train and save base/head/head_wide .keras")
    pretrain.add_argument("source_npz", type=Path)
    pretrain.add_argument("out_dir", type=Path)
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.command == "write-raw":
            path = write_raw_digits(args.out_dir)
            print(f"{path}  md5 {file_hash(path)}")
        elif args.command == "prepare":
            task = make_transfer_task(
                args.raw_path,
                args.out_dir,
                seed=args.seed,
                target_train_per_class=args.target_train_per_class,
            )
            print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in task.items()}))
        else:
            result = pretrain_components(
                args.source_npz, args.out_dir, seed=args.seed, epochs=args.epochs
            )
            print(json.dumps(result, indent=2))
    except TfstackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
