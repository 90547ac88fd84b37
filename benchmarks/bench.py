"""tfstack against plain Keras on this machine: ratios measured side by side in one run.

    .venv/bin/python benchmarks/bench.py            # or: make bench
    .venv/bin/python benchmarks/bench.py --quick    # fewer repeats and epochs, to try it out

Sections (see README, "Performance"):
  (a) frozen-phase throughput, tfstack with frozen-feature caching vs a plain Keras ``fit`` of the
      same stacked model with a frozen base: the demo (digits 8x8) and a MobileNetV2 base at
      96x96 (``weights=None``, synthetic data);
  (b) joint-training samples/s, tfstack's fit path vs a hand-written ``model.fit``;
  (c) per-epoch tracking (EpochLogger on sqlite) as a share of training wall time, per mode;
  (d) the default pipeline end to end, ``dvc repro`` and ``tfstack run`` in a scratch copy, split
      into start-up/import, data, model I/O, training, checkpoints, evaluation, tracking, other;
  (e) training time at 1x, 2x, 4x the demo's training set: frozen-cached, frozen-plain, joint;
  plus the input pipeline (epoch iteration, cores busy) and import times of the entry points.

Variants compared with each other run interleaved in one process, each on a fresh model, and the
median of the repeats is reported. Nothing here asserts a time; it prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PROJECT_FILES = ["conf", "data", "data.dvc", "dvc.yaml", "params.yaml", "MLproject", "src"]
SEED = 42
LOSS = "sparse_categorical_crossentropy"
METRICS = ["accuracy"]
# EpochLogger settings compared in (c); the pipeline uses one of them
# (tfstack.pipeline.stages.EPOCH_LOGGING).
LOGGING_MODES = {
    "per epoch, synchronous": {"synchronous": True, "min_interval_s": 0.0},
    "per epoch, asynchronous": {"synchronous": False, "min_interval_s": 0.0},
    "every 5 s, synchronous": {"synchronous": True, "min_interval_s": 5.0},
    "every 5 s, asynchronous": {"synchronous": False, "min_interval_s": 5.0},
}
CATEGORIES = [
    "startup",
    "import",
    "data",
    "model_io",
    "training",
    "checkpoint",
    "evaluation",
    "tracking",
    "other",
    "exit",
]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def measure(function: Callable[[], object]) -> dict:
    """Wall seconds and busy cores (process CPU seconds / wall seconds) of one call."""
    cpu_before, start = os.times(), time.perf_counter()
    function()
    wall = time.perf_counter() - start
    cpu_after = os.times()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {"seconds": wall, "cores": cpu / wall}


def side_by_side(
    variants: dict[str, Callable[[], Callable[[], object]]], repeats: int, *, warmup: bool = True
) -> dict:
    """Run each variant ``repeats`` times, interleaved (rotating the order); best run of each.

    Each variant is a factory: it prepares a fresh model (not timed) and returns the call to time.
    With ``warmup``, the first variant runs once untimed first (process-wide first-use costs).
    The best (shortest) run is reported: on a shared machine other processes only ever add time.
    """
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    if warmup:
        variants[names[0]]()()
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            call = variants[name]()
            runs[name].append(measure(call))
            getattr(call, "after", lambda: None)()  # untimed clean-up, before the next run
    out = {}
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        out[name] = {
            "seconds": best["seconds"],
            "cores": best["cores"],
            "median_seconds": statistics.median(r["seconds"] for r in rs),
            "all_seconds": [round(r["seconds"], 3) for r in rs],
        }
    return out


def machine() -> dict:
    """nproc, CPU model, RAM and the versions that matter."""
    import importlib.metadata as md

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
    versions = {p: md.version(p) for p in ("tensorflow", "keras", "mlflow", "dvc")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "load_average_1min_at_start": load,
        **versions,
    }


# ---------------------------------------------------------------------------------------------
# The scratch project and the pipeline (d)
# ---------------------------------------------------------------------------------------------


def _sh(cwd: Path, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_project(where: Path) -> Path:
    """A git + DVC copy of the project as a fresh clone has it: default config, no outputs."""
    project = where / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, project / name)
    shutil.copy2(ROOT / ".gitignore", project / ".gitignore")
    env = _env(project)
    _sh(project, "git", "init", "-q", env=env)
    _sh(project, "git", "config", "user.email", "bench@example.com", env=env)
    _sh(project, "git", "config", "user.name", "bench", env=env)
    _sh(project, "dvc", "init", "-q", env=env)
    shutil.copy2(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    _sh(project, "dvc", "commit", "-q", "-f", "data.dvc", env=env)
    _sh(project, "git", "add", "-A", env=env)
    _sh(project, "git", "commit", "-q", "-m", "bench copy", env=env)
    return project


def _env(project: Path, profile: Path | None = None) -> dict:
    """PATH with the profiling ``tfstack`` first, then this venv; no inherited tracking URIs."""
    env = dict(os.environ)
    shim_bin = project.parent / "bin"
    env["PATH"] = f"{shim_bin}:{VENV_BIN}:{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in ("TFSTACK_TRACKING_URI", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(name, None)
    if profile is not None:
        env["TFSTACK_BENCH_PROFILE"] = str(profile)
    return env


def write_profiling_command(where: Path) -> None:
    """``bin/tfstack``: the real CLI under stage_profile.py, stamped with its launch time."""
    shim_bin = where / "bin"
    shim_bin.mkdir(exist_ok=True)
    script = shim_bin / "tfstack"
    script.write_text(
        "#!/bin/sh\n"
        'TFSTACK_BENCH_T0="$(date +%s.%N)"; export TFSTACK_BENCH_T0\n'
        f'"{sys.executable}" "{Path(__file__).with_name("stage_profile.py")}" "$@"\n'
        "status=$?\n"
        'if [ -n "$TFSTACK_BENCH_PROFILE" ]; then\n'
        '  echo "{\\"launched\\": $TFSTACK_BENCH_T0, \\"exited\\": $(date +%s.%N)}" '
        '>> "$TFSTACK_BENCH_PROFILE.exits"\n'
        "fi\n"
        'exit "$status"\n'
    )
    script.chmod(0o755)


def _profiles(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage_seconds(project: Path) -> dict[str, float]:
    """The stage_seconds_* metrics of the latest run in the copy's store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tfstack")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    metrics = runs[0].data.metrics
    return {k: round(v, 2) for k, v in metrics.items() if k.startswith("stage_seconds_")}


