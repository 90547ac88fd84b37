"""What tfstack's reliability features cost, measured side by side in one run.

    .venv/bin/python benchmarks/reliability.py            # or --quick

Sections:
  (a) the non-finite-loss check: none, at epoch end only, after every batch synchronously (what
      keras.callbacks.TerminateOnNaN does), after every batch on Keras's callback thread
      (``async_safe``, what tfstack's StopOnNonFiniteLoss does); joint training of the demo's
      stacked model on the source task (1,300 images, batch 16: 80 steps per epoch);
  (b) the per-epoch checkpoint (tfstack.epoch_callbacks.EpochCheckpoint): time per write and as a
      share of the epoch, for the demo model and a MobileNetV2 base (weights=None, 96x96);
  (c) how long ``tfstack run tracking.uri=http://127.0.0.1:9`` (nothing listening) takes to fail.

Variants compared with each other run interleaved, on fresh models, and the median of the
repeats is reported. Nothing here asserts a time; it prints what it measured.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]


def _nan_checks():
    import keras

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if not math.isfinite(float(logs["loss"])):
                raise RuntimeError("nan")

    class PerBatchSync(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if not math.isfinite(float(logs["loss"])):
                raise RuntimeError("nan")

    class PerBatchAsync(PerBatchSync):
        async_safe = True

    from tfstack.epoch_callbacks import StopOnNonFiniteLoss

    return {
        "none": lambda: [],
        "epoch end": lambda: [EpochEnd()],
        "per batch, sync": lambda: [PerBatchSync()],
        "per batch, async": lambda: [PerBatchAsync()],
        "StopOnNonFiniteLoss": lambda: [StopOnNonFiniteLoss("bench")],
    }


def _demo_model_and_data(seed: int = 0):
    import keras

    from tfstack.pipeline import demo

    keras.utils.set_random_seed(seed)
    base, head, _ = demo.build_components(seed)
    image = keras.Input(demo.IMAGE_SHAPE)
    model = keras.Model(image, head(base(image)))
    pixels, digits = demo.read_raw_digits(ROOT / "data" / demo.RAW_DIR)
    keep = digits < 5
    x = (pixels[keep].astype("float32") / 255)[..., None]
    return model, x[:1280], digits[keep][:1280].astype("int64")


def bench_nan_check(repeats: int, epochs: int) -> None:
    import keras

    from tfstack.datasets import ArrayDataset

    checks = _nan_checks()
    times: dict[str, list[float]] = {name: [] for name in checks}
    for _ in range(repeats):
        for name, make in checks.items():
            model, x, y = _demo_model_and_data()
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
            data = ArrayDataset(x, y, batch_size=16, shuffle=True, seed=0).batches()
            model.fit(data, epochs=1, verbose=0, callbacks=make())  # warm-up: tracing
            start = time.perf_counter()
            model.fit(data, epochs=epochs, verbose=0, callbacks=make())
            times[name].append((time.perf_counter() - start) / epochs)
    base = statistics.median(times["none"])
    print(f"(a) non-finite-loss check, demo joint training, 80 steps/epoch, {repeats} repeats")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"    {name:<22} {1000 * median:7.1f} ms/epoch   x{median / base:.3f}")


def bench_checkpoint(repeats: int) -> None:
    import keras
    import numpy as np

    from tfstack import checkpoints
    from tfstack.epoch_callbacks import EpochCheckpoint

    def mobilenet():
        base = keras.applications.MobileNetV2(
            weights=None, include_top=False, pooling="avg", input_shape=(96, 96, 3)
        )
        return keras.Sequential([base, keras.layers.Dense(5, activation="softmax")])

    cases = {"demo": lambda: _demo_model_and_data()[0], "MobileNetV2 96x96": mobilenet}
    print("(b) per-epoch checkpoint write (weights + optimizer state, then state.json renamed)")
    for name, make in cases.items():
        model = make()
        model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy")
        model.optimizer.build(model.trainable_variables)
        with tempfile.TemporaryDirectory() as tmp:
            state = checkpoints.TrainingState(key="bench", run_id=None, total_epochs=repeats)
            callback = EpochCheckpoint(
                Path(tmp), model, state, phase_index=0, phase_record={"history": {}}
            )
            callback.set_model(model)
            callback.on_train_begin()
            for epoch in range(repeats):
                callback.on_epoch_end(epoch, {"loss": 1.0})
            size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        params = sum(int(np.prod(v.shape)) for v in model.variables)
        median = statistics.median(callback.write_seconds)
        print(
            f"    {name:<20} {params:>10,} model values  {size / 1e6:6.1f} MB (2 slots)  "
            f"{1000 * median:7.1f} ms per epoch"
        )


def bench_unreachable() -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    tfstack = Path(sys.executable).parent / "tfstack"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run(
            [str(tfstack), "run", "tracking.uri=http://127.0.0.1:9", f"output_dir={tmp}/out"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    print("(c) tfstack run tracking.uri=http://127.0.0.1:9 (nothing listening)")
    print(f"    exit {result.returncode} after {seconds:.1f} s (imports included)")
    print("    " + result.stderr.strip().splitlines()[-1][:160])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, epochs = (2, 2) if args.quick else (7, 5)
    bench_nan_check(repeats, epochs)
    bench_checkpoint(5 if args.quick else 10)
    bench_unreachable()


if __name__ == "__main__":
    main()
