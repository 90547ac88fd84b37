"""(f) A sweep of 8 head configurations over one frozen MobileNetV2, whole processes, three ways.

    .venv/bin/python benchmarks/sweep_cache.py           # about 10 min on 2 busy cores
    .venv/bin/python benchmarks/sweep_cache.py --quick   # fewer epochs, to try it out

The sweep is 2 heads x 2 learning rates x 2 seeds over one frozen MobileNetV2 (alpha 0.35,
32x32, ``weights=None``: nothing to download), 1,400 synthetic training samples (20% of them
validation), 20 epochs. Each job is one fresh process, and the three ways run interleaved (job
1 of each, then job 2, ...), so the machine's load falls on all three alike:

- ``tfstack run`` with the shared frozen-feature cache (its own, empty at the start): the first
  job of each train/validation split extracts the features, the others read them;
- ``tfstack run`` with ``train.feature_cache=off`` (each job extracts once, in its process);
- a plain Keras script: load the base, freeze it, stack the head, ``fit``, ``evaluate``.

The tfstack runs track everything (params, per-epoch metrics, plots, test metrics) but do not
log the model (``tracking.log_model=false``; ``--log-model`` logs it): logging a model is a
fixed cost of its own, measured by the fixed-cost benchmark (i), and plain Keras saves nothing.

It prints the summed wall time of each way's 8 processes and the ratios, and, for the cached
runs, where their time goes (the train and evaluate stages as the runs' ``stage_seconds_*``
metrics record them, the rest being start-up, imports, build, tracking and exit).
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


def tfstack_command(where: Path, job: int, head: str, lr: float, seed: int, args, cache: str):
    return [
        str(TFSTACK),
        "run",
        "data=npz",
        f"data.path={where / 'data.npz'}",
        f"components.base.path={where / 'base.keras'}",
        f"components.head.path={where / f'head_{head}.keras'}",
        "preprocess=none",
        "freeze=frozen",
        "schedule=single",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={lr}",
        f"seed={seed}",
        "train.verbose=0",
        f"train.feature_cache={cache}",
        f"train.feature_cache_dir={where / 'feature_cache'}",
        f"output_dir={where / f'outputs-{cache}-{job}'}",
        f"tracking.uri=sqlite:///{where / f'mlflow-{cache}.db'}",
        *([] if args.log_model else ["tracking.log_model=false"]),
    ]


def run_sweep(where: Path, args) -> dict:
    """The 8 jobs of each way, interleaved; seconds per job and the cached runs' records."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update({"DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
    env.pop("TFSTACK_FEATURE_CACHE", None)
    if args.no_diagrams:  # PATH without `dot`: tfstack finds no Graphviz and draws nothing
        shim = where / "bin"
        shim.mkdir()
        folders = env["PATH"].split(os.pathsep)
        with_dot = [f for f in folders if (Path(f) / "dot").exists()]
        for folder in with_dot:
            for tool in Path(folder).iterdir():
                if tool.name != "dot" and not (shim / tool.name).exists():
                    (shim / tool.name).symlink_to(tool)
        kept = [f for f in folders if f not in with_dot]
        env["PATH"] = os.pathsep.join([*kept, str(shim)])
    project = where / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    script = where / "plain_keras.py"
    script.write_text(PLAIN_KERAS)
    seconds: dict[str, list[float]] = {"tfstack, shared cache": [], "tfstack, cache off": []}
    seconds["plain Keras"] = []
    jobs = list(itertools.product(HEADS, RATES, SEEDS))
    if args.first_job > 1:  # the earlier jobs' shared-cache runs, untimed: they fill the cache
        for job in range(min(len(SEEDS), args.first_job - 1)):
            head, lr, seed = jobs[job]
            command = tfstack_command(where, job, head, lr, seed, args, "shared")
            _timed(command, project, env, where / f"warm{job}.log")
    for job, (head, lr, seed) in enumerate(jobs):
        if job + 1 < args.first_job:
            continue
        plain = [sys.executable, str(script), str(where / "base.keras")]
        plain += [str(where / f"head_{head}.keras"), str(where / "data.npz"), str(lr), str(seed)]
        plain += [str(args.epochs), str(args.batch_size)]
        commands = {
            "tfstack, shared cache": tfstack_command(where, job, head, lr, seed, args, "shared"),
            "tfstack, cache off": tfstack_command(where, job, head, lr, seed, args, "off"),
            "plain Keras": plain,
        }
        for name, command in commands.items():
            log = where / f"job{job}-{name.replace(' ', '_').replace(',', '')}.log"
            seconds[name].append(_timed(command, project, env, log))
        print(
            f"  job {job + 1}/8 {head} lr={lr} seed={seed}: "
            + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()),
            flush=True,
        )
    timed = list(range(args.first_job - 1, len(jobs)))
    return {"seconds": seconds, "records": records(where, "shared", timed), "jobs": jobs}


