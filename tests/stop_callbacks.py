"""Keras callbacks that end a fit early, as a crash or a user's own callback would."""

import keras


class Killed(Exception):
    """Stands for the process dying after an epoch was checkpointed."""


class KillAfter(keras.callbacks.Callback):
    """Raise `Killed` at the end of a global epoch (after its checkpoint was written)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Killed


class StopAt(keras.callbacks.Callback):
    """A user's callback that stops training at a global epoch (as EarlyStopping would)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True
