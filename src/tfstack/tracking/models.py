"""Keras models in a run: the TensorFlow flavor with a signature, an input example and pins."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Iterator

import keras
import mlflow
import mlflow.tensorflow
import numpy as np

from tfstack.tracking.registry import get_tracked_run

logger = logging.getLogger(__name__)


def default_pip_requirements() -> list[str]:
    """Pinned requirements of a logged Keras model: the installed tensorflow, keras and mlflow.

    Passing them skips MLflow's requirement inference, which reloads the model in a subprocess
    (measured: about 4.6 s against 0.35 s for a tiny model).
    """
    packages = ["tensorflow", "keras", "mlflow"]
    return [f"{name}=={importlib.metadata.version(name)}" for name in packages]


@contextlib.contextmanager
def _without_global_custom_objects() -> Iterator[None]:
    """Hide Keras's registered custom objects while MLflow saves a model.

    mlflow.tensorflow.save_model cloudpickles every registered custom object (tfstack registers
    its Cast layer and discriminative optimizers) into ``global_custom_objects.cloudpickle``, and
    load_model unpickles it: a pickle in every logged model. Keras saves registered classes by
    name in the model's config without that dict, so hiding it only drops the pickle; a process
    that loads a model using tfstack's classes imports them (``import tfstack.adapters,
    tfstack.schedules``) as for any registered Keras class.
    """
    registered = keras.saving.get_custom_objects()
    saved = dict(registered)
    registered.clear()
    try:
        yield
    finally:
        registered.update(saved)


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Set MLflow's process-wide tracking URI for a block, then restore it and the env var."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both the URI and the env var


def log_keras_model(
    run_id: str,
    model: keras.Model,
    input_example: np.ndarray,
    *,
    name: str = "model",
    pip_requirements: list[str] | None = None,
) -> str:
    """Log a Keras model with the MLflow TensorFlow flavor, with a signature and input example.

    In MLflow 3 a model is a LoggedModel of its own (artifacts under `.../models/<model_id>/`,
    not under the run's artifacts) linked to the run as an output. It loads with
    `mlflow.tensorflow.load_model(uri)` (the Keras model) and `mlflow.pyfunc.load_model(uri)`.
    The LoggedModel is created explicitly in the run's experiment: with a run id but no active
    fluent run MLflow 3.17 would put it in experiment "0" under `./mlruns`, where
    `runs:/<run_id>/<name>` cannot find it.

    Args:
        run_id: A run started or resumed in this process.
        model: The Keras model.
        input_example: A batch of inputs; the first 5 rows are stored as the example and used with
            the model's predictions to infer the signature.
        name: Model name (`runs:/<run_id>/<name>` also resolves to it).
        pip_requirements: Requirements recorded with the model; None uses
            `default_pip_requirements()` (pinned installed versions, no slow inference).

    Returns:
        The model URI, `models:/<model_id>`.

    Raises:
        TrackingError: Logging failed.
    """
    from mlflow.models import infer_signature

    run = get_tracked_run(run_id)
    example = np.asarray(input_example)[:5]
    predictions = model.predict(example, verbose=0)
    if isinstance(predictions, (list, tuple)):
        predictions = dict(zip(model.output_names, predictions, strict=True))
    signature = infer_signature(example, predictions)
    requirements = default_pip_requirements() if pip_requirements is None else pip_requirements
    logged_model = run.write(
        f"creating model {name!r} in run {run_id}",
        run.client.create_logged_model,
        experiment_id=run.experiment_id,
        name=name,
        source_run_id=run_id,
    )
    start = time.perf_counter()
    # Model.log resolves its store from the process-wide tracking URI; set it only for this call
    # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would leak into later runs
    # of this process and into every subprocess it starts).
    with _process_tracking_uri(run.uri), _without_global_custom_objects():
        info = run.write(
            f"logging model {name!r} to run {run_id}",
            mlflow.tensorflow.log_model,
            model,
            name=name,
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            run_id=run_id,
            model_id=logged_model.model_id,
        )
    logger.info(
        "logged model %s to run %s in %.2f s", info.model_uri, run_id, time.perf_counter() - start
    )
    return info.model_uri
