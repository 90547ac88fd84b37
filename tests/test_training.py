"""Frozen-feature caching: a cached phase trains the same model, in place, as the uncached one.

Each test trains a tiny stacked model twice from the same seed, once with ``cache_frozen`` and
once without, and compares what a user would see: the head's weights, the per-epoch metrics
(as Keras reports them and as MLflow records them), the saved model's predictions.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_base, make_data, make_head
from mlflow import MlflowClient
from stop_callbacks import KillAfter, Killed

from tfstack import tracking
from tfstack.datasets import ArrayDataset
from tfstack.freezing import FreezePolicy
from tfstack.frozen_features import split_frozen
from tfstack.schedules import Phase, make_schedule
from tfstack.stacking import build_stacked
from tfstack.training import fit_phase, run_schedule

LOSS = "sparse_categorical_crossentropy"
WEIGHT_TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("deterministic_ops")


def _base_4d(name="base"):
    """A base without pooling: (batch, 8, 8, 1) -> (batch, 4, 4, 5)."""
    inputs = keras.Input((8, 8, 1), name=f"{name}_input")
    x = keras.layers.Conv2D(5, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)  # (batch, 8, 8, 5) -> (batch, 4, 4, 5)
    return keras.Model(inputs, x, name=name)


def _base_with(layer, name="base"):
    """The conftest base with ``layer`` inserted before its features."""
    inputs = keras.Input((8, 8, 1), name=f"{name}_input")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = layer(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, activation="relu", name="features")(x)
    return keras.Model(inputs, x, name=name)


# name -> (builds the stacked model, feature extractors, the layer whose outputs are cached)
CASES = {
    "sequential": (lambda: build_stacked("sequential", make_base(), make_head()), "base"),
    # A Dense adapter (8 -> 6 features) trains, so the cut is the base's output.
    "adapter_dense": (
        lambda: build_stacked("adapter", make_base(), make_head(in_features=6), adapter="auto"),
        "base",
    ),
    # A pooling adapter has no weights: it is part of the frozen part, so the cut is after it.
    "adapter_pooling": (
        lambda: build_stacked("adapter", _base_4d(), make_head(in_features=5), adapter="auto"),
        "adapter_1",
    ),
    "functional": (
        lambda: build_stacked(
            "functional",
            make_base(),
            make_head(in_features=6),
            intermediate=[{"class_name": "Dense", "config": {"units": 6, "name": "dense"}}],
        ),
        "base",
    ),
    # Two bases merged by a weightless Concatenate: one cached tensor, after the merge.
    "functional_two_bases": (
        lambda: build_stacked(
            "functional",
            [make_base("base"), make_base("extra", features=4)],
            make_head(in_features=12),
        ),
        "merge",
    ),
}


class _EpochLogs(keras.callbacks.Callback):
    """Records every epoch's logs and the optimizer's learning rate, as EpochLogger sees them."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.rows.append((epoch, {**{k: float(v) for k, v in logs.items()}, "lr": lr}))


def _datasets(n=48, n_val=16, batch_size=16, epoch_seeded=False):
    x, y = make_data(n)
    x_val, y_val = make_data(n_val, seed=1)
    return (
        ArrayDataset(x, y, batch_size=batch_size, shuffle=True, seed=7, epoch_seeded=epoch_seeded),
        ArrayDataset(x_val, y_val, batch_size=batch_size, shuffle=False, seed=0),
    )


def _train(case, phases, *, cache, callbacks=(), extractors=None, epoch_seeded=False):
    """Build the case's model from seed 0 and run ``phases``; return model, results, logs."""
    build, _ = CASES[case]
    keras.utils.set_random_seed(0)
    stack = build()
    train_ds, val_ds = _datasets(epoch_seeded=epoch_seeded)
    logs = _EpochLogs()
    results = run_schedule(
        stack.model,
        phases,
        train_ds,
        val_ds,
        loss=LOSS,
        metrics=["accuracy"],
        feature_extractors=extractors or stack.feature_extractors,
        callbacks=[logs, *callbacks],
        verbose=0,
        cache_frozen=cache,
    )
    return stack.model, results, logs.rows


