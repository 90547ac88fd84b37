"""A run's fixed costs, the frozen phase against its physical limit, and XLA on this machine.

    .venv/bin/python benchmarks/fixed_costs.py            # (g), (i) and jit_compile
    .venv/bin/python benchmarks/fixed_costs.py --quick    # fewer epochs and repeats
    .venv/bin/python benchmarks/fixed_costs.py --repeats 1  # as for the README (24 min, loaded)

The case (issue 16): a MobileNetV2 base (alpha 0.35, 32x32, ``weights=None``) saved as a
``.keras`` component, a dense head, 1,400 samples in an ``.npz`` (20% of them validation),
20 epochs, ``freeze=frozen``, tracking to sqlite in the scratch copy.

  (g) the frozen phase against its physical limit, in one process: t(phase) /
      (t(one ``predict`` of the frozen part over train and validation) + t(fitting the head on
      those features)), each on a fresh model, best of the repeats;
  (i) the fixed costs of ``tfstack run``: every second of the process charged to one category
      (benchmarks/stage_profile.py with ``TFSTACK_BENCH_DETAIL=1``), with the run's cuts
      (``TFSTACK_FIXED_COSTS=before`` turns them off: the run as it was) and without, side by
      side, and the same for ``dvc repro`` (each stage its own process); the metrics of both are
      compared;
  jit_compile: epoch seconds with ``train.jit_compile`` true against false (XLA), on the demo and
      on the MobileNetV2 case, on the device this runs on (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the scratch project, the profiling shim, the machine)

EPOCHS = 20
SAMPLES = 1400
TEST_SAMPLES = 350
CLASSES = 10
IMAGE = (32, 32, 3)
# The non-training categories a run pays whatever its length.
TRAINING = ("training", "checkpoint")


def write_case(where: Path) -> dict[str, Path]:
    """The MobileNetV2 base and head as .keras files, and the npz (learnable: class-shifted)."""
    import keras
    import numpy as np

    where.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        input_shape=IMAGE, alpha=0.35, include_top=False, weights=None, pooling="avg"
    )
    features = int(base.output.shape[-1])  # (batch, 1280)
    head = keras.Sequential(
        [keras.Input((features,)), keras.layers.Dense(CLASSES, activation="softmax", name="out")],
        name="case_head",
    )
    base.save(where / "base.keras")
    head.save(where / "head.keras")
    rng = np.random.default_rng(0)
    n = SAMPLES + TEST_SAMPLES
    y = rng.integers(0, CLASSES, size=n)
    x = rng.normal(size=(n, *IMAGE)).astype("float32") + (y[:, None, None, None] / CLASSES)
    np.savez(
        where / "case.npz",
        x_train=x[:SAMPLES],
        y_train=y[:SAMPLES],
        x_test=x[SAMPLES:],
        y_test=y[SAMPLES:],
    )
    return {"base": where / "base.keras", "head": where / "head.keras", "data": where / "case.npz"}


def case_overrides(files: dict[str, Path], epochs: int) -> list[str]:
    return [
        "data=npz",
        f"data.path={files['data']}",
        f"components.base.path={files['base']}",
        f"components.head.path={files['head']}",
        "preprocess=none",
        "freeze=frozen",
        f"train.epochs={epochs}",
        "train.verbose=0",
    ]


def _env(project: Path, source: Path) -> dict:
    """The profiling shim's environment, importing tfstack from ``source`` (a ``src/``)."""
    env = bench._env(project, None)
    env["TFSTACK_BENCH_DETAIL"] = "1"
    env["PYTHONPATH"] = str(source)
    return env


def before_source(ref: str, where: Path) -> Path:
    """``src/`` and ``conf/`` of the commit ``ref`` (before the cuts), from git archive."""
    import subprocess

    where.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(bench.ROOT), "archive", ref, "src", "conf"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def _profiled(project: Path, label: str, command: list[str], env: dict) -> dict:
    """Wall time of ``command`` and the per-category seconds of its tfstack processes."""
    profile = project.parent / f"profile_{label}.jsonl"
    env["TFSTACK_BENCH_PROFILE"] = str(profile)
    start = time.perf_counter()
    bench._sh(project, *command, env=env)
    wall = time.perf_counter() - start
    exited = {r["launched"]: r["exited"] for r in bench._profiles(Path(f"{profile}.exits"))}
    totals: dict[str, float] = {}
    processes = []
    for record in bench._profiles(profile):
        record["seconds"]["exit"] = exited[record["launched"]] - record["launched"] - record["wall"]
        for category, seconds in record["seconds"].items():
            totals[category] = totals.get(category, 0.0) + seconds
        processes.append(
            {"command": " ".join(record["command"]), "wall": record["wall"], **record["seconds"]}
        )
    accounted = sum(p["wall"] + p["exit"] for p in processes)
    totals["dvc"] = max(wall - accounted, 0.0)
    return {"wall": wall, "categories": totals, "processes": processes}


def _metrics(project: Path) -> dict:
    return json.loads((project / "outputs/evaluate/metrics.json").read_text())


def _run_files(project: Path) -> list[str]:
    """The files a run leaves in outputs/ (what the user sees), relative."""
    out = project / "outputs"
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def fixed_costs_section(
    tmp: Path, files: dict[str, Path], sources: dict[str, Path], epochs: int, repeats: int
) -> dict:
    """(i) ``tfstack run`` and ``dvc repro evaluate`` on the case, per source of tfstack.

    One scratch project per variant; the ``tfstack run`` repeats alternate between them and the
    shortest of each is kept (other processes only add time). Then ``dvc repro evaluate`` once
    in each (its build, train and evaluate stages, each its own process).
    """
    out: dict = {"tfstack run": {}, "dvc repro": {}, "metrics": {}, "files": {}}
    overrides = case_overrides(files, epochs)
    projects = {}
    for variant in sources:
        where = tmp / variant
        where.mkdir()
        bench.write_profiling_command(where)
        projects[variant] = bench.make_project(where)
        if sources[variant] != bench.ROOT:  # that version's config too
            shutil.rmtree(projects[variant] / "conf")
            shutil.copytree(sources[variant] / "conf", projects[variant] / "conf")
    names = list(sources)
    for repeat in range(repeats):
        for variant in names if repeat % 2 == 0 else names[::-1]:
            project = projects[variant]
            shutil.rmtree(project / "outputs", ignore_errors=True)
            env = _env(project, sources[variant] / "src")
            uri = f"tracking.uri=sqlite:///{project / f'mlflow_{repeat}.db'}"
            command = ["tfstack", "run", *overrides, uri]
            result = _profiled(project, f"run_{variant}_{repeat}", command, env)
            out["tfstack run"].setdefault(variant, []).append(result)
            out["metrics"][variant] = _metrics(project)
            out["files"][variant] = _run_files(project)
    for variant, project in projects.items():
        shutil.rmtree(project / "outputs", ignore_errors=True)
        env = _env(project, sources[variant] / "src")
        uri = f"tracking.uri=sqlite:///{project / 'mlflow_dvc.db'}"
        bench._sh(project, "tfstack", "params", *overrides, uri, env=env)
        out["dvc repro"][variant] = [
            _profiled(project, f"dvc_{variant}", ["dvc", "repro", "evaluate"], env)
        ]
    for kind in ("tfstack run", "dvc repro"):
        for variant, results in out[kind].items():
            out[kind][variant] = min(results, key=lambda r: r["wall"])
    return out


