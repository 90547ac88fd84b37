"""Per-epoch training checkpoints: a killed run resumes from its last completed epoch.

After every epoch, `EpochCheckpoint` writes into the checkpoint directory
(``<output_dir>/train/checkpoint/`` in the pipeline):

- ``weights-a.npz`` / ``weights-b.npz``: every variable of the stacked model (weights,
  BatchNormalization statistics, the states of random-seed generators such as Dropout's) and of
  its optimizer (step count, learning rate, moments). Numbers only: written with ``np.savez`` and
  read back with ``allow_pickle=False``. Epochs alternate between the two files.
- ``state.json``: how many epochs are done, the finished phases' results, the current phase's
  history so far, the metrics logged per epoch, the MLflow run id, the key (config and data) the
  checkpoint belongs to, and which weights file is current. An epoch writes the other weights
  file, then replaces ``state.json`` (written beside it, then renamed), so a process killed at any
  moment leaves the previous complete checkpoint or the new one, never a mixture. Files are not
  fsync'ed (that cost more than the demo's epochs): a killed process loses nothing, an operating
  system crash may lose the last epochs' checkpoint, and a damaged one is refused by name.

`run_phases` runs a schedule from such a state: it restores the variables, skips the finished
phases, restores the optimizer when the checkpoint falls inside a phase, and fits the rest of
that phase from the next epoch. For the continuation to be the uninterrupted run's, the training
data must be an `ArrayDataset` with ``epoch_seeded=True``: each epoch's order then depends on
``(seed, epoch)`` only (`EpochOrder` sets the epoch), not on how many epochs this process ran.

This module takes values (a key, a run id, a directory); the pipeline decides what they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tfstack.data import ArrayDataset
from tfstack.errors import OutputError, TrainingError
from tfstack.freezing import ParamCounts, count_params
from tfstack.schedules import Phase
from tfstack.training import PhaseResult, fit_phase

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHT_SLOTS = ("weights-a.npz", "weights-b.npz")
FORMAT = 1

try:  # POSIX only; elsewhere two processes sharing an output directory are not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


@dataclass
class TrainingState:
    """What ``state.json`` records.

    Attributes:
        key: identifies the config and data the checkpoint was made for.
        run_id: the MLflow run the epochs were logged to (None without tracking).
        epochs_done: epochs completed over all phases (the next global epoch index).
        phases: one record per phase started: `PhaseResult.to_dict()` for finished phases; the
            current phase's record holds the history of its completed epochs so far.
        epoch_rows: per completed epoch, ``{"epoch": e, "metrics": {...}}`` as the tracking
            callback logs it (Keras logs, ``lr``, ``phase_index``), to fill gaps in the run.
        weights_file: the ``.npz`` holding the variables.
        variables: ``[path, shape, dtype]`` of every model variable, in order.
        optimizer_variables: the same for the optimizer of phase ``optimizer_phase``.
        optimizer_phase: the phase the saved optimizer state belongs to.
        total_epochs: epochs of the whole schedule.
    """

    key: str
    run_id: str | None
    epochs_done: int = 0
    phases: list[dict[str, Any]] = field(default_factory=list)
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    weights_file: str = ""
    variables: list[list[Any]] = field(default_factory=list)
    optimizer_variables: list[list[Any]] = field(default_factory=list)
    optimizer_phase: int = 0
    total_epochs: int = 0

    def to_json(self) -> str:
        # Compact, and without dataclasses.asdict's deep copy: written after every epoch.
        return json.dumps({"format": FORMAT, **vars(self)}, separators=(",", ":")) + "\n"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _cannot_write(path: Path, err: OSError) -> OutputError:
    return OutputError(
        f"Cannot write the training checkpoint {path}: {err.strerror or err}. Free space or fix "
        "the permissions of output_dir, or set train.resume=off to train without checkpoints."
    )


def _write_in_place(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file that nothing references yet (the weights slot state.json does not name)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            write(file)
    except OSError as err:
        raise _cannot_write(path, err) from err


def _write_replacing(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file beside ``path``, then rename it into place (atomic for readers and kills)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _cannot_write(path, err) from err
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _cannot_write(path, err) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(directory: Path) -> TrainingState | None:
    """The checkpoint in ``directory``, or None when there is none.

    Raises:
        TrainingError: ``state.json`` exists but is not a checkpoint this version can read.
    """
    path = Path(directory) / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise TrainingError(_unreadable(path, err)) from err
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        raise TrainingError(_unreadable(path, f"not a format-{FORMAT} checkpoint"))
    try:
        state = TrainingState(**raw)
    except TypeError as err:
        raise TrainingError(_unreadable(path, err)) from err
    if not (Path(directory) / state.weights_file).is_file():
        raise TrainingError(_unreadable(path, f"its weights file {state.weights_file} is missing"))
    return state


def _unreadable(path: Path, why: object) -> str:
    return (
        f"The training checkpoint {path} cannot be read ({why}). Delete {path.parent} to train "
        "from the first epoch, or set train.resume=off."
    )


def remove(directory: Path) -> None:
    """Delete a checkpoint directory (nothing happens when there is none)."""
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def exclusive(directory: Path, what: str = "output_dir") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for a block; refuse when another process has it.

    Two processes writing one output directory would overwrite each other's models and
    checkpoints. The lock is a ``flock`` on ``<directory>/.tfstack-lock``, released by the
    kernel when the process dies, so a killed run never leaves it behind.

    Raises:
        OutputError: another process holds the lock, or the directory cannot be written.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = Path(directory) / ".tfstack-lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as err:
        raise OutputError(
            f"{what}={directory} cannot be written ({err}). Choose a directory you can write."
        ) from err
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            raise OutputError(
                f"{what}={directory} is in use by {holder}. Wait for it to finish, or give this "
                f"run its own {what}=... ."
            ) from err
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"tfstack process {os.getpid()}\n")
        lock_file.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_file.seek(0)
                lock_file.truncate()
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Variables
# ---------------------------------------------------------------------------------------------


def _describe(variables) -> list[list[Any]]:
    return [[v.path, list(v.shape), str(v.dtype)] for v in variables]


def _check_fits(saved: list[list[Any]], variables, what: str, directory: Path) -> None:
    current = _describe(variables)
    if [s[1:] for s in saved] != [c[1:] for c in current]:
        first = next(
            (
                f"{s[0]} {tuple(s[1])} {s[2]} vs {c[0]} {tuple(c[1])} {c[2]}"
                for s, c in zip(saved, current, strict=False)
                if s[1:] != c[1:]
            ),
            f"{len(saved)} saved vs {len(current)} now",
        )
        raise TrainingError(
            f"The training checkpoint in {directory} does not fit the {what} ({first}). Delete "
            f"{directory} to train from the first epoch, or set train.resume=off."
        )


def restore_model(model: keras.Model, state: TrainingState, directory: Path) -> None:
    """Load the checkpoint's model variables into ``model``.

    Raises:
        TrainingError: the checkpoint was made for a model with other variables.
    """
    _check_fits(state.variables, model.variables, "model", directory)
    for variable, value in zip(model.variables, _arrays(state, directory, "model"), strict=True):
        variable.assign(value)


def _arrays(state: TrainingState, directory: Path, prefix: str) -> list[np.ndarray]:
    path = Path(directory) / state.weights_file
    count = len(state.variables if prefix == "model" else state.optimizer_variables)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return [arrays[f"{prefix}_{i:05d}"] for i in range(count)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise TrainingError(_unreadable(path, f"{type(err).__name__}: {err}")) from err


class _RestoreOptimizer(keras.callbacks.Callback):
    """At the start of a resumed phase, load the optimizer state the checkpoint saved."""

    def __init__(self, stacked: keras.Model, state: TrainingState, directory: Path):
        super().__init__()
        self.stacked = stacked
        self.state = state
        self.directory = directory

    def on_train_begin(self, logs=None):
        optimizer = self.stacked.optimizer
        if not optimizer.built:
            # What Keras builds at the first step, on the same variables, in the same order.
            optimizer.build(self.stacked.trainable_variables)
        _check_fits(
            self.state.optimizer_variables, optimizer.variables, "optimizer", self.directory
        )
        values = _arrays(self.state, self.directory, "optimizer")
        for variable, value in zip(optimizer.variables, values, strict=True):
            variable.assign(value)


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------


class EpochOrder(keras.callbacks.Callback):
    """Tell an epoch-seeded `ArrayDataset` which epoch starts, so its order is that epoch's."""

    def __init__(self, dataset: ArrayDataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.set_epoch(epoch)


def _current_lr(optimizer) -> float | None:
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except Exception:  # exotic optimizers or schedules: the logger skips lr too
        return None


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, write the variables and the state (see the module docstring).

    Put it before any callback that logs the epoch elsewhere: an epoch is logged only once it is
    checkpointed, so a resumed run never logs an epoch twice (gaps are filled from
    ``state.epoch_rows`` instead).

    Args:
        directory: the checkpoint directory.
        stacked: the stacked model (whose variables and optimizer are saved, whichever model the
            phase fits: a cached phase fits a part that shares them).
        state: the state to update and write; shared by the phases of one schedule.
        phase_index: the phase's position in the schedule.
        phase_record: the phase's record in ``state.phases`` (its history grows per epoch).
    """

    def __init__(
        self,
        directory: Path,
        stacked: keras.Model,
        state: TrainingState,
        *,
        phase_index: int,
        phase_record: dict[str, Any],
    ):
        super().__init__()
        self.directory = Path(directory)
        self.stacked = stacked
        self.state = state
        self.phase_index = phase_index
        self.record = phase_record
        self.seconds_before = float(phase_record.get("seconds", 0.0))
        self.started = time.perf_counter()
        self.write_seconds: list[float] = []
        self.described: tuple[list, list] | None = None

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        # What the phase's result will say, in case the process dies after its last epoch's
        # checkpoint but before the result is recorded (the cache note is not known here).
        self.record["counts"] = count_params(self.stacked).to_dict()
        self.described = None  # the optimizer is built by the first step, not yet
        self.record.setdefault("cached", self.model is not self.stacked)
        self.record.setdefault("cache_note", "")

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        logs = dict(logs or {})
        history = self.record.setdefault("history", {})
        metrics: dict[str, float] = {}
        for key, value in logs.items():
            try:
                number = float(np.asarray(value).item())
            except (TypeError, ValueError):
                continue
            history.setdefault(key, []).append(number)
            metrics[str(key)] = number
        lr = _current_lr(self.stacked.optimizer)
        if lr is not None:
            metrics["lr"] = lr
        metrics["phase_index"] = float(self.phase_index)
        self.record["seconds"] = self.seconds_before + (start - self.started)
        state = self.state
        state.epoch_rows.append({"epoch": int(epoch), "metrics": metrics})
        state.epochs_done = int(epoch) + 1
        state.optimizer_phase = self.phase_index
        self._write()
        self.write_seconds.append(time.perf_counter() - start)

    def _write(self) -> None:
        state = self.state
        model_variables = self.stacked.variables
        optimizer_variables = self.stacked.optimizer.variables
        arrays = {f"model_{i:05d}": np.asarray(v) for i, v in enumerate(model_variables)}
        arrays.update(
            {f"optimizer_{i:05d}": np.asarray(v) for i, v in enumerate(optimizer_variables)}
        )
        # Two slots: write the one state.json does not name, then commit by replacing
        # state.json. No unlink or fsync per epoch (each cost ~3 ms on the demo's disk).
        slot = WEIGHT_SLOTS[1] if state.weights_file == WEIGHT_SLOTS[0] else WEIGHT_SLOTS[0]
        _write_in_place(self.directory / slot, lambda f: np.savez(f, **arrays))
        state.weights_file = slot
        if self.described is None:  # the same variables for the whole phase
            self.described = (_describe(model_variables), _describe(optimizer_variables))
        state.variables, state.optimizer_variables = self.described
        write_state(self.directory, state)


def write_state(directory: Path, state: TrainingState) -> None:
    """Replace ``state.json`` atomically (the checkpoint's commit point)."""
    _write_replacing(Path(directory) / STATE_FILE, lambda f: f.write(state.to_json().encode()))


# ---------------------------------------------------------------------------------------------
# Running a schedule from a checkpoint
# ---------------------------------------------------------------------------------------------


def _result_from_record(record: dict[str, Any]) -> PhaseResult:
    counts = record["counts"]
    return PhaseResult(
        name=record["name"],
        index=record["index"],
        initial_epoch=record["initial_epoch"],
        epochs=record["epochs"],
        lr=record["lr"],
        freeze=record["freeze"],
        counts=ParamCounts(counts["trainable"], counts["non_trainable"]),
        history={k: list(v) for k, v in record["history"].items()},
        seconds=record.get("seconds", 0.0),
        cached=record.get("cached", False),
        cache_note=record.get("cache_note", ""),
        inference_mode=list(record.get("inference_mode", [])),
    )


def run_phases(
    model: keras.Model,
    phases: Sequence[Phase],
    train_data,
    val_data=None,
    *,
    directory: Path | None,
    key: str,
    run_id: str | None,
    state: TrainingState | None = None,
    callbacks_for_phase: Callable[[Phase, int], list] | None = None,
    **fit_kwargs,
) -> list[PhaseResult]:
    """Run a schedule's phases with a checkpoint after every epoch, from ``state`` if given.

    Like `tfstack.training.run_schedule` (one `fit_phase` per phase, the global epoch count
    continued), plus: `EpochOrder` for an epoch-seeded `ArrayDataset`, `EpochCheckpoint` into
    ``directory`` (None: no checkpoints), and, with ``state``, the resumption described in the
    module docstring.

    Args:
        model: the stacked model.
        phases: the schedule.
        train_data: the training data; an `ArrayDataset` with ``epoch_seeded=True`` for an exact
            resumption.
        val_data: the validation data.
        directory: the checkpoint directory, or None to write none.
        key: identifies the config and data (recorded; the caller compares it before resuming).
        run_id: the MLflow run (recorded).
        state: a checkpoint to resume from (its key and run already checked by the caller).
        callbacks_for_phase: ``(phase, index) -> callbacks``, run after the checkpoint's.
        **fit_kwargs: ``loss``, ``metrics``, ``feature_extractors``, ``verbose``,
            ``cache_frozen`` for `fit_phase`.

    Returns:
        One PhaseResult per phase, the resumed phases' history included.

    Raises:
        TrainingError: the checkpoint does not fit the model, or training diverged.
    """
    starts = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    total = sum(p.epochs for p in phases)
    if state is None:
        state = TrainingState(key=key, run_id=run_id, total_epochs=total)
    elif state.total_epochs != total:
        raise TrainingError(
            f"The training checkpoint in {directory} was made for {state.total_epochs} epochs; "
            f"the schedule now has {total}. Delete {directory} or set train.resume=off."
        )
    resumed_at = state.epochs_done if state.weights_file else None
    if resumed_at is not None:
        restore_model(model, state, directory)
        logger.info("Resuming training at epoch %d of %d from %s", resumed_at, total, directory)
    results = []
    for index, phase in enumerate(phases):
        start, end = starts[index], starts[index] + phase.epochs
        if state.epochs_done >= end:  # finished before the checkpoint
            results.append(_result_from_record(state.phases[index]))
            continue
        done_here = state.epochs_done - start  # > 0: the checkpoint falls inside this phase
        if done_here > 0:
            record = state.phases[index]
        else:
            record = {"history": {}, "seconds": 0.0}
            del state.phases[index:]
            state.phases.append(record)
        record.update(
            name=phase.name,
            index=index,
            initial_epoch=start,
            epochs=phase.epochs,
            lr=phase.lr,
            freeze=phase.freeze.describe(),
        )
        seconds_before = float(record.get("seconds", 0.0))
        callbacks: list = []
        if isinstance(train_data, ArrayDataset):
            callbacks.append(EpochOrder(train_data))
        if done_here > 0:
            if state.optimizer_phase != index:
                raise TrainingError(_unreadable(directory / STATE_FILE, "phases disagree"))
            callbacks.append(_RestoreOptimizer(model, state, directory))
        if directory is not None:
            callbacks.append(
                EpochCheckpoint(directory, model, state, phase_index=index, phase_record=record)
            )
        if callbacks_for_phase:
            callbacks += callbacks_for_phase(phase, index)
        part = dataclasses.replace(phase, epochs=end - state.epochs_done)
        result = fit_phase(
            model,
            part,
            train_data,
            val_data,
            index=index,
            initial_epoch=state.epochs_done,
            callbacks=callbacks,
            **fit_kwargs,
        )
        if done_here > 0:
            earlier = record.get("history", {})
            result.history = {
                k: list(earlier.get(k, []))[:done_here] + v for k, v in result.history.items()
            }
            result.seconds += seconds_before
        result.epochs = phase.epochs
        result.initial_epoch = start
        results.append(result)
        state.phases[index] = result.to_dict()
        state.epochs_done = end
        if directory is not None:
            write_state(directory, state)
    return results
