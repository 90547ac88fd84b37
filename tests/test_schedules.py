"""Schedules and the phase loop: presets, recompiles, epochs, applied and discriminative rates."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_base, make_data, make_head

from tfstack.errors import ScheduleError, TrainingError
from tfstack.freezing import FreezePolicy
from tfstack.schedules import Phase, make_optimizer, make_schedule
from tfstack.stacking import build_stacked
from tfstack.training import run_schedule

LOSS = "sparse_categorical_crossentropy"


def _dataset(n=32, batch_size=16):
    x, y = make_data(n)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _model(strategy="functional"):
    keras.utils.set_random_seed(0)
    return build_stacked(strategy, make_base(), make_head()).model


class _Recorder(keras.callbacks.Callback):
    """Records, per epoch, the optimizer object, its learning rate and the epoch index."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        # The object, not its id: a freed optimizer's id can be reused by the next one.
        self.rows.append((epoch, opt, float(opt.learning_rate.numpy())))


def test_presets_have_the_expected_phases():
    frozen = FreezePolicy("frozen")
    two = make_schedule("two_phase", epochs=3, lr=1e-3, optimizer="adam", freeze=frozen)
    assert [p.name for p in two] == ["head", "fine_tune"]
    assert two[0].freeze.kind == "frozen" and two[1].freeze.kind == "partial"
    assert two[1].lr == pytest.approx(1e-4)
    gradual = make_schedule(
        "gradual", epochs=1, lr=1e-3, optimizer="adam", freeze=frozen, stages=3, unfreeze_step=2
    )
    assert [p.freeze.unfreeze_last for p in gradual] == [None, 2, 4]
    assert [p.lr for p in gradual] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    single = make_schedule("single", epochs=2, lr=1e-2, optimizer="sgd", freeze=frozen)
    assert len(single) == 1 and single[0].epochs == 2


def test_two_phase_uses_a_joint_policy_when_given():
    phases = make_schedule(
        "two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy("joint")
    )
    assert phases[1].freeze.kind == "joint"


def test_unknown_schedule_and_bad_phase_values_are_refused():
    with pytest.raises(ScheduleError, match="two_phase"):
        make_schedule("three_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy())
    with pytest.raises(ScheduleError, match="at least 1 epoch"):
        Phase("x", 0, FreezePolicy(), 1e-3)
    with pytest.raises(ScheduleError, match="train.optimizer"):
        Phase("x", 1, FreezePolicy(), 1e-3, optimizer="adamz")
    with pytest.raises(ScheduleError, match="stages"):
        make_schedule(
            "gradual", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), stages=1
        )


@pytest.mark.slow
def test_phases_recompile_continue_epochs_and_apply_their_rates():
    model = _model()
    phases = make_schedule(
        "gradual", epochs=2, lr=1e-2, optimizer="adam", freeze=FreezePolicy(), stages=3
    )
    recorder = _Recorder()
    results = run_schedule(
        model,
        phases,
        _dataset(),
        _dataset(16),
        loss=LOSS,
        metrics=["accuracy"],
        feature_extractors=["base"],
        callbacks=[recorder],
        verbose=0,
    )
    assert [r.initial_epoch for r in results] == [0, 2, 4]
    assert [row[0] for row in recorder.rows] == [0, 1, 2, 3, 4, 5]
    optimizers = [row[1] for row in recorder.rows]
    assert len({id(o) for o in (optimizers[0], optimizers[2], optimizers[4])}) == 3  # fresh ones
    assert [row[2] for row in recorder.rows] == pytest.approx(
        [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3]
    )
    trainable = [r.counts.trainable for r in results]
    assert trainable[0] < trainable[1] < trainable[2]
    assert all(len(r.history["val_loss"]) == 2 for r in results)


