"""Hydra multirun sweeps: one MLflow parent run per sweep, one nested, complete run per job.

``tfstack run -m stacking=sequential,adapter freeze=frozen,joint`` (or ``hparams_search=optuna``)
hands the overrides to Hydra's own multirun machinery, so every sweeper and launcher plugin works
(``hydra/launcher=joblib`` runs jobs in parallel processes). ``run_sweep``, the CLI's entry:

1. ``preflight`` composes and validates the first job and every other value of each choice or
   range sweep, so a mistyped key or option fails before anything runs;
2. makes the demo's inputs once (parallel jobs must not race to write them), starts the parent
   run and exports its id as ``TFSTACK_PARENT_RUN_ID``, which every job inherits (joblib
   workers start after it is set);
3. runs Hydra's multirun with ``task`` as the task function. ``SweepCallback`` (a Hydra
   callback, the packaged ``hydra/callbacks/tfstack.yaml``) only notes where the sweep writes:
   Hydra turns exceptions raised in callbacks into warnings, so nothing that can fail happens
   there;
4. ``_finish``: collects every job's ``sweep_result.json``, records the jobs and the best one on
   the parent (and Optuna's ``optimization_results.yaml``), logs the ``tfstack compare`` table to
   it and ends it FINISHED. Whatever stops the sweep itself ends the parent FAILED.

``task`` is one job: the pipeline's ``run_all`` writing to the job's own Hydra output directory
(``multirun/<date>/<time>/<job>/``), its run tagged ``mlflow.parentRunId`` (nested in the MLflow
UI), ``sweep_job`` and ``sweep_overrides``. It returns the objective to the sweeper: the best
epoch's value of ``objective.metric`` (default ``val_accuracy``, max). A failing job ends its run
FAILED and returns the worst value, so a grid goes on and an Optuna study steers away from it.

Parallel jobs share the sqlite store: ``tfstack.tracking`` serializes its creation and retries
writes that meet "database is locked"; the parent run creates the store before any job starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tfstack.errors import ConfigError, TfstackError
from tfstack.files import write_json
from tfstack.pipeline.conf_dirs import config_source
from tfstack.pipeline.config import validate
from tfstack.pipeline.phase_settings import history_keys
from tfstack.pipeline.schema import Config

logger = logging.getLogger(__name__)

PARENT_ENV = "TFSTACK_PARENT_RUN_ID"
SWEPT_ENV = "TFSTACK_SWEPT_KEYS"
RESULT_FILE = "sweep_result.json"
OBJECTIVE_KEY = "objective"
DEFAULT_OBJECTIVE = {"metric": "val_accuracy", "mode": "max"}

# The sweep in progress in this (launching) process: parent run id, uri, experiment, sweep dir.
_SWEEP: dict[str, Any] = {}


def objective_of(cfg: DictConfig) -> dict[str, str]:
    """The sweep objective (``objective.metric``, ``objective.mode``), checked.

    Raises:
        ConfigError: an unknown mode, or a mode that contradicts the Optuna direction.
    """
    objective = dict(DEFAULT_OBJECTIVE)
    if OBJECTIVE_KEY in cfg and cfg[OBJECTIVE_KEY] is not None:
        objective.update(OmegaConf.to_container(cfg[OBJECTIVE_KEY], resolve=True))
    unknown = sorted(set(objective) - set(DEFAULT_OBJECTIVE))
    if unknown:
        raise ConfigError(f"objective.{unknown[0]} is not a key. Valid keys: ['metric', 'mode'].")
    if objective["mode"] not in ("max", "min"):
        raise ConfigError(
            f"objective.mode={objective['mode']!r} is not valid. Expected one of ['max', 'min']."
        )
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction", default=None)
    if direction is not None:
        expected = "maximize" if objective["mode"] == "max" else "minimize"
        if str(getattr(direction, "name", direction)) != expected:
            raise ConfigError(
                f"objective.mode={objective['mode']} but hydra.sweeper.direction={direction}; "
                f"set hydra.sweeper.direction={expected}."
            )
    return objective


def job_config(cfg: DictConfig) -> Config:
    """The pipeline's validated config from a Hydra job's (without ``hydra`` and ``objective``)."""
    keys = [key for key in cfg if key not in ("hydra", OBJECTIVE_KEY)]
    data = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    return validate(data, source="the sweep's config")


def check_objective_metric(config: Config, metric: str) -> None:
    """The objective must be a key of the Keras history this config produces."""
    known = history_keys(config.train)
    if metric not in known:
        raise ConfigError(
            f"objective.metric={metric} is not in the training history. Expected one of {known}."
        )


def best_of_history(history: list[dict], metric: str, mode: str) -> tuple[float, int]:
    """The best value of ``metric`` over ``history.json`` rows and its 1-based epoch."""
    points = [(row["epoch"], float(row[metric])) for row in history if metric in row]
    points = [(epoch, value) for epoch, value in points if math.isfinite(value)]
    if not points:
        return worst(mode), -1
    sign = -1.0 if mode == "max" else 1.0
    epoch, value = min(points, key=lambda point: (sign * point[1], point[0]))
    return value, int(epoch) + 1


def worst(mode: str) -> float:
    """What a failed job returns to the sweeper."""
    return -math.inf if mode == "max" else math.inf


def task(cfg: DictConfig) -> float:
    """One sweep job: a complete pipeline run nested under the sweep's parent run.

    Returns:
        The best epoch's value of the objective metric (the worst value if the job failed).
    """
    from hydra.core.hydra_config import HydraConfig

    from tfstack import pipeline, tracking

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    root = Path(hydra_cfg.runtime.cwd)
    overrides = list(hydra_cfg.overrides.task)
    objective = dict(DEFAULT_OBJECTIVE)
    result: dict[str, Any] = {
        "job": int(hydra_cfg.job.num),
        "overrides": overrides,
        "output_dir": str(job_dir),
        "objective": objective,
    }
    try:
        objective.update(objective_of(cfg))
        config = job_config(cfg)
        check_objective_metric(config, objective["metric"])
        config.output_dir = str(job_dir)  # absolute: each job writes only its own directory
        if config.tracking.run_name is None:  # named by what the sweep varies
            swept = os.environ.get(SWEPT_ENV, "").split(",")
            named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
            config.tracking.run_name = " ".join(named or overrides) or f"job {result['job']}"
        tags = {"sweep_job": result["job"], "sweep_overrides": " ".join(overrides)}
        if os.environ.get(PARENT_ENV):
            tags[tracking.PARENT_RUN_TAG] = os.environ[PARENT_ENV]
        run, metrics = pipeline.run_all(config, pipeline.Paths(root=root, out=job_dir), tags=tags)
        history = json.loads((job_dir / "train" / "history.json").read_text(encoding="utf-8"))
        value, epoch = best_of_history(history, objective["metric"], objective["mode"])
        result.update(
            status="FINISHED", run_id=run.run_id, value=value, epoch=epoch, metrics=metrics
        )
    except Exception as err:  # one failed job must not stop the sweep; its run says why
        # A user error needs its message; anything else its traceback.
        log = logger.error if isinstance(err, TfstackError) else logger.exception
        log("sweep job %s (%s) failed: %s", result["job"], " ".join(overrides), err)
        ref = tracking.read_run_ref(job_dir / "run.json")
        result.update(
            status="FAILED",
            run_id=ref and ref["run_id"],
            value=worst(objective["mode"]),
            error=f"{type(err).__name__}: {err}",
        )
    write_json(job_dir / RESULT_FILE, result)
    return float(result["value"])


class SweepCallback(Callback):
    """Hydra callback (``tfstack/conf/hydra/callbacks/tfstack.yaml``): where the sweep writes.

    Hydra turns exceptions raised in callbacks into warnings, so the callback only records the
    sweep directory, sweeper and launcher; ``run_sweep`` does the work that may fail before and
    after Hydra's multirun.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tfstack import tracking

        sweep = {
            "sweep_dir": Path(str(config.hydra.sweep.dir)).resolve(),
            "sweeper": str(config.hydra.sweeper._target_).rsplit(".", 1)[-1],
            "launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
        }
        _SWEEP.update(sweep)
        if _SWEEP.get("run_id"):
            tracking.log_tags(_SWEEP["run_id"], sweep)
            logger.info(
                "Sweep parent run %s; jobs write to %s", _SWEEP["run_id"], sweep["sweep_dir"]
            )


