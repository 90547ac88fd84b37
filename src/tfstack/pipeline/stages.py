"""The pipeline's stages: prepare -> pretrain -> build -> train -> evaluate.

This is the entry layer: it reads the validated ``Config``, turns it into plain values for the
library (components, shapes, stacking, freezing, schedules, training, evaluation) and writes the
outputs DVC tracks. Tracking goes through ``tfstack.tracking`` only.

One MLflow run per pipeline execution: ``build`` starts it and writes ``outputs/run.json``; the
later stages reopen that run when it was made for the same config (the config hash matches),
otherwise (``build`` was cached by DVC) they start a new run and log the build's report from its
files. Every stage ends the run FINISHED, or FAILED with the error, so no run is left RUNNING
between or after stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from tfstack.errors import DataError, TfstackError
from tfstack.files import atomic_path, write_json
from tfstack.pipeline.inputs import (
    check_pretrained_weights,
    check_targets,
    class_names,
    early_stopping_rules,
    feature_extractor_names,
    input_sample,
    load_components,
    load_model,
    load_splits,
    lr_schedule_specs,
    make_dataset,
    make_front,
    make_phases,
    safe_mode_for,
    seed_everything,
    served_example,
)
from tfstack.pipeline.paths import Paths
from tfstack.pipeline.records import component_files, log_build_report, log_phases, shape_report
from tfstack.pipeline.run_log import RunLog
from tfstack.pipeline.schema import Config
from tfstack.pipeline.train_options import (
    apply_precision,
    class_weights,
    feature_cache,
    log_class_weights,
    log_precision,
    precision,
    stacked_under_precision,
)

logger = logging.getLogger(__name__)

# How EpochLogger writes per-epoch metrics: gathered into one write per 5 s, since a sqlite write
# lasts about as long as a demo epoch; synchronous, since once MLflow's asynchronous logging has
# been used, ending the run waits about 1 s for its logging thread (benchmarks/bench.py, (c)).
EPOCH_LOGGING = {"synchronous": True, "min_interval_s": 5.0}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def prepare(config: Config, paths: Paths) -> dict:
    """Make the demo's source and target tasks (image folders) from the raw digit PNGs."""
    from tfstack.pipeline import demo

    raw = paths.resolve(config.demo.raw)
    if not raw.is_dir():
        raise DataError(
            f"demo.raw={config.demo.raw} does not exist. Run `make data` (or "
            "`python -m tfstack.pipeline.demo write-raw data`) to materialize it, or `dvc pull`."
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
    from tfstack.pipeline import demo

    source = paths.stage("prepare") / "source"
    if not source.is_dir():
        raise DataError(f"{source} is missing; run the prepare stage first (dvc repro prepare).")
    result = demo.pretrain_components(
        source, paths.stage("pretrain"), seed=config.seed, epochs=config.demo.pretrain_epochs
    )
    write_json(paths.stage("pretrain") / "pretrain.json", result)
    return result


def build(config: Config, paths: Paths, run: RunLog):
    """Load the components, stack them by strategy and write the untrained model and report."""
    from tfstack.shapes import summary_text
    from tfstack.stacking import build_stacked

    start = time.perf_counter()
    # Seeded here too: adapters and intermediate layers get their initial weights at build time.
    seed_everything(config.seed, config.train.deterministic)
    bases, head = load_components(config, paths)
    apply_precision(config, bases, head)  # the files keep float32 policies (train.precision)
    from tfstack.precision import precision_scope

    with precision_scope("float32"):  # the front scales pixels at full precision, for any policy
        front = make_front(config, paths, bases[0])
    result = build_stacked(
        config.stacking.strategy,
        bases,
        head,
        adapter=config.stacking.adapter,
        intermediate=list(config.stacking.intermediate) or None,
        merge=config.stacking.merge,
        front=front,
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
        "component_files": component_files(models),
        "seconds": time.perf_counter() - start,
    }
    summaries = {"stacked": summary_text(result.model)}
    summaries.update({name: summary_text(m) for name, m in models.items()})
    with atomic_path(out / "stacked.keras") as tmp:
        result.model.save(tmp)
    write_json(out / "shapes.json", report)
    from tfstack.diagrams import draw

    draw(result.model, out / "stacked")  # the architecture as built (none without Graphviz)
    for name, text in summaries.items():
        with atomic_path(out / f"summary_{name}.txt") as tmp:
            tmp.write_text(text, encoding="utf-8")
    log_build_report(run, out)
    return result


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
    with precision(config):
        train(config, paths, run, chief=False)


def _train(config: Config, paths: Paths, run: RunLog, model, *, keep_checkpoint: bool, chief: bool):
    """Run the schedule's phases on the stacked model; write the trained model and history.

    With ``train.resume=auto`` a checkpoint is written after every epoch and a matching one is
    resumed (see `tfstack.training.run_schedule`); it is removed at the end unless
    ``keep_checkpoint`` (`run_all` removes it once evaluation is done too). Under
    ``multi_worker`` there are no checkpoints: every worker would have to resume the same
    epoch. ``chief=False`` writes nothing.
    """
    from tfstack import checkpoints
    from tfstack.diagrams import draw_phases
    from tfstack.images import naming_unreadable_files
    from tfstack.input_range import check_input_range
    from tfstack.phase_results import history_rows
    from tfstack.pipeline import resume
    from tfstack.pipeline.callbacks import log_callbacks, training_callbacks
    from tfstack.training import run_schedule

    seed_everything(config.seed, config.train.deterministic)
    if model is None:
        model = load_model(paths.stage("build") / "stacked.keras", config, stage="build")
    splits = load_splits(config, paths)
    check_targets(config, model, splits)
    names = class_names(config, paths, splits, model)  # bad names fail now, not after training
    weights = class_weights(config, splits, names)
    stacked_under_precision(config, model)
    log_precision(run, config, model, chief=chief)  # before training: it may warn
    # IndexedDatasets, not bare tf.data pipelines: a cached frozen phase replays their order.
    train_ds = make_dataset(config, model, splits, "train", shuffle=True)
    val_ds = make_dataset(config, model, splits, "val", shuffle=False)
    # A warning, not an error: the data is the user's to fix (and stays as given).
    key = f"data.path={config.data.path} x_train"
    for warning in check_input_range(input_sample(train_ds), model, key=key) if chief else []:
        print(f"tfstack: warning: {warning.message}", file=sys.stderr)
        if run.run_id:
            from tfstack.tracking import log_tags

            log_tags(run.run_id, {"input_range_warning": warning.summary})
    phases = make_phases(config)
    resumable = config.train.resume == "auto" and config.distribute.kind != "multi_worker"
    state = resume.resumable_checkpoint(config, paths, run) if resumable else None
    if state is not None and run.run_id:
        resume.continue_run_record(run, state)

    if state is None and run.run_id:
        with tempfile.TemporaryDirectory() as directory:
            # What each phase trains, drawn once per distinct trainable set.
            diagrams = draw_phases(
                model, phases, Path(directory), feature_extractors=feature_extractor_names(config)
            )
            run.files(diagrams, "shapes")

    def per_phase(phase, index):
        if not run.run_id:
            return []
        from tfstack.tracking import EpochLogger

        return [EpochLogger(run.run_id, phase.name, phase_index=index, **EPOCH_LOGGING)]

    directory = resume.checkpoint_dir(paths)
    # A damaged image fails inside tf.data without its name: find it and name it.
    with naming_unreadable_files(train_ds, val_ds):
        results = run_schedule(
            model,
            phases,
            train_ds,
            val_ds,
            loss=config.train.loss,
            metrics=list(config.train.metrics),
            feature_extractors=feature_extractor_names(config),
            callbacks=training_callbacks(config, paths, fresh=state is None, chief=chief),
            callbacks_for_phase=per_phase,
            verbose=config.train.verbose,
            cache_frozen=config.train.cache_frozen == "auto",
            feature_cache=feature_cache(config),
            feature_memory_mb=config.train.feature_memory_mb,
            checkpoint_dir=directory if resumable else None,
            resume_from=state,
            checkpoint_key=resume.checkpoint_key(config, paths),
            run_id=run.run_id,
            early_stopping=early_stopping_rules(config, phases),
            lr_schedule=lr_schedule_specs(config, phases),
            class_weight=weights,
            jit_compile=config.train.jit_compile,
        )
    if run.run_id:
        log_phases(run, results, model)
        log_callbacks(run, config, paths)
    log_class_weights(run, weights, names)
    counted = resume.logged_steps(run, "params_trainable") if state and run.run_id else set()
    for result in results:
        # A phase that ran no epoch has no step of its own (the next phase starts there).
        if result.epochs and result.initial_epoch not in counted:
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


def _ended_cached(paths: Paths) -> bool:
    """Whether the train stage's last phase trained on features of the shared cache."""
    try:
        phases = json.loads((paths.stage("train") / "phases.json").read_text(encoding="utf-8"))
        return phases[-1].get("cache") in ("hit", "miss")
    except (OSError, ValueError, IndexError, KeyError, AttributeError, TypeError):
        return False


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
    from tfstack.images import naming_unreadable_files

    splits = load_splits(config, paths)
    check_targets(config, model, splits)
    names = class_names(config, paths, splits, model)
    test_ds = make_dataset(config, model, splits, "test", shuffle=False)
    single = config.distribute.kind == "none"
    with naming_unreadable_files(test_ds):
        result = evaluation.evaluate(
            model,
            # Arrays are evaluated as they are; image files stream through their batches.
            test_ds,
            splits.y_test,
            task=config.train.task,
            batch_size=config.train.batch_size,
            loss=config.train.loss,
            metrics=config.train.metrics,
            class_names=names,
            # One pass of the frozen part over the test set (not under a strategy: its
            # variables are mirrored).
            feature_extractors=feature_extractor_names(config) if single else (),
            feature_memory_mb=config.train.feature_memory_mb,
            # The test features through the shared cache when the last phase trained on
            # cached ones: the frozen part is the one that phase's entries were stored with.
            feature_cache=feature_cache(config) if single and _ended_cached(paths) else None,
        )
    metrics = {f"test_{name}": value for name, value in result.metrics.items()}
    out = paths.stage("evaluate")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name, rows in result.tables.items():
        write_json(plots / name, rows)
    if result.confusion_matrix is not None:
        run.json(result.confusion_matrix.tolist(), "evaluation/confusion_matrix.json")
    if names is not None:
        run.json(names, "class_names.json")
    figures = dict(result.figures)
    history_path = paths.stage("train") / "history.json"
    if history_path.is_file():
        history = json.loads(history_path.read_text(encoding="utf-8"))
        starts = evaluation.phase_starts_of(history)
        figures["learning_curve.png"] = evaluation.learning_curve_figure(history, starts)
    for name, fig in figures.items():
        with atomic_path(plots / name) as tmp:
            fig.savefig(tmp, format="png")
    # The files as written: each figure is rendered once.
    run.files([plots / name for name in figures], "evaluation")
    write_json(out / "metrics.json", metrics)
    run.metrics(metrics)
    if run.run_id and config.tracking.log_model:
        from tfstack import tracking

        example = served_example(test_ds)  # uint8 for images, as a client sends them
        # The signature from the test predictions' first rows (no new predict of the model).
        uri = tracking.log_keras_model(
            run.run_id, model, example, name="model", predictions=result.outputs
        )
        logger.info("Logged the trained model as %s", uri)
        if names is not None:
            trained = paths.stage("train") / "model.keras"
            # Beside the TensorFlow flavor (which reproduce and the tests load as Keras): the
            # pyfunc that `mlflow models serve -m runs:/<id>/classifier` answers with names.
            uri = tracking.log_classifier_model(
                run.run_id,
                model,
                example,
                names,
                name="classifier",
                safe_mode=safe_mode_for(trained, config, stage="train"),
                keras_file=trained,  # the file train wrote of this model, not saved again
            )
            logger.info("Logged the classifier (class names and probabilities) as %s", uri)
    return metrics


def ensure_demo_inputs(config: Config, paths: Paths) -> None:
    """For ``tfstack run`` on the demo: make the prepared data and components when missing."""
    if config.data.name != "digits":
        return
    if not paths.resolve(config.data.path).exists():
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
    from tfstack.pipeline import preflight

    # Paths first, before the demo's stages, any run and TensorFlow's import (checkpoints and
    # guards import it): a typo leaves no FAILED run. What the demo makes is checked once made.
    made_by_demo = preflight.made_by_demo(config)
    preflight.check_inputs(config, paths, stage="run", skip=made_by_demo)
    check_pretrained_weights(config, paths)  # offline without the file: one line, no run
    ensure_demo_inputs(config, paths)
    if made_by_demo:
        preflight.check_inputs(config, paths, stage="run")
    from tfstack import checkpoints
    from tfstack.guards import determinism_errors, xla_errors
    from tfstack.pipeline import resume
    from tfstack.pipeline.output_lock import exclusive

    run = RunLog(config, paths, extra_tags=tags)
    with exclusive(paths.out):
        # A killed execution of this config resumes into its own run (train.resume=auto).
        run.run_id = resume.run_to_resume(config, paths, run)
        resume.end_orphaned_run(run, keep=run.run_id)
        with (
            run.stage("run", continue_run=False),
            determinism_errors(),
            xla_errors(),
            precision(config),
        ):
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
    from tfstack.pipeline.promote import register_finished_run

    register_finished_run(run, config)  # tracking.register, once the run ended FINISHED
    return run, metrics


def run_stage(name: str, config: Config, paths: Paths) -> tuple[RunLog, object]:
    """One DVC stage in its own process."""
    if name in ("prepare", "pretrain"):
        return None, {"prepare": prepare, "pretrain": pretrain}[name](config, paths)
    from tfstack.pipeline import preflight

    # What this stage reads, before its run starts (or continues) and before TensorFlow.
    preflight.check_inputs(config, paths, stage=name)
    if name == "build":
        check_pretrained_weights(config, paths)
    from tfstack.pipeline import resume
    from tfstack.pipeline.output_lock import exclusive

    run = RunLog(config, paths)
    with exclusive(paths.out):
        if name == "build":  # the other stages continue the run that build started
            resume.end_orphaned_run(run, keep=None)
        result = _run_stage(name, config, paths, run)
    if name == "evaluate":  # the last stage: the run ended FINISHED
        from tfstack.pipeline.promote import register_finished_run

        register_finished_run(run, config)
    return run, result


def _run_stage(name: str, config: Config, paths: Paths, run: RunLog):
    from tfstack.guards import determinism_errors, xla_errors

    with (
        run.stage(name, continue_run=name != "build"),
        determinism_errors(),
        xla_errors(),
        precision(config),
    ):
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