@pytest.mark.slow
def test_callbacks_for_phase_receive_each_phase():
    seen = []

    def per_phase(phase, index):
        seen.append((index, phase.name))
        return []

    run_schedule(
        _model(),
        make_schedule("two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy()),
        _dataset(),
        loss=LOSS,
        feature_extractors=["base"],
        callbacks_for_phase=per_phase,
        verbose=0,
    )
    assert seen == [(0, "head"), (1, "fine_tune")]


def _one_step_deltas(optimizer_name, multipliers):
    """Weights moved by one identical step, for the base and the head."""
    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", make_base(), make_head()).model
    from tfstack.freezing import apply_freeze_policy

    apply_freeze_policy(model, FreezePolicy("joint", bn="freeze"), feature_extractors=["base"])
    # A large rate keeps one SGD step far above float32 round-off in the weight differences.
    lr = 1.0 if optimizer_name == "sgd" else 0.01
    opt = make_optimizer(optimizer_name, lr, model=model, lr_multipliers=multipliers)
    model.compile(optimizer=opt, loss=LOSS)
    x, y = make_data(16)
    base_kernel = model.get_layer("base").get_layer("features").kernel
    head_kernel = model.get_layer("head").get_layer("logits").kernel
    before = base_kernel.numpy().copy(), head_kernel.numpy().copy()
    model.train_on_batch(x, y)
    return base_kernel.numpy() - before[0], head_kernel.numpy() - before[1]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.slow
def test_discriminative_rates_scale_the_base_update(optimizer):
    plain_base, plain_head = _one_step_deltas(optimizer, None)
    disc_base, disc_head = _one_step_deltas(optimizer, {"base": 0.1})
    scale = np.abs(plain_base).max()
    assert scale > 0
    np.testing.assert_allclose(disc_base, 0.1 * plain_base, rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(disc_head, plain_head, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_discriminative_optimizer_saves_and_reloads(tmp_path):
    model = _model("sequential")
    phases = [Phase("joint", 1, FreezePolicy("joint"), 1e-3, "adam", {"base": 0.1})]
    run_schedule(model, phases, _dataset(), loss=LOSS, feature_extractors=["base"], verbose=0)
    # Only optimizer state (iteration, rate, two slots per trainable variable), no model weights.
    assert len(model.optimizer.variables) == 2 + 2 * len(model.trainable_variables)
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Skipping variable loading for optimizer" is a failure
        reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(reloaded.optimizer).__name__ == "DiscriminativeAdam"
    assert reloaded.optimizer.lr_multipliers == {"base": 0.1}


def test_unknown_component_in_multipliers_is_named():
    with pytest.raises(ScheduleError, match="'backbone'"):
        make_optimizer("adam", 1e-3, model=_model(), lr_multipliers={"backbone": 0.1})


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_epoch_named():
    model = _model()
    x, _ = make_data(32)
    # A regression target with one NaN makes the mean-squared error NaN from the first epoch.
    y = np.zeros((32, 3), dtype="float32")
    y[0, 0] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with pytest.raises(TrainingError, match="phase 'train' at epoch 1"):
        run_schedule(
            model,
            [Phase("train", 3, FreezePolicy("joint"), 1e-3)],
            data,
            loss="mse",
            feature_extractors=["base"],
            verbose=0,
        )


def test_zero_fine_tune_epochs_means_no_fine_tuning_phase(caplog):
    # Before: `fine_tune_epochs or epochs` ran a fine-tuning phase of train.epochs epochs.
    phases = make_schedule(
        "two_phase", epochs=3, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), fine_tune_epochs=0
    )
    assert [(p.name, p.epochs) for p in phases] == [("head", 3)]
    assert "schedule.fine_tune_epochs=0" in caplog.text
    unset = make_schedule("two_phase", epochs=3, lr=1e-3, optimizer="adam", freeze=FreezePolicy())
    assert [(p.name, p.epochs) for p in unset] == [("head", 3), ("fine_tune", 3)]


@pytest.mark.slow
def test_zero_fine_tune_epochs_trains_the_head_only():
    model = _model()
    phases = make_schedule(
        "two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), fine_tune_epochs=0
    )
    results = run_schedule(
        model, phases, _dataset(), _dataset(), loss=LOSS, feature_extractors=["base"], verbose=0
    )
    assert [(r.name, r.epochs) for r in results] == [("head", 1)]
    assert all(not w.trainable for w in model.get_layer("base").weights)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        # Before: "Phase 'fine_tune' has lr=inf" or no error at all; now the config key.
        ("two_phase", {"fine_tune_lr_factor": float("inf")}, "schedule.fine_tune_lr_factor=inf"),
        ("two_phase", {"fine_tune_lr_factor": 0.0}, "schedule.fine_tune_lr_factor=0.0"),
        ("two_phase", {"fine_tune_epochs": -1}, "schedule.fine_tune_epochs=-1"),
        ("two_phase", {"unfreeze_last": 0}, "schedule.unfreeze_last=0"),
        ("gradual", {"lr_decay": float("nan")}, "schedule.lr_decay=nan"),
        ("gradual", {"lr_decay": 0.0}, "schedule.lr_decay=0.0"),
        # Before: blamed freeze.unfreeze_last, a key the user never set.
        ("gradual", {"unfreeze_step": 0}, "schedule.unfreeze_step=0"),
        ("single", {"lr": float("inf")}, "train.lr=inf"),
        ("single", {"epochs": 0}, "train.epochs=0"),
        ("gradual", {"lr_multipliers": {"base": float("inf")}}, "schedule.lr_multipliers.base=inf"),
    ],
)
def test_schedule_values_are_refused_naming_the_config_key(name, kwargs, message):
    arguments = {"epochs": 1, "lr": 1e-3, "optimizer": "adam", "freeze": FreezePolicy()}
    arguments.update(kwargs)
    with pytest.raises(ScheduleError) as err:
        make_schedule(name, **arguments)
    assert str(err.value).startswith(message)


def test_unfreeze_policies_carry_the_schedule_key_they_come_from():
    two = make_schedule("two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy())
    assert two[1].freeze.last_setting == "schedule.unfreeze_last=2"
    gradual = make_schedule(
        "gradual", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), unfreeze_step=2
    )
    assert gradual[2].freeze.last_setting.startswith("schedule.unfreeze_step=2 (phase unfreeze_2")


def test_two_phase_fine_tunes_only_the_named_components():
    # Before: two_phase with freeze=frozen dropped freeze.components (every base fine-tuned).
    freeze = FreezePolicy("frozen", components=("base",))
    phases = make_schedule("two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=freeze)
    assert phases[1].freeze.components == ("base",)
