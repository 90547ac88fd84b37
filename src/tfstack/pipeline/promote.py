"""`tfstack promote` and ``tracking.register``: a run's model into the MLflow Model Registry.

``promote`` picks the run: the given one, or the best finished child of a sweep by the sweep's
objective (its parent's ``objective`` tag, ``max val_accuracy`` by default: the best epoch's
value of that metric, as the sweep itself ranks its jobs; ties go to the earlier job). It then
registers the run's served model (the pyfunc ``classifier``, else the TensorFlow ``model``) as a
new version of the registered model, moves the alias to it and tags the version with what the
run was: freeze, stacking, schedule, config hash, its test metrics (and the objective's value).

``register_finished_run`` is ``tracking.register``: the same registration at the end of a
successful ``tfstack run`` or DVC ``evaluate`` stage. A sweep's jobs do not register one by
one (the last to finish would take the alias); the sweep registers its best job at its end.
"""

from __future__ import annotations

import logging
from typing import Any

from tfstack.errors import TfstackError

logger = logging.getLogger(__name__)

# The run's tags a registered version carries, when the run has them.
RUN_TAGS = ("freeze", "stacking", "schedule", "config_hash", "data_hash", "git_commit")
# A version carries the run's evaluation metrics (test_accuracy, test_loss, ...).
METRIC_PREFIX = "test_"
OBJECTIVE_TAG = "objective"  # on a sweep's parent run: "max val_accuracy"


class PromoteError(TfstackError):
    """No run to register: a parent without finished children, no objective, a failed run."""


