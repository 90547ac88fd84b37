"""MLflow tracking: one run per pipeline execution, shared by several stages.

This package is the only tfstack code that imports mlflow (`tests/test_layers.py` and ruff's
banned-api rule enforce it). It receives plain values (dicts, numbers, strings, numpy arrays,
matplotlib figures, Keras models) and logs them into a run by its id. Its modules, by concern:

    store      tracking URIs, the sqlite default, reachability, one `Store` (client) per URI,
               bounded retries on "database is locked", a store that fails during a run
    registry   `TrackedRun`, the one run object, and the registry of runs open in this process
    runs       experiments; start, resume, attach and end a run (`tracked_run`); params, tags
    records    metrics, and text, JSON, figure and file artifacts
    models     `log_keras_model`: the TensorFlow flavor with a signature and pinned requirements;
               `log_classifier_model`: the pyfunc classifier (`classifier`) answering with names
    model_registry  `register_run_model`: a run's served model as a registered version, an alias
    model_uris `fetch_model`: a runs:/ or models:/ URI downloaded as a .keras file with its
               class names (`tfstack predict`)
    callback   `EpochLogger`, the Keras callback that logs every epoch of a phase
    queries    reading runs back: `get_run`, `search_runs`, `metric_history`, artifacts
    run_ref    the JSON file that carries a run's id from one stage to the next
    values     Python values as MLflow stores them, and MLflow's limits

A pipeline execution is one MLflow run written to by several processes (the DVC stages `build`,
`train`, `evaluate`). The first stage starts the run and writes its id to a small JSON file
(`write_run_ref`); each later stage reads it (`read_run_ref`) and resumes the run by id.
Everything is logged through `MlflowClient` with an explicit run id, never through MLflow's fluent
"active run", so no process-global state decides where data lands and nothing ends a run behind
our back. A stage that is not the last one leaves the run RUNNING (`tracked_run(..., end=False)`);
the last stage ends it FINISHED; any stage that raises ends it FAILED with an `error` tag and an
`error.txt` artifact.

Typical stage:

    ref = read_run_ref(ref_path)
    with tracked_run(uri, experiment, run_id=ref and ref["run_id"], end=False) as run_id:
        write_run_ref(ref_path, run_id, uri, experiment)
        log_params_flat(run_id, params)
        model.fit(..., callbacks=[EpochLogger(run_id, phase="head", phase_index=0)])
"""

from tfstack.errors import StoreLostError, TrackingError
from tfstack.tracking.callback import EpochLogger
from tfstack.tracking.model_registry import (
    register_run_model,
    run_model,
)
from tfstack.tracking.models import (
    default_pip_requirements,
    log_classifier_model,
    log_keras_model,
)
from tfstack.tracking.queries import (
    PARENT_RUN_TAG,
    get_run,
    metric_history,
    read_artifact_text,
    search_runs,
)
from tfstack.tracking.records import (
    log_artifact_file,
    log_figure,
    log_json,
    log_metrics,
    log_text,
)
from tfstack.tracking.registry import TrackedRun, get_tracked_run
from tfstack.tracking.run_ref import RUN_REF_KEYS, read_run_ref, write_run_ref
from tfstack.tracking.runs import (
    TERMINAL_STATUSES,
    attach_run,
    check_store,
    delete_tags,
    end_run,
    ensure_experiment,
    flush,
    log_params_flat,
    log_tags,
    run_experiment_name,
    start_run,
    tracked_run,
)
from tfstack.tracking.store import HTTP_LIMITS, check_reachable, default_tracking_uri
from tfstack.tracking.values import (
    MAX_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    flatten_params,
)

__all__ = [
    "HTTP_LIMITS",
    "MAX_KEY_LENGTH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "PARENT_RUN_TAG",
    "RUN_REF_KEYS",
    "TERMINAL_STATUSES",
    "EpochLogger",
    "StoreLostError",
    "TrackedRun",
    "TrackingError",
    "attach_run",
    "check_reachable",
    "check_store",
    "default_pip_requirements",
    "default_tracking_uri",
    "delete_tags",
    "end_run",
    "ensure_experiment",
    "flatten_params",
    "flush",
    "get_run",
    "get_tracked_run",
    "log_artifact_file",
    "log_classifier_model",
    "log_figure",
    "log_json",
    "log_keras_model",
    "log_metrics",
    "log_params_flat",
    "log_tags",
    "log_text",
    "metric_history",
    "read_artifact_text",
    "read_run_ref",
    "register_run_model",
    "run_model",
    "run_experiment_name",
    "search_runs",
    "start_run",
    "tracked_run",
    "write_run_ref",
]
