"""The MLflow run of one pipeline execution, as the stages see it (`RunLog`).

One MLflow run per pipeline execution: ``build`` starts it and writes ``outputs/run.json``; the
later stages reopen that run when it was made for the same config (the config hash matches),
otherwise (``build`` was cached by DVC) they start a new run and log the build's report from its
files. Every stage ends the run FINISHED, or FAILED with the error, so no run is left RUNNING
between or after stages. Everything goes through `tfstack.tracking`, the only MLflow importer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tfstack.pipeline.config import to_dict
from tfstack.pipeline.paths import Paths, main_project_root
from tfstack.pipeline.schema import Config

CONFIG_ARTIFACT = "config.yaml"


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, as logged in every run's ``config.yaml`` artifact."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(to_dict(config))


def config_hash(config: Config) -> str:
    """A short hash of the resolved config, identifying one pipeline execution's settings."""
    data = to_dict(config)
    data["tracking"].pop("run_name", None)
    data["tracking"].pop("register", None)  # where the model goes after the run, not the run
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str | None:
    """The current commit of the project, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def tracking_uri(config: Config, root: Path) -> str:
    """The tracking URI of ``config`` (`resolve_tracking_uri` of its ``tracking.uri``)."""
    return resolve_tracking_uri(config.tracking.uri, root)


def resolve_tracking_uri(configured: str | None, root: Path) -> str:
    """The tracking URI: ``configured``, else ``TFSTACK_TRACKING_URI``, else MLflow's own
    ``MLFLOW_TRACKING_URI`` (set by ``mlflow run``), else sqlite at the workspace root.

    A relative sqlite path is made absolute against the workspace root, so queued DVC
    experiments running in temporary copies log to the same store.
    """
    from tfstack import tracking

    uri = (
        configured
        or os.environ.get("TFSTACK_TRACKING_URI")
        or os.environ.get("MLFLOW_TRACKING_URI")
    )
    if not uri:
        return tracking.default_tracking_uri(main_project_root(root))
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///") :]
        return "sqlite:///" + str(main_project_root(root) / relative)
    return uri


class RunLog:
    """The MLflow run of one pipeline execution, or a no-op when tracking is off."""

    def __init__(self, config: Config, paths: Paths, extra_tags: dict | None = None):
        self.config = config
        self.paths = paths
        # e.g. mlflow.parentRunId (a sweep's job), reproduced_from (tfstack reproduce)
        self.extra_tags = dict(extra_tags or {})
        self.enabled = config.tracking.enabled
        self.uri = tracking_uri(config, paths.root) if self.enabled else None
        self.experiment = config.tracking.experiment
        self.run_id: str | None = None
        self.new = False
        self.registered: dict | None = None  # tracking.register's version, once registered

    def tags(self) -> dict:
        from tfstack.pipeline.inputs import data_hash

        tags = {
            "stacking": self.config.stacking.strategy,
            "freeze": self.config.freeze.policy,
            "schedule": self.config.schedule.name,
            "config_hash": config_hash(self.config),
        }
        commit = git_commit(self.paths.root)
        if commit:
            tags["git_commit"] = commit
        hashed = data_hash(self.config, self.paths)
        if hashed:
            tags["data_hash"] = hashed
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        tags.update(self.extra_tags)
        return tags

    @contextlib.contextmanager
    def stage(self, name: str, *, continue_run: bool, end: bool = True) -> Iterator[RunLog]:
        """Open the run for one stage; end it FINISHED, or FAILED on an exception."""
        if not self.enabled:
            yield self
            return
        from tfstack import tracking

        run_id = self.run_id
        if run_id is None and continue_run:
            ref = tracking.read_run_ref(self.paths.run_ref)
            same = (
                ref is not None
                and ref["uri"] == self.uri
                and ref["experiment"] == self.config.tracking.experiment
                and ref.get("config_hash") == config_hash(self.config)
            )
            run_id = ref["run_id"] if same else None
        self.new = run_id is None
        if run_id is None and os.environ.get("MLFLOW_RUN_ID"):
            # Under `mlflow run`, the project run is this execution's run: adopt it (and its
            # experiment) rather than leave an empty run beside ours.
            run_id = os.environ["MLFLOW_RUN_ID"]
            self.experiment = tracking.run_experiment_name(self.uri, run_id)
        start = time.perf_counter()
        with tracking.tracked_run(
            self.uri,
            self.experiment,
            run_id=run_id,
            run_name=self.config.tracking.run_name,
            tags=self.tags(),
            end=end,
        ) as run_id:
            self.run_id = run_id
            if self.new:
                tracking.log_params_flat(run_id, to_dict(self.config))
                # The exact config (params are flattened strings): what `tfstack reproduce` reads.
                tracking.log_text(run_id, config_yaml(self.config), CONFIG_ARTIFACT)
                tracking.write_run_ref(
                    self.paths.run_ref,
                    run_id,
                    self.uri,
                    self.experiment,
                    config_hash=config_hash(self.config),
                )
            yield self
            tracking.log_metrics(run_id, {f"stage_seconds_{name}": time.perf_counter() - start})

    # Thin forwards, so stage code reads as "what is recorded", and skips when tracking is off.
    def json(self, obj, artifact_file: str) -> None:
        if self.run_id:
            from tfstack import tracking

            tracking.log_json(self.run_id, obj, artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        if self.run_id:
            from tfstack import tracking

            tracking.log_text(self.run_id, text, artifact_file)

    def figure(self, fig, artifact_file: str) -> None:
        if self.run_id:
            from tfstack import tracking

            tracking.log_figure(self.run_id, fig, artifact_file)

    def files(self, paths, artifact_path: str) -> None:
        if self.run_id:
            from tfstack import tracking

            for path in paths:
                tracking.log_artifact_file(self.run_id, path, artifact_path)

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.run_id:
            from tfstack import tracking

            tracking.log_metrics(self.run_id, metrics, step=step)