def version_tags(run: dict[str, Any], objective: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tags of a registered version: the run's configuration tags, test metrics, objective.

    Args:
        run: A run as `tfstack.tracking.get_run` returns it.
        objective: ``{"metric", "mode", "value", "parent_run_id"}`` when a sweep picked it
            (``parent_run_id`` None and ``runs`` when it was picked among pipeline runs).
    """
    tags: dict[str, Any] = {key: run["tags"][key] for key in RUN_TAGS if key in run["tags"]}
    tags.update(
        {key: value for key, value in run["metrics"].items() if key.startswith(METRIC_PREFIX)}
    )
    tags["run_name"] = run["run_name"]
    if objective is not None:
        tags["objective"] = f"{objective['mode']} {objective['metric']}"
        tags[f"best_{objective['metric']}"] = objective["value"]
        if objective["parent_run_id"]:
            tags["sweep_parent_run_id"] = objective["parent_run_id"]
        else:  # picked among the experiment's pipeline runs (no sweep)
            tags["picked_among_runs"] = objective["runs"]
    return tags


def parse_objective(parent: dict[str, Any]) -> dict[str, str]:
    """A sweep parent's objective from its ``objective`` tag (``max val_accuracy``).

    Raises:
        PromoteError: The run has no (valid) objective tag: it is not a sweep's parent.
    """
    text = parent["tags"].get(OBJECTIVE_TAG, "")
    mode, _, metric = text.partition(" ")
    if mode not in ("max", "min") or not metric:
        raise PromoteError(
            f"run {parent['run_id']} has no sweep objective (tag objective={text!r}), so it is "
            f"not the parent of a `tfstack run -m` sweep. Give a sweep's parent run id with "
            f"--parent (or --parent last), or the run itself: tfstack promote RUN_ID."
        )
    return {"mode": mode, "metric": metric}


def best_child(uri: str, parent: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sweep's best finished child by its objective, and the objective with its value.

    Raises:
        PromoteError: No objective, no finished child, or no child logged the objective metric.
    """
    from tfstack import tracking

    objective = parse_objective(parent)
    children = tracking.search_runs(uri, parent["experiment"], parent_run_id=parent["run_id"])
    if not children:
        raise PromoteError(
            f"sweep parent run {parent['run_id']} has no FINISHED child run in {uri}: every job "
            f"failed, or the sweep is still running. Check it with `tfstack compare --parent "
            f"{parent['run_id']}`, or promote a run by its id."
        )
    run, value = best_run(uri, children, objective)
    if run is None:
        raise PromoteError(
            f"no FINISHED child of sweep parent run {parent['run_id']} logged the objective "
            f"metric {objective['metric']} ({objective['mode']}): nothing to rank them by. "
            "Promote a run by its id."
        )
    return run, {**objective, "value": value, "parent_run_id": parent["run_id"]}


def best_run(
    uri: str, runs: list[dict[str, Any]], objective: dict[str, str]
) -> tuple[dict[str, Any] | None, float | None]:
    """The run with the best epoch of ``objective`` (ties: the earlier job), and that value.

    ``(None, None)`` when no run logged the metric.
    """
    from tfstack import tracking
    from tfstack.pipeline.sweeps import best_of_history, pick_best

    metric, mode = objective["metric"], objective["mode"]
    scored = []
    for index, run in enumerate(runs):
        history = tracking.metric_history(uri, run["run_id"], metric)
        rows = [{"epoch": step, metric: value} for step, value in history]
        value, _ = best_of_history(rows, metric, mode)
        if history:
            job = run["tags"].get("sweep_job", "")
            order = int(job) if job.isdigit() else index  # ties: the earlier job, as the sweep
            scored.append({"value": value, "job": order, "run": run})
    if not scored:
        return None, None
    best = pick_best(scored, mode)
    return best["run"], best["value"]


def best_pipeline_run(uri: str, experiment: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """With no sweep: the best of the experiment's FINISHED top-level runs (``dvc repro``,
    ``dvc exp run``, ``tfstack run``), by the sweeps' default objective.

    A DVC project's experiments are its sweep: each ``dvc exp run -S ...`` is one run, and none
    has a parent run.

    Raises:
        PromoteError: The experiment has no finished run, or none logged the objective metric.
    """
    from tfstack import tracking
    from tfstack.pipeline.sweeps import DEFAULT_OBJECTIVE

    runs = [
        run
        for run in tracking.search_runs(uri, experiment)
        if tracking.PARENT_RUN_TAG not in run["tags"]
    ]
    objective = dict(DEFAULT_OBJECTIVE)
    run, value = best_run(uri, runs, objective) if runs else (None, None)
    if run is None:
        raise PromoteError(
            f"--parent last: experiment {experiment!r} ({uri}) has no sweep and no FINISHED run "
            f"that logged {objective['metric']}. Run `dvc repro` or `tfstack run -m ...` first, "
            "name the experiment (--experiment NAME), or promote a run by its id."
        )
    return run, {**objective, "value": value, "parent_run_id": None, "runs": len(runs)}


def promote(
    uri: str,
    *,
    name: str,
    alias: str | None,
    run_id: str | None = None,
    parent: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Register a run's model (the given run, or a sweep's best child) and move the alias.

    Args:
        uri: Tracking URI.
        name: The registered model's name.
        alias: The alias to move to the new version (``champion``), or None.
        run_id: The run to register; or
        parent: a sweep's parent run id, or ``"last"`` for the experiment's latest sweep.
        experiment: The experiment ``parent="last"`` looks in.

    Returns:
        `tracking.register_run_model`'s answer with ``run_id``, ``run_name`` and ``tags`` (the
        version's), and ``objective`` when a sweep picked the run.

    Raises:
        PromoteError: No run to register (see `best_child`), or the run did not finish.
        TrackingError: The run or its model does not exist, or the registry refused a write.
    """
    check_names(name, alias, name_key="--name", alias_key="--alias")  # before TensorFlow loads
    from tfstack import tracking

    objective = None
    if parent is not None:
        if parent == "last":
            parent = _latest_sweep(uri, experiment or "tfstack")
        if parent is None:
            run, objective = best_pipeline_run(uri, experiment or "tfstack")
        else:
            run, objective = best_child(uri, tracking.get_run(uri, parent))
    else:
        run = tracking.get_run(uri, run_id)
        if run["status"] != "FINISHED":
            raise PromoteError(
                f"run {run_id} is {run['status']}, not FINISHED: only a run that completed is "
                f"registered. Promote a finished run (tfstack compare lists them)."
            )
    tags = version_tags(run, objective)
    registered = tracking.register_run_model(
        uri, run["run_id"], name, alias=alias or None, tags=tags
    )
    return {
        **registered,
        "run_id": run["run_id"],
        "run_name": run["run_name"],
        "tags": tags,
        "objective": objective,
    }


def _latest_sweep(uri: str, experiment: str) -> str | None:
    """The experiment's most recent sweep parent (``--parent last``); None if it has none."""
    from tfstack.compare import CompareError
    from tfstack.pipeline.compare import latest_sweep_parent

    try:
        return latest_sweep_parent(uri, experiment)
    except CompareError:
        return None


def check_names(name: str | None, alias: str | None, *, name_key: str, alias_key: str) -> None:
    """MLflow's rules for registered model names and aliases, checked before anything runs.

    A name is not empty, holds no ``/`` or ``:`` and is not ``.`` or ``..``-prefixed (MLflow
    treats names as paths that must not resolve to another name); an alias holds only letters,
    digits, ``_`` and ``-`` (at most 255) and is neither ``latest`` nor ``v<N>`` (MLflow reserves
    those: ``@latest`` is the newest version, ``@v3`` version 3). As `mlflow.utils.validation`
    checks them in MLflow 3, so a typo fails in one line before training, not after it.

    Raises:
        ConfigError: A name or alias MLflow would refuse.
    """
    import posixpath
    import re

    from tfstack.errors import ConfigError

    if name is not None:
        problem = None
        if not name.strip():
            problem = "is empty"
        elif "/" in name or ":" in name:
            problem = "holds '/' or ':', which MLflow refuses in registered model names"
        elif posixpath.normpath(name) != name or name == "." or name.startswith(".."):
            problem = "is not a plain name (MLflow treats names as paths)"
        if problem:
            raise ConfigError(
                f"{name_key}={name!r} {problem}. Use letters, digits, '_', '-' or '.', e.g. "
                f"{name_key}=digits."
            )
    if alias is not None:
        problem = None
        if not re.fullmatch(r"[\w\-]{1,255}", alias):
            problem = "may hold only letters, digits, '_' and '-' (1 to 255 of them)"
        elif alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            problem = "is reserved by MLflow ('latest' is the newest version, v<N> version N)"
        if problem:
            raise ConfigError(f"{alias_key}={alias!r} {problem}. Use e.g. {alias_key}=champion.")


def check_register(tracking) -> None:
    """``tracking.register``: MLflow's name and alias rules, and a run that logs a model.

    Raises:
        ConfigError: A bad name or alias, an alias without a name, or nothing to register.
    """
    from tfstack.errors import ConfigError

    name, alias = tracking.register.name, tracking.register.alias
    check_names(name, alias, name_key="tracking.register.name", alias_key="tracking.register.alias")
    if alias is not None and name is None:
        raise ConfigError(
            f"tracking.register.alias={alias} needs the registered model's name: set "
            f"tracking.register.name=NAME too, or tracking.register.alias=null."
        )
    if name is not None and not (tracking.enabled and tracking.log_model):
        off = "tracking.enabled=false" if not tracking.enabled else "tracking.log_model=false"
        raise ConfigError(
            f"tracking.register.name={name} registers the run's logged model, but {off} logs "
            f"none. Use tracking=sqlite (or server) with tracking.log_model=true, or set "
            f"tracking.register.name=null."
        )


def register_finished_run(run, config) -> dict[str, Any] | None:
    """``tracking.register``: register a successful run's model and move the alias.

    Called once the run ended FINISHED (`run_all`, the DVC ``evaluate`` stage). A sweep's job
    does not register (the sweep registers its best job at its end), nor does a reproduction
    (`tfstack reproduce` checks a run; it does not release one).

    Args:
        run: The pipeline's `RunLog`; ``run.registered`` is set to the registration.
        config: The run's config.

    Returns:
        The registration (see `promote`), or None when nothing is registered.

    Raises:
        TrackingError: The registration failed; the message says the run stays FINISHED and
            how to register it again.
    """
    from tfstack import tracking
    from tfstack.pipeline.reproduce import REPRODUCED_FROM_TAG

    register = config.tracking.register
    skipped = (tracking.PARENT_RUN_TAG, REPRODUCED_FROM_TAG)
    if not register.name or not run.run_id or any(tag in run.extra_tags for tag in skipped):
        return None
    try:
        run.registered = promote(
            run.uri, name=register.name, alias=register.alias, run_id=run.run_id
        )
    except TfstackError as err:
        retry = f"tfstack promote {run.run_id} --name {register.name}"
        retry += f" --alias {register.alias}" if register.alias else ""
        raise tracking.TrackingError(
            f"run {run.run_id} FINISHED, but registering its model as "
            f"tracking.register.name={register.name} failed: {err} Register it again with "
            f"`{retry}`."
        ) from err
    return run.registered


def registered_text(registered: dict[str, Any]) -> str:
    """One registration as the CLI shows it: ``models:/digits@champion (version 3, run ...)``."""
    return (
        f"{registered['model_uri']} (version {registered['version']} of {registered['name']}: "
        f"the {registered['model_name']} of run {registered['run_id']})"
    )


def picked_text(objective: dict[str, Any] | None) -> str | None:
    """How ``--parent`` picked the run: ``the best of sweep X by max val_accuracy (0.94)``."""
    if objective is None:
        return None
    among = (
        f"sweep {objective['parent_run_id']}"
        if objective["parent_run_id"]
        else f"the experiment's {objective['runs']} runs (no sweep)"
    )
    return (
        f"the best of {among} by {objective['mode']} {objective['metric']} "
        f"({objective['value']:.4g})"
    )