def _frozen_phase(epochs=3, **kwargs):
    return [Phase("head", epochs, FreezePolicy("frozen"), 0.01, **kwargs)]


def _max_weight_difference(a: keras.Model, b: keras.Model) -> float:
    assert [v.path for v in a.weights] == [v.path for v in b.weights]
    return max(
        float(np.max(np.abs(u - v))) for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
    )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_cached_frozen_phase_matches_the_uncached_phase(case):
    plain, plain_results, plain_logs = _train(case, _frozen_phase(), cache=False)
    cached, cached_results, cached_logs = _train(case, _frozen_phase(), cache=True)

    (plain_result,), (cached_result,) = plain_results, cached_results
    assert not plain_result.cached and cached_result.cached
    assert CASES[case][1] in cached_result.cache_note
    head_before = _train(case, _frozen_phase(epochs=1), cache=False)[0]
    assert _max_weight_difference(head_before, cached) > 1e-3  # the head did train
    assert _max_weight_difference(plain, cached) <= WEIGHT_TOLERANCE
    assert list(cached_result.history) == list(plain_result.history)
    assert set(cached_result.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in plain_result.history.items():
        np.testing.assert_allclose(cached_result.history[key], values, rtol=1e-6, atol=1e-7)
    assert [epoch for epoch, _ in cached_logs] == [epoch for epoch, _ in plain_logs] == [0, 1, 2]
    for (_, plain_row), (_, cached_row) in zip(plain_logs, cached_logs, strict=True):
        assert list(cached_row) == list(plain_row)
        np.testing.assert_allclose(list(cached_row.values()), list(plain_row.values()), rtol=1e-6)
    assert cached_result.counts == plain_result.counts


@pytest.mark.slow
def test_cached_phase_sees_the_same_batches_in_the_same_order():
    """Trained with a batch order of its own, the head would differ: the comparison can fail."""
    plain, _, _ = _train("sequential", _frozen_phase(), cache=False)
    keras.utils.set_random_seed(0)
    stack = CASES["sequential"][0]()
    train_ds, val_ds = _datasets()
    reshuffled = ArrayDataset(train_ds.x, train_ds.y, batch_size=16, shuffle=True, seed=8)
    run_schedule(
        stack.model,
        _frozen_phase(),
        reshuffled,
        val_ds,
        loss=LOSS,
        metrics=["accuracy"],
        feature_extractors=["base"],
        verbose=0,
        cache_frozen=True,
    )
    assert _max_weight_difference(plain, stack.model) > 1e-4


@pytest.mark.slow
def test_a_cached_phase_leaves_the_frozen_base_and_its_statistics_untouched():
    keras.utils.set_random_seed(0)
    stack = CASES["sequential"][0]()
    base = stack.model.get_layer("base")
    before = [w.copy() for w in base.get_weights()]
    train_ds, val_ds = _datasets()
    fit_phase(
        stack.model,
        _frozen_phase()[0],
        train_ds,
        val_ds,
        loss=LOSS,
        feature_extractors=["base"],
        verbose=0,
        cache_frozen=True,
    )
    for old, new in zip(before, base.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_two_phase_schedule_continues_the_same_batch_order_after_a_cached_phase():
    phases = make_schedule(
        "two_phase", epochs=2, lr=0.01, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    plain, _, plain_logs = _train("functional", phases, cache=False)
    cached, results, cached_logs = _train("functional", phases, cache=True)

    assert [r.cached for r in results] == [True, False]
    assert "trains" in results[1].cache_note
    assert _max_weight_difference(plain, cached) <= WEIGHT_TOLERANCE
    assert [e for e, _ in cached_logs] == [e for e, _ in plain_logs] == [0, 1, 2, 3]
    assert [row["lr"] for _, row in cached_logs] == pytest.approx([0.01, 0.01, 0.001, 0.001])


@pytest.mark.slow
def test_epoch_seeded_data_gives_the_same_cached_and_uncached_training():
    phases = make_schedule(
        "two_phase", epochs=2, lr=0.01, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    plain, _, _ = _train("sequential", phases, cache=False, epoch_seeded=True)
    cached, results, _ = _train("sequential", phases, cache=True, epoch_seeded=True)
    stream, _, _ = _train("sequential", phases, cache=True)

    assert [r.cached for r in results] == [True, False]
    assert _max_weight_difference(plain, cached) <= WEIGHT_TOLERANCE
    assert _max_weight_difference(stream, cached) > 1e-4  # another order: the test can fail


@pytest.mark.slow
def test_discriminative_rates_apply_in_a_cached_phase():
    phases = _frozen_phase(lr_multipliers={"head": 0.25})
    plain, _, _ = _train("adapter_dense", phases, cache=False)
    cached, results, _ = _train("adapter_dense", phases, cache=True)
    unscaled, _, _ = _train("adapter_dense", _frozen_phase(), cache=True)

    assert results[0].cached
    assert _max_weight_difference(plain, cached) <= WEIGHT_TOLERANCE
    assert _max_weight_difference(unscaled, cached) > 1e-4  # the multiplier changed the update


@pytest.mark.slow
def test_logged_metrics_match_between_cached_and_uncached_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {}
    for cache in (False, True):
        run_id = tracking.start_run(uri, "cache", run_name=f"cache={cache}")
        _train(
            "sequential",
            _frozen_phase(),
            cache=cache,
            callbacks=[tracking.EpochLogger(run_id, "head", phase_index=0)],
        )
        tracking.end_run(run_id, "FINISHED")
        runs[cache] = run_id
    client = MlflowClient(uri)
    plain, cached = (client.get_run(runs[c]).data.metrics for c in (False, True))
    assert sorted(cached) == sorted(plain)
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "lr", "phase_index"} <= set(plain)
    for name in plain:
        histories = [client.get_metric_history(runs[c], name) for c in (False, True)]
        assert [m.step for m in histories[1]] == [m.step for m in histories[0]] == [0, 1, 2]
        np.testing.assert_allclose(
            [m.value for m in histories[1]], [m.value for m in histories[0]], rtol=1e-6
        )


def _fit_base(model, phase, *, cache=True):
    """One phase on the standard datasets, with ``base`` as the feature extractor."""
    train_ds, val_ds = _datasets()
    return fit_phase(
        model,
        phase,
        train_ds,
        val_ds,
        loss=LOSS,
        feature_extractors=["base"],
        verbose=0,
        cache_frozen=cache,
    )


RANDOM_LAYERS = [
    lambda: keras.layers.Dropout(0.3, name="dropout"),
    lambda: keras.layers.GaussianNoise(0.1, name="noise"),
    lambda: keras.layers.RandomFlip(name="flip"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make_layer", RANDOM_LAYERS, ids=["Dropout", "Noise", "RandomFlip"])
@pytest.mark.parametrize("strategy", ["sequential", "functional"])
def test_a_frozen_base_runs_in_inference_mode_so_its_random_layers_are_off(
    make_layer, strategy, caplog
):
    """Frozen means called with training=False: the head trains on the same features every
    epoch, so training on cached features gives exactly the same model."""
    runs = {}
    for cache in (False, True):
        keras.utils.set_random_seed(0)
        stack = build_stacked(strategy, _base_with(make_layer()), make_head())
        with caplog.at_level(logging.INFO, logger="tfstack.training"):
            result = _fit_base(stack.model, _frozen_phase(epochs=2)[0], cache=cache)
        runs[cache] = stack.model, result
    (plain, uncached), (cached_model, cached) = runs[False], runs[True]
    assert cached.cached and not uncached.cached
    assert uncached.inference_mode == cached.inference_mode == ["base"]
    assert "calling frozen ['base'] with training=False" in caplog.text
    assert _max_weight_difference(plain, cached_model) <= 1e-6
    np.testing.assert_allclose(uncached.history["loss"], cached.history["loss"], rtol=1e-6)
    # The stacked model itself is unchanged: its random layer still acts in training mode.
    layer = plain.get_layer("base").layers[3]
    assert type(layer).__name__ in ("Dropout", "GaussianNoise", "RandomFlip")
    features = np.random.default_rng(0).random((16, 8, 8, 4), dtype=np.float32)
    assert not np.allclose(layer(features, training=True), layer(features, training=False))


@pytest.mark.slow
def test_a_base_that_trains_keeps_its_dropout_and_random_layers_after_it_prevent_caching():
    keras.utils.set_random_seed(0)
    stack = build_stacked(
        "functional",
        _base_with(keras.layers.Dropout(0.3, name="dropout")),
        make_head(),
        intermediate=[{"class_name": "Dropout", "config": {"rate": 0.2, "name": "between"}}],
    )
    joint = _fit_base(stack.model, Phase("joint", 1, FreezePolicy("joint"), 1e-3))
    assert joint.inference_mode == [] and not joint.cached
    frozen = _fit_base(stack.model, _frozen_phase(epochs=1)[0])
    # The base is frozen (inference mode), and the cut falls before the random layer after it.
    assert frozen.inference_mode == ["base"]
    assert frozen.cached and "base" in frozen.cache_note


@pytest.mark.parametrize(
    "policy",
    [FreezePolicy("joint"), FreezePolicy("partial", unfreeze_last=1)],
    ids=["joint", "partial"],
)
@pytest.mark.slow
def test_caching_is_refused_when_any_base_layer_trains(policy):
    keras.utils.set_random_seed(0)
    stack = CASES["functional_two_bases"][0]()
    train_ds, val_ds = _datasets()
    result = fit_phase(
        stack.model,
        Phase("fine_tune", 1, policy, 1e-3),
        train_ds,
        val_ds,
        loss=LOSS,
        feature_extractors=["base", "extra"],
        verbose=0,
        cache_frozen=True,
    )
    assert not result.cached
    assert "feature extractor 'base' trains" in result.cache_note


@pytest.mark.slow
def test_caching_needs_an_array_dataset_and_the_flag():
    keras.utils.set_random_seed(0)
    stack = CASES["sequential"][0]()
    x, y = make_data(32)
    plain_pipeline = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    common = dict(loss=LOSS, feature_extractors=["base"], verbose=0)
    result = fit_phase(
        stack.model, _frozen_phase(1)[0], plain_pipeline, cache_frozen=True, **common
    )
    assert not result.cached and "ArrayDataset" in result.cache_note
    train_ds, _ = _datasets()
    result = fit_phase(stack.model, _frozen_phase(1)[0], train_ds, cache_frozen=False, **common)
    assert not result.cached and result.cache_note == "cache_frozen is off"


@pytest.mark.slow
def test_split_frozen_shares_the_stacked_models_layers():
    keras.utils.set_random_seed(0)
    stack = CASES["adapter_pooling"][0]()
    from tfstack.freezing import apply_freeze_policy

    apply_freeze_policy(stack.model, FreezePolicy("frozen"), feature_extractors=["base"])
    split, note = split_frozen(stack.model, ["base"])
    assert split.cut == ["adapter_1"] and "(None, 5)" in note
    trained = {id(v) for v in split.trainable.trainable_weights}
    assert trained == {id(v) for v in stack.model.trainable_weights}
    x, _ = make_data(8)
    np.testing.assert_allclose(
        split.trainable.predict(split.frozen.predict(x, verbose=0), verbose=0),
        stack.model.predict(x, verbose=0),
        rtol=1e-6,
    )


@pytest.mark.slow
def test_the_saved_model_after_a_cached_phase_is_the_full_stacked_model(tmp_path):
    plain, _, _ = _train("functional_two_bases", _frozen_phase(), cache=False)
    cached, results, _ = _train("functional_two_bases", _frozen_phase(), cache=True)
    assert results[0].cached
    path = tmp_path / "model.keras"
    cached.save(path)

    reloaded = keras.saving.load_model(path, compile=True)
    assert [layer.name for layer in reloaded.layers] == [
        layer.name for layer in plain.layers
    ]  # input, base, extra, merge, head
    assert reloaded.count_params() == plain.count_params()
    x, y = make_data(20, seed=3)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-6
    )
    # The optimizer state trained in the cached phase is saved with the stacked model.
    assert int(reloaded.optimizer.iterations) == 3 * 3  # 3 epochs of 48 / 16 batches
    scores = reloaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(scores) == {"loss", "accuracy"}


class _RecordingDataset(ArrayDataset):
    """An epoch-seeded ArrayDataset that notes which samples each batch it serves holds.

    Samples are identified by their first pixel (normal draws: distinct). The note is taken as
    the batch is read, so it is the order the training loop really consumed.
    """

    def __init__(self, x, y):
        super().__init__(x, y, batch_size=16, shuffle=True, seed=7, epoch_seeded=True)
        self.index = {float(v): i for i, v in enumerate(x[:, 0, 0, 0])}
        self.served: list[int] = []
        self._recorded = None

    def _note(self, first_pixels):
        self.served += [self.index[float(v)] for v in first_pixels.numpy()]
        return first_pixels

    def batches(self):
        if self._recorded is None:

            def note(x, y):
                seen = tf.py_function(self._note, [x[:, 0, 0, 0]], Tout=x.dtype)
                with tf.control_dependencies([seen]):
                    return tf.identity(x), y

            self._recorded = super().batches().map(note)
        return self._recorded

    def epochs(self) -> list[list[int]]:
        n = len(self.x)
        assert len(self.served) % n == 0, len(self.served)
        return [self.served[i : i + n] for i in range(0, len(self.served), n)]


def _checkpointed_schedule(directory, *, resume_from=None, kill_after=None):
    """The two-phase schedule (2 + 2 epochs) on the sequential case, checkpointing into
    ``directory``; returns the model, the results and the dataset's per-epoch orders."""
    keras.utils.set_random_seed(0)
    stack = CASES["sequential"][0]()
    x, y = make_data(48)
    train_ds = _RecordingDataset(x, y)
    _, val_ds = _datasets()
    phases = make_schedule(
        "two_phase", epochs=2, lr=0.01, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    results = None
    try:
        results = run_schedule(
            stack.model,
            phases,
            train_ds,
            val_ds,
            loss=LOSS,
            metrics=["accuracy"],
            feature_extractors=["base"],
            callbacks=[] if kill_after is None else [KillAfter(kill_after)],
            verbose=0,
            checkpoint_dir=directory,
            resume_from=resume_from,
            checkpoint_key="key",
            run_id="run-1",
        )
    except Killed:
        pass
    return stack.model, results, train_ds.epochs()


@pytest.mark.slow
def test_the_loop_orders_epochs_by_seed_and_epoch_so_a_resumed_run_is_the_uninterrupted_one(
    tmp_path,
):
    from tfstack import checkpoints

    whole, whole_results, whole_orders = _checkpointed_schedule(tmp_path / "whole")
    assert len(whole_orders) == 4
    assert all(sorted(order) == list(range(48)) for order in whole_orders)
    assert len({tuple(order) for order in whole_orders}) == 4  # a new order every epoch

    # Killed after epoch 2 (the first of the fine-tuning phase), once it was checkpointed.
    directory = tmp_path / "killed"
    _, _, killed_orders = _checkpointed_schedule(directory, kill_after=2)
    state = checkpoints.read_state(directory)
    assert state.epochs_done == 3 and (state.key, state.run_id) == ("key", "run-1")
    assert killed_orders == whole_orders[:3]

    resumed, results, resumed_orders = _checkpointed_schedule(directory, resume_from=state)
    assert resumed_orders == [whole_orders[3]]  # epoch 3's order, as in the uninterrupted run
    for a, b in zip(whole.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert int(resumed.optimizer.iterations) == int(whole.optimizer.iterations) == 2 * 3
    assert [(r.name, r.initial_epoch, r.epochs) for r in results] == [
        ("head", 0, 2),
        ("fine_tune", 2, 2),
    ]
    assert [r.history for r in results] == [r.history for r in whole_results]
    assert checkpoints.read_state(directory).epochs_done == 4


def test_jit_compile_reaches_keras_and_a_model_without_xla_support_is_refused():
    from tfstack.errors import TrainingError
    from tfstack.training import compile_phase

    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", make_base(), make_head()).model
    phase = Phase("train", 1, FreezePolicy("frozen"), 0.01)
    options = {
        "loss": "sparse_categorical_crossentropy",
        "metrics": [],
        "feature_extractors": ["base"],
    }
    compile_phase(model, phase, **options, jit_compile=False)
    assert model.jit_compile is False
    zoom = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.RandomZoom(0.1, name="zoom")], name="augment"
    )
    augmented = build_stacked("sequential", make_base(), make_head(), front=[zoom]).model
    with pytest.raises(TrainingError, match=r"zoom \(RandomZoom\)"):
        compile_phase(augmented, phase, **options, jit_compile=True)


class _HostOp(keras.layers.Layer):
    """A layer whose op (a NumPy call) has no XLA kernel."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a, [x], tf.float32)
        return tf.ensure_shape(y, x.shape)


@pytest.fixture
def without_op_determinism():
    """Keras compiles no XLA under op determinism (train.jit_compile=true needs it off)."""
    from tensorflow.python.framework import config

    config.disable_op_determinism()
    yield
    tf.config.experimental.enable_op_determinism()


def test_an_op_xla_cannot_compile_is_named_with_the_setting(without_op_determinism):
    from tfstack.errors import TrainingError
    from tfstack.guards import xla_errors

    model = keras.Sequential([keras.Input((4,)), _HostOp(), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    x = np.zeros((4, 4), "float32")
    with pytest.raises(TrainingError, match="XLA cannot compile PyFunc") as err, xla_errors():
        model.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0)
    assert "train.jit_compile=true" in str(err.value)


def test_evaluation_after_a_cached_phase_reuses_its_frozen_part_and_gives_the_same_numbers():
    from tfstack import evaluation
    from tfstack.frozen_features import inference_split

    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", make_base(), make_head()).model
    x, y = make_data(32)
    (result,) = run_schedule(
        model,
        _frozen_phase(epochs=1),
        ArrayDataset(x, y, batch_size=8, shuffle=True, seed=0),
        loss=LOSS,
        metrics=["accuracy"],
        feature_extractors=["base"],
        verbose=0,
        cache_frozen=True,
    )
    assert result.cached
    split = inference_split(model, ["base"])
    assert split is inference_split(model, ["base"])  # the trained split, traced once
    assert split.frozen.predict_function is not None
    x_test, y_test = make_data(24, seed=3)
    kwargs = {"task": "classification", "batch_size": 8}
    once = evaluation.evaluate(model, x_test, y_test, feature_extractors=["base"], **kwargs)
    whole = evaluation.evaluate(model, x_test, y_test, **kwargs)
    assert once.metrics == whole.metrics
    np.testing.assert_array_equal(once.outputs, whole.outputs)
