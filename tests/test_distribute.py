"""Distribution: mirrored and two-worker training match one process; failures are clear."""

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_pipeline import project  # noqa: F401 (the shrunk project-copy fixture)

from tfstack.distribute import is_chief, make_strategy, read_tf_config, synchronized_batchnorm
from tfstack.errors import ConfigError

TESTS = Path(__file__).resolve().parent

# Logical CPU devices must be configured before TensorFlow starts, so this runs in a fresh process.
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from tfstack.distribute import make_strategy
    strategy = make_strategy("mirrored", cpu_replicas=2)
    import keras, tensorflow as tf
    from conftest import make_base, make_data, make_head
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import make_schedule
    from tfstack.stacking import build_stacked
    from tfstack.training import run_schedule

    def train(strategy):
        keras.utils.set_random_seed(0)
        x, y = make_data(64)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        with strategy.scope():
            model = build_stacked("functional", make_base(), make_head()).model
            phases = make_schedule(
                "two_phase", epochs=2, lr=1e-2, optimizer="adam", freeze=FreezePolicy("frozen")
            )
            results = run_schedule(
                model, phases, data, loss="sparse_categorical_crossentropy",
                feature_extractors=["base"], verbose=0,
            )
        return {{
            "replicas": strategy.num_replicas_in_sync,
            "loss": [v for r in results for v in r.history["loss"]],
            "trainable": [r.counts.trainable for r in results],
        }}

    single = train(tf.distribute.get_strategy())
    print(json.dumps({{"mirrored": train(strategy), "single": single}}))
    """
)


@pytest.mark.slow
def test_mirrored_over_two_cpu_replicas_matches_one_device():
    script = MIRRORED_SCRIPT.format(tests=str(TESTS))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mirrored, single = result["mirrored"], result["single"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    # Both phases ran under the strategy: frozen head first, then the top of the base.
    assert mirrored["trainable"] == single["trainable"] and mirrored["trainable"][0] == 27
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("", "distribute=multi_worker needs TF_CONFIG"),
        ("{cluster", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no 'cluster'"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "TF_CONFIG has no 'task'"),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
            "TF_CONFIG task worker:1 is not in the cluster",
        ),
    ],
)
def test_bad_tf_config_is_named_before_anything_starts(tf_config, message):
    with pytest.raises(ConfigError, match=message) as err:
        read_tf_config({"TF_CONFIG": tf_config})
    assert "TF_CONFIG" in str(err.value)


def test_tf_config_of_a_worker_is_read():
    spec = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    assert read_tf_config({"TF_CONFIG": json.dumps(spec)}) == spec


def test_synchronized_batchnorm_is_switched_only_while_training():
    import keras
    from conftest import make_base, make_head

    from tfstack.stacking import build_stacked

    model = build_stacked("sequential", make_base(), make_head()).model
    base = model.get_layer("base")
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    with synchronized_batchnorm(model) as switched:
        assert switched == ["base/bn1", "base/bn2"]
        assert all(layer.synchronized for layer in norms)
    # What is saved afterwards is the model as it was.
    assert [layer.get_config()["synchronized"] for layer in norms] == [False, False]


def test_synchronized_batchnorm_keeps_the_feature_cache_key_and_one_process_decides_alone(
    tmp_path,
):
    """The workers' frozen part (BatchNormalization synchronized) has the single process's key."""
    import numpy as np
    from conftest import make_base, make_head

    from tfstack.distribute import WorkersFeatureCache, on_every_worker
    from tfstack.feature_cache import FeatureCache
    from tfstack.feature_keys import model_digest
    from tfstack.stacking import build_stacked

    model = build_stacked("sequential", make_base(), make_head()).model
    alone = model_digest(model)
    with synchronized_batchnorm(model):
        assert model_digest(model) == alone
    model.get_layer("base").get_layer("bn1").epsilon = 0.5  # this changes the outputs: a miss
    assert model_digest(model) != alone

    strategy = make_strategy("none")
    assert on_every_worker(strategy, True) and not on_every_worker(strategy, False)
    cache = WorkersFeatureCache(FeatureCache(tmp_path, max_bytes=10**6), strategy)
    first = cache.get_or_compute("k", lambda: [np.arange(4.0)], {})
    again = cache.get_or_compute("k", lambda: [np.zeros(4)], {})
    assert (first[1], again[1]) == (False, True)
    np.testing.assert_array_equal(again[0][0], np.arange(4.0))


@pytest.mark.parametrize(
    ("cluster", "task", "chief"),
    [
        ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
        ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
    ],
)
def test_the_chief_is_the_chief_task_or_else_worker_0(cluster, task, chief):
    import types

    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task[0], task_id=task[1]
    )
    assert is_chief(types.SimpleNamespace(cluster_resolver=resolver)) is chief


def test_unknown_kind_and_default_strategy():
    with pytest.raises(ConfigError, match="distribute='tpu'"):
        make_strategy("tpu")
    assert is_chief(make_strategy("none"))


@pytest.mark.slow
def test_tfstack_run_mirrored_matches_single_device_and_is_tracked(project):  # noqa: F811
    from test_pipeline import _runs, _sh, assert_complete_run

    for kind, replicas in (("none", 0), ("mirrored", 2)):
        _sh(
            project,
            "tfstack",
            "run",
            f"distribute={kind}",
            f"distribute.cpu_replicas={replicas}",
            "schedule=two_phase",
        )
    client, runs = _runs(project)
    single, mirrored = runs
    assert_complete_run(client, mirrored, epochs=1, freeze="frozen")
    assert mirrored.data.tags["distribute"] == "mirrored"
    assert mirrored.data.metrics["replicas"] == 2
    # Tolerance: same seed and data; only the order of the cross-replica sum may differ.
    assert mirrored.data.metrics["test_accuracy"] == pytest.approx(
        single.data.metrics["test_accuracy"], abs=1e-6
    )
    assert mirrored.data.metrics["test_loss"] == pytest.approx(
        single.data.metrics["test_loss"], rel=1e-4
    )


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _two_workers(root: Path, overrides, *, kill_worker_at: str | None = None):
    """`tfstack run` as worker 0 (the chief) and worker 1 on 127.0.0.1; their results."""
    from test_pipeline import _env

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    for index in (1, 0):  # the worker first: it waits for the chief's build
        env = _env(root)
        task = {"type": "worker", "index": index}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
        log = open(root / f"worker{index}.log", "w+")  # noqa: SIM115 (closed below)
        cmd = ["tfstack", "run", "distribute=multi_worker", *overrides]
        procs.append((subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=log), log))
    worker, chief = procs
    if kill_worker_at:
        deadline = time.monotonic() + 300
        while kill_worker_at not in (root / "worker1.log").read_text():
            assert time.monotonic() < deadline and worker[0].poll() is None
            time.sleep(0.2)
        worker[0].kill()
    results = []
    for proc, log in (chief, worker):
        proc.wait(timeout=600)
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results


# Early stopping that fires at each phase's second epoch whatever the losses (no change counts
# as an improvement of 10), so both runs stop at the same epochs.
EARLY_STOP = [
    "train.epochs=4",
    "train.early_stopping.patience=1",
    "train.early_stopping.min_delta=10",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("freeze", "schedule", "extra"),
    [("frozen", "two_phase", []), ("joint", "single", []), ("frozen", "two_phase", EARLY_STOP)],
    ids=["frozen-two_phase", "joint-single", "early_stopping"],
)
def test_two_workers_train_like_one_process_and_only_the_chief_logs(
    project,  # noqa: F811
    freeze,
    schedule,
    extra,
):
    """Two MultiWorkerMirroredStrategy workers on 127.0.0.1 against one process.

    ``frozen`` + ``two_phase``: a cached frozen phase, then a recompiled fine-tuning phase.
    ``joint``: the base's BatchNormalization trains, with statistics of the global batch.

    Tolerance: both see the same global batches (each worker half of every batch), gradients
    and BatchNormalization statistics are all-reduced (distribute.sync_batchnorm), so only the
    order of floating-point sums differs: losses within rel 1e-4, accuracy within one test
    sample (abs 2e-3 of 846).
    """
    from test_pipeline import _runs, _sh, assert_complete_run

    overrides = [f"freeze={freeze}", f"schedule={schedule}", *extra]
    _sh(project, "tfstack", "run", *overrides)
    # With early stopping the workers get a cache of their own: they miss, compute together,
    # and the chief stores; otherwise they read what the single process stored.
    worker_cache = project / "workers_feature_cache"
    workers = [*overrides, f"train.feature_cache_dir={worker_cache}"] if extra else overrides
    (chief_code, chief_log), (worker_code, worker_log) = _two_workers(project, workers)
    assert chief_code == 0, chief_log[-3000:]
    assert worker_code == 0, worker_log[-3000:]
    assert "tfstack run: worker 1 of 2 done (the chief logs the run)" in worker_log
    assert "All 2 replicas joined" in worker_log
    client, runs = _runs(project)
    assert len(runs) == 2, "the non-chief worker must not start an MLflow run"
    single, multi = runs
    assert_complete_run(client, multi, epochs=4 if extra else 1, freeze=freeze)
    if extra:  # each phase stopped at its second epoch, in both runs; the axis stays contiguous
        for run in (single, multi):
            tags = run.data.tags
            assert [tags[f"phase.{i}.stopped_epoch"] for i in (0, 1)] == ["1", "3"]
            assert [tags[f"phase.{i}.epochs"] for i in (0, 1)] == ["0-1", "2-3"]
    assert multi.data.tags["distribute"] == "multi_worker"
    assert multi.data.metrics["replicas"] == 2
    assert single.data.tags.get("distribute") is None
    if freeze == "frozen":
        assert single.data.tags["phase.0.cache"] == "miss"
        assert multi.data.tags["phase.0.cache_key"] == single.data.tags["phase.0.cache_key"]
        if extra:  # computed by both workers, stored by the chief: train and val
            assert multi.data.tags["phase.0.cache"] == "miss"
            assert len(list(worker_cache.glob("*/meta.json"))) == 2
        else:  # found by both workers in what the single process stored
            assert multi.data.tags["phase.0.cache"] == "hit"
    for name in ("test_loss", "val_loss", "loss"):
        assert multi.data.metrics[name] == pytest.approx(single.data.metrics[name], rel=1e-4), name
    assert multi.data.metrics["test_accuracy"] == pytest.approx(
        single.data.metrics["test_accuracy"], abs=2e-3
    )
    cached = [multi.data.tags[f"phase.{i}.cached"] for i in range(2 if freeze == "frozen" else 1)]
    assert cached == (["true", "false"] if freeze == "frozen" else ["false"])
    assert multi.data.metrics["params_trainable"] == single.data.metrics["params_trainable"]
    assert (project / "outputs" / "train" / "model.keras").is_file()
    assert not list(project.glob("**/tfstack-worker-*")), "the worker's scratch save was left"


@pytest.mark.slow
def test_a_worker_that_dies_fails_the_chiefs_run_clearly(project):  # noqa: F811
    from test_pipeline import _runs

    (chief_code, chief_log), (worker_code, _) = _two_workers(
        project, ["freeze=joint", "train.epochs=500", "train.verbose=2"], kill_worker_at="Epoch 3/"
    )
    assert worker_code != 0
    assert chief_code == 2, chief_log[-3000:]
    assert (
        "tfstack: error: Multi-worker training on worker 0 of 2 stopped: another worker failed "
        "or left" in chief_log
    )
    assert "Traceback" not in chief_log and "Exception ignored" not in chief_log
    _, runs = _runs(project)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "another worker failed or left" in runs[0].data.tags["error"]


@pytest.mark.slow
def test_the_worker_stops_clearly_when_the_chief_fails_before_training(project):  # noqa: F811
    from test_pipeline import _runs

    overrides = ["experiment=wide_head", "stacking=sequential"]
    (chief_code, chief_log), (worker_code, worker_log) = _two_workers(project, overrides)
    assert chief_code == 2 and "last dimension 32 != 64" in chief_log
    assert worker_code == 2, worker_log[-3000:]
    assert "tfstack: error: Multi-worker training on worker 1 of 2 stopped" in worker_log
    assert "Traceback" not in worker_log
    _, runs = _runs(project)
    assert [r.info.status for r in runs] == ["FAILED"]
