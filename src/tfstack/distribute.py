"""TensorFlow distribution strategies for training: none, mirrored, multi_worker.

``mirrored`` is ``tf.distribute.MirroredStrategy`` over the local devices. On a machine without
accelerators, ``cpu_replicas=N`` splits the CPU into N logical devices so the strategy really
mirrors (and can be tested) on CPU. The model is loaded, every phase is recompiled and fitted
inside ``strategy.scope()``, so freeze policies, schedules and per-phase optimizers work as in
a single process.

``multi_worker`` (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``) is refused with a clear
message: ``Model.fit`` in Keras 3.15 fails under it (keras-team/keras#20585, still open). Checked
here with two workers on 127.0.0.1: first ``strategy.reduce`` of a nested batch in
``_maybe_symbolic_build``, then ``reduce("MEAN", axis=0)`` of scalar metrics.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from tfstack.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("none", "mirrored", "multi_worker")


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
        cpu_replicas: with ``mirrored`` on a machine without accelerators, mirror over this many
            logical CPU devices (0 = the physical devices as they are).

    Returns:
        A ``tf.distribute.Strategy`` (the default strategy for ``none``).

    Raises:
        ConfigError: an unknown kind, or ``multi_worker`` (not supported by Keras 3.15's fit).
    """
    if kind not in KINDS:
        raise ConfigError(f"distribute={kind!r} is not valid. Expected one of {list(KINDS)}.")
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "multi_worker":
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
        raise ConfigError(
            "distribute=multi_worker is not supported: Keras 3.15's Model.fit fails under "
            "tf.distribute.MultiWorkerMirroredStrategy (keras-team/keras#20585) "
            f"(TF_CONFIG task: {task or 'unset'}). Use distribute=mirrored on one machine."
        )
    if cpu_replicas:
        configure_cpu_replicas(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    logger.info("MirroredStrategy over %s (%d replicas)", devices, strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process logs to MLflow and writes outputs (always true but for workers > 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )
