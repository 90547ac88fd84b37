"""The pipeline's stages: prepare -> pretrain -> build -> train -> evaluate.

This is the entry layer: it reads the validated ``Config``, turns it into plain values for the
library (components, shapes, stacking, freezing, schedules, training, evaluation) and writes the
outputs DVC tracks. Tracking goes through ``tracking.py`` only.

One MLflow run per pipeline execution: ``build`` starts it and writes ``outputs/run.json``; the
later stages reopen that run when it was made for the same config (the config hash matches),
otherwise (``build`` was cached by DVC) they start a new run and log the build's report from its
files. Every stage ends the run FINISHED, or FAILED with the error, so no run is left RUNNING
between or after stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tfstack.config import Config, to_dict
from tfstack.errors import ConfigError, DataError, OutputError, TfstackError, describe_error
from tfstack.files import atomic_path, write_json

logger = logging.getLogger(__name__)

DVC_EXPS_DIR = "/.dvc/tmp/exps/"
CONFIG_ARTIFACT = "config.yaml"
# How EpochLogger writes per-epoch metrics: gathered into one write per 5 s, since a sqlite write
# lasts about as long as a demo epoch; synchronous, since once MLflow's asynchronous logging has
# been used, ending the run waits about 1 s for its logging thread (benchmarks/bench.py, (c)).
EPOCH_LOGGING = {"synchronous": True, "min_interval_s": 5.0}


# ---------------------------------------------------------------------------------------------
# Paths and small helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, under the project root."""

    root: Path
    out: Path

    @classmethod
    def from_config(cls, config: Config, root: Path) -> Paths:
        out = Path(config.output_dir)
        out = out if out.is_absolute() else root / out
        resolved = out.resolve()
        if not Path(config.output_dir).is_absolute() and not resolved.is_relative_to(
            root.resolve()
        ):
            raise ConfigError(
                f"output_dir={config.output_dir} leaves the project root {root}; "
                "use a path inside it or an absolute path."
            )
        _check_writable(out, "output_dir")
        return cls(root=root, out=out)

    def stage(self, name: str) -> Path:
        return self.out / name

    @property
    def run_ref(self) -> Path:
        return self.out / "run.json"

    def resolve(self, path: str) -> Path:
        """A config path, relative to the project root unless absolute."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p


def _check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and prove a file can be created in it, before any work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tfstack-probe-", dir=directory):
            pass
    except OSError as err:
        raise OutputError(
            f"{key}={directory} cannot be written: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename and str(err.filename) != str(directory) else "")
            + f". Set {key}=... to a directory you can write."
        ) from err


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, as logged in every run's ``config.yaml`` artifact."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(to_dict(config))


def config_hash(config: Config) -> str:
    """A short hash of the resolved config, identifying one pipeline execution's settings."""
    data = to_dict(config)
    data["tracking"].pop("run_name", None)
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


def main_project_root(root: Path) -> Path:
    """The workspace root, also from inside a queued DVC experiment's temporary copy."""
    text = str(root.resolve())
    if DVC_EXPS_DIR in text:
        return Path(text.split(DVC_EXPS_DIR)[0])
    return root.resolve()


def tracking_uri(config: Config, root: Path) -> str:
    """The tracking URI: ``tracking.uri``, else ``TFSTACK_TRACKING_URI``, else MLflow's own
    ``MLFLOW_TRACKING_URI`` (set by ``mlflow run``), else sqlite at the workspace root.

    A relative sqlite path is made absolute against the workspace root, so queued DVC
    experiments running in temporary copies log to the same store.
    """
    from tfstack import tracking

    uri = (
        config.tracking.uri
        or os.environ.get("TFSTACK_TRACKING_URI")
        or os.environ.get("MLFLOW_TRACKING_URI")
    )
    if not uri:
        return tracking.default_tracking_uri(main_project_root(root))
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///") :]
        return "sqlite:///" + str(main_project_root(root) / relative)
    return uri


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; turn on op determinism when asked."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # Op determinism is process-wide and the demo's pretraining turns it on; honour false.
        from tfstack._keras_compat import disable_op_determinism

        disable_op_determinism()


# ---------------------------------------------------------------------------------------------
# Tracking glue: one run per pipeline execution
# ---------------------------------------------------------------------------------------------


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

    def tags(self) -> dict:
        data_path = self.paths.resolve(self.config.data.path)
        tags = {
            "stacking": self.config.stacking.strategy,
            "freeze": self.config.freeze.policy,
            "schedule": self.config.schedule.name,
            "config_hash": config_hash(self.config),
        }
        commit = git_commit(self.paths.root)
        if commit:
            tags["git_commit"] = commit
        if data_path.is_file():
            from tfstack.data import file_hash

            tags["data_hash"] = file_hash(data_path)
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

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.run_id:
            from tfstack import tracking

            tracking.log_metrics(self.run_id, metrics, step=step)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def prepare(config: Config, paths: Paths) -> dict:
    """Make the demo's source and target tasks from the raw digits."""
    from tfstack import demo

    raw = paths.resolve(config.demo.raw)
    if not raw.is_file():
        raise DataError(
            f"demo.raw={config.demo.raw} does not exist. Run `make data` (or "
            "`python -m tfstack.demo write-raw data`) to materialize it, or `dvc pull`."
        )
    result = demo.make_transfer_task(
        raw,
        paths.stage("prepare"),
        seed=config.seed,
        target_train_per_class=config.demo.target_train_per_class,
    )
    return result


def pretrain(config: Config, paths: Paths) -> dict:
    """Train the demo's model_1 (base) and model_2 (head) on the source task."""
    from tfstack import demo

    source = paths.stage("prepare") / "source.npz"
    if not source.is_file():
        raise DataError(f"{source} is missing; run the prepare stage first (dvc repro prepare).")
    result = demo.pretrain_components(
        source, paths.stage("pretrain"), seed=config.seed, epochs=config.demo.pretrain_epochs
    )
    write_json(paths.stage("pretrain") / "pretrain.json", result)
    return result


def _component_kwargs(component) -> dict:
    kwargs = {
        "cut_at": component.cut_at,
        "trust_code": component.trust_code,
        "modules": list(component.modules),
    }
    if component.path.startswith("keras_applications:"):
        kwargs.update(
            weights=component.weights,
            include_top=component.include_top,
            pooling=component.pooling,
            input_shape=tuple(component.input_shape) if component.input_shape is not None else None,
        )
    return kwargs


def load_components(config: Config, paths: Paths):
    """Load the feature extractors (base, then extra) and the head, each under its own name."""
    from tfstack.components import load_component

    def load(key: str, component):
        source = component.path
        if not source.startswith("keras_applications:"):
            source = str(paths.resolve(source))
        return load_component(
            source,
            name=component.name or key,
            key=f"components.{key}",
            **_component_kwargs(component),
        )

    bases = [load("base", config.components.base)]
    bases += [load(f"extra.{key}", c) for key, c in config.components.extra.items()]
    head = load("head", config.components.head)
    return bases, head


def shape_report(models: dict) -> dict:
    """Specs and per-layer tables of several models, JSON-ready."""
    from tfstack.shapes import input_specs, layer_table, output_specs

    return {
        name: {
            "inputs": [s.to_dict() for s in input_specs(model)],
            "outputs": [s.to_dict() for s in output_specs(model)],
            "layers": layer_table(model),
        }
        for name, model in models.items()
    }


def build(config: Config, paths: Paths, run: RunLog):
    """Load the components, stack them by strategy and write the untrained model and report."""
    from tfstack.shapes import summary_text
    from tfstack.stacking import build_stacked

    start = time.perf_counter()
    # Seeded here too: adapters and intermediate layers get their initial weights at build time.
    seed_everything(config.seed, config.train.deterministic)
    bases, head = load_components(config, paths)
    result = build_stacked(
        config.stacking.strategy,
        bases,
        head,
        adapter=config.stacking.adapter,
        intermediate=list(config.stacking.intermediate) or None,
        merge=config.stacking.merge,
        name="stacked",
    )
    out = paths.stage("build")
    models = {m.name: m for m in [*bases, head]}
    report = {
        "strategy": result.strategy,
        "feature_extractors": result.feature_extractors,
        "head": result.head,
        "adapters": result.adapters,
        "stacked": shape_report({"stacked": result.model})["stacked"],
        "components": shape_report(models),
        "seconds": time.perf_counter() - start,
    }
    summaries = {"stacked": summary_text(result.model)}
    summaries.update({name: summary_text(m) for name, m in models.items()})
    with atomic_path(out / "stacked.keras") as tmp:
        result.model.save(tmp)
    write_json(out / "shapes.json", report)
    for name, text in summaries.items():
        with atomic_path(out / f"summary_{name}.txt") as tmp:
            tmp.write_text(text, encoding="utf-8")
    log_build_report(run, out)
    return result


def log_build_report(run: RunLog, build_dir: Path) -> None:
    """Record the build's shape report and summaries in the run (from the build's files)."""
    report = json.loads((build_dir / "shapes.json").read_text(encoding="utf-8"))
    run.json(report["stacked"]["layers"], "shapes/stacked_layers.json")
    for name, component in report["components"].items():
        run.json(component["layers"], f"shapes/{name}_layers.json")
    run.json(report, "shapes/report.json")
    if "seconds" in report:
        # When DVC cached the build, this run did not time it; the report did.
        run.metrics({"stage_seconds_build": report["seconds"]})
    for summary in sorted(build_dir.glob("summary_*.txt")):
        run.text(summary.read_text(encoding="utf-8"), f"shapes/{summary.name}")
    if run.run_id and report.get("adapters"):
        from tfstack import tracking

        described = "; ".join(
            f"{a['upstream']}->{a['downstream']}: "
            + ", ".join(layer["class_name"] for layer in a["layers"])
            for a in report["adapters"]
            if a["layers"]
        )
        if described:
            tracking.log_tags(run.run_id, {"adapter": described})


def _components_by_name(config: Config) -> dict:
    """Component name (the stacked model's sub-model) -> (config key, component config)."""
    components = {"base": config.components.base, "head": config.components.head}
    components.update({f"extra.{k}": c for k, c in config.components.extra.items()})
    return {c.name or key: (f"components.{key}", c) for key, c in components.items()}


def _reload_safe_mode(path: Path, config: Config, *, stage: str, compile: bool) -> bool:
    """Keep per-component trust when reloading a stacked model a previous stage wrote.

    Code in a component's sub-model is allowed only when that component trusts code (its
    modules are imported first); code anywhere else is refused. Keras then loads with
    safe_mode=False only when there is code and all of it is trusted, never for everything
    because one component is trusted.
    """
    from tfstack.components import read_model_config
    from tfstack.errors import ComponentError
    from tfstack.trust import (
        TrustOptions,
        describe_code,
        find_code_by_component,
        import_modules,
        refusal_message,
        unknown_class_message,
        unresolved,
    )

    try:
        model_config = read_model_config(str(path), key=stage)
    except ComponentError as err:
        reason = str(err).removeprefix(f"{stage}.path={path} ")
        raise DataError(
            f"{path} cannot be loaded ({reason}): it is damaged or was written by another "
            f"version. Write it again: dvc repro -f {stage} (or tfstack run)."
        ) from err
    components = _components_by_name(config)
    owned = find_code_by_component(model_config, components, include_compile=compile)
    for owner, elements in owned.items():
        if owner is None:
            raise ComponentError(
                f"{path} holds {describe_code(elements)} outside every component (base, head, "
                f"extra); tfstack trusts code only per component and refuses it. Rebuild it "
                f"from trusted components: dvc repro -f {stage} (or tfstack run)."
            )
        key, component = components[owner]
        subject = f"{path}: component {owner!r}"
        options = TrustOptions.for_key(key)
        if not component.trust_code:
            raise ComponentError(refusal_message(subject, elements, options=options))
        import_modules(component.modules, trusted=True, options=options)
        if missing := unresolved(elements):
            raise ComponentError(unknown_class_message(subject, missing, options=options))
    return not owned


