"""The names Keras accepts for optimizers, losses and metrics, known without importing Keras.

Importing Keras imports TensorFlow (about 6 s); a mistyped ``train.optimizer``, ``train.loss``
or ``train.metrics`` must fail before that, and before any MLflow run exists (README, "When
something is wrong"). So the names are kept here as data. ``tests/test_keras_names.py`` imports
Keras and checks each set equals what ``keras.optimizers.get``, ``keras.losses.get`` and
``keras.metrics.get`` accept, so the lists cannot drift from the installed Keras.
"""

from __future__ import annotations

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