def _sweep_override_values(override) -> list[str] | None:
    """The values of a choice or range sweep (``a,b`` / ``range(1,4)``); None for others."""
    from hydra.core.override_parser.types import ValueType

    enumerable = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)
    return list(override.sweep_string_iterator()) if override.value_type in enumerable else None


def _compose(overrides: list[str], config_dir: Path) -> tuple[Config, dict[str, str], list[str]]:
    """One job's config, the objective and the sweeper's own search keys, validated."""
    from tfstack.pipeline.compose import _hydra_compose

    cfg = _hydra_compose(config_source(config_dir), overrides, return_hydra_config=True)
    searched = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    return job_config(cfg), objective_of(cfg), [str(key) for key in searched]


def preflight(overrides: list[str], config_dir: Path) -> tuple[Config, dict[str, str], list[str]]:
    """Check the sweep's overrides before any MLflow or TensorFlow work.

    Composes the first job, then each other value of every choice or range sweep, so a
    mistyped key or option fails with tfstack's message instead of halfway through the sweep.

    Returns:
        The first job's config, the objective and the config keys the sweep varies.

    Raises:
        ConfigError: a bad override, key, option or value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept = {o.get_key_element(): _sweep_override_values(o) for o in parsed}
    swept = {key: values for key, values in swept.items() if values}
    first = {key: values[0] for key, values in swept.items()}
    config, objective, searched = _compose(
        fixed + [f"{k}={v}" for k, v in first.items()], config_dir
    )
    check_objective_metric(config, objective["metric"])
    for key, values in swept.items():
        for value in values[1:]:
            job = {**first, key: value}
            _compose(fixed + [f"{k}={v}" for k, v in job.items()], config_dir)
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return config, objective, list(dict.fromkeys(keys + searched))


def _start_parent(base: Config, root: Path, overrides: list[str], objective: dict) -> None:
    from tfstack import tracking
    from tfstack.pipeline.run_log import git_commit, tracking_uri

    uri = tracking_uri(base, root)
    tags = {
        "sweep_overrides": " ".join(overrides),
        "objective": f"{objective['mode']} {objective['metric']}",
    }
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
    # Under `mlflow run`, the project's run becomes the parent; jobs must not adopt it.
    adopted = os.environ.pop("MLFLOW_RUN_ID", None)
    experiment = tracking.run_experiment_name(uri, adopted) if adopted else None
    experiment = experiment or base.tracking.experiment
    run_id = tracking.start_run(
        uri,
        experiment,
        run_id=adopted,
        run_name=base.tracking.run_name or f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags=tags,
    )
    os.environ[PARENT_ENV] = run_id  # inherited by every job, in joblib workers too
    _SWEEP.update(run_id=run_id, uri=uri, experiment=experiment, register=base.tracking.register)


def _finish(objective: dict) -> dict[str, Any]:
    """Collect the jobs' results, record them and the best job on the parent, compare, end it."""
    from tfstack import tracking

    sweep_dir = _SWEEP.get("sweep_dir")
    results = collect_results(sweep_dir) if sweep_dir else []
    finished = [r for r in results if r["status"] == "FINISHED"]
    best = pick_best(finished, objective["mode"])
    sweep = {
        "sweep_dir": sweep_dir,
        "results": results,
        "best": best,
        "objective": objective,
        "parent_run_id": _SWEEP.get("run_id"),
        "uri": _SWEEP.get("uri"),
        "experiment": _SWEEP.get("experiment"),
    }
    run_id = _SWEEP.get("run_id")
    if run_id is None:
        return sweep
    metric = objective["metric"]
    tracking.log_metrics(
        run_id, {"jobs": len(results), "jobs_failed": len(results) - len(finished)}
    )
    tracking.log_json(run_id, results, "sweep/results.json")
    if best is not None:
        tracking.log_metrics(run_id, {f"best_{metric}": best["value"]})
        tracking.log_tags(
            run_id,
            {
                "best_run_id": best["run_id"],
                "best_job": best["job"],
                "best_overrides": " ".join(best["overrides"]),
                f"best_{metric}_epoch": best["epoch"],
            },
        )
    optuna_results = sweep_dir / "optimization_results.yaml" if sweep_dir else None
    if optuna_results is not None and optuna_results.is_file():
        tracking.log_artifact_file(run_id, optuna_results, "sweep")
        found = OmegaConf.to_container(OmegaConf.load(optuna_results))
        params = found.get("best_params", {})
        tracking.log_tags(run_id, {f"best_param.{k}": v for k, v in params.items()})
    if finished:
        sweep["comparison"] = _compare(run_id, results)
    register = _SWEEP.get("register")
    _end_parent("FINISHED" if finished else "FAILED")
    if finished and register is not None and register.name:
        sweep["registered"] = _register_best(sweep, register)
    return sweep