def load_model(path: Path, config: Config, *, stage: str, compile: bool = False):
    """Load a model a previous stage wrote, with a clear message when it is missing or damaged.

    Raises:
        DataError: The file is missing or damaged.
        ComponentError: It holds code of a component that does not trust code, or code outside
            every component.
    """
    import keras

    if not path.is_file():
        raise DataError(f"{path} is missing; run the {stage} stage first (dvc repro {stage}).")
    safe_mode = _reload_safe_mode(path, config, stage=stage, compile=compile)
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    except Exception as err:  # Keras raises many types for a damaged file
        raise DataError(
            f"{path} cannot be loaded ({describe_error(err)}): it is damaged or was "
            f"written by another version. Write it again: dvc repro -f {stage} (or tfstack run)."
        ) from err


def _load_splits(config: Config, paths: Paths):
    from tfstack.data import load_npz

    return load_npz(
        paths.resolve(config.data.path),
        val_fraction=config.data.val_fraction,
        seed=config.seed,
    )


def _check_targets(config: Config, model, splits) -> None:
    """Check the data fits the stacked model: input shapes and dtypes, labels or targets."""
    from tfstack.labels import check_labels

    _check_inputs(config, model, splits)
    outputs = int(model.outputs[0].shape[-1] or 1)
    task = config.train.task
    for name in ("y_train", "y_val", "y_test"):
        check_labels(getattr(splits, name), outputs, task=task, key=f"data.path {name}")
    if task == "regression":
        produced = tuple(model.outputs[0].shape[1:])
        for name in ("y_train", "y_val", "y_test"):
            per_sample = tuple(getattr(splits, name).shape[1:]) or (1,)
            if per_sample != produced:
                raise DataError(
                    f"data.path={config.data.path}: {name} has targets of shape {per_sample} per "
                    f"sample, but the head (components.head.path={config.components.head.path}) "
                    f"outputs {produced}. With train.task=regression the head needs one output per "
                    "target value: use a head with that many outputs, or reshape the targets."
                )


def _check_inputs(config: Config, model, splits) -> None:
    """The samples must have the shape and a numeric dtype the stacked model takes."""
    if len(model.inputs) != 1:
        return
    expected = tuple(model.inputs[0].shape[1:])
    for name in ("x_train", "x_val", "x_test"):
        x = getattr(splits, name)
        if x.dtype.kind not in "biuf":
            raise DataError(
                f"data.path={config.data.path}: {name} has dtype {x.dtype}; the model takes "
                "numbers. Store numeric arrays, e.g. x.astype('float32')."
            )
        got = tuple(x.shape[1:])
        if len(got) != len(expected) or any(
            e is not None and e != g for e, g in zip(expected, got, strict=False)
        ):
            raise DataError(
                f"data.path={config.data.path}: {name} holds samples of shape {got}, but the "
                f"stacked model takes {expected} (the input of components.base.path="
                f"{config.components.base.path}). Resize or reshape the data to {expected}, or "
                "use a base whose input fits the data."
            )


def make_phases(config: Config):
    """The schedule's phases from config values."""
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import make_schedule

    f = config.freeze
    freeze = FreezePolicy(
        kind=f.policy,
        unfreeze_last=f.unfreeze_last,
        unfreeze_pattern=f.unfreeze_pattern,
        bn=f.bn,
        components=tuple(f.components) if f.components is not None else None,
    )
    s = config.schedule
    return make_schedule(
        s.name,
        epochs=config.train.epochs,
        lr=config.train.lr,
        optimizer=config.train.optimizer,
        freeze=freeze,
        fine_tune_epochs=s.fine_tune_epochs,
        fine_tune_lr_factor=s.fine_tune_lr_factor,
        unfreeze_last=s.unfreeze_last,
        stages=s.stages,
        unfreeze_step=s.unfreeze_step,
        lr_decay=s.lr_decay,
        lr_multipliers=dict(s.lr_multipliers),
    )


def feature_extractor_names(config: Config) -> list[str]:
    names = [config.components.base.name or "base"]
    names += [c.name or f"extra.{k}" for k, c in config.components.extra.items()]
    return names