def records(where: Path, cache: str, timed: list[int]) -> list[dict]:
    """Per timed job: its run's phase-0 cache tag, stage seconds and the phase's seconds."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{where / f'mlflow-{cache}.db'}")
    experiment = client.get_experiment_by_name("tfstack")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    out = []
    for job, run in zip(timed, runs[-len(timed) :], strict=True):
        phases_file = where / f"outputs-{cache}-{job}" / "train" / "phases.json"
        phases = json.loads(phases_file.read_text())
        stages = {k: v for k, v in run.data.metrics.items() if k.startswith("stage_seconds_")}
        out.append({"cache": run.data.tags.get("phase.0.cache"), "phase": phases[0]["seconds"]})
        out[-1].update({k.removeprefix("stage_seconds_"): v for k, v in stages.items()})
    return out


def report(result: dict, args) -> str:
    seconds = {name: sum(values) for name, values in result["seconds"].items()}
    cached = seconds["tfstack, shared cache"]
    lines = [
        f"(f) sweep of 8 head configurations (2 heads x 2 lr x 2 seeds), frozen MobileNetV2 "
        f"alpha 0.35 {SIZE}x{SIZE}, {N_TRAIN} samples, {args.epochs} epochs, batch "
        f"{args.batch_size}; whole-process wall time of 8 fresh processes each"
        + ("" if args.log_model else " (tfstack: tracking.log_model=false)"),
    ]
    for name, total in seconds.items():
        per = ", ".join(f"{s:.1f}" for s in result["seconds"][name])
        lines.append(f"  {name:<22} {total:7.1f} s   ({per})")
    lines.append(
        f"  ratio plain Keras / tfstack shared cache: {seconds['plain Keras'] / cached:.2f}x "
        "(target >= 6x)"
    )
    lines.append(
        f"  ratio tfstack cache off / tfstack shared cache: "
        f"{seconds['tfstack, cache off'] / cached:.2f}x"
    )
    lines.append("  where the shared-cache runs' time goes (s; rest = start-up, imports, exit):")
    first = args.first_job - 1
    for job, (record, wall) in enumerate(
        zip(result["records"], result["seconds"]["tfstack, shared cache"], strict=True), first
    ):
        staged = sum(record.get(k, 0.0) for k in ("build", "train", "evaluate"))
        lines.append(
            f"    job {job + 1}: cache {record['cache']:<4} wall {wall:5.1f}  build "
            f"{record.get('build', 0):4.1f}  train {record.get('train', 0):4.1f} (phase "
            f"{record['phase']:4.1f})  evaluate {record.get('evaluate', 0):4.1f}  rest "
            f"{wall - staged:4.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs instead of 20")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--log-model",
        action="store_true",
        help="log the model in every run (the default here does not: its cost is (i)'s)",
    )
    parser.add_argument(
        "--first-job",
        type=int,
        default=1,
        help="start the sweep at this job (1-8), filling the cache with untimed runs first",
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
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tfstack-sweep-") as directory:
        where = Path(directory)
        write_inputs(where)
        result = run_sweep(where, args)
    text = report(result, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