def _register_best(sweep: dict[str, Any], register) -> dict[str, Any]:
    """``tracking.register`` of a sweep: its best job's model, once the parent is FINISHED."""
    from tfstack.errors import TrackingError
    from tfstack.pipeline.promote import promote

    parent = sweep["parent_run_id"]
    try:
        return promote(sweep["uri"], name=register.name, alias=register.alias, parent=parent)
    except TfstackError as err:
        retry = f"tfstack promote --parent {parent} --name {register.name}"
        retry += f" --alias {register.alias}" if register.alias else ""
        raise TrackingError(
            f"the sweep FINISHED, but registering its best model as tracking.register.name="
            f"{register.name} failed: {err} Register it again with `{retry}`."
        ) from err


def _compare(parent_run_id: str, results: list[dict]):
    """The comparison of the sweep's runs, logged to the parent (a failure only warns).

    Besides freeze x stacking x schedule, it groups by every other config key the sweep varies
    (``train.lr``...), except ``seed``: runs that differ only by seed are averaged.
    """
    from tfstack.pipeline import compare

    extra = [key for key in _SWEEP.get("swept", []) if "." in key and key not in compare.GROUP_BY]
    try:
        comparison, files, _ = compare.compare_store(
            _SWEEP["uri"],
            _SWEEP["experiment"],
            parent_run_id=parent_run_id,
            group_by=[*compare.GROUP_BY, *extra],
            out_dir=_SWEEP["sweep_dir"] / "comparison",
        )
    except Exception:
        logger.warning("Could not compare the sweep's runs", exc_info=True)
        return None
    return comparison, files


