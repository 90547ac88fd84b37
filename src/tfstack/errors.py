"""User-facing errors.

Every error a user can cause by their input is a `TfstackError`: its message says what is wrong,
which file or config key, and how to fix it. The CLI prints it on one screen without a traceback.
"""


class TfstackError(Exception):
    """Base class of every error caused by user input.

    Example:
        >>> from tfstack import TfstackError, load_component
        >>> try:
        ...     load_component("missing.keras", name="base")
        ... except TfstackError as err:
        ...     print(str(err).split(" (")[0])
        components.base.path=missing.keras does not exist
    """


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


class StoreLostError(TrackingError):
    """The tracking store stopped working during a run: deleted, read-only or unreachable.

    Nothing more is written to that store by this process (not even the run's end: it stays
    RUNNING there), so a store that comes back holds the run as the last successful write left
    it, and a rerun of the same command continues it from its checkpoint.

    Attributes:
        uri: The tracking URI.
        problem: What went wrong, e.g. "the sqlite file /x/mlflow.db was deleted".
    """

    def __init__(self, uri: str, problem: str, fix: str, what: str | None = None) -> None:
        self.uri = uri
        self.problem = problem
        during = f" ({what})" if what else ""
        super().__init__(
            f"tracking.uri={uri} failed during the run{during}: {problem}, so the MLflow run "
            f"cannot be ended FAILED there and stays RUNNING. {fix} (or set tracking.uri=... "
            f"to start a new run)"
        )


class TrainingError(TfstackError):
    """Training diverged or stopped (for example a non-finite loss)."""


class OutputError(TfstackError):
    """An output file or directory cannot be written (permissions, a missing or read-only path)."""


class ProjectError(TfstackError):
    """The project around tfstack is not as a command needs it (no git repository, files in
    the way of `tfstack init`)."""


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
