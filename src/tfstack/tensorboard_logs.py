"""TensorBoard logs of a whole schedule on one step axis: `ScheduleTensorBoard`.

Every phase is its own ``fit``. Keras's ``TensorBoard`` writes the epoch scalars at the epoch
``fit`` reports, which ``initial_epoch`` makes global, but it restarts its batch counter at 0
in every ``on_train_begin`` and writes the ``evaluation_*_vs_iterations`` scalars at the
optimizer's step count, which restarts with each phase's fresh optimizer
(keras/src/callbacks/tensorboard.py). `ScheduleTensorBoard` counts batches globally instead:
epoch ``e`` starts at batch ``e * steps_per_epoch``, so the batch axis continues across phases
and across a resumed run (the phases share one dataset, so one epoch length).

It is meant to run inside `tfstack.user_callbacks.FullModelCallbacks`: the graph summary is the
full stacked model's in every phase. The op graph of a cached phase's training step (the
trainable part alone, on cached features) is not written: ``self.model.train_function`` is the
stacked model's, which that phase does not run.
"""

from __future__ import annotations

import keras


class ScheduleTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard with one global batch axis across the phases of a schedule.

    Args:
        log_dir: the log directory (``train/`` and ``validation/`` event files under it).
        **kwargs: the other arguments of ``keras.callbacks.TensorBoard``.
    """

    def __init__(self, log_dir: str, **kwargs):
        super().__init__(log_dir=str(log_dir), **kwargs)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        steps = (self.params or {}).get("steps")
        if steps:
            # Keras counts from 0 in every fit; epoch e of the schedule starts after e epochs.
            self._global_train_batch = self._epoch * int(steps)
        super().on_epoch_begin(epoch, logs)

    def on_test_end(self, logs=None):
        # Keras writes these at optimizer.iterations, which restarts with each phase's
        # optimizer; here they are at the global batch (the validation after epoch e).
        if logs:
            with self._val_writer.as_default():
                for name, value in logs.items():
                    self.summary.scalar(
                        f"evaluation_{name}_vs_iterations", value, step=self._global_train_batch
                    )
        self._pop_writer()


__all__ = ["ScheduleTensorBoard"]
