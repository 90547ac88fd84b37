"""The per-epoch training checkpoint's format: a killed run resumes from its last completed epoch.

`tfstack.training.run_schedule` writes, after every epoch, into its ``checkpoint_dir``
(``<output_dir>/train/checkpoint/`` in the pipeline):

- ``weights-a.npz`` / ``weights-b.npz``: every variable of the stacked model (weights,
  BatchNormalization statistics, the states of random-seed generators such as Dropout's) and of
  its optimizer (step count, learning rate, moments). Numbers only: written with ``np.savez`` and
  read back with ``allow_pickle=False``. Epochs alternate between the two files.
- ``state.json``: how many epochs are done, the finished phases' results, the current phase's
  history so far (and its early-stopping state, whose best weights are the ``best_*`` arrays of
  the weights file), the metrics logged per epoch, the MLflow run id, the key (config and data) the
  checkpoint belongs to, and which weights file is current. An epoch writes the other weights
  file, then replaces ``state.json`` (written beside it, then renamed), so a process killed at any
  moment leaves the previous complete checkpoint or the new one, never a mixture. Files are not
  fsync'ed (that cost more than the demo's epochs): a killed process loses nothing, an operating
  system crash may lose the last epochs' checkpoint, and a damaged one is refused by name.

This module is the format only (`TrainingState`, `write_checkpoint`, `read_state`,
`restore_model`, `RestoreOptimizer`); what goes into the state after each epoch and how a
schedule resumes from it is the loop's (`tfstack.training`). It takes values (a key, a run id,
a directory); the pipeline decides what they are.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tfstack.errors import OutputError, TrainingError
from tfstack.files import atomic_path

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHT_SLOTS = ("weights-a.npz", "weights-b.npz")
FORMAT = 1


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
    count = len(state.variables if prefix == "model" else state.optimizer_variables)
    return read_arrays(state, directory, prefix, count)


def read_arrays(state: TrainingState, directory: Path, prefix: str, count: int) -> list[np.ndarray]:
    """The arrays ``<prefix>_00000`` ... of the current weights file (``best`` for the
    early-stopping best weights, given to `write_checkpoint` as ``extra``).

    Raises:
        TrainingError: the file or an array is missing or damaged.
    """
    path = Path(directory) / state.weights_file
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return [arrays[f"{prefix}_{i:05d}"] for i in range(count)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise TrainingError(_unreadable(path, f"{type(err).__name__}: {err}")) from err


class RestoreOptimizer(keras.callbacks.Callback):
    """At the start of a resumed phase, load the optimizer state the checkpoint saved.

    A callback, not a function: the phase's fresh optimizer exists only once the phase has
    compiled, and is built (its variables created) here, as Keras would at the first step.

    Args:
        stacked: the stacked model, whose optimizer the phase trains with.
        state: the checkpoint's state.
        directory: the checkpoint directory.
        phase_index: the phase being resumed.

    Raises:
        TrainingError: the saved optimizer state belongs to another phase, or does not fit.
    """

    def __init__(
        self, stacked: keras.Model, state: TrainingState, directory: Path, *, phase_index: int
    ):
        super().__init__()
        if state.optimizer_phase != phase_index:
            raise TrainingError(_unreadable(Path(directory) / STATE_FILE, "phases disagree"))
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


def check_schedule(state: TrainingState, directory: Path, total_epochs: int) -> None:
    """Refuse a checkpoint made for a schedule of another length.

    Raises:
        TrainingError: ``state`` was made for another number of epochs.
    """
    if state.total_epochs != total_epochs:
        raise TrainingError(
            f"The training checkpoint in {directory} was made for {state.total_epochs} epochs; "
            f"the schedule now has {total_epochs}. Delete {directory} or set train.resume=off."
        )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

# [path, shape, dtype] of the model's and of the optimizer's variables.
Layout = tuple[list[list[Any]], list[list[Any]]]


def write_checkpoint(
    directory: Path,
    state: TrainingState,
    model: keras.Model,
    *,
    layout: Layout | None = None,
    extra: dict[str, list[np.ndarray]] | None = None,
) -> Layout:
    """Write the variables of ``model`` and its optimizer, then commit ``state``.

    The arrays go to the weights slot ``state.json`` does not name; replacing ``state.json``
    then makes them current (see the module docstring).

    Args:
        directory: the checkpoint directory.
        state: the state to record (its ``weights_file`` and variable lists are updated).
        model: the stacked model, compiled (its optimizer built), or not compiled at all.
        layout: what this function returned for the same variables before (they do not change
            within a phase), to skip describing them again; None describes them.
        extra: more arrays to keep, by prefix (read back with `read_arrays`).

    Returns:
        The variables' layout, to pass back for the next epoch of the same phase.

    Raises:
        OutputError: a file cannot be written.
    """
    directory = Path(directory)
    model_variables = model.variables
    # No optimizer: a resumed phase ended at the checkpoint, so this process did not compile.
    optimizer = getattr(model, "optimizer", None)
    optimizer_variables = optimizer.variables if optimizer is not None else []
    arrays = {f"model_{i:05d}": np.asarray(v) for i, v in enumerate(model_variables)}
    arrays.update({f"optimizer_{i:05d}": np.asarray(v) for i, v in enumerate(optimizer_variables)})
    for prefix, values in (extra or {}).items():
        arrays.update({f"{prefix}_{i:05d}": np.asarray(v) for i, v in enumerate(values)})
    # Two slots: write the one state.json does not name, then commit by replacing state.json.
    # No unlink or fsync per epoch (each cost ~3 ms on the demo's disk).
    slot = WEIGHT_SLOTS[1] if state.weights_file == WEIGHT_SLOTS[0] else WEIGHT_SLOTS[0]
    _write_in_place(directory / slot, lambda f: np.savez(f, **arrays))
    state.weights_file = slot
    if layout is None:
        layout = (_describe(model_variables), _describe(optimizer_variables))
    state.variables, state.optimizer_variables = layout
    write_state(directory, state)
    return layout


def write_state(directory: Path, state: TrainingState) -> None:
    """Replace ``state.json`` atomically (the checkpoint's commit point)."""
    with atomic_path(Path(directory) / STATE_FILE, error=_cannot_write) as tmp:
        tmp.write_text(state.to_json(), encoding="utf-8")
