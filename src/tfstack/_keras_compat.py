"""Every private Keras and TensorFlow API tfstack relies on, in one place.

Keras 3 and TensorFlow keep no promise about these names, so each use is a small function here
with what it does and why tfstack needs it; `tests/test_keras_compat.py` exercises each one, so a
Keras or TensorFlow release that changes one fails there, by name, rather than somewhere deep in
training. On import, `check_versions` warns (once per process) when the installed versions are
not the ones tested.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend import config as keras_config
from keras.src.backend.tensorflow import trainer
from keras.src.utils import file_utils
from tensorflow.python.framework import config as tf_config

logger = logging.getLogger(__name__)

# The minor releases these functions were written against and tested with (pyproject.toml
# allows only these).
TESTED = {"keras": "3.15", "tensorflow": "2.21"}


def check_versions() -> list[str]:
    """Warn when Keras or TensorFlow is not a tested minor release.

    Returns:
        One message per package outside its tested release; empty when both are tested.
    """
    installed = {"keras": keras.__version__, "tensorflow": tf.__version__}
    messages = [
        f"{package} {installed[package]} is not the tested {tested}.x: tfstack uses private "
        f"{package} APIs (tfstack/_keras_compat.py) that may have changed"
        for package, tested in TESTED.items()
        if not installed[package].startswith(tested + ".")
    ]
    for message in messages:
        logger.warning(message)
    return messages


def flatten_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """The layer itself and every layer nested in it, at any depth (models in models too)."""
    return layer._flatten_layers(include_self=True, recursive=True)


def uses_seed_generators(layer: keras.layers.Layer) -> bool:
    """Whether the layer draws random numbers (Dropout, noise, random augmentation, ...)."""
    return bool(layer._seed_generators)


def producer(tensor) -> tuple[keras.Operation, object]:
    """The operation that produced a functional model's KerasTensor, and its call (node)."""
    operation, node_index, _ = tensor._keras_history
    return operation, operation._inbound_nodes[node_index]


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether a distribution strategy's cluster has more than this process."""
    return bool(strategy.extended._in_multi_worker_mode())


def disable_op_determinism() -> None:
    """Turn TensorFlow's process-wide op determinism off again (the public API only turns it on)."""
    tf_config.disable_op_determinism()


def fix_multi_worker_fit(is_multi_worker: Callable[[object], bool]) -> None:
    """Make Keras 3.15's ``Model.fit`` work under a multi-worker strategy.

    Two single-worker assumptions in ``keras/src/backend/tensorflow/trainer.py`` break it
    (reproduced with two workers on 127.0.0.1, keras-team/keras#20585):

    - ``_maybe_symbolic_build`` peeks at one batch to build the metrics and averages it across
      replicas with ``strategy.reduce``, which cannot convert the batch of several workers
      (``Attempt to convert a value (PerReplica...) to a Tensor``). Building only needs shapes,
      so this replacement takes the batch of this worker's first replica.
    - ``reduce_per_replica`` averages every step's logs with ``strategy.reduce("MEAN", v,
      axis=0)``; the logs are scalars (``Invalid reduction dimension 0 for input with 0
      dimensions``). The replacement reduces scalars with ``axis=None``. Keras's metric
      variables are already summed across replicas on update, so the mean of equal values is
      the global metric, as in one process.

    Both replacements defer to Keras's own code outside multi-worker mode. Applied once per
    process; a Keras without these functions is left alone (and the two-worker test says
    whether fit works there).

    Args:
        is_multi_worker: tells whether a strategy spans several workers
            (`tfstack.distribute.is_multi_worker`).
    """
    if not hasattr(trainer, "reduce_per_replica") or not hasattr(
        trainer.TensorFlowTrainer, "_maybe_symbolic_build"
    ):
        logger.warning("This Keras has no reduce_per_replica to fix; fit is used as it is")
        return
    if getattr(trainer.reduce_per_replica, "_tfstack_fix", False):
        return
    keras_reduce = trainer.reduce_per_replica
    keras_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    @functools.wraps(keras_reduce)
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return keras_reduce(values, strategy, reduction)

        def mean(value):
            rank = getattr(getattr(value, "shape", None), "rank", None)
            return strategy.reduce("MEAN", value, axis=None if rank == 0 else 0)

        return tree.map_structure(mean, values)

    @functools.wraps(keras_build)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and is_multi_worker(strategy):
            for _, _, batches in iterator:
                data_batch = tree.map_structure(
                    lambda x: (
                        strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues)
                        else x
                    ),
                    next(batches),
                )
                break
            iterator = None
        return keras_build(self, iterator=iterator, data_batch=data_batch)

    reduce_per_replica._tfstack_fix = True
    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def keras_home() -> str:
    """The Keras home folder Keras read at import (``$KERAS_HOME``, else ``~/.keras``)."""
    return keras_config.keras_home()


def file_matches_hash(path: str, file_hash: str, algorithm: str = "auto") -> bool:
    """Whether a file has the md5 or sha256 hash Keras gives for it (Keras's own check)."""
    return file_utils.validate_file(path, file_hash, algorithm=algorithm)


@contextlib.contextmanager
def answering_get_file(replacement: Callable[..., str]) -> Iterator[None]:
    """Let ``replacement`` answer the ``get_file`` calls of Keras Applications builders.

    Every ``keras/src/applications/*.py`` builder fetches its weights with
    ``file_utils.get_file(fname, origin, cache_subdir="models", file_hash=...)``, looked up on
    the module at call time, so replacing that module attribute for the duration of a build
    reaches every family without knowing how each names its files. ``replacement`` receives
    Keras's own ``get_file`` first, then the builder's arguments. Not thread-safe: one build at
    a time.
    """
    original = file_utils.get_file
    file_utils.get_file = functools.partial(replacement, original)
    try:
        yield
    finally:
        file_utils.get_file = original


check_versions()