def importtime(source: Path, limit: int = 10) -> dict:
    """``python -X importtime`` of what ``tfstack run`` imports: the slowest top-level packages."""
    import subprocess

    modules = ["tfstack.cli", "tfstack.pipeline.stages", "tfstack.training", "tfstack.tracking"]
    code = "import " + ", ".join([*modules, "tfstack.evaluation", "tfstack.diagrams"])
    env = {**os.environ, "PYTHONPATH": str(source)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env
    )
    top: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative_us, name = line[len("import time:") :].split("|")
        if len(name) - len(name.lstrip()) == 1:  # a top-level import, not one inside another
            top[name.strip()] = top.get(name.strip(), 0.0) + int(cumulative_us) / 1e6
    slowest = dict(sorted(top.items(), key=lambda kv: -kv[1])[:limit])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], capture_output=True)
    return {"top_level": slowest, "total": sum(top.values()), "python": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# (g) the frozen phase against its physical limit
# ---------------------------------------------------------------------------------------------


def _case_arrays(files: dict[str, Path]):
    from tfstack.data import load_npz

    return load_npz(files["data"], val_fraction=0.2, seed=bench.SEED)


def _stacked(files: dict[str, Path]):
    import keras

    from tfstack.components import load_component
    from tfstack.stacking import build_stacked

    keras.utils.set_random_seed(bench.SEED)
    base = load_component(str(files["base"]), name="base", key="components.base")
    head = load_component(str(files["head"]), name="head", key="components.head")
    return build_stacked("sequential", base, head).model


def limit_section(files: dict[str, Path], epochs: int, repeats: int) -> dict:
    """(g) t(cached frozen phase) against t(predict train+val once) + t(fit the head on them)."""
    import keras
    import numpy as np

    from tfstack.datasets import ArrayDataset
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import Phase
    from tfstack.training import fit_phase

    splits = _case_arrays(files)
    batch = 16

    def phase():
        model = _stacked(files)
        train = ArrayDataset(
            splits.x_train,
            splits.y_train,
            batch_size=batch,
            shuffle=True,
            seed=bench.SEED,
            epoch_seeded=True,
        )
        val = ArrayDataset(splits.x_val, splits.y_val, batch_size=batch, shuffle=False, seed=0)

        def run():
            result = fit_phase(
                model,
                Phase("train", epochs, FreezePolicy("frozen"), 0.01),
                train,
                val,
                loss=bench.LOSS,
                metrics=bench.METRICS,
                feature_extractors=["base"],
                verbose=0,
                cache_frozen=True,
            )
            assert result.cached, result.cache_note

        return run

    def limit():
        model = _stacked(files)
        base, head = model.get_layer("base"), model.get_layer("head")

        def run():
            x = np.concatenate([splits.x_train, splits.x_val])
            features = base.predict(x, batch_size=batch, verbose=0)  # (n, 1280)
            n = len(splits.x_train)
            head.compile(
                optimizer=keras.optimizers.Adam(0.01), loss=bench.LOSS, metrics=bench.METRICS
            )
            head.fit(
                features[:n],
                splits.y_train,
                batch_size=batch,
                epochs=epochs,
                validation_data=(features[n:], splits.y_val),
                shuffle=True,
                verbose=0,
            )

        return run

    timings = bench.side_by_side({"limit": limit, "tfstack phase": phase}, repeats)
    ratio = timings["tfstack phase"]["seconds"] / timings["limit"]["seconds"]
    return {"epochs": epochs, "n_train": len(splits.x_train), "timings": timings, "ratio": ratio}


# ---------------------------------------------------------------------------------------------
# jit_compile
# ---------------------------------------------------------------------------------------------


class _EpochClock:
    """Wall seconds of every epoch of a fit (a Keras callback, made on first use)."""

    def __init__(self) -> None:
        import keras

        clock = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                clock.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                clock.epochs.append(time.perf_counter() - clock.started)

        self.epochs: list[float] = []
        self.callback = Callback()


def jit_section(workloads: dict, epochs: int, repeats: int) -> dict:
    """Seconds per epoch with XLA (``jit_compile=True``) and without, per workload, interleaved.

    The first epoch (tracing, and XLA's compilation) is reported apart from the median of the
    others. Op determinism must be off: Keras runs no XLA under it (train.deterministic=false).
    """
    import tensorflow as tf

    from tfstack.datasets import ArrayDataset
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import Phase
    from tfstack.training import fit_phase

    devices = [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()]
    out: dict = {"devices": devices}
    for name, (build, x, y, x_val, y_val, policy, batch) in workloads.items():
        clocks: dict[str, list[_EpochClock]] = {"false": [], "true": []}

        def variant(
            jit,
            build=build,
            x=x,
            y=y,
            x_val=x_val,
            y_val=y_val,
            policy=policy,
            batch=batch,
            clocks=clocks,
        ):
            def factory():
                model = build()
                train = ArrayDataset(x, y, batch_size=batch, shuffle=True, seed=bench.SEED)
                val = ArrayDataset(x_val, y_val, batch_size=batch, shuffle=False, seed=0)
                clock = _EpochClock()
                clocks[str(jit).lower()].append(clock)

                def run():
                    fit_phase(
                        model,
                        Phase("train", epochs, FreezePolicy(policy), 0.001),
                        train,
                        val,
                        loss=bench.LOSS,
                        metrics=bench.METRICS,
                        feature_extractors=["base"],
                        verbose=0,
                        cache_frozen=False,
                        jit_compile=jit,
                        callbacks=[clock.callback],
                    )

                return run

            return factory

        bench.side_by_side({"false": variant(False), "true": variant(True)}, repeats, warmup=False)
        row = {"epochs": epochs, "policy": policy, "n_train": len(x)}
        for key, made in clocks.items():
            row[key] = {
                "first_epoch": min(c.epochs[0] for c in made),
                "epoch": min(statistics.median(c.epochs[1:]) for c in made),
            }
        row["ratio"] = row["true"]["epoch"] / row["false"]["epoch"]
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

# Categories of stage_profile.py, in the table's order; "training" is run_schedule (the frozen
# part's predictions included), everything else is what the run pays besides training.
ROWS = [
    ("startup", "process start to the first line (interpreter, site)"),
    ("import", "imports (TensorFlow, Keras, MLflow, matplotlib, pydot, ...)"),
    ("other", "config, CLI, outputs (JSON), run bookkeeping"),
    ("tracking", "MLflow run, params, tags, metrics, artifacts"),
    ("data", "reading the npz, datasets"),
    ("model_load", "loading the components"),
    ("build", "stacking"),
    ("model_io", "rest of the model I/O"),
    ("diagrams", "architecture diagrams (Graphviz)"),
    ("model_save", "model saves (stacked.keras, model.keras, the logged models')"),
    ("checkpoint", "per-epoch training checkpoints"),
    ("test_predictions", "test-set evaluate + predict"),
    ("plots", "figures: drawing, PNG, logging"),
    ("log_model", "MLflow TensorFlow flavor: signature, example, files"),
    ("log_classifier", "MLflow pyfunc classifier"),
    ("evaluate_other", "rest of the evaluate stage"),
    ("exit", "interpreter exit"),
    ("dvc", "DVC itself (outside the stages)"),
]


def _share(result: dict) -> tuple[float, float]:
    training = result["categories"].get("training", 0.0)
    return training, (result["wall"] - training) / result["wall"]


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['nproc']} cores, {m['cpu']}, {m['ram_gb']} GB RAM; TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}, MLflow {m['mlflow']}, DVC {m['dvc']}; load "
        f"average at start {m['load_average_1min_at_start']:.2f}",
        f"devices: {', '.join(results['jit']['devices'])}",
        "",
    ]
    if "fixed" in results:
        fixed = results["fixed"]
        lines.append(
            f"(i) the fixed costs of a run: MobileNetV2 0.35 32x32, {SAMPLES} samples, "
            f"{results['epochs']} epochs, frozen, sqlite (seconds; before = {results['before']})"
        )
        header = f"  {'':<66}{'run before':>11}{'run after':>10}{'dvc before':>11}{'dvc after':>10}"
        lines.append(header)
        runs = [fixed["tfstack run"]["before"], fixed["tfstack run"]["after"]]
        runs += [fixed["dvc repro"]["before"], fixed["dvc repro"]["after"]]
        for key, label in [("training", "training (run_schedule)"), *ROWS]:
            cells = "".join(f"{r['categories'].get(key, 0.0):>10.2f} " for r in runs)
            lines.append(f"  {key + ': ' + label:<66}{cells}")
        lines.append(f"  {'wall':<66}" + "".join(f"{r['wall']:>10.2f} " for r in runs))
        for kind in ("tfstack run", "dvc repro"):
            b, a = fixed[kind]["before"], fixed[kind]["after"]
            (tb, sb), (ta, sa) = _share(b), _share(a)
            lines.append(
                f"  {kind}: non-training {b['wall'] - tb:.2f} s = {100 * sb:.0f}% of "
                f"{b['wall']:.2f} s before, {a['wall'] - ta:.2f} s = {100 * sa:.0f}% of "
                f"{a['wall']:.2f} s after (target <= 25%: {bench._verdict(sa, 0.25, False)}); "
                f"fixed costs cut {b['wall'] - tb - (a['wall'] - ta):.2f} s"
            )
        same = fixed["metrics"]["before"] == fixed["metrics"]["after"]
        files = fixed["files"]["before"] == fixed["files"]["after"]
        lines.append(
            f"  metrics.json identical before/after: {same} {fixed['metrics']['after']}; "
            f"same files in outputs/: {files}"
        )
        imports = results["importtime"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in imports["top_level"].items())
        lines.append(
            f"  python -X importtime of the run's modules: {imports['total']:.2f} s; {top}; "
            f"a bare interpreter {imports['python']:.2f} s"
        )
        lines.append("")
    g = results["limit"]
    t = g["timings"]
    lines.append(
        f"(g) the frozen phase against its physical limit ({g['n_train']} samples, "
        f"{g['epochs']} epochs): tfstack phase {t['tfstack phase']['seconds']:.2f} s, "
        f"predict + head fit {t['limit']['seconds']:.2f} s -> ratio {g['ratio']:.3f} "
        f"(target <= 1.15: {bench._verdict(g['ratio'], 1.15, False)})"
    )
    lines.append("")
    lines.append(
        "jit_compile (XLA), seconds per epoch: first epoch (tracing, compiling), then median"
    )
    for name, row in results["jit"].items():
        if name == "devices":
            continue
        lines.append(
            f"  {name} ({row['policy']}, {row['n_train']} samples, {row['epochs']} epochs): "
            f"false {row['false']['first_epoch']:.2f} / {row['false']['epoch']:.3f} s, "
            f"true {row['true']['first_epoch']:.2f} / {row['true']['epoch']:.3f} s -> "
            f"epoch ratio true/false {row['ratio']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--before", default="main", help="the git ref of 'before' in (i)")
    parser.add_argument("--skip-fixed", action="store_true", help="leave out (i)")
    parser.add_argument("--repeats", type=int, help="runs per variant (default 2; --quick 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    epochs = 5 if args.quick else EPOCHS
    results: dict = {"machine": bench.machine(), "epochs": epochs, "before": args.before}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tfstack-fixed-") as tmp:
        tmp = Path(tmp)
        files = write_case(tmp / "case")
        if not args.skip_fixed:
            print("(i) tfstack run and dvc repro, before and after ...", flush=True)
            sources = {
                "before": before_source(args.before, tmp / "before_src"),
                "after": bench.ROOT,
            }
            results["fixed"] = fixed_costs_section(tmp, files, sources, epochs, repeats)
            results["importtime"] = importtime(bench.ROOT / "src")
        print("(g) the frozen phase against its limit ...", flush=True)
        results["limit"] = limit_section(files, epochs, repeats + 1)
        print("jit_compile ...", flush=True)
        (tmp / "demo").mkdir()
        demo_project = bench.make_project(tmp / "demo")
        bench._sh(demo_project, "dvc", "repro", "pretrain", env=bench._env(demo_project))
        demo = bench.demo_workload(demo_project)
        splits = _case_arrays(files)
        n = 64  # XLA compiles a MobileNetV2 training step on CPU for minutes: keep it small
        workloads = {
            "demo (digits 8x8)": (demo._fresh, demo.x, demo.y, demo.x_val, demo.y_val, "joint", 16),
            "MobileNetV2 0.35 32x32": (
                lambda: _stacked(files),
                splits.x_train[:n],
                splits.y_train[:n],
                splits.x_val[:64],
                splits.y_val[:64],
                "joint",
                16,
            ),
        }
        results["jit"] = jit_section(workloads, 3, 1)
    results["seconds"] = time.perf_counter() - started
    text = report(results)
    print()
    print(text)
    print(f"\n(benchmark took {results['seconds']:.0f} s: {' '.join(sys.argv)})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
