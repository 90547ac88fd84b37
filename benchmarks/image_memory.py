"""Peak memory and images/s of a frozen phase on an image folder at 1x, 4x and 16x its size.

    .venv/bin/python benchmarks/image_memory.py            # 1250, 5000, 20000 images (~5 min)
    .venv/bin/python benchmarks/image_memory.py --quick    # 250, 1000, 4000 images, 1 epoch
                                                           # (as long: 27 processes' start-up)

It writes 32x32 RGB PNGs in 5 class folders (``train/<class>/``, in a temporary folder) and, for
each size, trains the same stacked model with a frozen base, each way in a fresh subprocess so
that its peak RSS (``VmHWM``) is its own:

- tfstack: the library's path for ``data=images``: `tfstack.image_files.find_image_folder`,
  `tfstack.images.ImageDataset` (files decoded in tf.data) and `tfstack.run_schedule` with
  ``cache_frozen=True``, which runs the frozen base once over the files and trains the head on
  the cached features (N x feature_dim floats, the only part that grows with the data);
- plain Keras: ``keras.utils.image_dataset_from_directory`` and ``fit`` of the same model with
  ``base.trainable = False``, for the same epochs and batch size;
- ``tfstack run`` (the whole pipeline, as a user runs it: ``data=images``, the same components
  as ``.keras`` files, ``preprocess=rescale``, an sqlite MLflow store): its peak RSS (the
  child's ``ru_maxrss``, from ``os.wait4``) and the images/s of its phase (``phases.json``),
  so that anything the pipeline adds around the library (file hashes, range checks,
  evaluation, tracking) would show if it grew with the data.

The components are a small conv base (3 conv layers, global pooling to 64 features) and a
dense head, with a Rescaling(1/255) in front: the question is the input pipeline's memory, so
the model stays small enough that decoding the files is most of the work, and 2 shared cores
run the whole benchmark in minutes (a MobileNetV2 would add the same fixed weights to both sides
and multiply the plain side's time by its forward pass each epoch).

Issue 16 (h) adds, on the same folders: each tfstack way cached (``cache_frozen`` on; ``tfstack
run`` with an empty shared cache of its own, so a miss that writes the entry) and uncached
(``train.cache_frozen=off``: the base runs on every batch of every epoch), and a second base,
``unpooled``, whose features are the last conv layer's 4x4x128 map (8 kB per image, 164 MB at
20,000 images), the size at which holding them shows in the RSS. Its cached ways run with
``train.feature_memory_mb`` at twice its 1x features (so 1x keeps them in memory and 4x and 16x
stream them from disk, `tfstack.feature_streaming`), and once without a budget (in memory) for
comparison. The (h) table prints peak RSS and images/s of every way at 1x, 4x and 16x;
``--ways NAME ...`` runs only those (and prints their JSON).

Printed per size: peak RSS, RSS growth from just before the data is read to the peak, images/s
(training images x epochs / seconds of listing the files and training: ``find_image_folder`` +
``run_schedule``, ``image_dataset_from_directory`` + ``fit``; for ``tfstack run``, of its
phase), and the ratios; beside
them the size of the cached features and of the decoded images as float32 (what a loader
holding them would need). Nothing here asserts; it prints what it measured.
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

SEED = 42
IMAGE_SIZE = (32, 32)
CLASSES = ["apple", "bear", "car", "dog", "egg"]
FEATURES = 64
UNPOOLED = (4, 4, 128)  # the unpooled base's feature map: 8 kB per image
FACTORS = (1, 4, 16)
BASES = ("pooled", "unpooled")
STREAMED = "budget"  # the unpooled base's streaming budget, set from the sizes in main()
# Each way: a worker process of this script (library, keras) or the CLI (cli, `tfstack run`).
WAYS = {
    "tfstack": {"way": "library", "base": "pooled", "cached": True, "memory_mb": None},
    "keras": {"way": "keras", "base": "pooled", "cached": False, "memory_mb": None},
    "tfstack run": {"way": "cli", "base": "pooled", "cached": True, "memory_mb": None},
    "library uncached": {"way": "library", "base": "pooled", "cached": False, "memory_mb": None},
    "run uncached": {"way": "cli", "base": "pooled", "cached": False, "memory_mb": None},
    "unpooled library streamed": {
        "way": "library", "base": "unpooled", "cached": True, "memory_mb": STREAMED,
    },
    "unpooled library in memory": {
        "way": "library", "base": "unpooled", "cached": True, "memory_mb": None,
    },
    "unpooled run streamed": {
        "way": "cli", "base": "unpooled", "cached": True, "memory_mb": STREAMED,
    },
    "unpooled run uncached": {
        "way": "cli", "base": "unpooled", "cached": False, "memory_mb": None,
    },
}  # fmt: skip
RUN_TIMEOUT_S = 900

# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------


def write_images(folder: Path, per_class: int) -> None:
    """``per_class`` 32x32 RGB PNGs in each class folder of ``folder/train/``.

    Each class has its own mean colour plus noise, so the head has something to learn; the
    files are incompressible enough (about 3 KB each) that decoding is real work.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    for index, name in enumerate(CLASSES):
        target = folder / "train" / name
        target.mkdir(parents=True)
        mean = np.array([40 + 40 * index, 200 - 30 * index, 128], dtype=np.float32)
        for i in range(per_class):
            pixels = mean + rng.normal(0, 40, size=(*IMAGE_SIZE, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            image.save(target / f"{i:05d}.png")


def link_subset(source: Path, folder: Path, per_class: int) -> None:
    """A smaller copy of ``source`` as hard links: the first ``per_class`` files of each class.

    Beside ``train/``, ``val/`` and ``test/`` get 2 files per class, as the layout of
    `tfstack.image_files.find_image_folder` wants; only ``train/`` is trained on, both ways.
    """
    for split, first, count in (("train", 0, per_class), ("val", 0, 2), ("test", 2, 2)):
        for name in CLASSES:
            target = folder / split / name
            target.mkdir(parents=True)
            for path in sorted((source / "train" / name).iterdir())[first : first + count]:
                os.link(path, target / path.name)


# ---------------------------------------------------------------------------------------------
# One run, in a fresh process
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (``VmRSS`` now, ``VmHWM`` the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def components(base_kind: str = "pooled"):
    """The frozen base (32x32x3 -> features) and the head (features -> 5 classes), seeded.

    ``pooled``: 64 features (global pooling); ``unpooled``: the last conv layer's 4x4x128 map
    (2,048 floats, 8 kB per image), which the head flattens.
    """
    import keras

    keras.utils.set_random_seed(SEED)
    layers = keras.layers
    if base_kind == "pooled":
        top = [
            layers.Conv2D(FEATURES, 3, activation="relu", name="conv3"),
            layers.GlobalAveragePooling2D(name="pool"),  # (batch, 4, 4, 64) -> (batch, 64)
        ]
        head_layers = [keras.Input((FEATURES,))]
    else:
        top = [layers.Conv2D(UNPOOLED[-1], 3, activation="relu", name="conv3")]  # (b, 4, 4, 128)
        head_layers = [keras.Input(UNPOOLED), layers.Flatten(name="flatten")]  # -> (b, 2048)
    base = keras.Sequential(
        [
            keras.Input((*IMAGE_SIZE, 3)),
            layers.Conv2D(16, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(32, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            *top,
        ],
        name="base",
    )
    head = keras.Sequential(
        [*head_layers, layers.Dense(len(CLASSES), activation="softmax")], name="head"
    )
    rescale = keras.Sequential(
        [keras.Input((*IMAGE_SIZE, 3)), layers.Rescaling(1 / 255, name="rescale")],
        name="preprocess",
    )
    return rescale, base, head


def feature_floats(base_kind: str) -> int:
    return FEATURES if base_kind == "pooled" else UNPOOLED[0] * UNPOOLED[1] * UNPOOLED[2]


def run_tfstack(folder: Path, epochs: int, batch_size: int, spec: dict) -> dict:
    """The library's frozen phase on the folder (cached or not): seconds of `run_schedule`."""
    from tfstack import FreezePolicy, build_stacked, make_schedule, run_schedule
    from tfstack.image_files import ImageOptions, find_image_folder
    from tfstack.images import ImageDataset

    rescale, base, head = components(spec["base"])
    model = build_stacked("sequential", base, head, front=[rescale]).model
    phases = make_schedule(
        "single", epochs=epochs, lr=1e-3, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    before_data = _status_kb("VmRSS")
    start = time.perf_counter()
    splits = find_image_folder(folder, seed=SEED)  # train/, and the small val/ and test/
    data = ImageDataset(
        splits.train_files,
        splits.y_train,
        ImageOptions(IMAGE_SIZE),
        batch_size=batch_size,
        shuffle=True,
        seed=SEED,
        epoch_seeded=True,
    )
    results = run_schedule(
        model,
        phases,
        data,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        feature_extractors=["base"],
        cache_frozen=spec["cached"],
        feature_memory_mb=spec["memory_mb"],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    return {
        "n": len(splits.train_files),
        "seconds": seconds,
        "before_data_kb": before_data,
        "cached": results[0].cached,
        "cache_note": results[0].cache_note,
        "streamed": "streamed from disk" in results[0].cache_note,
        "accuracy": results[0].history["accuracy"][-1],
    }


def run_keras(folder: Path, epochs: int, batch_size: int, spec: dict) -> dict:
    """``image_dataset_from_directory`` and ``fit`` with the base frozen: seconds of both."""
    import keras
    import tensorflow as tf

    rescale, base, head = components(spec["base"])
    base.trainable = False
    model = keras.Sequential([keras.Input((*IMAGE_SIZE, 3)), rescale, base, head], name="stacked")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    before_data = _status_kb("VmRSS")
    start = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        folder / "train",
        image_size=IMAGE_SIZE,
        batch_size=batch_size,
        seed=SEED,
        verbose=False,
    )
    n = len(dataset.file_paths)
    history = model.fit(dataset.prefetch(tf.data.AUTOTUNE), epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    return {
        "n": n,
        "seconds": seconds,
        "before_data_kb": before_data,
        "accuracy": history.history["accuracy"][-1],
    }


def worker(spec: dict, folder: Path, epochs: int, batch_size: int) -> None:
    """Run one way in this process and print its measurements as one JSON line."""
    if spec["way"] == "components":
        save_components(folder)
        return
    run = run_tfstack if spec["way"] == "library" else run_keras
    row = run(folder, epochs, batch_size, spec)
    row["peak_kb"] = _status_kb("VmHWM")
    row["images_per_s"] = row["n"] * epochs / row["seconds"]
    print("RESULT " + json.dumps(row))


def measure(spec: dict, folder: Path, epochs: int, batch_size: int) -> dict:
    """One run in a fresh interpreter (so the peak RSS is this run's alone)."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec), "--folder", str(folder)]
    command += ["--epochs", str(epochs), "--batch-size", str(batch_size)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{spec} on {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    row = json.loads(lines[-1].removeprefix("RESULT "))
    row["process_seconds"] = time.perf_counter() - started
    return row


def save_components(project: Path) -> None:
    """``base-<kind>.keras`` and ``head-<kind>.keras`` of both bases (the CLI loads files)."""
    for kind in BASES:
        _, base, head = components(kind)
        base.save(project / f"base-{kind}.keras")
        head.save(project / f"head-{kind}.keras")


def make_project(where: Path) -> Path:
    """A folder with the project's conf/ and the components, for ``tfstack run``."""
    import shutil

    project = where / "project"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", project / "conf")
    spec = json.dumps({"way": "components"})
    command = [sys.executable, __file__, "--worker", spec, "--folder", str(project)]
    subprocess.run(command, check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
    return project


def measure_cli(project: Path, folder: Path, epochs: int, batch_size: int, spec: dict) -> dict:
    """``tfstack run`` on the folder in ``project``: the child's peak RSS and its phase's speed.

    Cached, its features go to a shared cache in ``project`` (empty for each run: a miss).
    """
    import shutil

    name = f"{folder.name}-{spec['base']}-{'cached' if spec['cached'] else 'uncached'}"
    out = project / f"outputs-{name}"
    cache_dir = project / f"feature-cache-{name}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    kind = spec["base"]
    overrides = [
        "data=images",
        f"data.path={folder}",
        f"components.base.path={project / f'base-{kind}.keras'}",
        f"components.head.path={project / f'head-{kind}.keras'}",
        f"train.cache_frozen={'auto' if spec['cached'] else 'off'}",
        f"train.feature_cache_dir={cache_dir}",
        f"train.feature_memory_mb={spec['memory_mb'] if spec['memory_mb'] is not None else 1e9}",
        "preprocess=rescale",
        "freeze=frozen",
        "schedule=single",
        f"train.epochs={epochs}",
        f"train.batch_size={batch_size}",
        "train.verbose=0",
        f"output_dir={out}",
        f"tracking.uri=sqlite:///{project / 'mlflow.db'}",
        "tracking.log_model=false",  # the model's size does not depend on the data's
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["TFSTACK_TRACKING_URI"] = ""
    started = time.perf_counter()
    with open(project / f"run-{name}.log", "w") as log:
        child = subprocess.Popen(
            [str(Path(sys.executable).parent / "tfstack"), "run", *overrides],
            cwd=project,
            env={**env, "DVC_NO_ANALYTICS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        text = (project / f"run-{name}.log").read_text()
        raise RuntimeError(f"tfstack run on {folder} failed ({child.returncode}):\n{text[-3000:]}")
    (phase,) = json.loads((out / "train" / "phases.json").read_text())
    n = sum(1 for _ in (folder / "train").rglob("*.png"))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "n": n,
        "seconds": phase["seconds"],
        "cached": phase["cached"],
        "streamed": "streamed from disk" in (phase.get("cache_note") or ""),
        "peak_kb": usage.ru_maxrss,  # kB on Linux
        "images_per_s": n * epochs / phase["seconds"],
        "process_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _mb(kb: float) -> float:
    return kb / 1024


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['nproc']} cores, {m['cpu']}, {m['ram_gb']} GB RAM; Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}; load average at start "
        f"{m['load_average_1min_at_start']:.2f}",
        f"frozen phase, {results['epochs']} epochs, batch {results['batch_size']}, "
        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} RGB PNGs in {len(CLASSES)} classes; each run in a fresh "
        "process. RSS in MB: peak = the process's peak RSS; growth = peak - RSS just before the "
        "data is read",
        "",
        f"{'':>4} {'images':>6} {'decoded':>7} {'features':>8} | {'tfstack library':^20} | "
        f"{'plain Keras':^20} | {'tfstack run':^12} | {'library/Keras':^13}",
        f"{'':>4} {'':>6} {'MB':>7} {'MB':>8} | {'peak':>6} {'growth':>6} {'img/s':>6} | "
        f"{'peak':>6} {'growth':>6} {'img/s':>6} | {'peak':>5} {'img/s':>6} | "
        f"{'peak':>5} {'img/s':>7}",
    ]
    for size, row in results["sizes"].items():
        t, k, c = row["tfstack"], row["keras"], row["tfstack run"]
        lines.append(
            f"{size:>4} {row['n']:>6} {row['decoded_mb']:>7.1f} {row['features_mb']:>8.1f} | "
            f"{_mb(t['peak_kb']):>6.0f} {_mb(t['peak_kb'] - t['before_data_kb']):>6.0f} "
            f"{t['images_per_s']:>6.0f} | "
            f"{_mb(k['peak_kb']):>6.0f} {_mb(k['peak_kb'] - k['before_data_kb']):>6.0f} "
            f"{k['images_per_s']:>6.0f} | "
            f"{_mb(c['peak_kb']):>5.0f} {c['images_per_s']:>6.0f} | "
            f"{t['peak_kb'] / k['peak_kb']:>5.2f} {t['images_per_s'] / k['images_per_s']:>6.2f}x"
        )
    rows = list(results["sizes"].values())  # smallest first
    first, last = rows[0], rows[-1]
    lines.append("")
    lines.append(
        f"from {first['n']} to {last['n']} images the decoded images grow by "
        f"{last['decoded_mb'] - first['decoded_mb']:.0f} MB and the cached features by "
        f"{last['features_mb'] - first['features_mb']:.1f} MB; the peak RSS grows by:"
    )
    for way in ("tfstack", "keras", "tfstack run"):
        grew = _mb(last[way]["peak_kb"] - first[way]["peak_kb"])
        lines.append(
            f"  {way:<12} {_mb(first[way]['peak_kb']):5.0f} -> {_mb(last[way]['peak_kb']):5.0f} "
            f"MB ({grew:+.0f} MB, {1024 * grew / (last['n'] - first['n']):.2f} kB per image)"
        )
    cached = {row[way]["cached"] for row in rows for way in ("tfstack", "tfstack run")}
    lines.append(
        "decoded = N x 32 x 32 x 3 float32 (what holding the images would take); features = "
        "N x 64 float32 (the tfstack cache); img/s = training images x epochs / seconds of "
        "listing the files and training (library: find_image_folder + run_schedule; Keras: "
        "image_dataset_from_directory + fit) or of the run's phase (phases.json, listing not "
        "included)" + ("" if cached == {True} else "   WARNING: a tfstack phase was not cached")
    )
    return "\n".join(lines)


def report_h(results: dict) -> str:
    """(h): peak RSS (MB) and images/s per way and size, cached and uncached, both bases."""
    sizes = results["sizes"]
    budget = results["streaming_budget_mb"]
    lines = [
        "(h) peak RSS MB / images per s; cached = cache_frozen=auto (the library without a "
        "shared cache, tfstack run with an empty one: a miss), uncached = cache_frozen=off; "
        f"streamed = train.feature_memory_mb={budget:g} (the unpooled base's features stream "
        "from disk above it), in memory = no budget"
    ]
    for kind, label in (("pooled", "64 floats"), ("unpooled", "4x4x128 = 8 kB")):
        names = [name for name, spec in WAYS.items() if spec["base"] == kind]
        floats = feature_floats(kind)
        lines += ["", f"base {kind} ({label} per image)"]
        header = f"{'':>4} {'images':>6} {'features MB':>11}"
        for name in names:
            header += f" | {name.removeprefix('unpooled '):>20}"
        lines.append(header)
        for size, row in sizes.items():
            text = f"{size:>4} {row['n']:>6} {row['n'] * floats * 4 / 1e6:>11.1f}"
            for name in names:
                r = row[name]
                mark = "(s)" if r.get("streamed") else ""
                text += f" | {_mb(r['peak_kb']):>8.0f} {r['images_per_s']:>7.0f} {mark:>3}"
            lines.append(text)
        first, last = list(sizes.values())[0], list(sizes.values())[-1]
        grown = ", ".join(
            f"{name.removeprefix('unpooled ')} "
            f"{_mb(last[name]['peak_kb'] - first[name]['peak_kb']):+.0f}"
            for name in names
        )
        lines.append(f"peak RSS growth 1x -> 16x, MB: {grown}; (s): streamed from disk")
    not_cached = [
        f"{size} {name}"
        for size, row in sizes.items()
        for name, spec in WAYS.items()
        if spec["cached"] and spec["way"] != "keras" and not row[name]["cached"]
    ]
    if not_cached:
        lines.append(f"WARNING: not cached: {', '.join(not_cached)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5x fewer images and 1 epoch")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--ways", nargs="*", help="only these ways (no tables)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a way's spec, as JSON
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.folder, args.epochs, args.batch_size)
        return 0

    from bench import machine  # benchmarks/ is this script's folder, first on sys.path

    epochs = 1 if args.quick else args.epochs
    per_class = 50 if args.quick else 250  # 1x: 250 or 1250 images
    # Twice the unpooled features at 1x: 1x holds them in memory, 4x and 16x stream.
    budget = round(2 * per_class * len(CLASSES) * feature_floats("unpooled") * 4 / 1e6, 1)
    results: dict = {
        "streaming_budget_mb": budget,
        "machine": machine(),
        "command": " ".join(sys.argv),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "sizes": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tfstack-image-memory-") as tmp:
        tmp = Path(tmp)
        largest = max(FACTORS)
        print(f"writing {largest * per_class * len(CLASSES)} PNGs ...", flush=True)
        write_images(tmp / "written", largest * per_class)
        project = make_project(tmp)
        for factor in FACTORS:
            folder = tmp / f"{factor}x"
            link_subset(tmp / "written", folder, factor * per_class)
            n = factor * per_class * len(CLASSES)
            row: dict = {
                "n": n,
                "decoded_mb": n * IMAGE_SIZE[0] * IMAGE_SIZE[1] * 3 * 4 / 2**20,
                "features_mb": n * FEATURES * 4 / 2**20,
            }
            for name, spec in WAYS.items():
                if args.ways and name not in args.ways:
                    continue
                print(f"{factor}x ({n} images): {name} ...", flush=True)
                if spec["memory_mb"] == STREAMED:
                    spec = {**spec, "memory_mb": budget}
                if spec["way"] == "cli":
                    row[name] = measure_cli(project, folder, epochs, args.batch_size, spec)
                else:
                    row[name] = measure(spec, folder, epochs, args.batch_size)
            results["sizes"][f"{factor}x"] = row
    results["bench_seconds"] = time.perf_counter() - started
    print()
    if not args.ways:
        print(report(results))
        print()
        print(report_h(results))
    else:
        print(json.dumps(results["sizes"], indent=1))
    print(f"\n(benchmark took {results['bench_seconds']:.0f} s: {results['command']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