def pipeline_section(project: Path) -> dict:
    """(d) ``dvc repro`` then ``tfstack run`` (default config), each profiled per process."""
    out: dict = {}
    for label, command in (("dvc repro", ["dvc", "repro"]), ("tfstack run", ["tfstack", "run"])):
        profile = project.parent / f"profile_{label.replace(' ', '_')}.jsonl"
        start = time.perf_counter()
        _sh(project, *command, env=_env(project, profile))
        wall = time.perf_counter() - start
        processes = _profiles(profile)
        exited = {r["launched"]: r["exited"] for r in _profiles(Path(f"{profile}.exits"))}
        totals = {c: 0.0 for c in CATEGORIES}
        for record in processes:
            # The interpreter's exit, after the last atexit handler (TensorFlow's teardown).
            record["seconds"]["exit"] = exited[record["launched"]] - record["launched"]
            record["seconds"]["exit"] -= record["wall"]
            record["wall"] += record["seconds"]["exit"]
            for category, seconds in record["seconds"].items():
                totals[category] = totals.get(category, 0.0) + seconds
        accounted = sum(r["wall"] for r in processes)
        out[label] = {
            "wall": wall,
            "outside_tfstack": wall - accounted,  # DVC itself: hashing, locks, checks
            "categories": totals,
            "processes": [
                {"command": " ".join(r["command"]), "wall": r["wall"], **r["seconds"]}
                for r in processes
            ],
            "stage_seconds": _stage_seconds(project),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Models and data for the in-process sections
# ---------------------------------------------------------------------------------------------


class Workload:
    """A stacked model recipe and its data, run the tfstack way or the plain Keras way."""

    def __init__(self, name, build, feature_extractors, x, y, x_val, y_val, *, batch_size, lr):
        self.name = name
        self.build = build  # () -> stacked keras model, freshly initialised
        self.feature_extractors = feature_extractors
        self.x, self.y, self.x_val, self.y_val = x, y, x_val, y_val
        self.batch_size = batch_size
        self.lr = lr

    def with_train(self, x, y) -> Workload:
        return Workload(
            self.name,
            self.build,
            self.feature_extractors,
            x,
            y,
            self.x_val,
            self.y_val,
            batch_size=self.batch_size,
            lr=self.lr,
        )

    def tfstack(self, policy: str, epochs: int, *, cache: bool, callbacks=()):
        """tfstack's fit path: ArrayDataset, freeze policy, fresh optimizer, fit_phase.

        The training data is epoch-seeded, as in the pipeline (``pipeline.train``; `fit_phase`
        sets each epoch's order); the pipeline's per-epoch checkpoints and tracking are not
        included (see (c) and (d)).
        """
        from tfstack.datasets import ArrayDataset
        from tfstack.freezing import FreezePolicy
        from tfstack.schedules import Phase
        from tfstack.training import fit_phase

        model = self._fresh()
        batch = self.batch_size
        train = ArrayDataset(
            self.x, self.y, batch_size=batch, shuffle=True, seed=SEED, epoch_seeded=True
        )
        val = ArrayDataset(self.x_val, self.y_val, batch_size=batch, shuffle=False, seed=0)
        phase = Phase("train", epochs, FreezePolicy(policy), self.lr)
        made = list(callbacks() if callable(callbacks) else callbacks)

        def run():
            result = fit_phase(
                model,
                phase,
                train,
                val,
                loss=LOSS,
                metrics=METRICS,
                feature_extractors=self.feature_extractors,
                callbacks=made,
                verbose=0,
                cache_frozen=cache,
            )
            assert result.cached == cache or policy != "frozen", result.cache_note

        return run

    def keras(self, epochs: int, *, freeze_base: bool):
        """The hand-written way: trainable flags, compile, ``fit`` on the arrays."""
        import keras

        model = self._fresh()

        def run():
            for name in self.feature_extractors:
                model.get_layer(name).trainable = not freeze_base
            model.compile(optimizer=keras.optimizers.Adam(self.lr), loss=LOSS, metrics=METRICS)
            model.fit(
                self.x,
                self.y,
                batch_size=self.batch_size,
                epochs=epochs,
                validation_data=(self.x_val, self.y_val),
                shuffle=True,
                verbose=0,
            )

        return run

    def _fresh(self):
        import keras

        keras.utils.set_random_seed(SEED)
        return self.build()


def demo_workload(project: Path) -> Workload:
    """The default pipeline's model and data: the pretrained demo components, stacked."""
    from tfstack.components import load_component
    from tfstack.data import load_npz
    from tfstack.stacking import build_stacked

    pretrain = project / "outputs" / "pretrain"
    splits = load_npz(project / "outputs/prepare/target.npz", val_fraction=0.2, seed=SEED)
    # The PNGs' uint8 pixels, scaled as the pipeline's preprocess=rescale does (no Rescaling
    # layer here: both sides of the comparison train the same bare stacked model).
    for name in ("x_train", "x_val", "x_test"):
        setattr(splits, name, getattr(splits, name).astype("float32") / 255)

    def build():
        base = load_component(str(pretrain / "base.keras"), name="base", key="components.base")
        head = load_component(str(pretrain / "head.keras"), name="head", key="components.head")
        return build_stacked("sequential", base, head).model

    workload = Workload(
        "demo (digits 8x8)",
        build,
        ["base"],
        splits.x_train,
        splits.y_train,
        splits.x_val,
        splits.y_val,
        batch_size=16,
        lr=0.01,
    )
    workload.pool = (  # more target-task images for (e): train first, then test
        _concat(splits.x_train, splits.x_test),
        _concat(splits.y_train, splits.y_test),
    )
    return workload


def _concat(a, b):
    import numpy as np

    return np.concatenate([a, b])


def mobilenet_workload(n_train: int, n_val: int) -> Workload:
    """MobileNetV2 (weights=None, 96x96, average pooling) and a 10-class head; synthetic data."""
    import keras
    import numpy as np

    from tfstack.stacking import build_stacked

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_train + n_val, 96, 96, 3)).astype("float32")
    y = rng.integers(0, 10, size=n_train + n_val).astype("int64")

    def build():
        base = keras.applications.MobileNetV2(
            weights=None, include_top=False, pooling="avg", input_shape=(96, 96, 3)
        )
        base.name = "base"
        head = keras.Sequential(
            [keras.Input((1280,)), keras.layers.Dense(10, activation="softmax", name="classifier")],
            name="head",
        )
        return build_stacked("sequential", base, head).model

    return Workload(
        "MobileNetV2 96x96",
        build,
        ["base"],
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        batch_size=16,
        lr=0.001,
    )


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def frozen_section(workload: Workload, epochs: int, repeats: int) -> dict:
    """(a) samples/s of a frozen phase: tfstack cached, tfstack uncached, plain Keras."""
    timings = side_by_side(
        {
            "tfstack cached": lambda: workload.tfstack("frozen", epochs, cache=True),
            "tfstack uncached": lambda: workload.tfstack("frozen", epochs, cache=False),
            "keras plain": lambda: workload.keras(epochs, freeze_base=True),
        },
        repeats,
    )  # the cheapest variant first: it is the warm-up
    samples = len(workload.x) * epochs
    for timing in timings.values():
        timing["samples_per_s"] = samples / timing["seconds"]
    return {"epochs": epochs, "n_train": len(workload.x), "timings": timings}


