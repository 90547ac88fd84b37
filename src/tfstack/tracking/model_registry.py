"""The MLflow Model Registry: a run's logged model as a version of a registered model, by alias.

In MLflow 3 a model is a LoggedModel of its own (``models:/<model_id>``) linked to the run that
logged it. `register_run_model` registers the LoggedModel a user would load to predict (the
pyfunc ``classifier``, which answers with class names, else the TensorFlow flavor ``model``) as
a new version of a registered model, the way ``mlflow.register_model("models:/<model_id>")``
does (the version's source is ``models:/<model_id>``, its run id the run's, and the LoggedModel
is tagged with the version), tags the version and points an alias at it. Aliases only: the
registry's stages are deprecated.

Everything goes through one `MlflowClient` whose registry is the tracking store itself (not the
process-wide or ``MLFLOW_REGISTRY_URI`` registry), and every call through `Store.write`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tfstack.errors import TrackingError
from tfstack.tracking.models import process_tracking_uri
from tfstack.tracking.queries import get_run
from tfstack.tracking.store import reading_store
from tfstack.tracking.values import tag_value

logger = logging.getLogger(__name__)

# The LoggedModels a run may hold, in the order a user would load them to predict: the pyfunc
# classifier (class names and probabilities), then the TensorFlow flavor (the Keras model).
SERVED_MODEL_NAMES = ("classifier", "model")
# MLflow's tag on a LoggedModel listing its registered versions (mlflow.utils.mlflow_tags).
MODEL_VERSIONS_TAG = "mlflow.modelVersions"


def run_model(uri: str, run_id: str) -> dict[str, str]:
    """The LoggedModel of a run that a user would load to predict (its latest, if logged twice).

    Args:
        uri: Tracking URI.
        run_id: A run id in that store.

    Returns:
        ``{"model_id", "name", "uri"}``: the LoggedModel's id, its name (``classifier`` or
        ``model``) and ``models:/<model_id>``.

    Raises:
        TrackingError: The run does not exist, or logged no model.
    """
    experiment_id = get_run(uri, run_id)["experiment_id"]
    store = reading_store(uri)
    for name in SERVED_MODEL_NAMES:
        found = store.write(
            f"searching the models of run {run_id}",
            store.client.search_logged_models,
            experiment_ids=[experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            max_results=1,
        )
        if found:
            model_id = found[0].model_id
            return {"model_id": model_id, "name": name, "uri": f"models:/{model_id}"}
    raise TrackingError(
        f"run {run_id} has no logged model (neither {' nor '.join(SERVED_MODEL_NAMES)}): it ran "
        f"with tracking.log_model=false, or failed before its evaluation. Rerun it with "
        f"tracking.log_model=true, or register another run."
    )


def _registry_client(uri: str) -> MlflowClient:
    """A client whose model registry is the tracking store at ``uri``."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_run_model(
    uri: str,
    run_id: str,
    name: str,
    *,
    alias: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Register a run's served model (`run_model`) as a new version of ``name``; move ``alias``.

    The registered model is created on first use. The version carries ``tags`` (values as
    strings); the alias, if given, is moved from whichever version held it to the new one.

    Args:
        uri: Tracking URI (the registry is the same store).
        run_id: The run whose model is registered.
        name: The registered model's name.
        alias: An alias to point at the new version (e.g. ``champion``), or None.
        tags: Tags of the new version.

    Returns:
        ``{"name", "version", "alias", "model_uri", "source", "model_name"}``: ``model_uri`` is
        ``models:/<name>@<alias>`` (or ``models:/<name>/<version>`` without an alias),
        ``source`` the LoggedModel's ``models:/<model_id>``, ``model_name`` its name in the run.

    Raises:
        TrackingError: The run or its model does not exist, or the registry refused a write.
    """
    model = run_model(uri, run_id)
    store = reading_store(uri)
    client = _registry_client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        store.write(f"creating registered model {name!r}", client.create_registered_model, name)
        logger.info("Created registered model %r", name)
    # A sqlite registry resolves a models:/<model_id> source through the process-wide tracking
    # URI (MLflow 3.17's SqlAlchemyStore.create_model_version), so it is set for this call only.
    with process_tracking_uri(uri):
        version = store.write(
            f"registering {model['uri']} of run {run_id} as a version of {name!r}",
            client.create_model_version,
            name=name,
            source=model["uri"],
            run_id=run_id,
            tags={str(key): tag_value(value) for key, value in (tags or {}).items()},
            model_id=model["model_id"],
        )
    _link_logged_model(store, client, model["model_id"], name, version.version)
    if alias:
        store.write(
            f"moving alias {alias!r} of {name!r} to version {version.version}",
            client.set_registered_model_alias,
            name,
            alias,
            version.version,
        )
    logger.info(
        "Registered %s (run %s) as %s version %s%s",
        model["uri"],
        run_id,
        name,
        version.version,
        f" @{alias}" if alias else "",
    )
    return {
        "name": name,
        "version": str(version.version),
        "alias": alias or "",
        "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}",
        "source": model["uri"],
        "model_name": model["name"],
    }


def _link_logged_model(store, client: MlflowClient, model_id: str, name: str, version) -> None:
    """Tag the LoggedModel with its new registered version, as ``mlflow.register_model`` does."""
    logged = store.write(f"reading model {model_id}", client.get_logged_model, model_id)
    versions = json.loads(logged.tags.get(MODEL_VERSIONS_TAG) or "[]")
    versions.append({"name": name, "version": str(version)})
    store.write(
        f"tagging model {model_id} with its registered version",
        client.set_logged_model_tags,
        model_id,
        {MODEL_VERSIONS_TAG: json.dumps(versions)},
    )
