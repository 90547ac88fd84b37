"""The ``tfstack`` command.

``tfstack run [overrides]``                  the whole pipeline in one process and one MLflow run
``tfstack prepare|pretrain|build|train|evaluate [--params params.yaml] [overrides]``  DVC stages
``tfstack inspect MODEL [MODEL2]``           specs, per-layer table, verdict, the adapter auto picks
``tfstack params [overrides]``               write conf/ composed as DVC does into params.yaml

Overrides are Hydra overrides of ``conf/`` (``stacking=adapter freeze=joint train.epochs=3``).
With ``--params FILE`` a stage reads the config DVC composed into ``params.yaml`` instead.
Errors caused by input print one short message and exit 2; ``--debug`` or ``HYDRA_FULL_ERROR=1``
shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tfstack.errors import TfstackError

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
    inspect.add_argument("--trust-code", action="store_true", help="allow Lambda layers")
    inspect.add_argument("--cut-at", help="use the first model up to this layer's output")
    return parser


def _load_config(args):
    from tfstack.config import compose, load_params

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
    lines.append(f"  outputs      {paths.out}")
    if run is not None and run.uri and run.uri.startswith("sqlite:"):
        lines.append(f"  open the UI  mlflow ui --backend-store-uri {run.uri} --host 127.0.0.1")
    return "\n".join(lines)


def _inspect(args) -> int:
    from tfstack.adapters import describe_adapter, plan_adapter
    from tfstack.components import load_component
    from tfstack.shapes import check_compatibility, input_specs, output_specs, summary_text

    models = []
    for i, source in enumerate(args.models[:2]):
        name = "model_1" if i == 0 else "model_2"
        models.append(
            load_component(
                source,
                name=name,
                trust_code=args.trust_code,
                cut_at=args.cut_at if i == 0 else None,
                key=name,
            )
        )
    for source, model in zip(args.models, models, strict=False):
        print(f"== {model.name}: {source}")
        print("  inputs: ", ", ".join(str(s) for s in input_specs(model)))
        print("  outputs:", ", ".join(str(s) for s in output_specs(model)))
        print(summary_text(model))
    if len(models) == 2:
        up, down = output_specs(models[0])[0], input_specs(models[1])[0]
        verdict = check_compatibility("model_1", up, "model_2", down)
        print("== compatibility")
        print("  " + ("compatible" if verdict.compatible else str(verdict)))
        plan = plan_adapter(up, down)
        print("  adapter auto would add: " + (describe_adapter(plan) if plan else "nothing"))
    return 0


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
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "params":
            from tfstack.config import compose, compose_yaml

            compose(args.overrides, config_dir=args.config_dir)  # validate first
            Path(args.out).write_text(compose_yaml(args.config_dir, args.overrides))
            print(f"tfstack params: wrote {args.out}")
            return 0
        config = _load_config(args)
        from tfstack import pipeline

        paths = pipeline.Paths.from_config(config, Path.cwd())
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
        print(f"tfstack: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfstack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
