"""The names Keras accepts for optimizers, losses, metrics and callbacks, known without importing
Keras.

Importing Keras imports TensorFlow (about 6 s); a mistyped ``train.optimizer``, ``train.loss``
or ``train.metrics`` must fail before that, and before any MLflow run exists (README, "When
something is wrong"). So the names are kept here as data. ``tests/test_keras_names.py`` imports
Keras and checks each set equals what ``keras.optimizers.get``, ``keras.losses.get`` and
``keras.metrics.get`` accept, so the lists cannot drift from the installed Keras.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tfstack.vocabulary import shown

# Every string `keras.optimizers.get` turns into an optimizer (Keras 3.15; case-insensitive).
KERAS_OPTIMIZERS = frozenset(
    {
        "adadelta",
        "adafactor",
        "adagrad",
        "adam",
        "adamax",
        "adamw",
        "ftrl",
        "lion",
        "muon",
        "nadam",
        "rmsprop",
        "schedulefreeadamw",
        "sgd",
    }
)
# The ones tfstack compiles with (`schedules.OPTIMIZERS`, each with a per-component-rate
# subclass that a saved model reloads); the test checks the two agree.
SUPPORTED_OPTIMIZERS = ("adagrad", "adam", "adamax", "adamw", "nadam", "rmsprop", "sgd")

# The error names that are both a Keras loss and a Keras metric.
_ERRORS = (
    "mae",
    "mape",
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_error",
    "mean_squared_logarithmic_error",
    "mse",
    "msle",
)

# Every string `keras.losses.get` accepts (case-sensitive), except the abstract base class
# `Loss`, which it accepts but which cannot compute a loss.
KERAS_LOSSES = frozenset(
    {
        "BCE",
        "BinaryCrossentropy",
        "BinaryFocalCrossentropy",
        "CTC",
        "CategoricalCrossentropy",
        "CategoricalFocalCrossentropy",
        "CategoricalHinge",
        "Circle",
        "CosineSimilarity",
        "Dice",
        "Hinge",
        "Huber",
        "KLD",
        "KLDivergence",
        "LogCosh",
        "MAE",
        "MAPE",
        "MSE",
        "MSLE",
        "MeanAbsoluteError",
        "MeanAbsolutePercentageError",
        "MeanSquaredError",
        "MeanSquaredLogarithmicError",
        "Poisson",
        "SparseCategoricalCrossentropy",
        "SquaredHinge",
        "Tversky",
        "bce",
        "binary_crossentropy",
        "binary_focal_crossentropy",
        "categorical_crossentropy",
        "categorical_focal_crossentropy",
        "categorical_hinge",
        "circle",
        "cosine_similarity",
        "ctc",
        "dice",
        "hinge",
        "huber",
        "kl_divergence",
        "kld",
        "log_cosh",
        *_ERRORS,
        "poisson",
        "sparse_categorical_crossentropy",
        "squared_hinge",
        "tversky",
    }
)

# Every string `keras.metrics.get` accepts (case-sensitive), except the abstract base class
# (`Metric`, `metric`). Metrics that need constructor arguments (IoU, PrecisionAtRecall, ...)
# are refused by `get` too.
KERAS_METRICS = frozenset(
    {
        "AUC",
        "Accuracy",
        "BCE",
        "BinaryAccuracy",
        "BinaryCrossentropy",
        "BinaryIoU",
        "CategoricalAccuracy",
        "CategoricalCrossentropy",
        "CategoricalHinge",
        "ConcordanceCorrelation",
        "CosineSimilarity",
        "F1Score",
        "FBetaScore",
        "FalseNegatives",
        "FalsePositives",
        "Hinge",
        "KLDivergence",
        "LogCoshError",
        "MAE",
        "MAPE",
        "MSE",
        "MSLE",
        "Mean",
        "MeanAbsoluteError",
        "MeanAbsolutePercentageError",
        "MeanSquaredError",
        "MeanSquaredLogarithmicError",
        "PearsonCorrelation",
        "Poisson",
        "Precision",
        "R2Score",
        "Recall",
        "RootMeanSquaredError",
        "SparseCategoricalAccuracy",
        "SparseCategoricalCrossentropy",
        "SparseTopKCategoricalAccuracy",
        "SquaredHinge",
        "Sum",
        "TopKCategoricalAccuracy",
        "TrueNegatives",
        "TruePositives",
        "accuracy",
        "auc",
        "bce",
        "binary_accuracy",
        "binary_crossentropy",
        "binary_io_u",
        "categorical_accuracy",
        "categorical_crossentropy",
        "categorical_hinge",
        "concordance_correlation",
        "cosine_similarity",
        "f1_score",
        "f_beta_score",
        "false_negatives",
        "false_positives",
        "hinge",
        "kl_divergence",
        "log_cosh_error",
        *_ERRORS,
        "mean",
        "pearson_correlation",
        "poisson",
        "precision",
        "r2_score",
        "recall",
        "root_mean_squared_error",
        "sparse_categorical_accuracy",
        "sparse_categorical_crossentropy",
        "sparse_top_k_categorical_accuracy",
        "squared_hinge",
        "sum",
        "top_k_categorical_accuracy",
        "true_negatives",
        "true_positives",
    }
)

# Names `Model.compile` resolves itself, case-insensitively, to the accuracy or cross-entropy
# that fits the labels and outputs (keras/src/trainers/compile_utils.py: get_metric, get_loss).
# "crossentropy" and "ce" are loss aliases only: as a metric, compile refuses them.
COMPILE_METRIC_ALIASES = ("accuracy", "acc")
COMPILE_LOSS_ALIASES = ("crossentropy", "ce")


def is_loss(name: str) -> bool:
    """Whether ``Model.compile(loss=name)`` accepts this name."""
    return name in KERAS_LOSSES or name.lower() in COMPILE_LOSS_ALIASES


def is_metric(name: str) -> bool:
    """Whether ``Model.compile(metrics=[name])`` accepts this name."""
    return name in KERAS_METRICS or name.lower() in COMPILE_METRIC_ALIASES


# --- The user's callbacks (train.callbacks) -----------------------------------------------------

KERAS_CALLBACKS = (
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "OrbaxCheckpoint",
    "ProgbarLogger",
    "ReduceLROnPlateau",
    "RemoteMonitor",
    "SwapEMAWeights",
    "TensorBoard",
    "TerminateOnNaN",
)
"""Every class of ``keras.callbacks`` (Keras 3.15; tests/test_user_callbacks.py checks it)."""

REFUSED_CALLBACKS = {
    "BackupAndRestore": "tfstack checkpoints every epoch and resumes a killed run itself "
    "(train.resume=auto)",
    "TensorBoard": "set tracking.tensorboard=true instead (one log directory and step axis "
    "across the phases, logged to the MLflow run)",
    "LambdaCallback": "its hooks are Python functions, which a config cannot hold; write a "
    "callback class and name it with _target_ (needs trust_code=true)",
    "LearningRateScheduler": "its schedule is a Python function, which a config cannot hold; "
    "use a _target_ callback (needs trust_code=true)",
    "ProgbarLogger": "Keras adds it itself; set train.verbose",
    "History": "Keras adds it itself; tfstack writes the history (outputs/train/history.json)",
    "Callback": "the base class does nothing; name your own class with _target_",
    "CallbackList": "a container, not a callback",
    "SwapEMAWeights": "it needs an optimizer with use_ema=True, which tfstack's are not",
    "OrbaxCheckpoint": "it needs the orbax-checkpoint package; tfstack checkpoints itself, and "
    "ModelCheckpoint saves extra copies",
}
"""Built-in callbacks ``train.callbacks`` refuses, and why."""

CALLBACK_PATHS = {"ModelCheckpoint": "filepath", "CSVLogger": "filename"}
"""The file argument of a built-in callback; a relative one is under the train stage's outputs."""