def train(
    config: Config,
    paths: Paths,
    run: RunLog,
    model=None,
    *,
    keep_checkpoint: bool = False,
    chief: bool = True,
):
    """Train under the configured distribution strategy (see `_train`).

    Under a strategy the stacked model is (re)loaded inside ``strategy.scope()`` so its variables
    are mirrored; every phase then compiles and fits inside the same scope. Under
    ``multi_worker`` every worker first waits for the others here (the chief arrives once its
    build is done), and only the chief writes (``chief=False`` on the other workers).
    """
    if config.distribute.kind == "none":
        return _train(config, paths, run, model, keep_checkpoint=keep_checkpoint, chief=True)
    from tfstack.distribute import barrier, cluster_errors, make_strategy

    strategy = make_strategy(config.distribute.kind)
    with cluster_errors(strategy), strategy.scope():
        barrier(strategy)
        if run.run_id:
            from tfstack.tracking import log_tags

            log_tags(
                run.run_id,
                {
                    "distribute": config.distribute.kind,
                    "sync_batchnorm": str(config.distribute.sync_batchnorm).lower(),
                },
            )
            run.metrics({"replicas": strategy.num_replicas_in_sync})
        model = load_model(paths.stage("build") / "stacked.keras", config, stage="build")
        with contextlib.ExitStack() as stack:
            if config.distribute.sync_batchnorm:
                from tfstack.distribute import synchronized_batchnorm

                synced = stack.enter_context(synchronized_batchnorm(model))
                logger.info("Batch statistics over the global batch in %s", synced or "no layer")
            return _train(config, paths, run, model, keep_checkpoint=keep_checkpoint, chief=chief)


def train_worker(config: Config, paths: Paths) -> None:
    """A non-chief worker's part of ``distribute=multi_worker``: train, log nothing, write nothing.

    It reads the build stage's outputs of this workspace (the chief's, on a shared file system;
    elsewhere run ``dvc repro build`` or ``dvc pull`` first) after every worker has joined.
    """
    run = RunLog(config, paths)
    run.enabled = False
    train(config, paths, run, chief=False)


