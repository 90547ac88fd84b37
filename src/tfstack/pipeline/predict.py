"""`tfstack predict MODEL PATH...`: a run's, a registered or a saved model on new files.

The model comes from the project's MLflow store (`tfstack.tracking.model_uris.fetch_model`,
downloaded to a temporary directory) or from a ``.keras`` file, and loads as a component does
(`tfstack.components.load_component`: code in it is refused unless ``--trust-code``). The inputs
are found and predicted by `tfstack.predict`; the table has the columns the served classifier
answers with (`tfstack.predict.class_probabilities`), probabilities as ``p_<class>``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tfstack.errors import ComponentError, DataError

KERAS_FILES = (".keras", ".h5", ".hdf5")
MODEL_URI_PREFIXES = ("runs:/", "models:/")  # `tfstack.tracking.model_uris` resolves them
PATH_COLUMN = "path"
LABEL_COLUMN = "label"
PROBABILITY_PREFIX = "p_"


@dataclass
class Predictions:
    """What `predict` found: the table, and where the model and its class names came from."""

    table: object  # a pandas DataFrame: path, then label and p_<class>..., or prediction...
    model: str
    class_names: list[str] | None


def store_uri(explicit: str | None, root: Path) -> str:
    """The store ``tfstack run`` uses in ``root``, unless ``--tracking-uri`` names one.

    ``tracking.uri`` of the project's ``conf/`` (composed as ``tfstack run`` composes it), else
    ``TFSTACK_TRACKING_URI``, ``MLFLOW_TRACKING_URI``, else ``sqlite`` at the project root.
    """
    if explicit:
        return explicit
    from tfstack.pipeline.run_log import resolve_tracking_uri, tracking_uri

    if (root / "conf" / "config.yaml").is_file():
        from tfstack.pipeline.compose import compose

        return tracking_uri(compose([], config_dir=root / "conf"), root)
    return resolve_tracking_uri(None, root)  # no conf/: as tfstack run with tracking.uri null


def predict(
    model_source: str,
    paths: Sequence[str],
    *,
    tracking_uri: str | None = None,
    root: Path | None = None,
    batch_size: int = 32,
    trust_code: bool = False,
    modules: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    path_column: str = PATH_COLUMN,
) -> Predictions:
    """Predict on ``paths`` with the model ``model_source`` names.

    Args:
        model_source: ``runs:/RUN_ID/NAME``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            or a ``.keras`` file.
        paths: Image files, folders, CSVs of paths, ``.npz`` files (`tfstack.predict.find_inputs`).
        tracking_uri: The store (None: `store_uri`).
        root: The project root (default: the working directory).
        batch_size: Inputs per batch.
        trust_code: Allow code in the model (Lambda layers, custom classes).
        modules: Modules that register the model's custom classes (needs ``trust_code``).
        class_names: The class names, overriding the model's (needed for a ``.keras`` file of
            a classifier).
        path_column: A CSV's image column.

    Returns:
        The `Predictions`.

    Raises:
        TfstackError: (one line) the model, its URI or an input is wrong.
    """
    from tfstack import predict as library

    blocks = library.find_inputs(paths, path_column=path_column)  # before any model download
    root = Path.cwd() if root is None else root
    with tempfile.TemporaryDirectory(prefix="tfstack-predict-") as scratch:
        if model_source.startswith(MODEL_URI_PREFIXES):  # a .keras file needs no MLflow
            with warnings.catch_warnings():
                # Importing mlflow.pyfunc asks its own model classes for type hints, in a warning.
                warnings.filterwarnings("ignore", message=".*Add type hints", category=UserWarning)
                from tfstack.tracking.model_uris import fetch_model

            fetched = fetch_model(model_source, store_uri(tracking_uri, root), Path(scratch))
            keras_file, names, task = fetched.keras_file, fetched.class_names, fetched.task
        else:
            keras_file, names, task = _local_file(model_source), None, None
        model = _load(keras_file, model_source, trust_code=trust_code, modules=modules)
    names = list(class_names) if class_names is not None else names
    outputs = library.predict_blocks(model, blocks, batch_size=batch_size)
    row_names = [name for block in blocks for name in block.names]
    table = _table(outputs, names, task, model, model_source)
    table.insert(0, PATH_COLUMN, row_names)
    return Predictions(table, model_source, names)


def _local_file(source: str) -> Path:
    """A ``.keras`` (or legacy ``.h5``) file MODEL names."""
    if ":/" in source:
        raise ComponentError(
            f"{source} is not a model tfstack can read: expected runs:/RUN_ID/NAME, "
            "models:/NAME@ALIAS or models:/NAME/VERSION (a model in the MLflow store), or a "
            ".keras file."
        )
    path = Path(source)
    if not path.is_file():
        raise ComponentError(
            f"{source}: no such model file (working directory: {os.getcwd()}). Give a .keras "
            "file, or a model in the MLflow store: runs:/RUN_ID/classifier, models:/NAME@ALIAS."
        )
    if path.suffix.lower() not in KERAS_FILES:
        raise ComponentError(
            f"{source} is not a Keras model file (.keras, or a legacy .h5): save the model with "
            "model.save('model.keras')."
        )
    return path


def _load(keras_file: Path, source: str, *, trust_code: bool, modules: Sequence[str]):
    """Load the model as a component is loaded: untrusted code refused, one-line errors."""
    from tfstack.components import load_component
    from tfstack.trust import TrustOptions

    options = TrustOptions(trust_code="--trust-code", modules="--modules {modules}")
    try:
        return load_component(
            str(keras_file),
            name="model",
            trust_code=trust_code,
            modules=modules,
            key="MODEL",
            trust_options=options,
        )
    except ComponentError as err:
        # Name the model as the user did, not by a temporary download's path.
        message = str(err).replace(f"MODEL.path={keras_file}", source)
        raise ComponentError(message.replace(str(keras_file), source)) from err


def _table(outputs, names, task, model, source: str):
    """``label`` and ``p_<class>`` columns of a classifier, ``prediction`` ones of a regression."""
    import pandas as pd

    from tfstack import predict as library

    if names is None:
        classifier = task in ("classification", "binary") or (
            task is None and library.is_classifier(model)
        )
        if classifier:
            classes = outputs.shape[1] if outputs.shape[1] > 1 else 2
            raise DataError(
                f"{source} is a classifier without class names (no classifier model with "
                f"names, no class_names.json in its run): pass its {classes} class names "
                f"in class-id order, --class-names NAME,NAME,... (or --class-names "
                f"{','.join(str(i) for i in range(classes))} for class ids)."
            )
        return pd.DataFrame(outputs, columns=library.regression_columns(outputs))
    probabilities = library.class_probabilities(outputs, names, model=source)
    table = pd.DataFrame(probabilities, columns=[f"{PROBABILITY_PREFIX}{n}" for n in names])
    table.insert(0, LABEL_COLUMN, [names[i] for i in probabilities.argmax(axis=1)])
    return table


def table_text(table, *, limit: int | None = None) -> str:
    """The predictions as a readable table (probabilities to 3 decimals)."""
    shown = table if limit is None else table.head(limit)
    return shown.to_string(index=False, float_format=lambda value: f"{value:.3f}")


def write_csv(table, path: Path) -> None:
    """The predictions as CSV, written atomically (`tfstack.files.atomic_path`)."""
    from tfstack.files import atomic_path

    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