_CALLBACK_EXAMPLE = "[{class_name: EarlyStopping, config: {patience: 3}}]"


def callback_entry_problem(
    entries: Any, *, trust_code: bool, key: str = "train.callbacks"
) -> str | None:
    """The message for the first invalid entry of ``train.callbacks``, or None.

    An entry is ``{class_name: NAME, config: {...}}`` naming a class of ``keras.callbacks``
    (not one of `REFUSED_CALLBACKS`), or ``{_target_: my.module.Class, ...}`` for the user's
    own class, which is imported, so only with the top-level ``trust_code=true``. The built-in's
    parameters are checked when it is made (Keras's TypeError).

    Args:
        entries: the list as the user wrote it.
        trust_code: the top-level ``trust_code``.
        key: the config key, for the message.
    """
    import difflib

    if not isinstance(entries, list | tuple):
        return f"{key}={shown(entries)} is not a list. Give a list such as {_CALLBACK_EXAMPLE}."
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if isinstance(entry, Mapping) and "_target_" in entry:
            if "class_name" in entry:
                return f"{where} has both _target_ and class_name; give one of them."
            target = entry["_target_"]
            if not trust_code:
                return (
                    f"{where} (_target_: {target}) imports and runs your Python code, which "
                    "needs the top-level trust_code=true; set it only if you trust that module."
                )
            continue
        if not isinstance(entry, Mapping) or set(entry) - {"class_name", "config"}:
            return (
                f"{where}={entry!r} is not a callback entry. Write it as {_CALLBACK_EXAMPLE} "
                "(keys class_name and config), or {_target_: my.module.Class, ...} for your own."
            )
        name = entry.get("class_name")
        if name not in KERAS_CALLBACKS:
            close = difflib.get_close_matches(str(name), KERAS_CALLBACKS, n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            usable = [n for n in KERAS_CALLBACKS if n not in REFUSED_CALLBACKS]
            return (
                f"{where}: {name!r} is not a Keras callback.{hint} Use one of {usable}, or "
                "_target_ for your own class."
            )
        if name in REFUSED_CALLBACKS:
            return f"{where}: tfstack does not run {name}: {REFUSED_CALLBACKS[name]}."
        config = entry.get("config") or {}
        if not isinstance(config, Mapping):
            return f"{where}.config={config!r} is not a mapping of {name}'s parameters."
        if name == "CSVLogger" and config.get("append") is False:
            return (
                f"{where}: CSVLogger with append=false would keep only the last phase (every "
                "phase is a fit); leave append out: tfstack appends, and starts a new file "
                "when a run starts afresh."
            )
    return None