def _train(config: Config, paths: Paths, run: RunLog, model, *, keep_checkpoint: bool, chief: bool):
    """Run the schedule's phases on the stacked model; write the trained model and history.

    With ``train.resume=auto`` a checkpoint is written after every epoch and a matching one is
    resumed (see `tfstack.training.run_schedule`); it is removed at the end unless
    ``keep_checkpoint`` (`run_all` removes it once evaluation is done too). Under
    ``multi_worker`` there are no checkpoints: every worker would have to resume the same
    epoch. ``chief=False`` writes nothing.
    """
    from tfstack import checkpoints, resume
    from tfstack.data import ArrayDataset
    from tfstack.training import history_rows, run_schedule

    seed_everything(config.seed, config.train.deterministic)
    if model is None:
        model = load_model(paths.stage("build") / "stacked.keras", config, stage="build")
    splits = _load_splits(config, paths)
    _check_targets(config, model, splits)
    from tfstack.input_range import check_input_range

    # A warning, not an error: the data is the user's to fix (and stays as given).
    key = f"data.path={config.data.path} x_train"
    for warning in check_input_range(splits.x_train, model, key=key) if chief else []:
        print(f"tfstack: warning: {warning.message}", file=sys.stderr)
        if run.run_id:
            from tfstack.tracking import log_tags

            log_tags(run.run_id, {"input_range_warning": warning.summary})
    batch = config.train.batch_size
    # ArrayDataset, not a bare tf.data pipeline: a cached frozen phase replays its batch order.
    # Epoch-seeded: epoch k's order depends on (seed, k) only, so a resumed run sees the same.
    train_ds = ArrayDataset(
        splits.x_train,
        splits.y_train,
        batch_size=batch,
        shuffle=True,
        seed=config.seed,
        epoch_seeded=True,
    )
    val_ds = ArrayDataset(splits.x_val, splits.y_val, batch_size=batch, shuffle=False, seed=0)
    phases = make_phases(config)
    resumable = config.train.resume == "auto" and config.distribute.kind != "multi_worker"
    state = resume.resumable_checkpoint(config, paths, run) if resumable else None
    if state is not None and run.run_id:
        resume.continue_run_record(run, state)

    def per_phase(phase, index):
        if not run.run_id:
            return []
        from tfstack.tracking import EpochLogger

        return [EpochLogger(run.run_id, phase.name, phase_index=index, **EPOCH_LOGGING)]

    directory = resume.checkpoint_dir(paths)
    results = run_schedule(
        model,
        phases,
        train_ds,
        val_ds,
        loss=config.train.loss,
        metrics=list(config.train.metrics),
        feature_extractors=feature_extractor_names(config),
        callbacks_for_phase=per_phase,
        verbose=config.train.verbose,
        cache_frozen=config.train.cache_frozen == "auto",
        checkpoint_dir=directory if resumable else None,
        resume_from=state,
        checkpoint_key=resume.checkpoint_key(config, paths),
        run_id=run.run_id,
    )
    if run.run_id:
        from tfstack.tracking import log_tags

        log_tags(run.run_id, {f"phase.{r.index}.cached": str(r.cached).lower() for r in results})
        # The whole phase, also when this process ran only its last epochs.
        log_tags(
            run.run_id,
            {
                f"phase.{r.index}.epochs": f"{r.initial_epoch}-{r.initial_epoch + r.epochs - 1}"
                for r in results
            },
        )
    counted = resume.logged_steps(run, "params_trainable") if state and run.run_id else set()
    for result in results:
        if result.initial_epoch not in counted:
            run.metrics(
                {
                    "params_trainable": result.counts.trainable,
                    "params_non_trainable": result.counts.non_trainable,
                },
                step=result.initial_epoch,
            )
    history = history_rows(results)
    if not chief:
        # Saving may run collective ops (a variable first created on save is broadcast from the
        # chief), so every worker saves, as TensorFlow's multi-worker guide says; here, to a
        # temporary directory that is removed.
        with tempfile.TemporaryDirectory(prefix="tfstack-worker-") as scratch:
            model.save(Path(scratch) / "model.keras")
        return model, results
    out = paths.stage("train")
    with atomic_path(out / "model.keras") as tmp:
        model.save(tmp)
    phases_record = [{**r.to_dict(), "history": None} for r in results]
    write_json(out / "history.json", history)
    write_json(out / "phases.json", phases_record)
    run.json(phases_record, "training/phases.json")
    run.json(history, "training/history.json")
    if resumable and not keep_checkpoint:
        checkpoints.remove(directory)
    return model, results


def evaluate(config: Config, paths: Paths, run: RunLog, model=None) -> dict:
    """Test metrics, the task's plot and the learning curve; log the trained model.

    The measuring is `tfstack.evaluation.evaluate`; this stage loads its inputs, writes what
    DVC tracks (``metrics.json``, ``plots/``) and hands the same to the run.
    """
    from tfstack import evaluation

    if model is None:
        # With its training compile state: the logged model keeps the optimizer it trained with.
        model = load_model(
            paths.stage("train") / "model.keras", config, stage="train", compile=True
        )
    splits = _load_splits(config, paths)
    _check_targets(config, model, splits)
    result = evaluation.evaluate(
        model,
        splits.x_test,
        splits.y_test,
        task=config.train.task,
        batch_size=config.train.batch_size,
        loss=config.train.loss,
        metrics=config.train.metrics,
    )
    metrics = {f"test_{name}": value for name, value in result.metrics.items()}
    out = paths.stage("evaluate")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name, rows in result.tables.items():
        write_json(plots / name, rows)
    if result.confusion_matrix is not None:
        run.json(result.confusion_matrix.tolist(), "evaluation/confusion_matrix.json")
    figures = dict(result.figures)
    history_path = paths.stage("train") / "history.json"
    if history_path.is_file():
        history = json.loads(history_path.read_text(encoding="utf-8"))
        starts = evaluation.phase_starts_of(history)
        figures["learning_curve.png"] = evaluation.learning_curve_figure(history, starts)
    for name, fig in figures.items():
        with atomic_path(plots / name) as tmp:
            fig.savefig(tmp, format="png")
        run.figure(fig, f"evaluation/{name}")
    write_json(out / "metrics.json", metrics)
    run.metrics(metrics)
    if run.run_id and config.tracking.log_model:
        from tfstack import tracking

        uri = tracking.log_keras_model(run.run_id, model, splits.x_test[:5], name="model")
        logger.info("Logged the trained model as %s", uri)
    return metrics


