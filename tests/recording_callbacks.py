"""A user's own callback for `train.callbacks` `_target_` entries in the tests."""

import json
from pathlib import Path

import keras


class RecordModel(keras.callbacks.Callback):
    """Record, per epoch, the name and layer count of ``self.model`` (and write them to a file)."""

    def __init__(self, path: str | None = None, stop_at: int | None = None):
        super().__init__()
        self.path = path
        self.stop_at = stop_at
        self.seen: list[tuple[int, str, int]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append((int(epoch), self.model.name, len(self.model.layers)))
        if self.path:
            Path(self.path).write_text(json.dumps(self.seen))
        if self.stop_at is not None and epoch == self.stop_at:
            self.model.stop_training = True
