"""How to read frozen features back from disk for a shuffled head fit: throughput and peak RSS.

    .venv/bin/python benchmarks/feature_streaming.py            # 20,000 x 2048 float32, 3 epochs
    .venv/bin/python benchmarks/feature_streaming.py --quick    # 5,000 rows, 1 epoch

Issue 16 point 2 ("np.memmap, TFRecord or tf.data.Dataset.save; measure and pick"). The same
features (random float32 rows, written once) train the same Dense head (2048 -> 10 softmax,
batch 64, Adam) for the same epochs, each way in a fresh process, so that its peak RSS
(``VmHWM``) is its own:

- ``memory``: today's in-memory path (`IndexedDataset.with_inputs` of an array: tensors, gathered
  by the shared shuffled index order);
- ``pread``: `tfstack.feature_streaming.StoredFeatures` on an ``.npy`` file: each index batch of
  the same order read with ``os.preadv`` into fresh buffers (what tfstack streams with);
- ``memmap``: the same order gathered from ``np.load(mmap_mode="r")`` (pages touched stay in
  the process's RSS);
- ``dataset.save``: ``tf.data.Dataset.save`` of the rows, then ``load().shuffle(n)``: a saved
  dataset is read sequentially, so the shuffled order needs a shuffle buffer of every row
  (all in memory), and it is not the shared order;
- ``dataset.save, buffer 1024``: the same with a 1,024-row buffer (bounded memory; only a local
  shuffle, not the shared order).

Printed: samples/s of the fit (epochs x rows / seconds of ``fit``) and the peak RSS growth over
the RSS just before the features are opened. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WAYS = ("memory", "pread", "memmap", "dataset.save", "dataset.save, buffer 1024")
FEATURES = 2048
CLASSES = 10
BATCH = 64
SEED = 0


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def prepare(folder: Path, n: int) -> None:
    """``features.npy``, ``labels.npy`` and ``saved/`` (``tf.data.Dataset.save`` of the rows)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(SEED)
    features = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=np.float32, shape=(n, FEATURES)
    )
    for start in range(0, n, 1000):
        features[start : start + 1000] = rng.normal(size=(min(1000, n - start), FEATURES))
    features.flush()
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    np.save(folder / "labels.npy", labels)
    rows = tf.data.Dataset.from_tensor_slices((features, labels))
    rows.save(str(folder / "saved"))


def worker(way: str, folder: Path, epochs: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from tfstack.datasets import ArrayDataset

    keras.utils.set_random_seed(SEED)
    head = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(CLASSES, activation="softmax")]
    )
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    labels = np.load(folder / "labels.npy")
    n = len(labels)
    order = ArrayDataset(
        np.zeros((n, 1), np.float32), labels, batch_size=BATCH, shuffle=True, seed=SEED,
        epoch_seeded=True,
    )  # fmt: skip
    before = _status_kb("VmRSS")
    stored = None
    if way == "memory":
        batches = order.with_inputs(np.load(folder / "features.npy"))
    elif way == "pread":
        from tfstack.feature_streaming import StoredFeatures

        stored = StoredFeatures([folder / "features.npy"])
        batches = order.with_inputs(stored)
    elif way == "memmap":
        mapped = np.load(folder / "features.npy", mmap_mode="r")

        def rows(index):
            return np.asarray(mapped[np.sort(index)])[np.argsort(np.argsort(index))]

        def read(index):
            x = tf.numpy_function(rows, [index], tf.float32, stateful=False)
            x.set_shape((None, FEATURES))
            return x, tf.gather(order._y, index)

        batches = order._order.map(read, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    else:
        buffer = n if way == "dataset.save" else 1024
        loaded = tf.data.Dataset.load(str(folder / "saved"))
        batches = (
            loaded.shuffle(buffer, seed=SEED, reshuffle_each_iteration=True)
            .batch(BATCH)
            .prefetch(tf.data.AUTOTUNE)
        )
    start = time.perf_counter()
    history = head.fit(batches, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    if stored is not None:
        stored.close()
    return {
        "way": way,
        "samples_per_s": n * epochs / seconds,
        "seconds": seconds,
        "growth_mb": (_status_kb("VmHWM") - before) / 1024,
        "peak_mb": _status_kb("VmHWM") / 1024,
        "loss": history.history["loss"][-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 rows, 1 epoch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.folder, args.epochs)))
        return 0
    from bench import machine

    n, epochs = (5_000, 1) if args.quick else (20_000, args.epochs)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="tfstack-feature-streaming-") as tmp:
        folder = Path(tmp)
        prepare(folder, n)
        rows = []
        for way in WAYS:
            command = [sys.executable, __file__, "--worker", way, "--folder", str(folder)]
            done = subprocess.run(
                [*command, "--epochs", str(epochs)], capture_output=True, text=True, timeout=900
            )
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"{way} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
    print(
        f"machine: {info['nproc']} cores, {info['cpu']}, {info['ram_gb']} GB RAM; TensorFlow "
        f"{info['tensorflow']}, Keras {info['keras']}; load average at start "
        f"{info['load_average_1min_at_start']:.2f}"
    )
    print(
        f"{n} x {FEATURES} float32 features ({n * FEATURES * 4 / 2**20:.0f} MB), a Dense head, "
        f"batch {BATCH}, {epochs} epochs, shuffled; each way in a fresh process"
    )
    print(f"{'way':<27} {'samples/s':>10} {'RSS growth MB':>14} {'peak MB':>8}")
    for row in rows:
        print(
            f"{row['way']:<27} {row['samples_per_s']:>10.0f} {row['growth_mb']:>14.0f} "
            f"{row['peak_mb']:>8.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
