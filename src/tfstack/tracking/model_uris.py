"""Models named by MLflow URIs, fetched from the store as a Keras file and class names.

`fetch_model` resolves ``runs:/RUN_ID/NAME``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
(and a LoggedModel's ``models:/m-<id>``) against one store, checking each part first so that a
wrong run id, model name, alias or version gets one line naming it and what the store has. It
downloads the model into a directory and returns the ``.keras`` file inside it: the pyfunc
``classifier``'s ``model.keras`` artifact with its class names, or the TensorFlow flavor's
``data/model.keras`` with the class names of the run that logged it (``class_names.json``).
Nothing is loaded here: loading the Keras file, and deciding whether its code is trusted, is the
caller's (`tfstack.predict`, `tfstack.components.load_component`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException

from tfstack.errors import TrackingError
from tfstack.tracking.models import process_tracking_uri
from tfstack.tracking.queries import get_run, read_artifact_text
from tfstack.tracking.store import reading_store

MODEL_URI_FORMS = "runs:/RUN_ID/NAME, models:/NAME@ALIAS or models:/NAME/VERSION"
_RUNS = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<name>[^/]+)/?$")
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)$")
_KERAS_FILES = ("artifacts/model.keras", "data/model.keras")  # classifier, TensorFlow flavor


@dataclass(frozen=True)
class FetchedModel:
    """A model downloaded from the store.

    Attributes:
        uri: The model URI asked for.
        keras_file: The downloaded ``.keras`` file.
        class_names: The class names the model was logged with (the classifier's metadata, or
            the run's ``class_names.json``), or None when there are none (regression).
        run_id: The run that logged the model, when the store says.
        task: The run's ``train.task`` param, when known.
    """

    uri: str
    keras_file: Path
    class_names: list[str] | None
    run_id: str | None
    task: str | None


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar while downloading (set back afterwards)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def fetch_model(model_uri: str, tracking_uri: str, destination: Path) -> FetchedModel:
    """Download the model ``model_uri`` names from the store at ``tracking_uri``.

    The store is also the model registry (as for sqlite and ``mlflow server``).

    Args:
        model_uri: ``runs:/RUN_ID/NAME``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
            ``models:/m-<id>``.
        tracking_uri: The store.
        destination: An empty directory to download into.

    Returns:
        The `FetchedModel`.

    Raises:
        TrackingError: The URI has another form; the store, run, logged model, registered
            model, alias or version does not exist; the model holds no Keras file.
    """
    client = reading_store(tracking_uri).client  # a missing sqlite file is not created
    where = f"in --tracking-uri {tracking_uri}"
    version, download_uri = None, model_uri
    if match := _RUNS.match(model_uri):
        run_id = match["run"]
        get_run(tracking_uri, run_id)  # names a missing run
        names = _run_model_names(client, run_id)
        if match["name"] not in names:
            raise TrackingError(
                f"run {run_id} has no model {match['name']!r} {where}; it logged "
                f"{names or 'no model'}. Use runs:/{run_id}/NAME with one of them."
            )
    elif match := _ALIAS.match(model_uri):
        _registered_model(client, match["name"], where)
        try:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        except MlflowException as err:
            aliases = sorted(_registered_model(client, match["name"], where).aliases)
            raise TrackingError(
                f"registered model {match['name']!r} has no alias {match['alias']!r} {where}; "
                f"its aliases are {aliases or 'none'}. Use one of them, or a version: "
                f"models:/{match['name']}/VERSION."
            ) from err
    elif match := _VERSION.match(model_uri):
        _registered_model(client, match["name"], where)
        try:
            version = client.get_model_version(match["name"], match["version"])
        except MlflowException as err:
            versions = sorted(
                int(v.version)
                for v in client.search_model_versions(f"name = '{_quoted(match['name'])}'")
            )
            raise TrackingError(
                f"registered model {match['name']!r} has no version {match['version']} "
                f"{where}; its versions are {versions or 'none'}."
            ) from err
    if version is not None:
        download_uri = _version_source(version)
    elif not (_RUNS.match(model_uri) or _LOGGED.match(model_uri)):
        raise TrackingError(
            f"{model_uri} is not a model tfstack can read: expected {MODEL_URI_FORMS} (a model "
            "in the MLflow store), or a .keras file."
        )
    try:
        # MLflow resolves runs:/ and models:/ through the process-wide store, whatever
        # tracking_uri says: set it for the download only.
        with _quiet_downloads(), process_tracking_uri(tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri,
                dst_path=str(destination),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
    except (MlflowException, OSError) as err:
        raise TrackingError(
            f"{model_uri} cannot be downloaded {where} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Check the URI."
        ) from err
    return _read_model(model_uri, Path(local), tracking_uri)


def _read_model(model_uri: str, local: Path, tracking_uri: str) -> FetchedModel:
    """The Keras file, class names, run and task of a downloaded model directory."""
    from mlflow.models import Model

    keras_file = next((local / f for f in _KERAS_FILES if (local / f).is_file()), None)
    if keras_file is None:
        raise TrackingError(
            f"{model_uri} holds no Keras model (no {' or '.join(_KERAS_FILES)}): it was not "
            "logged by tfstack. Use a tfstack run's classifier or model."
        )
    logged = Model.load(str(local / "MLmodel"))
    run_id = logged.run_id
    names = (logged.metadata or {}).get("class_names")
    task = None
    if run_id:
        try:
            task = get_run(tracking_uri, run_id)["params"].get("train.task")
            if names is None:
                text = read_artifact_text(tracking_uri, run_id, "class_names.json")
                names = json.loads(text) if text else None
        except TrackingError:  # the run was deleted: the model still predicts
            pass
    return FetchedModel(
        model_uri,
        keras_file,
        [str(n) for n in names] if names is not None else None,
        run_id,
        task,
    )


def _version_source(version) -> str:
    """Where a registered version's model is: its LoggedModel, else the URI it was made from.

    A version made from ``runs:/RUN_ID/NAME`` (``mlflow.register_model``, or by hand) points
    into the run's artifacts, where MLflow 3 keeps no model: the LoggedModel of that name is
    what ``runs:/`` resolves to, so the source URI is downloaded as such.
    """
    if getattr(version, "model_id", None):
        return f"models:/{version.model_id}"
    return version.source


def _run_model_names(client, run_id: str) -> list[str]:
    """The names of the models a run logged (``classifier``, ``model``)."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    return sorted({model.name for model in found})


def _registered_model(client, name: str, where: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        known = sorted(model.name for model in client.search_registered_models())
        raise TrackingError(
            f"no registered model {name!r} {where}; the registry holds "
            f"{known or 'none'}. Register one (tfstack promote), or fix the name."
        ) from err


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")