def joint_section(workload: Workload, epochs: int, repeats: int, warmup: bool = True) -> dict:
    """(b) samples/s of joint training: tfstack's fit path vs a hand-written ``model.fit``."""
    timings = side_by_side(
        {
            "tfstack": lambda: workload.tfstack("joint", epochs, cache=True),
            "keras": lambda: workload.keras(epochs, freeze_base=False),
        },
        repeats,
        warmup=warmup,
    )
    samples = len(workload.x) * epochs
    for timing in timings.values():
        timing["samples_per_s"] = samples / timing["seconds"]
    return {"epochs": epochs, "n_train": len(workload.x), "timings": timings}


class _CallbackClock:
    """Wall time spent inside an EpochLogger's callbacks (the training thread's share)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, logger):
        for name in ("on_train_begin", "on_epoch_end", "on_train_end"):
            method = getattr(logger, name)

            def timed(*args, _method=method, **kwargs):
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(logger, name, timed)
        return logger


def tracking_section(workload: Workload, epochs: int, repeats: int, store: Path) -> dict:
    """(c) the default pipeline's training phase with each EpochLogger mode vs no tracking."""
    from tfstack import tracking
    from tfstack.pipeline.stages import EPOCH_LOGGING

    uri = f"sqlite:///{store}"
    modes = LOGGING_MODES
    clocks: dict[str, list[_CallbackClock]] = {mode: [] for mode in modes}
    deferred: dict[str, list[float]] = {mode: [] for mode in modes}

    def with_logger(mode):
        def factory():
            run_id = tracking.start_run(uri, "bench")
            clock = _CallbackClock()
            clocks[mode].append(clock)
            logger = tracking.EpochLogger(run_id, "train", phase_index=0, **modes[mode])
            run = workload.tfstack("frozen", epochs, cache=True, callbacks=[clock.wrap(logger)])

            def after():
                # What the stage's end waits for: writes queued and not awaited in training.
                start = time.perf_counter()
                tracking.end_run(run_id, "FINISHED")
                deferred[mode].append(time.perf_counter() - start)

            run.after = after
            return run

        return factory

    variants = {"no tracking": lambda: workload.tfstack("frozen", epochs, cache=True)}
    variants.update({mode: with_logger(mode) for mode in modes})
    timings = side_by_side(variants, repeats)
    base = timings["no tracking"]["seconds"]
    pipeline_mode = next(mode for mode, kwargs in modes.items() if kwargs == EPOCH_LOGGING)
    out = {"epochs": epochs, "pipeline_mode": pipeline_mode, "modes": {}}
    for mode in modes:
        walls = timings[mode]["all_seconds"]
        shares = [c.seconds / (w - c.seconds) for c, w in zip(clocks[mode], walls, strict=True)]
        out["modes"][mode] = {
            "seconds": timings[mode]["seconds"],
            "all_seconds": walls,
            "share_wall": (timings[mode]["seconds"] - base) / base,
            "share_in_callbacks": statistics.median(shares),
            "end_of_run_seconds": statistics.median(deferred[mode]),
        }
    out["no_tracking_seconds"] = base
    out["no_tracking_all_seconds"] = timings["no tracking"]["all_seconds"]
    return out


