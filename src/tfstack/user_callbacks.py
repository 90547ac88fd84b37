"""The user's own Keras callbacks, run in every phase on the full stacked model.

A cached phase fits the trainable part alone on the frozen part's outputs, and an
inference-mode phase fits a view of the model (`tfstack.frozen_features`); Keras gives each
callback the model that ``fit`` runs on. `FullModelCallbacks` forwards every hook to the user's
callbacks with the stacked model as their ``self.model`` instead (both share the variables and
the optimizer), so a ModelCheckpoint saves the stacked model, and an EarlyStopping that sets
``self.model.stop_training`` stops the phase: the flag is passed on to the fitted model.

`builtin_callback` makes a ``keras.callbacks`` class from a ``{class_name, config}`` entry
(checked by `tfstack.keras_names.callback_entry_problem`); a relative file path of
ModelCheckpoint or CSVLogger is under the given directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras

from tfstack.errors import ConfigError
from tfstack.keras_names import CALLBACK_PATHS, callback_entry_problem


class FullModelCallbacks(keras.callbacks.Callback):
    """Run callbacks with the full stacked model as ``self.model``, whichever model is fitted.

    Args:
        callbacks: the callbacks to run, in order.
        model: the stacked model.
    """

    def __init__(self, callbacks: Sequence[keras.callbacks.Callback], model: keras.Model):
        super().__init__()
        self.callbacks = list(callbacks)
        self.full_model = model  # given to the callbacks by each fit's set_model

    def set_params(self, params):
        super().set_params(params)
        for callback in self.callbacks:
            callback.set_params(params)

    def set_model(self, model):
        # The fitted model is ours (to pass stop_training on); the callbacks keep the full one.
        super().set_model(model)
        for callback in self.callbacks:
            callback.set_model(self.full_model)

    def _forward(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)
        fitted = self.model
        if fitted is not None and fitted is not self.full_model:
            if getattr(self.full_model, "stop_training", False):
                fitted.stop_training = True

    def on_train_begin(self, logs=None):
        # Keras resets the flag of the model it fits; the full model's is reset here.
        self.full_model.stop_training = False
        self._forward("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._forward("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._forward("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._forward("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._forward("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._forward("on_train_batch_end", batch, logs)

    def on_test_begin(self, logs=None):
        self._forward("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._forward("on_test_end", logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._forward("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self._forward("on_test_batch_end", batch, logs)


def builtin_callback(
    entry: Mapping[str, Any], *, index: int, directory: Path, key: str = "train.callbacks"
) -> keras.callbacks.Callback:
    """A ``keras.callbacks`` class made from a ``{class_name, config}`` entry.

    Args:
        entry: the entry, e.g. ``{"class_name": "EarlyStopping", "config": {"patience": 3}}``.
        index: its position in the list, for messages.
        directory: where a relative ModelCheckpoint ``filepath`` or CSVLogger ``filename`` goes.
        key: the config key of the list, for messages.

    Returns:
        The callback (a CSVLogger appends, so that every phase's epochs are in its file).

    Raises:
        ConfigError: an entry `tfstack.keras_names.callback_entry_problem` refuses, or
            parameters Keras refuses.

    Example:
        >>> from pathlib import Path
        >>> from tfstack.user_callbacks import builtin_callback
        >>> entry = {"class_name": "CSVLogger", "config": {"filename": "epochs.csv"}}
        >>> callback = builtin_callback(entry, index=0, directory=Path("outputs/train"))
        >>> callback.filename, callback.append
        ('outputs/train/epochs.csv', True)
    """
    where = f"{key}[{index}]"
    problem = callback_entry_problem([entry], trust_code=False, key=key)
    if problem:
        raise ConfigError(problem.replace(f"{key}[0]", where))
    name = entry["class_name"]
    config = dict(entry.get("config") or {})
    argument = CALLBACK_PATHS.get(name)
    if argument and argument in config:
        # An absolute path stays as given (Path's join keeps it).
        config[argument] = str(Path(directory) / Path(str(config[argument])).expanduser())
    if name == "CSVLogger":
        config["append"] = True
    try:
        return getattr(keras.callbacks, name)(**config)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{where}: {name}({_shown(entry.get('config') or {})}) is refused by Keras: {first}. "
            f"Fix {where}.config (the parameters of keras.callbacks.{name})."
        ) from err


def _shown(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


__all__ = ["FullModelCallbacks", "builtin_callback"]
