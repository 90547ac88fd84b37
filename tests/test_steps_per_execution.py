"""A cached phase runs one epoch's batches per Keras call (steps_per_execution), exactly."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_base, make_data, make_head

from tfstack.datasets import ArrayDataset
from tfstack.epoch_callbacks import EpochOrder, StopOnNonFiniteLoss
from tfstack.errors import TrainingError
from tfstack.freezing import FreezePolicy
from tfstack.frozen_features import cached_steps_per_execution
from tfstack.schedules import Phase
from tfstack.stacking import build_stacked
from tfstack.training import run_schedule
from tfstack.user_callbacks import FullModelCallbacks

LOSS = "sparse_categorical_crossentropy"
TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("deterministic_ops")


class _EpochLogs(keras.callbacks.Callback):
    """Every epoch's logs (epoch hooks only: the phase keeps one call per epoch)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append((epoch, {k: float(v) for k, v in logs.items()}))


class _BatchCounter(keras.callbacks.Callback):
    """A user callback with a batch hook: the phase must call it after every batch."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(batch)


def _cached_run(callbacks, x=None, epochs=4, hidden=True, base=None):
    """A frozen phase on cached features: shuffled by (seed, epoch), validation, last batch 2."""
    keras.utils.set_random_seed(0)
    head = make_head()
    if hidden:  # two trainable layers: the step is more than one matrix product
        head = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(5, activation="relu", name="hidden"),
                keras.layers.Dense(3, activation="softmax", name="logits"),
            ],
            name="head",
        )
    stack = build_stacked("sequential", base or make_base(), head)
    x_train, y_train = make_data(50) if x is None else (x, make_data(len(x))[1])
    x_val, y_val = make_data(20, seed=1)
    # 50 samples in batches of 16: 3 full batches and one of 2; validation 16 + 4.
    train = ArrayDataset(x_train, y_train, batch_size=16, shuffle=True, seed=7, epoch_seeded=True)
    val = ArrayDataset(x_val, y_val, batch_size=16, shuffle=False, seed=0)
    results = run_schedule(
        stack.model,
        [Phase("head", epochs, FreezePolicy("frozen"), 0.05)],
        train,
        val,
        loss=LOSS,
        metrics=["accuracy"],
        feature_extractors=stack.feature_extractors,
        callbacks=callbacks,
        verbose=0,
        cache_frozen=True,
    )
    assert results[0].cached
    return stack.model, results[0].history


def test_one_call_per_epoch_trains_the_head_as_one_call_per_batch(caplog):
    with caplog.at_level(logging.INFO, logger="tfstack.training"):
        per_epoch_logs = _EpochLogs()
        fast, fast_history = _cached_run([per_epoch_logs])
    assert "steps_per_execution=4: 4 batches per execution (one epoch)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tfstack.training"):
        counter, per_batch_logs = _BatchCounter(), _EpochLogs()
        slow, slow_history = _cached_run([per_batch_logs, counter])
    assert "steps_per_execution=1: callback _BatchCounter has a batch hook" in caplog.text
    assert counter.batches == [0, 1, 2, 3] * 4  # every batch of every epoch, as asked
    assert (
        sorted(fast_history)
        == sorted(slow_history)
        == [
            "accuracy",
            "loss",
            "val_accuracy",
            "val_loss",
        ]
    )
    for key, values in slow_history.items():
        assert len(values) == 4
        np.testing.assert_allclose(fast_history[key], values, rtol=0, atol=TOLERANCE)
    assert [e for e, _ in per_epoch_logs.rows] == [e for e, _ in per_batch_logs.rows]
    for (_, a), (_, b) in zip(per_epoch_logs.rows, per_batch_logs.rows, strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=0, atol=TOLERANCE)
    assert [v.path for v in fast.weights] == [v.path for v in slow.weights]
    for u, v in zip(fast.get_weights(), slow.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=0, atol=TOLERANCE)
    # The optimizer took every batch's step: 4 per epoch.
    assert int(fast.optimizer.iterations.numpy()) == int(slow.optimizer.iterations.numpy()) == 16


def test_callbacks_with_batch_hooks_keep_one_batch_per_call(tmp_path):
    own = [StopOnNonFiniteLoss("head"), EpochOrder(None)]
    assert cached_steps_per_execution(own, 35) == (35, "35 batches per execution (one epoch)")
    epoch_level = [keras.callbacks.EarlyStopping(), keras.callbacks.CSVLogger(tmp_path / "a")]
    assert cached_steps_per_execution([*own, *epoch_level], 35)[0] == 35
    per_batch = {
        "_BatchCounter": FullModelCallbacks([_BatchCounter()], keras.Sequential()),
        "TensorBoard": keras.callbacks.TensorBoard(tmp_path / "tb"),
        "ModelCheckpoint": keras.callbacks.ModelCheckpoint(tmp_path / "m.keras"),
        "TerminateOnNaN": keras.callbacks.TerminateOnNaN(),
    }
    for name, callback in per_batch.items():
        steps, why = cached_steps_per_execution([*own, callback], 35)
        assert steps == 1
        assert why.startswith(f"callback {name} has a batch hook")
    assert cached_steps_per_execution(own, None) == (1, "the number of batches is unknown")
    assert cached_steps_per_execution(own, 1)[0] == 1
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert cached_steps_per_execution(own, 35) == (1, "a distribution strategy is in scope")


def test_a_loss_that_becomes_nan_names_the_batches_of_the_call():
    x, _ = make_data(50)
    x[20] = np.nan  # sample 20's features are NaN: the loss is NaN in the first epoch
    linear = keras.Sequential(  # passes NaN on (a ReLU may turn it into 0)
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(8, name="features")],
        name="base",
    )
    with pytest.raises(TrainingError, match=r"phase 'head' at epoch 1, batches 1-4\. Lower"):
        _cached_run([], x=x, epochs=2, hidden=False, base=linear)
