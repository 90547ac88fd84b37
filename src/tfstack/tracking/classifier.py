"""The served classifier: an MLflow pyfunc model that answers with class names.

`log_classifier_model` (in `tfstack.tracking.models`) logs this file as a *model from code*:
MLflow copies it into the logged model and runs it when the model loads, so nothing is pickled.
It must therefore stand alone: it imports keras, numpy, pandas and mlflow, never tfstack's
pipeline. Its artifacts are the trained Keras model (``model.keras``) and ``class_names.json``;
its model config names the modules that register the model's custom Keras classes (for a model
with tfstack's ``Cast`` adapter layer, ``tfstack.adapters``, so tfstack must be installed where
such a model is served) and whether Keras may load it with ``safe_mode=False`` (only when the
pipeline trusted the code inside it).

``predict`` takes raw inputs as the data holds them (the signature keeps their dtype, uint8 for
uint8 images) and returns one row per input: ``label``, the predicted class name, then one
column per class with its probability, in class order.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Sequence

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

LABEL_COLUMN = "label"

# MLflow asks every PythonModel without type hints on predict for them (at definition, logging
# and loading); this model's signature is explicit (raw tensors in, a table out), so it has none.
warnings.filterwarnings(
    "ignore", message=".*Add type hints to the `predict` method", category=UserWarning
)


def probability_table(outputs: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """The predicted class name and per-class probabilities of a classifier's outputs.

    Args:
        outputs: ``(n, classes)`` softmax probabilities, or ``(n, 1)``/``(n,)`` probabilities of
            class 1 for a binary head (with two class names).
        class_names: One name per class, in class-id order.

    Returns:
        A DataFrame with ``label`` and one float64 column per class name, one row per input.

    Raises:
        ValueError: The outputs do not hold one probability per class name.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    names = [str(name) for name in class_names]
    if len(names) == 2 and outputs.reshape(len(outputs), -1).shape[1] == 1:
        positive = outputs.reshape(len(outputs))
        outputs = np.stack([1.0 - positive, positive], axis=1)  # (n,) -> (n, 2)
    if outputs.ndim != 2 or outputs.shape[1] != len(names):
        raise ValueError(
            f"The model outputs shape {outputs.shape}, but there are {len(names)} class names "
            f"({names}); expected (n, {len(names)})."
        )
    table = pd.DataFrame(outputs, columns=names)
    table.insert(0, LABEL_COLUMN, [names[i] for i in outputs.argmax(axis=1)])
    return table


class ClassifierModel(PythonModel):
    """A Keras classifier served with its class names (an MLflow pyfunc model)."""

    def load_context(self, context) -> None:
        """Load the Keras model and the class names from the logged model's artifacts."""
        import keras

        config = context.model_config or {}
        # The modules that register the model's custom classes (Keras finds registered classes
        # by name only after their module has run).
        for module in config.get("modules", []):
            importlib.import_module(module)
        with open(context.artifacts["class_names"], encoding="utf-8") as file:
            self.class_names = json.load(file)
        # compile=False: serving needs no optimizer or loss (nor their classes).
        self.model = keras.saving.load_model(
            context.artifacts["keras_model"],
            compile=False,
            safe_mode=bool(config.get("safe_mode", True)),
        )

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Class name and per-class probabilities of each input.

        Args:
            context: MLflow's model context (unused once loaded).
            model_input: A batch of raw inputs, ``(n, *input_shape)``, as the signature gives.
            params: Unused.
        """
        batch = np.asarray(model_input)
        outputs = self.model.predict(batch, verbose=0)
        return probability_table(outputs, self.class_names)


# MLflow runs this file as a model from code (under a module name of its own, code_model_<hex>);
# importing it as tfstack.tracking.classifier must not set MLflow's process-wide current model.
if not __name__.startswith("tfstack."):
    mlflow.models.set_model(ClassifierModel())