def collect_results(sweep_dir: Path) -> list[dict]:
    """Every job's ``sweep_result.json`` under a sweep directory, by job number."""
    results = [
        json.loads(path.read_text(encoding="utf-8")) for path in sweep_dir.glob(f"*/{RESULT_FILE}")
    ]
    return sorted(results, key=lambda result: result["job"])


def pick_best(results: list[dict], mode: str) -> dict | None:
    """The finished job with the best objective value (the earliest job on ties)."""
    if not results:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(results, key=lambda result: (sign * result["value"], result["job"]))


def _end_parent(status: str, error: BaseException | None = None) -> None:
    from tfstack import tracking

    run_id = _SWEEP.pop("run_id", None)
    if os.environ.get(PARENT_ENV) == run_id:
        os.environ.pop(PARENT_ENV, None)
    if run_id:
        tracking.end_run(run_id, status, error=error)


@contextlib.contextmanager
def _argv_and_env(argv: list[str], env: dict[str, str]) -> Iterator[None]:
    saved_argv, saved_env = sys.argv, {key: os.environ.get(key) for key in env}
    sys.argv = argv
    os.environ.update(env)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_sweep(overrides: list[str], *, config_dir: str | Path) -> dict[str, Any]:
    """Run a Hydra multirun over ``conf/`` with ``overrides`` (``tfstack run -m ...``).

    Returns:
        ``sweep_dir``, ``results`` (one dict per job: ``job``, ``overrides``, ``status``,
        ``run_id``, ``value``, ``epoch``, ``metrics`` or ``error``), ``best``, ``objective``,
        ``parent_run_id``, ``uri``, ``experiment`` and ``comparison``.

    Raises:
        ConfigError: a bad override or config, before any job runs.
        Exception: whatever stopped the sweep itself; the parent run then ends FAILED.
    """
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tfstack import pipeline
    from tfstack.pipeline.compose import _compose_error

    source = config_source(config_dir)
    try:
        base, objective, swept = preflight(list(overrides), config_dir)
    except (HydraException, OmegaConfBaseException) as err:
        raise _compose_error(err, source) from err
    root = Path.cwd()
    # Once, here: parallel jobs must not race to write the demo's data and components.
    pipeline.ensure_demo_inputs(base, pipeline.Paths.from_config(base, root))
    _SWEEP.clear()
    _SWEEP["swept"] = swept
    os.environ.pop(PARENT_ENV, None)  # a stale id from the shell must not nest these jobs
    if base.tracking.enabled:
        _start_parent(base, root, list(overrides), objective)
    main = hydra.main(config_path=None, config_name="config", version_base=None)(task)
    argv = ["tfstack", "--multirun", "--config-dir", str(source.directory), *overrides]
    try:
        # HYDRA_FULL_ERROR: errors reach us (and the CLI's messages) instead of sys.exit(1).
        with _argv_and_env(argv, {"HYDRA_FULL_ERROR": "1", SWEPT_ENV: ",".join(swept)}):
            try:
                main()
            finally:
                GlobalHydra.instance().clear()
        return _finish(objective)
    except BaseException as err:
        if _SWEEP.get("run_id"):
            _end_parent("FAILED" if isinstance(err, Exception) else "KILLED", error=err)
        if isinstance(err, (HydraException, OmegaConfBaseException)):
            raise _compose_error(err, source) from err
        raise
    finally:
        _SWEEP.clear()