def scaling_section(workload: Workload, epochs: int, repeats: int) -> dict:
    """(e) seconds for 1x, 2x, 4x the demo's training set, per way of training."""
    x_pool, y_pool = workload.pool
    n = len(workload.x)
    out = {}
    for factor in (1, 2, 4):
        sized = workload.with_train(x_pool[: n * factor], y_pool[: n * factor])
        timings = side_by_side(
            {
                "frozen cached": lambda sized=sized: sized.tfstack("frozen", epochs, cache=True),
                "frozen plain": lambda sized=sized: sized.keras(epochs, freeze_base=True),
                "joint": lambda sized=sized: sized.tfstack("joint", epochs, cache=True),
            },
            repeats,
        )
        out[f"{factor}x"] = {"n_train": n * factor, **{k: v["seconds"] for k, v in timings.items()}}
    return {"epochs": epochs, "sizes": out}


def legacy_dataset(x, y, batch_size: int, seed: int):
    """make_dataset before ArrayDataset: shuffle the (x, y) samples themselves."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _iterate(dataset, epochs: int):
    def run():
        for _ in range(epochs):
            for _batch in dataset:
                pass

    return run


def _iterate_epoch_seeded(data, epochs: int):
    dataset = data.batches()

    def run():
        for epoch in range(epochs):
            data.set_epoch(epoch)
            for _batch in dataset:
                pass

    return run


def input_pipeline_section(workloads: list[Workload], repeats: int, epochs: int = 20) -> dict:
    """Seconds to iterate one training epoch: shuffled samples (before) vs gathered indices."""
    from tfstack.datasets import ArrayDataset, make_dataset

    out = {}
    for w in workloads:
        variants = {
            "before (shuffle samples)": lambda w=w: _iterate(
                legacy_dataset(w.x, w.y, w.batch_size, SEED), epochs
            ),
            "ArrayDataset": lambda w=w: _iterate(
                make_dataset(w.x, w.y, batch_size=w.batch_size, shuffle=True, seed=SEED), epochs
            ),
            "ArrayDataset epoch-seeded": lambda w=w: _iterate_epoch_seeded(
                ArrayDataset(
                    w.x, w.y, batch_size=w.batch_size, shuffle=True, seed=SEED, epoch_seeded=True
                ),
                epochs,
            ),
        }
        timings = side_by_side(variants, repeats)
        out[w.name] = {k: v["seconds"] / epochs for k, v in timings.items()}
    return out


def imports_section() -> dict:
    """Fresh-process wall time of the entry points, and whether TensorFlow was imported."""
    probes = {
        "tfstack --help": [str(VENV_BIN / "tfstack"), "--help"],
        "compose + validate config": [
            sys.executable,
            "-c",
            "import sys; from tfstack.pipeline.compose import compose; "
            f"compose([], config_dir={str(ROOT / 'conf')!r}); "
            "print('tensorflow' in sys.modules)",
        ],
        "import tfstack.training (TF, Keras)": [sys.executable, "-c", "import tfstack.training"],
        "import tfstack.tracking (+ MLflow)": [sys.executable, "-c", "import tfstack.tracking"],
    }
    out = {}
    for name, command in probes.items():
        walls, stdout = [], ""
        for _ in range(2):
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            walls.append(time.perf_counter() - start)
            stdout = result.stdout.strip()
        out[name] = {"seconds": min(walls)}
        if stdout in ("True", "False"):
            out[name]["imports_tensorflow"] = stdout == "True"
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _verdict(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return "met" if met else "MISSED"


def report(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(
        f"machine: {m['nproc']} cores, {m['cpu']}, {m['ram_gb']} GB RAM; Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, MLflow {m['mlflow']}, DVC {m['dvc']}; "
        f"load average at start {m['load_average_1min_at_start']:.2f}"
    )
    lines.append("")
    lines.append(
        "(a) frozen phase, samples/s (best of interleaved repeats; cores = CPU s / wall s)"
    )
    for key in ("frozen_demo", "frozen_mobilenet"):
        section = results[key]
        t = section["timings"]
        lines.append(
            f"  {section['name']}: {section['n_train']} samples x {section['epochs']} epochs"
        )
        for variant, timing in t.items():
            lines.append(
                f"    {variant:<18} {timing['samples_per_s']:9.1f} samples/s  "
                f"{timing['seconds']:7.2f} s  cores {timing['cores']:.2f}"
            )
        ratio = t["tfstack cached"]["samples_per_s"] / t["keras plain"]["samples_per_s"]
        uncached = t["tfstack uncached"]["samples_per_s"] / t["keras plain"]["samples_per_s"]
        section["ratio"] = ratio
        lines.append(
            f"    cached / plain Keras = {ratio:.2f}x  (target >= 5x: {_verdict(ratio, 5, True)}); "
            f"uncached / plain Keras = {uncached:.2f}x"
        )
    lines.append("")
    lines.append("(b) joint training, samples/s")
    for key in ("joint_demo", "joint_mobilenet"):
        section = results[key]
        t = section["timings"]
        ratio = t["tfstack"]["samples_per_s"] / t["keras"]["samples_per_s"]
        section["ratio"] = ratio
        lines.append(
            f"  {section['name']} ({section['n_train']} x {section['epochs']} epochs): tfstack "
            f"{t['tfstack']['samples_per_s']:.1f}, keras {t['keras']['samples_per_s']:.1f} -> "
            f"ratio {ratio:.3f}  (target >= 0.95: {_verdict(ratio, 0.95, True)})"
        )
    lines.append("")
    c = results["tracking"]
    lines.append(
        f"(c) per-epoch tracking on the demo's frozen phase ({c['epochs']} epochs, "
        f"{c['no_tracking_seconds']:.2f} s untracked), share of training wall time"
    )
    for mode, row in c["modes"].items():
        chosen = "  <- the pipeline's setting" if mode == c["pipeline_mode"] else ""
        lines.append(
            f"  {mode:<26} wall {100 * row['share_wall']:+6.1f}%   in callbacks "
            f"{100 * row['share_in_callbacks']:5.1f}%   end of run "
            f"{1000 * row['end_of_run_seconds']:5.0f} ms{chosen}"
        )
    chosen = c["modes"][c["pipeline_mode"]]
    lines.append(
        f"  pipeline setting: {100 * chosen['share_in_callbacks']:.1f}% of training time spent in "
        f"its callbacks (target <= 3%: {_verdict(chosen['share_in_callbacks'], 0.03, False)}); "
        f"best-run wall difference {100 * chosen['share_wall']:+.1f}% (other processes' noise "
        f"included); {1000 * chosen['end_of_run_seconds']:.0f} ms waited for when the run ends"
    )
    if "pipeline" in results:
        lines.append("")
        lines.append("(d) default pipeline end to end (seconds, summed over processes)")
        header = "".join(f"{c[:9]:>10}" for c in CATEGORIES)
        lines.append(f"  {'':<14}{'wall':>8}{'DVC':>8}{header}")
        for label, row in results["pipeline"].items():
            cats = "".join(f"{row['categories'].get(c, 0.0):10.2f}" for c in CATEGORIES)
            lines.append(f"  {label:<14}{row['wall']:8.2f}{row['outside_tfstack']:8.2f}{cats}")
            for process in row["processes"]:
                cats = "".join(f"{process.get(c, 0.0):10.2f}" for c in CATEGORIES)
                lines.append(f"    {process['command']:<12}{process['wall']:8.2f}{'':>8}{cats}")
            lines.append(f"    MLflow stage_seconds: {row['stage_seconds']}")
        run = results["pipeline"]["tfstack run"]["categories"]
        share = run["tracking"] / run["training"]
        lines.append(
            f"  tfstack run: tracking (run, params, artifacts, model) {run['tracking']:.2f} s = "
            f"{100 * share:.0f}% of training {run['training']:.2f} s"
        )
    lines.append("")
    e = results["scaling"]
    lines.append(f"(e) training seconds by training-set size ({e['epochs']} epochs; x = vs 1x)")
    one = e["sizes"]["1x"]
    for size, row in e["sizes"].items():
        cells = "  ".join(
            f"{k} {row[k]:6.2f} s ({row[k] / one[k]:.2f}x)"
            for k in ("frozen cached", "frozen plain", "joint")
        )
        lines.append(f"  {size} n={row['n_train']:<4} {cells}")
    lines.append("")
    lines.append("input pipeline: seconds per training epoch (iteration only)")
    for name, row in results["input_pipeline"].items():
        cells = "  ".join(f"{k} {1000 * v:.2f} ms" for k, v in row.items())
        lines.append(f"  {name}: {cells}")
    lines.append("")
    lines.append("entry points, fresh process (min of 2)")
    for name, row in results["imports"].items():
        extra = (
            f"  (imports TensorFlow: {row['imports_tensorflow']})"
            if "imports_tensorflow" in row
            else ""
        )
        lines.append(f"  {name:<38} {row['seconds']:6.2f} s{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs")
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out (d)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    repeats, epochs = (1, 5) if args.quick else (3, 30)

    results: dict = {"machine": machine(), "command": " ".join(sys.argv)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tfstack-bench-") as tmp:
        tmp = Path(tmp)
        write_profiling_command(tmp)
        project = make_project(tmp)
        if args.skip_pipeline:
            _sh(project, "dvc", "repro", "pretrain", env=_env(project))
        else:
            print("(d) dvc repro, then tfstack run, in a scratch copy ...", flush=True)
            results["pipeline"] = pipeline_section(project)
        results["imports"] = imports_section()

        from tfstack.pipeline.inputs import seed_everything

        seed_everything(SEED, deterministic=True)  # as the pipeline's train stage does
        demo = demo_workload(project)
        mobilenet = mobilenet_workload(n_train=64 if args.quick else 256, n_val=64)
        mobilenet_joint = mobilenet_workload(n_train=32 if args.quick else 64, n_val=16)

        print("(a) frozen phase ...", flush=True)
        results["frozen_demo"] = {"name": demo.name, **frozen_section(demo, epochs, repeats)}
        results["frozen_mobilenet"] = {
            "name": mobilenet.name,
            **frozen_section(mobilenet, 3 if args.quick else 30, 1 if args.quick else 2),
        }
        print("(b) joint training ...", flush=True)
        results["joint_demo"] = {"name": demo.name, **joint_section(demo, epochs, repeats + 2)}
        results["joint_mobilenet"] = {
            "name": mobilenet_joint.name,
            **joint_section(
                mobilenet_joint, 1 if args.quick else 2, 1 if args.quick else 4, warmup=True
            ),
        }
        print("(c) tracking ...", flush=True)
        results["tracking"] = tracking_section(demo, epochs, repeats + 2, tmp / "bench.db")
        print("(e) scaling ...", flush=True)
        results["scaling"] = scaling_section(demo, epochs, 1 if args.quick else 3)
        print("input pipeline ...", flush=True)
        results["input_pipeline"] = input_pipeline_section([demo, mobilenet], repeats)
    results["bench_seconds"] = time.perf_counter() - started
    text = report(results)
    print()
    print(text)
    print(f"\n(benchmark took {results['bench_seconds']:.0f} s: {results['command']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
