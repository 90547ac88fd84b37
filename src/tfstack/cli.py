"""The ``tfstack`` command.

``tfstack run [overrides]``                  the whole pipeline in one process and one MLflow run
``tfstack prepare|pretrain|build|train|evaluate [--params params.yaml] [overrides]``  DVC stages
``tfstack inspect MODEL [MODEL2] [--plot F]`` specs, layer table, verdict, adapter; F: the diagram
``tfstack params [overrides]``               write conf/ composed as DVC does into params.yaml
``tfstack run -m a=x,y b=u,v`` (or ``hparams_search=optuna``)  a Hydra multirun: one MLflow parent
                                             run, one nested run per job (``pipeline.sweeps``)
``tfstack compare [--parent ID] [--filter F]`` the runs grouped by freeze x stacking x schedule
``tfstack reproduce RUN_ID``                 re-run a run from its logged config, diff the metrics
``tfstack predict MODEL PATH... [--output F]`` a run's, a registered or a saved model on new files
``tfstack init [--base P --head P --data P]`` scaffold conf/, dvc.yaml, ... into this git repo
``tfstack promote (RUN_ID|--parent ID|last) --name N --alias A``  register a run's model (a sweep's
                                             best by its objective) and move the alias
``tfstack cache list|clear [KEY ...]``        the shared frozen-feature cache (`feature_cache`)

Overrides are Hydra overrides of ``conf/`` (``stacking=adapter freeze=joint train.epochs=3``).
With ``--params FILE`` a stage reads the config DVC composed into ``params.yaml`` instead.
Errors caused by input print one short message and exit 2; ``--debug`` or ``HYDRA_FULL_ERROR=1``
shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from pathlib import Path

from tfstack.errors import StoreLostError, TfstackError

STAGES = ("prepare", "pretrain", "build", "train", "evaluate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfstack",
        description="Stack pretrained Keras models, train them by freeze policy and schedule, "
        "and track every run in MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="build, train and evaluate in one process")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. stacking=adapter")
    run.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    run.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="Hydra multirun (a sweep): one job per combination, nested under one MLflow run",
    )
    for stage in STAGES:
        sub = commands.add_parser(stage, help=f"the DVC stage '{stage}'")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides (without --params)")
        sub.add_argument("--params", help="read this composed config (DVC's params.yaml)")
        sub.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    params = commands.add_parser("params", help="write conf/ composed as DVC does (params.yaml)")
    params.add_argument("overrides", nargs="*", help="Hydra overrides")
    params.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    params.add_argument("--out", default="params.yaml", help="the file to write")
    inspect = commands.add_parser("inspect", help="describe one model or check two fit")
    inspect.add_argument(
        "models", nargs="+", help="MODEL [MODEL2]: files or keras_applications:NAME"
    )
    inspect.add_argument(
        "--trust-code",
        action="store_true",
        help="allow code in the models: Lambda layers, custom classes, SavedModels",
    )
    inspect.add_argument(
        "--modules",
        default="",
        help="comma-separated Python modules to import first, which register the models' "
        "custom Keras classes (needs --trust-code)",
    )
    inspect.add_argument("--cut-at", help="use the first model up to this layer's output")
    inspect.add_argument(
        "--plot",
        metavar="FILE",
        help="also write the architecture diagram (FILE.png or FILE.svg; no suffix: both), as a "
        "run logs it; a second model's goes to FILE_2. Needs pydot and Graphviz",
    )
    tracking_help = "tracking.uri=... tracking.experiment=... (as for tfstack run)"
    compare = commands.add_parser("compare", help="compare runs: table, CSV, Markdown, curves")
    compare.add_argument("overrides", nargs="*", help=tracking_help)
    compare.add_argument("--parent", help="only this sweep's runs: a parent run id, or 'last'")
    compare.add_argument("--filter", help="an MLflow filter, e.g. \"tags.freeze = 'joint'\"")
    compare.add_argument(
        "--group-by", default="freeze,stacking,schedule", help="tags or params, comma-separated"
    )
    compare.add_argument("--rank-by", default="test_accuracy", help="the verdict's metric")
    compare.add_argument("--val-metric", default="val_accuracy", help="the history to plot")
    compare.add_argument("--out", default="outputs/compare", help="where to write the files")
    compare.add_argument("--no-log", action="store_true", help="do not log to the parent run")
    compare.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    reproduce = commands.add_parser("reproduce", help="re-run a run from its logged config")
    reproduce.add_argument("run_id", help="the MLflow run id to re-run")
    reproduce.add_argument("overrides", nargs="*", help=tracking_help)
    reproduce.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    predict = commands.add_parser("predict", help="predict on new images or arrays")
    predict.add_argument(
        "model",
        metavar="MODEL",
        help="runs:/RUN_ID/NAME, models:/NAME@ALIAS, models:/NAME/VERSION or FILE.keras",
    )
    predict.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders, CSVs of paths, .npz files"
    )
    predict.add_argument("--output", metavar="FILE.csv", help="write the predictions as CSV")
    predict.add_argument("--tracking-uri", metavar="URI", help="the store (default: tfstack run's)")
    predict.add_argument("--batch-size", type=int, default=32, metavar="N", help="per batch")
    predict.add_argument("--class-names", metavar="A,B,...", help="class names, by class id")
    predict.add_argument("--path-column", default="path", metavar="NAME", help="a CSV's column")
    predict.add_argument(
        "--trust-code", action="store_true", help="allow code in the model (Lambda layers, ...)"
    )
    predict.add_argument(
        "--modules", default="", metavar="A,B", help="modules registering its classes"
    )
    init = commands.add_parser("init", help="scaffold tfstack into this git repository")
    init.add_argument(
        "--base", help="model_1, the feature extractor: a file or keras_applications:NAME"
    )
    init.add_argument("--head", help="model_2, the head: a .keras/.h5 file or SavedModel")
    init.add_argument("--data", help="a folder of class folders, a .csv of images or an .npz")
    init.add_argument("--force", action="store_true", help="replace the files init writes")
    init.add_argument("--dry-run", action="store_true", help="list what it would do; write nothing")
    promote = commands.add_parser("promote", help="register a run's model, move an alias")
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("run_id", nargs="?", help="the MLflow run whose model to register")
    which.add_argument("--parent", help="a sweep's parent run id, or 'last': its best run")
    promote.add_argument("--name", required=True, help="the registered model, e.g. digits")
    promote.add_argument("--alias", help="the alias to move to the new version, e.g. champion")
    promote.add_argument("--tracking-uri", help="the store (default: as tfstack run's)")
    promote.add_argument("--experiment", help="where --parent last looks (default: as tfstack run)")
    promote.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    cache = commands.add_parser("cache", help="list or clear the shared frozen-feature cache")
    cache.add_argument("action", choices=("list", "clear"), help="list: show; clear: remove")
    cache.add_argument("keys", nargs="*", help="clear: only these keys (or key prefixes)")
    cache.add_argument("--dir", help="the cache directory (default: as tfstack run finds it)")
    cache.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides (train.*)")
    cache.add_argument("--config-dir", default="conf", help="the Hydra config directory")
    return parser


def _predict(args) -> int:
    from tfstack.pipeline import predict
    from tfstack.predict import parse_class_names

    result = predict.predict(
        args.model,
        args.paths,
        tracking_uri=args.tracking_uri,
        batch_size=args.batch_size,
        trust_code=args.trust_code,
        modules=[module.strip() for module in args.modules.split(",") if module.strip()],
        class_names=parse_class_names(args.class_names),
        path_column=args.path_column,
    )
    if args.output:
        predict.write_csv(result.table, Path(args.output))
        print(f"tfstack predict: wrote {len(result.table)} rows to {args.output}")
    else:
        print(predict.table_text(result.table))
    return 0


def _tracking_store(args):
    """The store and experiment named by ``tracking.*`` overrides, as ``tfstack run`` does."""
    from tfstack.errors import ConfigError
    from tfstack.pipeline import tracking_uri
    from tfstack.pipeline.compose import compose

    other = [o for o in args.overrides if not o.lstrip("+~").startswith("tracking")]
    if other:
        raise ConfigError(
            f"tfstack {args.command} takes only tracking overrides (tracking.uri=..., "
            f"tracking.experiment=...); got {other}. To change the config, use tfstack run."
        )
    config = compose(args.overrides, config_dir=args.config_dir)
    return tracking_uri(config, Path.cwd()), config


def _compare(args) -> int:
    from tfstack.pipeline import compare

    uri, config = _tracking_store(args)
    comparison, files, parent = compare.compare_store(
        uri,
        config.tracking.experiment,
        parent_run_id=args.parent,
        filter_string=args.filter,
        group_by=[key.strip() for key in args.group_by.split(",") if key.strip()],
        val_metric=args.val_metric,
        rank_by=args.rank_by,
        out_dir=Path(args.out),
        log_to_parent=not args.no_log,
    )
    print(comparison.text())
    print(f"\n  wrote {', '.join(str(path) for path in files.values())}")
    if parent and not args.no_log:
        print(f"  logged to parent run {parent} (comparison/)")
    return 0


def _reproduce(args) -> int:
    from tfstack.pipeline import reproduce

    uri, config = _tracking_store(args)
    explicit = any(o.lstrip("+").startswith("tracking.experiment=") for o in args.overrides)
    result = reproduce.reproduce(
        args.run_id,
        uri=uri,
        root=Path.cwd(),
        experiment=config.tracking.experiment if explicit else None,
        output_dir=config.output_dir,
        warn=lambda message: print(f"tfstack: warning: {message}", file=sys.stderr),
    )
    print(f"\ntfstack: reproduced run {result.source_run_id} as run {result.run_id} ({uri})")
    print(reproduce.differences_text(result.differences))
    return 0


def _promote(args) -> int:
    from tfstack.pipeline.promote import picked_text, promote, registered_text

    args.overrides = [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []
    args.overrides += [f"tracking.experiment={args.experiment}"] if args.experiment else []
    uri, config = _tracking_store(args)
    found = promote(
        uri,
        name=args.name,
        alias=args.alias,
        run_id=args.run_id,
        parent=args.parent,
        experiment=config.tracking.experiment,
    )
    print(f"tfstack promote: registered {registered_text(found)}")
    if picked_text(found["objective"]):
        print(f"  picked as {picked_text(found['objective'])}")
    print(f"  load it with mlflow.pyfunc.load_model('{found['model_uri']}') ({uri})")
    return 0


def _sweep(args) -> int:
    from tfstack.pipeline import sweeps

    result = sweeps.run_sweep(args.overrides, config_dir=args.config_dir)
    print(sweeps.summary(result))
    failed = [r for r in result.get("results", []) if r["status"] != "FINISHED"]
    return 1 if failed or not result.get("results") else 0


def _load_config(args):
    from tfstack.pipeline.compose import compose, load_params

    if getattr(args, "params", None):
        if args.overrides:
            raise TfstackError(
                "Give either --params FILE or overrides, not both: DVC composes overrides into "
                "params.yaml (dvc exp run -S key=value)."
            )
        return load_params(args.params)
    return compose(args.overrides, config_dir=args.config_dir)


def _summary(run, metrics: dict, paths) -> str:
    lines = ["", "tfstack: done"]
    if run is not None and run.run_id:
        lines.append(f"  MLflow run   {run.run_id}  ({run.uri})")
    for key, value in sorted(metrics.items()):
        if isinstance(value, float):
            lines.append(f"  {key:<24} {value:.4f}")
    if run is not None and getattr(run, "registered", None):
        from tfstack.pipeline.promote import registered_text

        lines.append(f"  registered   {registered_text(run.registered)}")
    lines.append(f"  outputs      {paths.out}")
    if run is not None and run.uri and run.uri.startswith("sqlite:"):
        lines.append(f"  open the UI  mlflow ui --backend-store-uri {run.uri} --host 127.0.0.1")
    return "\n".join(lines)


def _inspect(args) -> int:
    from tfstack.adapters import check_compatibility, describe_adapter, plan_adapter
    from tfstack.components import load_component
    from tfstack.shapes import input_specs, output_specs, summary_text
    from tfstack.trust import TrustOptions

    # The fixes messages name are this command's options, not config keys.
    options = TrustOptions(trust_code="--trust-code", modules="--modules {modules}")
    modules = [module.strip() for module in args.modules.split(",") if module.strip()]
    models = []
    for i, source in enumerate(args.models[:2]):
        name = "model_1" if i == 0 else "model_2"
        models.append(
            load_component(
                source,
                name=name,
                trust_code=args.trust_code,
                modules=modules,
                cut_at=args.cut_at if i == 0 else None,
                key=name,
                trust_options=options,
            )
        )
    for source, model in zip(args.models, models, strict=False):
        print(f"== {model.name}: {source}")
        print("  inputs: ", ", ".join(str(s) for s in input_specs(model)))
        print("  outputs:", ", ".join(str(s) for s in output_specs(model)))
        print(summary_text(model))
    for i, model in enumerate(models if args.plot else []):
        for path in _plot(model, Path(args.plot), second=i == 1):
            print(f"== diagram: {path}")
    if len(models) == 2:
        up, down = output_specs(models[0])[0], input_specs(models[1])[0]
        verdict = check_compatibility("model_1", up, "model_2", down)
        print("== compatibility")
        print("  " + ("compatible" if verdict.compatible else str(verdict)))
        plan = plan_adapter(up, down)
        print("  adapter auto would add: " + (describe_adapter(plan) if plan else "nothing"))
    return 0


def _plot(model, target: Path, *, second: bool) -> list[Path]:
    """`tfstack inspect --plot`: the model's diagram at ``target`` (a second model's at _2)."""
    from tfstack.diagrams import FORMATS, draw, missing_tools
    from tfstack.errors import ConfigError

    suffix = target.suffix.lower().lstrip(".")
    if suffix and suffix not in (*FORMATS, "pdf"):
        raise ConfigError(
            f"--plot {target}: cannot write .{suffix} diagrams. Give a .png, .svg or .pdf file, "
            "or a name without a suffix for both a PNG and an SVG."
        )
    missing = missing_tools()
    if missing:
        raise ConfigError(f"--plot {target}: {missing}; install it, or leave out --plot.")
    stem = target.with_suffix("") if suffix else target
    if second:
        stem = stem.with_name(f"{stem.name}_2")
    return draw(model, stem, formats=[suffix] if suffix else FORMATS)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("absl", "tensorflow", "h5py", "matplotlib", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfstack import signals

    with signals.stop_on_signals():
        return _command(args, debug)


def _command(args, debug: bool) -> int:
    """Run one command; input errors and stop signals become one line and an exit code."""
    from tfstack import signals

    paths = None
    try:
        if os.environ.get("DVC_STAGE"):  # a DVC stage: dvc forwards no SIGTERM (tfstack.signals)
            signals.stop_with_parent()
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "params":
            from tfstack.pipeline.compose import compose, compose_yaml

            compose(args.overrides, config_dir=args.config_dir)  # validate first
            from tfstack.files import atomic_path

            with atomic_path(Path(args.out)) as tmp:  # never a half-written params.yaml
                tmp.write_text(compose_yaml(args.config_dir, args.overrides))
            print(f"tfstack params: wrote {args.out}")
            return 0
        if args.command == "run" and (
            args.multirun or any(o.startswith("hparams_search=") for o in args.overrides)
        ):
            return _sweep(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "init":
            from tfstack.pipeline.scaffold import init_project

            options = {k: getattr(args, k) for k in ("base", "head", "data", "force", "dry_run")}
            print(init_project(Path.cwd(), **options))
            return 0
        if args.command == "promote":
            return _promote(args)
        if args.command == "cache":
            from tfstack.pipeline import cache_command

            return cache_command.main(args)
        config = _load_config(args)
        if config.distribute.cpu_replicas:
            # Logical CPU devices can only be made before TensorFlow starts its runtime.
            from tfstack.distribute import configure_cpu_replicas

            configure_cpu_replicas(config.distribute.cpu_replicas)
        from tfstack import pipeline

        paths = pipeline.Paths.from_config(config, Path.cwd())
        if config.distribute.kind == "multi_worker" and args.command in ("run", "train"):
            # Before any other TensorFlow op. The other stages do not join the cluster.
            from tfstack.distribute import is_chief, make_strategy, task_name

            strategy = make_strategy("multi_worker")
            if not is_chief(strategy):
                pipeline.train_worker(config, paths)
                done = f"{task_name(strategy)} done (the chief logs the run)"
                print(f"tfstack {args.command}: {done}")
                return 0
        if args.command == "run":
            run, metrics = pipeline.run_all(config, paths)
            print(_summary(run, metrics, paths))
        else:
            run, result = pipeline.run_stage(args.command, config, paths)
            if args.command == "evaluate":
                print(_summary(run, result, paths))
            elif run is not None and run.run_id:
                print(f"tfstack {args.command}: done (MLflow run {run.run_id})")
            else:
                print(f"tfstack {args.command}: done")
        return 0
    except TfstackError as err:
        if debug:
            raise
        # A store that failed mid-run left the checkpoint in place: say what a rerun does.
        lost = isinstance(err, StoreLostError)
        print(f"tfstack: error: {err}{_resume_note(paths) if lost else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or a `signals.Stopped` (SIGTERM, SIGHUP)
        name = signals.signal_name(stop)
        what = "interrupted (SIGINT)" if name == "SIGINT" else f"stopped by {name}"
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"tfstack: {what}{_resume_note(paths)}", file=sys.stderr)
        return signals.exit_code(stop)


def _resume_note(paths) -> str:
    """What a rerun does after a stop: resume from the kept checkpoint, or start over."""
    if paths is None:
        return ""
    import json

    from tfstack.pipeline.resume import checkpoint_dir

    directory = checkpoint_dir(paths)
    try:
        done = json.loads((directory / "state.json").read_text(encoding="utf-8"))["epochs_done"]
    except (OSError, ValueError, KeyError, TypeError):
        return "; no training checkpoint is kept (a rerun starts this command over)"
    return f"; the checkpoint after epoch {done} is kept in {directory}: rerun to resume"


def run(argv: list[str] | None = None) -> None:
    """The ``tfstack`` command: `main`, then exit with its code.

    Before exiting, ``gc.freeze()`` takes the objects left (TensorFlow's and Keras's, many and
    cyclic) out of the garbage collection the interpreter runs at exit: that collection took
    about 1.3 s of every TensorFlow process here, and so of every DVC stage, while the process
    was already done. Nothing is skipped but collecting cycles of a process about to end: the
    ``atexit`` handlers (MLflow's, logging's) and module teardown still run, and every output
    was written and closed before `main` returned.
    """
    code = main(argv)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