def summary(sweep: dict[str, Any]) -> str:
    """What the CLI prints after a sweep."""
    results = sweep.get("results", [])
    metric = sweep.get("objective", DEFAULT_OBJECTIVE)["metric"]
    lines = ["", f"tfstack: sweep of {len(results)} jobs in {sweep.get('sweep_dir')}"]
    if sweep.get("parent_run_id"):
        lines.append(f"  MLflow parent run  {sweep['parent_run_id']}  ({sweep.get('uri')})")
    for result in results:
        value = result.get("value")
        shown = f"{value:.4f}" if value is not None and math.isfinite(value) else "-"
        lines.append(
            f"  job {result['job']:<3} {result['status']:<8} best {metric} {shown:<8} "
            f"{' '.join(result['overrides'])}"
            + (f"  ({result['error']})" if result.get("error") else "")
        )
    best = sweep.get("best")
    if best:
        lines.append(
            f"  best: job {best['job']} ({' '.join(best['overrides'])}), {metric} "
            f"{best['value']:.4f} at epoch {best['epoch']}, run {best['run_id']}"
        )
    compared = sweep.get("comparison")
    if compared:
        comparison, files = compared
        lines += ["", comparison.text(), f"  written to {files['markdown'].parent}"]
    if sweep.get("parent_run_id"):
        lines.append(f"  compare again: tfstack compare --parent {sweep['parent_run_id']}")
    if sweep.get("registered"):
        from tfstack.pipeline.promote import registered_text

        lines.append(f"  registered   {registered_text(sweep['registered'])}")
    return "\n".join(lines)
