"""TensorFlow distribution strategies for training: none, mirrored, multi_worker.

``mirrored`` is ``tf.distribute.MirroredStrategy`` over the local devices. On a machine without
accelerators, ``cpu_replicas=N`` splits the CPU into N logical devices so the strategy really
mirrors (and can be tested) on CPU. The model is loaded, every phase is recompiled and fitted
inside ``strategy.scope()``, so freeze policies, schedules and per-phase optimizers work as in
a single process.

``multi_worker`` is ``tf.distribute.MultiWorkerMirroredStrategy`` configured from ``TF_CONFIG``:
synchronous data-parallel training, one process per worker, gradients all-reduced every step.
TensorFlow requires the strategy before any other TensorFlow op, so the CLI makes it first
(`make_strategy` keeps the one instance). Only the chief (task ``chief``, or ``worker`` 0) logs to
MLflow and writes outputs; the other workers train their shard and exit.

Keras 3.15's ``Model.fit`` fails under this strategy (keras-team/keras#20585, open). Two
functions of ``keras.src.backend.tensorflow.trainer`` assume a single worker;
`tfstack._keras_compat.fix_multi_worker_fit` replaces them while a multi-worker strategy
exists (see there). With them, two workers on 127.0.0.1 train to the same weights as one
process (tests/test_distribute.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import keras
import tensorflow as tf

from tfstack import _keras_compat
from tfstack.errors import ConfigError, TrainingError
from tfstack.vocabulary import DISTRIBUTE_KINDS as KINDS

logger = logging.getLogger(__name__)

_multi_worker: tf.distribute.MultiWorkerMirroredStrategy | None = None


def configure_cpu_replicas(count: int) -> None:
    """Split the first CPU into ``count`` logical devices (before TensorFlow initializes).

    Raises:
        ConfigError: TensorFlow has already initialized its devices in this process.
    """
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as err:
        raise ConfigError(
            f"distribute.cpu_replicas={count} must be set before TensorFlow starts; this process "
            "already initialized its devices. Run the stage in a fresh process."
        ) from err


def make_strategy(kind: str, *, cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """The strategy to train under.

    Args:
        kind: ``none``, ``mirrored`` or ``multi_worker``.
        cpu_replicas: on a machine without accelerators, mirror over this many logical CPU
            devices (per worker with ``multi_worker``; 0 = the physical devices as they are).

    Returns:
        A ``tf.distribute.Strategy`` (the default strategy for ``none``). ``multi_worker`` returns
        the same instance on every call: TensorFlow allows one per process.

    Raises:
        ConfigError: an unknown kind, a missing or malformed ``TF_CONFIG``, or a multi-worker
            strategy asked for after TensorFlow started.
    """
    if kind not in KINDS:
        raise ConfigError(f"distribute={kind!r} is not valid. Expected one of {list(KINDS)}.")
    if kind == "none":
        return tf.distribute.get_strategy()
    if cpu_replicas:
        configure_cpu_replicas(cpu_replicas)
    if kind == "multi_worker":
        return _make_multi_worker()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    logger.info("MirroredStrategy over %s (%d replicas)", devices, strategy.num_replicas_in_sync)
    return strategy


def read_tf_config(environ: dict | None = None) -> dict:
    """The cluster spec and this task from ``TF_CONFIG``, checked.

    Raises:
        ConfigError: ``TF_CONFIG`` is unset, not JSON, or lacks a cluster or this task.
    """
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    example = (
        'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not text.strip():
        raise ConfigError(
            "distribute=multi_worker needs TF_CONFIG, the cluster and this process's task. Set "
            f"it in every worker's environment, e.g. {example}"
        )
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({err}). Example: {example}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError(f"TF_CONFIG has no 'cluster' of job -> addresses. Example: {example}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError(
            f"TF_CONFIG has no 'task' with 'type' and 'index' (received {task!r}). "
            f"Example: {example}"
        )
    jobs = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    addresses = jobs.get(task["type"], [])
    if not isinstance(task["index"], int) or not 0 <= task["index"] < len(addresses):
        raise ConfigError(
            f"TF_CONFIG task {task['type']}:{task['index']} is not in the cluster "
            f"{json.dumps(jobs)}. Give each worker its own index, from 0."
        )
    return spec


def _make_multi_worker() -> tf.distribute.MultiWorkerMirroredStrategy:
    global _multi_worker
    if _multi_worker is not None:
        return _multi_worker
    spec = read_tf_config()
    task = spec["task"]
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as err:  # "Collective ops must be configured at program startup"
        raise ConfigError(
            "distribute=multi_worker must start before TensorFlow runs anything in this process "
            f"({err}). Run `tfstack run` or `tfstack train` in a fresh process."
        ) from err
    _keras_compat.fix_multi_worker_fit(is_multi_worker)
    _multi_worker = strategy
    logger.info(
        "MultiWorkerMirroredStrategy: task %s:%s of %s, %d replicas",
        task["type"],
        task["index"],
        json.dumps(spec["cluster"]),
        strategy.num_replicas_in_sync,
    )
    return strategy


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` spans more than this process."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        _keras_compat.in_multi_worker_mode(strategy)
    )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process logs to MLflow and writes outputs.

    The ``chief`` task when the cluster has one, else ``worker`` 0 (TensorFlow's convention);
    always true outside a cluster.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = bool(resolver.cluster_spec().as_dict().get("chief"))
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``worker 1 of 2``-style name of this process in the cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "the only process"
    count = sum(len(v) for v in resolver.cluster_spec().as_dict().values())
    return f"{resolver.task_type} {resolver.task_id} of {count}"


@contextlib.contextmanager
def cluster_errors(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Turn "another worker is gone" from TensorFlow's collectives into one clear error.

    When a worker fails (its own error is in its log) or is stopped, the others' collective ops
    abort with a gRPC error several screens long.

    Raises:
        TrainingError: a collective op aborted because a worker left.
    """
    if not is_multi_worker(strategy):
        yield
        return
    try:
        yield
        return
    except (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError) as err:
        text = str(err)
        if "heartbeat" in text:
            reason = "a worker stopped sending heartbeats"
        elif "Socket closed" in text or "Connection reset" in text:
            reason = "a worker closed its connection"
        else:
            reason = (text.strip().splitlines() or [type(err).__name__])[0][:200]
    # Raised outside the handler, so nothing keeps the aborted op's frames: TensorFlow's
    # all-reduce thread pool in them is then freed now, not at exit, where its __del__ prints
    # "Exception ignored ... Bad file descriptor".
    raise TrainingError(
        f"Multi-worker training on {task_name(strategy)} stopped: another worker failed or "
        f"left ({reason}). Its log says why; fix that and start every worker again."
    )


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Block until every worker reaches this point (an all-reduce of one number)."""
    if not is_multi_worker(strategy):
        return

    @tf.function  # eagerly, TensorFlow warns of the overhead of every collective
    def all_reduce_one():
        return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    logger.info("All %d replicas joined", int(all_reduce_one()))


def on_every_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """Whether ``flag`` holds on every worker of the cluster (``flag`` itself outside one).

    Every worker must call it at the same point: it is an all-reduce (of the workers where the
    flag does not hold, which must be none).
    """
    if not is_multi_worker(strategy):
        return flag

    @tf.function  # eagerly, TensorFlow warns of the overhead of every collective
    def count_false(value):
        return strategy.reduce("SUM", strategy.run(lambda: value), axis=None)

    return float(count_false(tf.constant(0.0 if flag else 1.0))) == 0.0


class WorkersFeatureCache:
    """The shared frozen-feature cache as the workers of a cluster use it, all together.

    Under a multi-worker strategy the frozen part's predict is collective: every worker runs it
    on its share of each batch and all of them get every output. So the workers decide together:
    an entry is read only when every worker finds it (`on_every_worker`); otherwise every worker
    computes it, and the chief stores it. No key lock is taken (a worker waiting for one would
    leave the others inside the collective predict). Workers on machines without a common cache
    directory therefore just compute, as without a cache.

    Args:
        cache: The `tfstack.feature_cache.FeatureCache` of this worker.
        strategy: The multi-worker strategy.
    """

    def __init__(self, cache, strategy: tf.distribute.Strategy):
        self.cache = cache
        self.strategy = strategy

    @property
    def root(self):
        return self.cache.root

    def __repr__(self) -> str:
        return f"WorkersFeatureCache({self.cache!r})"

    def get_or_compute(self, key: str, compute, meta: dict):
        """As `FeatureCache.get_or_compute`, decided by every worker together."""
        import numpy as np

        arrays = self.cache.load(key)
        if on_every_worker(self.strategy, arrays is not None):
            return arrays, True
        arrays = [np.asarray(a) for a in compute()]
        if is_chief(self.strategy):
            self.cache.store(key, arrays, meta)
        return arrays, False


@contextlib.contextmanager
def synchronized_batchnorm(model: keras.Model) -> Iterator[list[str]]:
    """While inside, every BatchNormalization in ``model`` normalizes over the global batch.

    Under a strategy each replica sees only its part of a batch, so a BatchNormalization that
    trains (``freeze=joint``, ``partial`` with ``bn=train``) would normalize with that part's
    statistics and train a different model than one device does. Keras's ``synchronized=True``
    all-reduces the statistics instead (two all-reduces per layer and step). Frozen layers run in
    inference mode either way. The flag is reset on exit, so the saved model is unchanged.

    Yields:
        The paths of the layers that were switched.
    """
    from tfstack.freezing import leaf_layers

    switched = [
        (path, layer)
        for path, layer in leaf_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized
    ]
    for _, layer in switched:
        layer.synchronized = True
    try:
        yield [path for path, _ in switched]
    finally:
        for _, layer in switched:
            layer.synchronized = False
