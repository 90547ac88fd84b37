"""The run reference: a small JSON file that carries a run's id from one stage to the next."""

from __future__ import annotations

import json
from pathlib import Path

from tfstack.errors import TrackingError
from tfstack.files import write_json

RUN_REF_KEYS = ("run_id", "uri", "experiment")


def write_run_ref(path: str | Path, run_id: str, uri: str, experiment: str, **extra: str) -> None:
    """Write the run reference that later stages read to resume the run.

    The JSON file is written beside it and renamed into place (`tfstack.files.write_json`), so a
    reader never sees a half-written file.

    Args:
        path: File to write (parent directories are created).
        run_id: MLflow run id.
        uri: Tracking URI of the run.
        experiment: Experiment name of the run.
        **extra: More string fields to carry, e.g. `config_hash=...` so a later stage can tell
            whether the run was started with the same config.
    """
    path = Path(path)
    clashing = sorted(set(extra) & set(RUN_REF_KEYS))
    if clashing:
        raise TrackingError(f"write_run_ref: extra field {clashing[0]!r} is a reserved key.")
    ref = {"run_id": run_id, "uri": uri, "experiment": experiment}
    ref.update({str(key): str(value) for key, value in extra.items()})
    write_json(path, ref)


def read_run_ref(path: str | Path) -> dict[str, str] | None:
    """Read a run reference written by `write_run_ref`.

    Args:
        path: The reference file.

    Returns:
        `{"run_id", "uri", "experiment", ...extra fields}`, or None when the file does not exist.

    Raises:
        TrackingError: The file exists but is not a valid run reference.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        ref = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrackingError(
            f"run reference {path} is not valid JSON ({exc}). Delete it to start a new run."
        ) from exc
    missing = [key for key in RUN_REF_KEYS if not isinstance(ref, dict) or not ref.get(key)]
    if missing:
        raise TrackingError(
            f"run reference {path} lacks {', '.join(missing)}. Expected a JSON object with "
            f"{', '.join(RUN_REF_KEYS)}; delete it to start a new run."
        )
    return {str(key): str(value) for key, value in ref.items()}
