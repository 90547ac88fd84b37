"""(f) A sweep of 8 head configurations over one frozen MobileNetV2, whole processes.

    .venv/bin/python benchmarks/sweep_cache.py           # 2 rounds, about 14 min on 2 busy cores
    .venv/bin/python benchmarks/sweep_cache.py --quick   # 5 epochs, 1 round, to try it out
    .venv/bin/python benchmarks/sweep_cache.py --per-process   # + 8 `tfstack run`: about 19 min

The sweep is 2 heads x 2 learning rates x 2 seeds over one frozen MobileNetV2 (alpha 0.35,
32x32, ``weights=None``: nothing to download), 1,400 synthetic training samples (20% of them
validation), 20 epochs, batch 32. The ways, each timed as whole processes:

- ``tfstack run -m components.head.path=A,B train.lr=0.001,0.003 seed=1,2`` with the shared
  frozen-feature cache (its own, empty at the start): one process, Hydra's basic launcher runs
  the 8 jobs in it, each its own MLflow run nested under the sweep's parent run. The first job
  of each train/validation split (each seed) extracts the features, the others read them;
- the same sweep with ``train.feature_cache=off`` (each job extracts once, in the process);
- 8 plain Keras scripts, one process each: load the base, freeze it, stack the head, ``fit``,
  ``evaluate``;
- with ``--per-process``: 8 fresh ``tfstack run`` processes sharing the cache (what the workers
  of ``dvc exp run --queue`` do).

The ways run one after another, in a rotated order each round (``--rounds``), so the machine's
load falls on all of them alike; each way's time is its best round. The tfstack runs track
everything (params, per-epoch metrics, plots, diagrams, test metrics) but do not log the model
(``tracking.log_model=false``; ``--log-model`` logs it): logging a model is a fixed cost of its
own, measured by the fixed-cost benchmark (i), and plain Keras saves nothing.

It prints each way's wall time and the ratios, whether the shared-cache and cache-off sweeps
wrote the same test metrics, and where a cached sweep job's time goes (its run's
``stage_seconds_*`` metrics; the rest of the sweep is start-up, imports, the config checks, the
parent run and the comparison at the end).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
TFSTACK = Path(sys.executable).parent / "tfstack"
N_TRAIN, N_TEST, SIZE, CLASSES = 1400, 200, 32, 10
HEADS = ("linear", "mlp")
RATES = (0.001, 0.003)
SEEDS = (1, 2)
JOBS = list(itertools.product(HEADS, RATES, SEEDS))

PLAIN_KERAS = """
import sys
import keras
import numpy as np

base_path, head_path, data_path, lr, seed, epochs, batch_size = sys.argv[1:8]
keras.utils.set_random_seed(int(seed))
data = np.load(data_path)
x, y = data["x_train"], data["y_train"]
order = np.random.default_rng(int(seed)).permutation(len(x))
n_val = round(0.2 * len(x))
val, train = order[:n_val], order[n_val:]
base = keras.models.load_model(base_path)
base.trainable = False
head = keras.models.load_model(head_path)
model = keras.Sequential([base, head])
model.compile(
    keras.optimizers.Adam(float(lr)), "sparse_categorical_crossentropy", metrics=["accuracy"]
)
model.fit(
    x[train], y[train], validation_data=(x[val], y[val]), epochs=int(epochs),
    batch_size=int(batch_size), verbose=0,
)
print(model.evaluate(data["x_test"], data["y_test"], verbose=0))
"""


def write_inputs(where: Path) -> None:
    """base.keras, head_linear.keras, head_mlp.keras and data.npz under ``where``."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
    )
    base.save(where / "base.keras")
    features = base.output_shape[-1]
    heads = {
        "linear": [keras.layers.Dense(CLASSES, activation="softmax", name="classifier")],
        "mlp": [
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(CLASSES, activation="softmax", name="classifier"),
        ],
    }
    for name, layers in heads.items():
        head = keras.Sequential([keras.Input((features,)), *layers], name=f"head_{name}")
        head.save(where / f"head_{name}.keras")
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, size=N_TRAIN + N_TEST)
    # A learnable signal: the class shifts the mean of one channel.
    x = rng.uniform(0, 1, size=(N_TRAIN + N_TEST, SIZE, SIZE, 3)).astype("float32")
    x[..., 0] += (y[:, None, None] / CLASSES).astype("float32")
    np.savez(
        where / "data.npz",
        x_train=x[:N_TRAIN],
        y_train=y[:N_TRAIN],
        x_test=x[N_TRAIN:],
        y_test=y[N_TRAIN:],
    )


def _timed(command: list[str], cwd: Path, env: dict, log: Path, retries: int = 1) -> float:
    """Wall seconds of one process; a failed one is run again (once) and the retry timed.

    A retry is for the machine's failures (Graphviz's ``dot`` was once killed by SIGABRT on the
    overloaded test machine, failing the build stage), and is printed.
    """
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        if retries:
            print(f"  {command[0]} failed ({done.returncode}); running it again:\n{tail[-500:]}")
            return _timed(command, cwd, env, log, retries - 1)
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}):\n{tail}")
    return seconds


def _common(where: Path, args, cache: str, uri: Path) -> list[str]:
    """The overrides every tfstack job of a way shares."""
    return [
        "data=npz",
        f"data.path={where / 'data.npz'}",
        f"components.base.path={where / 'base.keras'}",
        "preprocess=none",
        "freeze=frozen",
        "schedule=single",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.verbose=0",
        f"train.feature_cache={cache}",
        f"train.feature_cache_dir={where / f'feature_cache-{uri.stem}'}",
        f"tracking.uri=sqlite:///{uri}",
        *([] if args.log_model else ["tracking.log_model=false"]),
    ]


def sweep_command(where: Path, args, cache: str, uri: Path, sweep_dir: Path) -> list[str]:
    """One ``tfstack run -m`` over the 8 jobs (head slowest, seed fastest, as `jobs`)."""
    heads = ",".join(str(where / f"head_{head}.keras") for head in HEADS)
    return [
        str(TFSTACK),
        "run",
        "-m",
        *_common(where, args, cache, uri),
        f"components.head.path={heads}",
        f"train.lr={','.join(str(lr) for lr in RATES)}",
        f"seed={','.join(str(seed) for seed in SEEDS)}",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def job_command(where: Path, args, job: int, uri: Path, out: Path) -> list[str]:
    """One job as its own ``tfstack run`` process, with the shared cache."""
    head, lr, seed = JOBS[job]
    return [
        str(TFSTACK),
        "run",
        *_common(where, args, "shared", uri),
        f"components.head.path={where / f'head_{head}.keras'}",
        f"train.lr={lr}",
        f"seed={seed}",
        f"output_dir={out / str(job)}",
    ]


def plain_command(where: Path, args, job: int, script: Path) -> list[str]:
    head, lr, seed = JOBS[job]
    command = [sys.executable, str(script), str(where / "base.keras")]
    command += [str(where / f"head_{head}.keras"), str(where / "data.npz"), str(lr), str(seed)]
    return command + [str(args.epochs), str(args.batch_size)]


def environment(where: Path, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update({"DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
    env.pop("TFSTACK_FEATURE_CACHE", None)
    env.pop("TFSTACK_PARENT_RUN_ID", None)
    if args.no_diagrams:  # PATH without `dot`: tfstack finds no Graphviz and draws nothing
        shim = where / "bin"
        shim.mkdir(exist_ok=True)
        folders = env["PATH"].split(os.pathsep)
        with_dot = [f for f in folders if (Path(f) / "dot").exists()]
        for folder in with_dot:
            for tool in Path(folder).iterdir():
                if tool.name != "dot" and not (shim / tool.name).exists():
                    (shim / tool.name).symlink_to(tool)
        kept = [f for f in folders if f not in with_dot]
        env["PATH"] = os.pathsep.join([*kept, str(shim)])
    return env


def run_way(name: str, where: Path, args, round_: int, env: dict, project: Path) -> dict:
    """One way, once: its wall seconds (summed over its processes) and where it wrote."""
    tag = f"{name.split(',')[0].split()[0]}-{round_}"
    if name == "plain Keras":
        script = where / "plain_keras.py"
        script.write_text(PLAIN_KERAS)
        commands = [plain_command(where, args, job, script) for job in range(len(JOBS))]
        per = [_timed(c, project, env, where / f"{tag}-{j}.log") for j, c in enumerate(commands)]
        return {"seconds": sum(per), "per_process": per}
    cache = "off" if "cache off" in name else "shared"
    slug = "process" if "processes" in name else f"sweep-{cache}"
    uri = where / f"mlflow-{slug}-{round_}.db"
    out = where / f"{slug}-{round_}"
    if "processes" in name:
        commands = [job_command(where, args, job, uri, out) for job in range(len(JOBS))]
        per = [_timed(c, project, env, where / f"{tag}-{j}.log") for j, c in enumerate(commands)]
        return {"seconds": sum(per), "per_process": per, "uri": uri, "out": out}
    command = sweep_command(where, args, cache, uri, out)
    seconds = _timed(command, project, env, out.with_suffix(".log"))
    return {"seconds": seconds, "uri": uri, "out": out}


def job_records(result: dict) -> list[dict]:
    """Per job (in job order): its run's phase-0 cache tag, stage seconds, run seconds, metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{result['uri']}")
    experiment = client.get_experiment_by_name("tfstack")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    runs = [run for run in runs if "stage_seconds_train" in run.data.metrics]  # not the parent
    out = []
    for job, run in enumerate(runs[-len(JOBS) :]):
        job_dir = result["out"] / str(job)
        phases = json.loads((job_dir / "train" / "phases.json").read_text())
        metrics = json.loads((job_dir / "evaluate" / "metrics.json").read_text())
        record = {"cache": run.data.tags.get("phase.0.cache"), "phase": phases[0]["seconds"]}
        record["run"] = (run.info.end_time - run.info.start_time) / 1000
        record["metrics"] = metrics
        stages = {k: v for k, v in run.data.metrics.items() if k.startswith("stage_seconds_")}
        record.update({k.removeprefix("stage_seconds_"): v for k, v in stages.items()})
        out.append(record)
    return out


def run_all_ways(where: Path, args) -> dict:
    """Every way once per round, in a rotated order each round; each way's rounds."""
    env = environment(where, args)
    project = where / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    ways = ["tfstack -m, shared cache", "tfstack -m, cache off", "plain Keras"]
    if args.per_process:
        ways.append("tfstack, 8 processes, shared cache")
    rounds: dict[str, list[dict]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name in ways[round_ % len(ways) :] + ways[: round_ % len(ways)]:
            result = run_way(name, where, args, round_, env, project)
            if "uri" in result:
                result["jobs"] = job_records(result)
            rounds[name].append(result)
            print(f"  round {round_ + 1}: {name}: {result['seconds']:.1f} s", flush=True)
    return rounds


def _best(rounds: list[dict]) -> dict:
    return min(rounds, key=lambda r: r["seconds"])


def _same_metrics(a: list[dict], b: list[dict]) -> float:
    """The largest difference between two ways' test metrics, job by job."""
    return max(
        abs(x["metrics"][key] - y["metrics"][key])
        for x, y in zip(a, b, strict=True)
        for key in x["metrics"]
    )


def report(rounds: dict[str, list[dict]], args) -> str:
    best = {name: _best(results) for name, results in rounds.items()}
    plain = best["plain Keras"]["seconds"]
    lines = [
        f"(f) sweep of 8 head configurations (2 heads x 2 lr x 2 seeds), frozen MobileNetV2 "
        f"alpha 0.35 {SIZE}x{SIZE}, {N_TRAIN} samples, {args.epochs} epochs, batch "
        f"{args.batch_size}; whole-process wall time, best of {args.rounds} round(s)"
        + ("" if args.log_model else " (tfstack: tracking.log_model=false)"),
    ]
    for name, result in best.items():
        all_rounds = ", ".join(f"{r['seconds']:.1f}" for r in rounds[name])
        per = result.get("per_process")
        detail = f"; per process {', '.join(f'{s:.1f}' for s in per)}" if per else ""
        lines.append(f"  {name:<36} {result['seconds']:7.1f} s   (rounds {all_rounds}{detail})")
    for name, result in best.items():
        if name != "plain Keras":
            ratio = plain / result["seconds"]
            target = " (target >= 6x)" if name == "tfstack -m, shared cache" else ""
            lines.append(f"  plain Keras / {name}: {ratio:.2f}x{target}")
    shared, off = best["tfstack -m, shared cache"], best["tfstack -m, cache off"]
    lines.append(f"  cache off / shared cache (sweeps): {off['seconds'] / shared['seconds']:.2f}x")
    lines.append(
        "  test metrics, shared cache vs cache off, largest difference over the 8 jobs: "
        f"{_same_metrics(shared['jobs'], off['jobs']):.2g}"
    )
    for name, result in best.items():
        if "jobs" not in result:
            continue
        jobs = result["jobs"]
        in_runs = sum(job["run"] for job in jobs)
        lines.append(
            f"  {name}: the 8 runs {in_runs:.1f} s, the rest {result['seconds'] - in_runs:.1f} s "
            "(start-up, imports, config, parent run, comparison; per process: each's)"
        )
        for job, record in enumerate(jobs):
            staged = sum(record.get(k, 0.0) for k in ("build", "train", "evaluate"))
            lines.append(
                f"    job {job + 1}: cache {record['cache']:<6} run {record['run']:5.1f}  build "
                f"{record.get('build', 0):4.1f}  train {record.get('train', 0):4.1f} (phase "
                f"{record['phase']:4.1f})  evaluate {record.get('evaluate', 0):4.1f}  other "
                f"{record['run'] - staged:4.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs and 1 round")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="2 unless --quick")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--per-process",
        action="store_true",
        help="also 8 fresh `tfstack run` processes with the shared cache (a DVC queue's way)",
    )
    parser.add_argument(
        "--log-model",
        action="store_true",
        help="log the model in every run (the default here does not: its cost is (i)'s)",
    )
    parser.add_argument(
        "--no-diagrams",
        action="store_true",
        help="hide Graphviz from the tfstack runs (its dot aborted on the stacked MobileNetV2)",
    )
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 5 if args.quick else 20
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tfstack-sweep-") as directory:
        where = Path(directory)
        write_inputs(where)
        rounds = run_all_ways(where, args)
    text = report(rounds, args)
    print(text)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        measured = {"machine": info, "rounds": rounds}
        Path(args.json).write_text(json.dumps(measured, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
