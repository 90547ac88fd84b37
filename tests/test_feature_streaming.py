"""Frozen features above the memory budget: extracted to files batch by batch, read back by rows.

A phase trained on streamed features equals the in-memory one; a run's temporary files are gone
after it (and after a failure); a streamed shared-cache entry is a hit for the next process; and
the peak memory of extraction and training does not grow with the number of samples.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_data, make_stacked

from tfstack.datasets import ArrayDataset
from tfstack.feature_cache import FeatureCache
from tfstack.feature_streaming import TEMPORARY_PREFIX, StoredFeatures
from tfstack.freezing import FreezePolicy
from tfstack.schedules import Phase
from tfstack.training import fit_phase

LOSS = "sparse_categorical_crossentropy"
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


pytestmark = pytest.mark.usefixtures("deterministic_ops")


def _data(n=64):
    x, y = make_data(n)
    cut = n * 3 // 4
    return (
        ArrayDataset(x[:cut], y[:cut], batch_size=16, shuffle=True, seed=7, epoch_seeded=True),
        ArrayDataset(x[cut:], y[cut:], batch_size=16, shuffle=False, seed=0),
    )


def _fit(model, data, *, memory_mb, cache=None, epochs=3):
    train, val = data
    phase = Phase("head", epochs, FreezePolicy("frozen"), 0.01)
    return fit_phase(
        model, phase, train, val, loss=LOSS, metrics=["accuracy"], feature_extractors=["base"],
        verbose=0, cache_frozen=True, feature_cache=cache, feature_memory_mb=memory_mb,
    )  # fmt: skip


def _temporary_dirs():
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith(TEMPORARY_PREFIX)}


def _assert_same_training(streamed_model, streamed, memory_model, in_memory):
    for a, b in zip(memory_model.get_weights(), streamed_model.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert list(streamed.history) == list(in_memory.history)
    assert len(streamed.history["val_accuracy"]) == 3
    for key, values in in_memory.history.items():
        np.testing.assert_allclose(streamed.history[key], values, rtol=1e-6, atol=1e-7)


def test_a_phase_trained_on_streamed_features_equals_the_in_memory_one(caplog):
    before = _temporary_dirs()
    memory_model, streamed_model = make_stacked(), make_stacked()
    in_memory = _fit(memory_model, _data(), memory_mb=None)
    with caplog.at_level("INFO", logger="tfstack"):
        streamed = _fit(streamed_model, _data(), memory_mb=0)  # any feature is over 0 MB

    assert "exceed train.feature_memory_mb=0: streaming them from disk" in caplog.text
    assert "streamed from disk" in streamed.cache_note
    assert "streamed" not in in_memory.cache_note

    assert in_memory.cached and streamed.cached and streamed.cache == "off"
    _assert_same_training(streamed_model, streamed, memory_model, in_memory)
    assert _temporary_dirs() == before  # the phase's files are gone


def test_streamed_rows_are_the_rows_in_any_order(tmp_path):
    rows = np.arange(40 * 6, dtype=np.float32).reshape(40, 2, 3)
    np.save(tmp_path / "0.npy", rows)
    stored = StoredFeatures([tmp_path / "0.npy"])
    try:
        shuffled = np.random.default_rng(0).permutation(40)[:16]
        (picked,) = stored.rows(shuffled)
        np.testing.assert_array_equal(picked, rows[shuffled])
        (contiguous,) = stored.rows(np.arange(8, 24))
        np.testing.assert_array_equal(contiguous, rows[8:24])
        batches = stored.batches(tf.data.Dataset.range(40).batch(16), tf.constant(np.arange(40)))
        assert [(tuple(x.shape), int(y[0])) for x, y in batches] == [
            ((16, 2, 3), 0),
            ((16, 2, 3), 16),
            ((8, 2, 3), 32),
        ]
    finally:
        stored.close()


def test_a_failure_while_training_on_streamed_features_removes_their_files():
    before = _temporary_dirs()

    class Fail(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            assert len(_temporary_dirs() - before) == 2  # train and val, while training
            raise RuntimeError("stopped by the test")

    train, val = _data()
    phase = Phase("head", 2, FreezePolicy("frozen"), 0.01)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        fit_phase(
            make_stacked(), phase, train, val, loss=LOSS, feature_extractors=["base"], verbose=0,
            cache_frozen=True, feature_memory_mb=0, callbacks=[Fail()],
        )  # fmt: skip
    assert _temporary_dirs() == before


def test_a_failure_while_extracting_removes_the_files():
    before = _temporary_dirs()
    x, y = make_data(32)
    train = ArrayDataset(x, y, batch_size=16, shuffle=True, seed=0)
    train.input_batches = lambda: tf.data.Dataset.from_tensor_slices(x[:20]).batch(16)
    phase = Phase("head", 1, FreezePolicy("frozen"), 0.01)
    with pytest.raises(Exception, match="outputs for 20 or more samples of a split of 32"):
        fit_phase(
            make_stacked(), phase, train, loss=LOSS, feature_extractors=["base"], verbose=0,
            cache_frozen=True, feature_memory_mb=0,
        )  # fmt: skip
    assert _temporary_dirs() == before


def test_streamed_features_larger_than_the_cache_limit_train_without_an_entry(tmp_path):
    before = _temporary_dirs()
    cache = FeatureCache(tmp_path / "cache", max_bytes=100)  # smaller than any split's features
    memory_model, streamed_model = make_stacked(), make_stacked()
    in_memory = _fit(memory_model, _data(), memory_mb=None)
    streamed = _fit(streamed_model, _data(), memory_mb=0, cache=cache)

    assert streamed.cache == "miss" and cache.entries() == []
    assert not (tmp_path / "cache").exists() or not [
        p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")
    ]
    _assert_same_training(streamed_model, streamed, memory_model, in_memory)
    assert _temporary_dirs() == before


_WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import keras, numpy as np, tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    from conftest import make_base, make_data, make_head
    from tfstack.datasets import ArrayDataset
    from tfstack.feature_cache import FeatureCache
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import Phase
    from tfstack.stacking import build_stacked
    from tfstack.training import fit_phase
    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", make_base(), make_head()).model
    x, y = make_data(64)
    train = ArrayDataset(x[:48], y[:48], batch_size=16, shuffle=True, seed=7, epoch_seeded=True)
    val = ArrayDataset(x[48:], y[48:], batch_size=16, shuffle=False, seed=0)
    result = fit_phase(
        model, Phase("head", 3, FreezePolicy("frozen"), 0.01), train, val,
        loss="sparse_categorical_crossentropy", metrics=["accuracy"], feature_extractors=["base"],
        verbose=0, cache_frozen=True, feature_memory_mb=0,
        feature_cache=FeatureCache(sys.argv[1], max_bytes=10**9),
    )
    print(json.dumps({"cache": result.cache, "weights": [w.tolist() for w in model.get_weights()]}))
    """
)


