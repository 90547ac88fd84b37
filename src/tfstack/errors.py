"""User-facing errors.

Every error a user can cause by their input is a `TfstackError`: its message says what is wrong,
which file or config key, and how to fix it. The CLI prints it on one screen without a traceback.
"""


class TfstackError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(TfstackError):
    """A config key or value is wrong."""


class ComponentError(TfstackError):
    """A component (model file, application, SavedModel) cannot be loaded as asked."""


class ShapeError(TfstackError):
    """Two consecutive components do not fit together."""


class FreezeError(TfstackError):
    """A freeze policy cannot be applied, or its counts disagree with Keras."""


class ScheduleError(TfstackError):
    """A fine-tuning schedule or phase is invalid."""


class DataError(TfstackError):
    """A dataset or split is missing, empty or does not fit the model."""


class TrackingError(TfstackError):
    """The MLflow tracking store cannot be reached or written."""


class TrainingError(TfstackError):
    """Training diverged or stopped (for example a non-finite loss)."""


class OutputError(TfstackError):
    """An output file or directory cannot be written (permissions, a missing or read-only path)."""


# How much of an underlying error's message ours quotes.
_QUOTED_CHARS = 300


def describe_error(err: BaseException) -> str:
    """An underlying error in one short line: its type and the first line of its message.

    Keras, TensorFlow and h5py messages can be multi-line config dumps; a tfstack message quotes
    them through this, so it stays one line.

    Args:
        err: Any exception.

    Returns:
        ``TypeName: first line``, the line cut at 300 characters.
    """
    first = (str(err).strip().splitlines() or [""])[0]
    if len(first) > _QUOTED_CHARS:
        first = first[:_QUOTED_CHARS] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
