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