@pytest.mark.slow
def test_a_streamed_shared_cache_entry_is_a_hit_for_the_next_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    tests = os.path.dirname(__file__)
    command = [sys.executable, "-c", _WORKER, str(tmp_path / "cache"), tests]
    runs = [
        json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                                  timeout=120).stdout.splitlines()[-1])
        for _ in range(2)
    ]  # fmt: skip
    assert [r["cache"] for r in runs] == ["miss", "hit"]
    cache = FeatureCache(tmp_path / "cache", max_bytes=10**9)
    assert sorted(e.meta["shapes"][0][0] for e in cache.entries()) == [16, 48]
    for a, b in zip(runs[0]["weights"], runs[1]["weights"], strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=0, atol=1e-6)
    # The entry is the in-memory path's format: a later run under the budget loads it.
    memory_model = make_stacked()
    loaded = _fit(memory_model, _data(), memory_mb=None, cache=cache)
    assert loaded.cache == "hit"
    for a, b in zip(memory_model.get_weights(), runs[1]["weights"], strict=True):
        np.testing.assert_allclose(np.array(b), a, rtol=0, atol=1e-6)


_PEAK = textwrap.dedent(
    """
    import resource, sys
    import keras, numpy as np
    from tfstack.datasets import ArrayDataset
    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import Phase
    from tfstack.stacking import build_stacked
    from tfstack.training import fit_phase
    n = int(sys.argv[1])
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    base = keras.Model(inputs, keras.layers.Dense(4096, name="wide")(inputs), name="base")
    head = keras.Sequential([keras.Input((4096,)), keras.layers.Dense(2, activation="softmax")])
    model = build_stacked("sequential", base, head).model
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 2, n)
    data = ArrayDataset(x, y, batch_size=256, shuffle=True, seed=0, epoch_seeded=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fit_phase(
        model, Phase("head", 1, FreezePolicy("frozen"), 0.01), data,
        loss="sparse_categorical_crossentropy", feature_extractors=["base"], verbose=0,
        cache_frozen=True, feature_memory_mb=1,
    )
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


@pytest.mark.slow
def test_peak_memory_of_extraction_and_training_does_not_grow_with_the_data():
    env = {**os.environ, "PYTHONPATH": SRC, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def peak_kb(n):
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, str(n)], env=env, capture_output=True, text=True,
            check=True, timeout=120,
        )  # fmt: skip
        return [int(v) for v in done.stdout.split()]

    small, large = 4_000, 16_000  # 64 MB and 262 MB of float32 features
    (_, peak_small), (_, peak_large) = peak_kb(small), peak_kb(large)
    grown_mb = (peak_large - peak_small) / 1024
    features_grown_mb = (large - small) * 4096 * 4 / 2**20
    assert grown_mb < 0.1 * features_grown_mb, (grown_mb, features_grown_mb)


def test_test_features_over_the_budget_stream_to_the_same_metrics_and_outputs(caplog):
    from tfstack import evaluation

    model = make_stacked()
    model.get_layer("base").trainable = False
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    x, y = make_data(40, seed=1)
    kwargs = {"task": "classification", "batch_size": 8, "feature_extractors": ["base"]}
    before = _temporary_dirs()
    in_memory = evaluation.evaluate(model, x, y, **kwargs)
    with caplog.at_level("INFO", logger="tfstack"):
        streamed = evaluation.evaluate(model, x, y, feature_memory_mb=0, **kwargs)
    assert "of test features to" in caplog.text
    images = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # (x, y) batches, as images
    streamed_batches = evaluation.evaluate(model, images, y, feature_memory_mb=0, **kwargs)
    for result in (streamed, streamed_batches):
        assert result.metrics == in_memory.metrics
        np.testing.assert_array_equal(result.outputs, in_memory.outputs)
    assert _temporary_dirs() == before


def test_an_entry_stored_from_memory_reads_as_rows_and_bfloat16_stays_bfloat16(tmp_path):
    import ml_dtypes

    cache = FeatureCache(tmp_path, max_bytes=10**6)
    features = np.arange(24, dtype=np.float32).reshape(8, 3)
    halves = features.astype(ml_dtypes.bfloat16)
    cache.store("key", [features, halves], {})  # as the in-memory path (and older runs) stored it
    stored = cache.open_files("key")
    try:
        first, second = stored.rows(np.array([5, 1, 2]))
        np.testing.assert_array_equal(first, features[[5, 1, 2]])
        assert second.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(second.astype(np.float32), features[[5, 1, 2]])
    finally:
        stored.close()


def test_a_truncated_entry_is_a_miss_that_is_removed_not_a_crash_later(tmp_path):
    """An entry copied partway reads as unreadable at once, not as missing rows in training."""
    cache = FeatureCache(tmp_path, max_bytes=10**6)
    cache.store("key", [np.ones((100, 4), np.float32)], {})
    data = cache.path("key") / "0.npy"
    os.truncate(data, data.stat().st_size - 800)
    assert cache.open_files("key") is None
    assert not cache.path("key").exists()
    again, hit = cache.get_or_write(
        "key", lambda d: [np.save(d / "0.npy", np.zeros((100, 4), np.float32)) or "float32"], {}
    )
    try:
        assert not hit and len(again) == 100
    finally:
        again.close()


def test_a_full_disk_while_streaming_is_one_line_naming_the_directory_and_the_key(tmp_path):
    """Writing the run's own feature files past a size limit: one line, and nothing left."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {SRC!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np, tensorflow as tf
        from conftest import make_base
        from tfstack.errors import TrainingError
        from tfstack.feature_streaming import temporary_features
        base = make_base()
        x = np.zeros((4000, 8, 8, 1), np.float32)
        batches = tf.data.Dataset.from_tensor_slices(x).batch(64)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16000, 16000))
        try:
            temporary_features(base, batches, len(x), name="train")
        except TrainingError as err:
            print("ERROR", err)
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    [line] = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert f"Could not write the train split's frozen features to {tmp_path}" in line
    assert "File too large" in line and "train.feature_memory_mb" in line
    assert list(tmp_path.iterdir()) == []  # the directory is gone
