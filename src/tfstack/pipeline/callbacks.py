"""``train.callbacks`` and ``tracking.tensorboard``: the Keras callbacks of every phase.

The entries were checked by `tfstack.pipeline.config.validate` (names, refusals, trust); here
they are made: a ``{class_name, config}`` entry by `tfstack.user_callbacks.builtin_callback`
(relative file paths under ``outputs/train/``), a ``{_target_: ...}`` entry by Hydra's
``instantiate``, which imports the user's module (the working directory is searched too, as for
``components.<key>.modules``). `tfstack.training.run_schedule` runs them on the full stacked
model in every phase. With ``tracking.tensorboard`` a `tfstack.tensorboard_logs.
ScheduleTensorBoard` writes to ``outputs/train/tensorboard/``; `log_callbacks` logs that
directory into the run (artifacts ``tensorboard/``) and the callbacks' names (tag ``callbacks``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tfstack.errors import ConfigError, describe_error
from tfstack.keras_names import CALLBACK_PATHS
from tfstack.pipeline.paths import Paths
from tfstack.pipeline.run_log import RunLog
from tfstack.pipeline.schema import Config

logger = logging.getLogger(__name__)

KEY = "train.callbacks"
TENSORBOARD_DIR = "tensorboard"  # under the train stage's outputs, and in the run's artifacts


def tensorboard_dir(paths: Paths) -> Path:
    """``outputs/train/tensorboard``: the TensorBoard log directory of the run."""
    return paths.stage("train") / TENSORBOARD_DIR


def training_callbacks(config: Config, paths: Paths, *, fresh: bool, chief: bool = True) -> list:
    """The callbacks of ``train.callbacks`` and ``tracking.tensorboard``, in that order.

    Args:
        config: the validated config.
        paths: the project's paths.
        fresh: training starts from its first epoch (not resumed): a CSVLogger's file and the
            TensorBoard logs of an earlier run are removed, so they hold this run only.
        chief: False on the other workers of ``distribute=multi_worker``: no TensorBoard logs,
            and the relative files of ModelCheckpoint and CSVLogger go to a scratch directory.

    Raises:
        ConfigError: a callback cannot be made (naming ``train.callbacks[i]``).
    """
    from tfstack.user_callbacks import builtin_callback

    made = []
    # The other workers write nothing of the run: their relative files go to a scratch directory.
    out = paths.stage("train") if chief else Path(tempfile.mkdtemp(prefix="tfstack-worker-"))
    for index, entry in enumerate(config.train.callbacks):
        if "_target_" in entry:
            made.append(_user_callback(dict(entry), index))
            continue
        callback = builtin_callback(entry, index=index, directory=out)
        argument = CALLBACK_PATHS.get(entry["class_name"])
        if argument and entry["class_name"] == "CSVLogger" and fresh and chief:
            Path(getattr(callback, argument)).unlink(missing_ok=True)
        made.append(callback)
    if config.tracking.tensorboard and chief:
        from tfstack.tensorboard_logs import ScheduleTensorBoard

        logs = tensorboard_dir(paths)
        if fresh:
            shutil.rmtree(logs, ignore_errors=True)
        made.append(ScheduleTensorBoard(str(logs)))
    return made


def callback_names(config: Config) -> str:
    """``EarlyStopping, my.module.Class``: the tag naming the user's callbacks (or ``none``)."""
    names = [str(e.get("_target_") or e.get("class_name")) for e in config.train.callbacks]
    return ", ".join(names) or "none"


def log_callbacks(run: RunLog, config: Config, paths: Paths) -> None:
    """Tag the run with the user's callbacks; log the TensorBoard logs as its artifacts."""
    from tfstack import tracking

    tracking.log_tags(run.run_id, {"callbacks": callback_names(config)})
    logs = tensorboard_dir(paths)
    if config.tracking.tensorboard and logs.is_dir():
        tracking.log_artifact_file(run.run_id, logs, TENSORBOARD_DIR)


def _user_callback(entry: dict[str, Any], index: int):
    """The user's callback class of a ``_target_`` entry (trust was checked by validate)."""
    import keras
    from hydra.utils import instantiate

    where = f"{KEY}[{index}]"
    target = entry["_target_"]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a project's own module, as `python -m` would find it
    try:
        callback = instantiate(entry, _convert_="all")
    except Exception as err:  # importing and constructing run the user's code: anything
        cause = err.__cause__ or err
        raise ConfigError(
            f"{where} (_target_: {target}) cannot be made: {describe_error(cause)}. Make the "
            "module importable from the working directory or PYTHONPATH, and check its "
            "arguments."
        ) from err
    if not isinstance(callback, keras.callbacks.Callback):
        raise ConfigError(
            f"{where} (_target_: {target}) made a {type(callback).__name__}, not a "
            "keras.callbacks.Callback; subclass keras.callbacks.Callback."
        )
    logger.info("%s: %s", where, type(callback).__name__)
    return callback
