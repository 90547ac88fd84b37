"""The application around the library: the only code that sees `Config`, Hydra, DVC and files.

``config`` (schemas, validation), ``compose`` (Hydra composition and its errors), ``preflight``
(checks that need no TensorFlow, before any run starts), ``paths``, ``run_log`` (the MLflow run
of one execution), ``inputs`` (config to library values), ``stages`` (prepare -> pretrain ->
build -> train -> evaluate), ``resume``, ``output_lock``, ``sweeps``, ``reproduce``,
``compare`` (the command) and ``demo``. The library (`tfstack.*` outside this package and
`tfstack.tracking`) never imports it.

The stages' entry points are re-exported here: ``from tfstack import pipeline;
pipeline.run_all(config, pipeline.Paths.from_config(config, root))``.
"""

from tfstack.pipeline.paths import Paths
from tfstack.pipeline.run_log import RunLog, tracking_uri
from tfstack.pipeline.stages import (
    build,
    ensure_demo_inputs,
    evaluate,
    prepare,
    pretrain,
    run_all,
    run_stage,
    train,
    train_worker,
)

__all__ = [
    "Paths",
    "RunLog",
    "build",
    "ensure_demo_inputs",
    "evaluate",
    "prepare",
    "pretrain",
    "run_all",
    "run_stage",
    "tracking_uri",
    "train",
    "train_worker",
]
