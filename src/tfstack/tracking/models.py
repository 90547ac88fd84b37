"""Keras models in a run: the TensorFlow flavor, and the pyfunc classifier that answers with names.

Both carry a signature, an input example and pinned requirements, and neither holds a pickle.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
import mlflow
import mlflow.models
import mlflow.pyfunc
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
def process_tracking_uri(uri: str) -> Iterator[None]:
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
    predictions: np.ndarray | None = None,
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
        predictions: The model's outputs for ``input_example`` (or more rows), when the caller
            has them: the signature takes their dtype and shape. None predicts the 5 rows here
            (for a large model, a new trace of its predict function: seconds).

    Returns:
        The model URI, `models:/<model_id>`.

    Raises:
        TrackingError: Logging failed.
    """
    from mlflow.models import infer_signature

    example = np.asarray(input_example)[:5]
    if predictions is None:
        predictions = model.predict(example, verbose=0)
    elif not isinstance(predictions, (list, tuple, dict)):
        predictions = np.asarray(predictions)[: len(example)]
    if isinstance(predictions, (list, tuple)):
        predictions = dict(zip(model.output_names, predictions, strict=True))
    return _log_model(
        run_id,
        name,
        # Model.log with the flavor, as mlflow.tensorflow.log_model does, without the reload.
        mlflow.models.Model.log,
        artifact_path=None,
        flavor=_WithoutServingCheck(mlflow.tensorflow),
        model=model,
        signature=infer_signature(example, predictions),
        input_example=example,
        pip_requirements=pip_requirements,
        hide_custom_objects=True,
    )


def log_classifier_model(
    run_id: str,
    model: keras.Model,
    input_example: np.ndarray,
    class_names: Sequence[str],
    *,
    name: str = "classifier",
    safe_mode: bool = True,
    pip_requirements: list[str] | None = None,
    keras_file: str | Path | None = None,
) -> str:
    """Log a Keras classifier as an MLflow pyfunc model that answers with class names.

    The model is `tfstack.tracking.classifier.ClassifierModel`, logged *from code* (MLflow
    copies that file into the model and runs it on load; nothing is pickled), with the Keras
    model and ``class_names.json`` as its artifacts and the names in its metadata. Its
    ``predict`` (and ``mlflow models serve``) returns, per input, ``label`` (the class name) and
    one probability column per class. The signature takes the raw inputs in their own dtype and
    shape (uint8 images stay uint8), so a client sends what the data holds.

    Args:
        run_id: A run started or resumed in this process.
        model: A trained Keras classifier: ``(n, classes)`` probabilities, or ``(n, 1)`` with
            two class names (binary).
        input_example: A batch of raw inputs; the first 5 rows are stored as the example.
        class_names: One name per class, in class-id order.
        name: Model name (``runs:/<run_id>/<name>`` resolves to it).
        safe_mode: Whether the model loads with Keras's safe mode (False only for a model
            whose code tfstack trusted).
        pip_requirements: As for `log_keras_model`.
        keras_file: ``model`` as saved already (a ``.keras`` file of this very model, e.g. the
            train stage's): logged as it is instead of saving the model once more.

    Returns:
        The model URI, ``models:/<model_id>``.

    Raises:
        TrackingError: Logging failed.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from tfstack.tracking import classifier

    names = [str(n) for n in class_names]
    example = np.asarray(input_example)[:5]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))]),
        outputs=Schema(
            [ColSpec("string", classifier.LABEL_COLUMN)] + [ColSpec("double", n) for n in names]
        ),
    )
    with tempfile.TemporaryDirectory(prefix="tfstack-classifier-") as scratch:
        keras_path = Path(scratch) / "model.keras"
        if keras_file is None:
            model.save(keras_path)
        else:
            shutil.copyfile(keras_file, keras_path)  # MLflow copies it under this name
        names_path = Path(scratch) / "class_names.json"
        names_path.write_text(json.dumps(names), encoding="utf-8")
        return _log_model(
            run_id,
            name,
            # Model.log, not mlflow.pyfunc.log_model, which does not pass a run id on.
            mlflow.models.Model.log,
            artifact_path=None,
            flavor=_WithoutServingCheck(mlflow.pyfunc),
            python_model=classifier.__file__,
            artifacts={"keras_model": str(keras_path), "class_names": str(names_path)},
            model_config={"modules": registered_modules(keras_path), "safe_mode": safe_mode},
            metadata={"class_names": names},
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements,
        )


def registered_modules(keras_file: Path) -> list[str]:
    """The modules whose registered Keras classes a saved model's layers use.

    Read from the ``.keras`` file's architecture (its ``config``, not its ``compile_config``:
    the served model loads without its optimizer), as ``registered_name`` entries that name a
    class in Keras's registry of custom objects.
    """
    with zipfile.ZipFile(keras_file) as archive:
        architecture = json.loads(archive.read("config.json"))["config"]
    used: set[str] = set()

    def collect(value) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("registered_name"), str):
                used.add(value["registered_name"])
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(architecture)
    registered = keras.saving.get_custom_objects()
    return sorted({registered[key].__module__ for key in used if key in registered})


class _WithoutServingCheck:
    """A flavor module whose ``Model.log`` skips MLflow's check of the input example.

    After saving, ``Model.log`` loads the saved model again (``mlflow.pyfunc.load_model``: a
    Keras load) and predicts the serving example with it, a new trace of the model's predict
    function: 7-8 s per logged MobileNetV2 on this machine, twice per classification run, and
    a failure there is only a logged warning. The model logged here is the one that just
    predicted the example (`log_keras_model`'s signature) and the classifier's load and
    predict are tested (``tests/test_tracking.py``), so the check is skipped:
    ``validate_serving_input=False``, which Model.log reads and the flavors' ``save_model``
    would refuse.
    """

    def __init__(self, flavor) -> None:
        self.flavor = flavor
        self.__name__ = flavor.__name__

    def save_model(self, *args, **kwargs):
        kwargs.pop("validate_serving_input", None)
        return self.flavor.save_model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.flavor, name)


def _log_model(
    run_id: str,
    name: str,
    log,
    *args,
    pip_requirements=None,
    hide_custom_objects: bool = False,
    **kwargs,
) -> str:
    """Create a LoggedModel in the run's experiment and log a model into it with ``log``.

    ``hide_custom_objects`` keeps the TensorFlow flavor's pickle of Keras's registered classes
    out (`_without_global_custom_objects`); the pyfunc classifier pickles nothing and keeps them
    registered. Neither is loaded again to check its input example (`_WithoutServingCheck`).
    """
    run = get_tracked_run(run_id)
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
    hidden = _without_global_custom_objects() if hide_custom_objects else contextlib.nullcontext()
    with process_tracking_uri(run.uri), hidden:
        info = run.write(
            f"logging model {name!r} to run {run_id}",
            log,
            *args,
            name=name,
            pip_requirements=requirements,
            run_id=run_id,
            model_id=logged_model.model_id,
            validate_serving_input=False,  # see _WithoutServingCheck
            **kwargs,
        )
    logger.info(
        "logged model %s to run %s in %.2f s", info.model_uri, run_id, time.perf_counter() - start
    )
    return info.model_uri
