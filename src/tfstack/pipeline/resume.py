"""Resuming a killed execution: which checkpoint and which MLflow run continue, and which end.

The entry layer's side of `tfstack.checkpoints`. A checkpoint is resumed when ``train.resume=auto``,
it was made with the same config and data (`checkpoint_key`) and its epochs were logged to the run
this execution continues: `tfstack run` reopens the checkpoint's run (`run_to_resume`), a DVC
``train`` stage the run ``outputs/run.json`` names. Before training resumes, the epochs the killed
process had checkpointed but not yet logged are logged (`continue_run_record`). A run a killed
process left RUNNING and that nothing resumes is ended KILLED (`end_orphaned_run`, and a stale
checkpoint's run in `resumable_checkpoint`); all of this runs with the output directory locked
(`output_lock.exclusive`), so no live process is writing to those runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tfstack.errors import TfstackError
from tfstack.pipeline.config import to_dict
from tfstack.pipeline.schema import Config

if TYPE_CHECKING:
    from tfstack.checkpoints import TrainingState
    from tfstack.pipeline.paths import Paths
    from tfstack.pipeline.run_log import RunLog

logger = logging.getLogger(__name__)


def checkpoint_dir(paths: Paths) -> Path:
    """Where `train` keeps its per-epoch checkpoint (removed once the execution succeeds)."""
    return paths.stage("train") / "checkpoint"


def checkpoint_key(config: Config, paths: Paths) -> str:
    """What a checkpoint must have been made with to be resumed: the config and the data.

    Settings that do not change what is trained (verbosity, ``train.resume``, the run's name,
    whether the model is logged) are left out.
    """
    from tfstack.pipeline.inputs import data_hash

    data = to_dict(config)
    for section, key in [
        ("train", "verbose"),
        ("train", "resume"),
        ("tracking", "run_name"),
        ("tracking", "log_model"),
    ]:
        data[section].pop(key, None)
    data["data_file_hash"] = data_hash(config, paths)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resumable_checkpoint(config: Config, paths: Paths, run: RunLog) -> TrainingState | None:
    """The checkpoint `train` should resume from, or None (a stale one is removed).

    A checkpoint is resumed when ``train.resume=auto``, it was made with the same config and data,
    and its epochs were logged to the same MLflow run as ``run`` (or neither is tracked). The run
    of a stale checkpoint, left RUNNING by its killed process, is ended KILLED.
    """
    from tfstack import checkpoints

    if config.train.resume != "auto":
        return None
    directory = checkpoint_dir(paths)
    state = checkpoints.read_state(directory)
    if state is None:
        return None
    if state.key != checkpoint_key(config, paths):
        why = "it was made with another config or other data"
    elif state.run_id != run.run_id:
        why = f"its epochs belong to MLflow run {state.run_id}, not to run {run.run_id}"
    else:
        return state
    logger.warning("Not resuming from %s: %s; training from the first epoch", directory, why)
    _end_abandoned_run(run, state, why)
    checkpoints.remove(directory)
    return None


def _run_record(run: RunLog, run_id: str) -> dict | None:
    from tfstack import tracking

    try:
        return tracking.get_run(run.uri, run_id)
    except TfstackError:  # not in this store (or no store yet)
        return None


def _end_abandoned_run(run: RunLog, state: TrainingState, why: str) -> None:
    """End the run of a checkpoint that will not be resumed, if its dead process left it RUNNING.

    Only called with the output directory locked (`output_lock.exclusive`), so no live process
    is writing to that run.
    """
    from tfstack import tracking

    if not (run.enabled and state.run_id and state.run_id != run.run_id):
        return
    record = _run_record(run, state.run_id)
    if record is None or record["status"] != "RUNNING":
        return
    tracking.attach_run(run.uri, state.run_id)
    tracking.end_run(
        state.run_id,
        "KILLED",
        error=f"interrupted after epoch {state.epochs_done} and not resumed: {why}",
    )


def end_orphaned_run(run: RunLog, keep: str | None) -> None:
    """End the run ``outputs/run.json`` names if a killed process left it RUNNING.

    Stages end their run before they return, so with the output directory locked
    (`output_lock.exclusive`) a RUNNING run recorded there has no live process: it was killed
    (before it had a checkpoint to resume from, or its checkpoint is not resumed). ``keep`` is
    the run this execution continues, if any.
    """
    from tfstack import tracking

    if not run.enabled:
        return
    try:
        ref = tracking.read_run_ref(run.paths.run_ref)
    except TfstackError:
        return
    if not ref or ref["uri"] != run.uri or ref["run_id"] == keep:
        return
    record = _run_record(run, ref["run_id"])
    if record is None or record["status"] != "RUNNING":
        return
    tracking.attach_run(run.uri, ref["run_id"])
    tracking.end_run(
        ref["run_id"],
        "KILLED",
        error=f"its process ended before finishing it; found RUNNING by a later tfstack "
        f"command in {run.paths.out}",
    )


def run_to_resume(config: Config, paths: Paths, run: RunLog) -> str | None:
    """For `tfstack run`: the MLflow run of the checkpoint this execution resumes, else None."""
    from tfstack import checkpoints

    if config.train.resume != "auto" or not run.enabled:
        return None
    state = checkpoints.read_state(checkpoint_dir(paths))
    if state is None or not state.run_id or state.key != checkpoint_key(config, paths):
        return None
    record = _run_record(run, state.run_id)
    if record is None or record["status"] == "FINISHED" or record["experiment"] != run.experiment:
        return None
    return state.run_id


def logged_steps(run: RunLog, key: str) -> set[int]:
    from tfstack import tracking

    return {step for step, _ in tracking.metric_history(run.uri, run.run_id, key)}


def continue_run_record(run: RunLog, state: TrainingState) -> None:
    """Before resuming: log the checkpointed epochs the killed process had not yet written."""
    from tfstack import tracking

    logged = logged_steps(run, "phase_index")
    missing = [row for row in state.epoch_rows if row["epoch"] not in logged]
    for row in missing:
        tracking.log_metrics(run.run_id, row["metrics"], step=row["epoch"])
    tracking.delete_tags(run.run_id, ["error", "killed_by"])  # from an interrupted attempt
    tracking.log_tags(run.run_id, {"resumed_at_epoch": state.epochs_done})
    logger.info(
        "Resuming MLflow run %s at epoch %d (%d checkpointed epochs were not yet logged)",
        run.run_id,
        state.epochs_done,
        len(missing),
    )