def ensure_demo_inputs(config: Config, paths: Paths) -> None:
    """For ``tfstack run`` on the demo: make the prepared data and components when missing."""
    if config.data.name != "digits":
        return
    if not paths.resolve(config.data.path).is_file():
        logger.info("Demo data missing: running prepare")
        prepare(config, paths)
    demo_components = [config.components.base.path, config.components.head.path]
    if any(
        p.startswith(str(Path(config.output_dir) / "pretrain")) and not paths.resolve(p).exists()
        for p in demo_components
    ):
        logger.info("Demo components missing: running pretrain")
        pretrain(config, paths)


def run_all(config: Config, paths: Paths, *, tags: dict | None = None) -> tuple[RunLog, dict]:
    """build -> train -> evaluate in one process and one MLflow run (with extra ``tags``)."""
    from tfstack import preflight

    # Paths first, before the demo's stages, any run and TensorFlow's import (checkpoints and
    # guards import it): a typo leaves no FAILED run. What the demo makes is checked once made.
    made_by_demo = preflight.made_by_demo(config)
    preflight.check_inputs(config, paths, stage="run", skip=made_by_demo)
    ensure_demo_inputs(config, paths)
    if made_by_demo:
        preflight.check_inputs(config, paths, stage="run")
    from tfstack import checkpoints, resume
    from tfstack.guards import determinism_errors
    from tfstack.output_lock import exclusive

    run = RunLog(config, paths, extra_tags=tags)
    with exclusive(paths.out):
        # A killed execution of this config resumes into its own run (train.resume=auto).
        run.run_id = resume.run_to_resume(config, paths, run)
        resume.end_orphaned_run(run, keep=run.run_id)
        with run.stage("run", continue_run=False), determinism_errors():
            result = build(config, paths, run)  # its report logs stage_seconds_build
            start = time.perf_counter()
            model, _ = train(config, paths, run, model=result.model, keep_checkpoint=True)
            run.metrics({"stage_seconds_train": time.perf_counter() - start})
            if config.distribute.kind == "multi_worker":
                # Its variables belong to the cluster; the chief evaluates a local copy.
                model = None
            start = time.perf_counter()
            metrics = evaluate(config, paths, run, model=model)
            run.metrics({"stage_seconds_evaluate": time.perf_counter() - start})
        if config.train.resume == "auto":
            checkpoints.remove(resume.checkpoint_dir(paths))
    return run, metrics


def run_stage(name: str, config: Config, paths: Paths) -> tuple[RunLog, object]:
    """One DVC stage in its own process."""
    if name in ("prepare", "pretrain"):
        return None, {"prepare": prepare, "pretrain": pretrain}[name](config, paths)
    from tfstack import preflight

    # What this stage reads, before its run starts (or continues) and before TensorFlow.
    preflight.check_inputs(config, paths, stage=name)
    from tfstack import resume
    from tfstack.output_lock import exclusive

    run = RunLog(config, paths)
    with exclusive(paths.out):
        if name == "build":  # the other stages continue the run that build started
            resume.end_orphaned_run(run, keep=None)
        result = _run_stage(name, config, paths, run)
    return run, result


def _run_stage(name: str, config: Config, paths: Paths, run: RunLog):
    from tfstack.guards import determinism_errors

    with run.stage(name, continue_run=name != "build"), determinism_errors():
        if name == "build":
            result = build(config, paths, run)
        elif name == "train":
            if run.new:
                log_build_report(run, paths.stage("build"))
            result = train(config, paths, run)
        elif name == "evaluate":
            if run.new:
                log_build_report(run, paths.stage("build"))
            result = evaluate(config, paths, run)
        else:  # pragma: no cover - the CLI only passes known names
            raise TfstackError(f"Unknown stage {name!r}.")
    return result
