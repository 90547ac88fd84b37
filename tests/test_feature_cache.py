"""The shared frozen-feature cache: exact hits, misses on any change of what features depend on,
atomic writes under concurrent processes, LRU eviction, and `tfstack cache list|clear`.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import make_base, make_data, make_head

from tfstack.datasets import ArrayDataset
from tfstack.feature_cache import FeatureCache
from tfstack.freezing import FreezePolicy
from tfstack.preprocessing import build_preprocessing
from tfstack.schedules import Phase
from tfstack.stacking import build_stacked
from tfstack.training import fit_phase

LOSS = "sparse_categorical_crossentropy"
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


pytestmark = pytest.mark.usefixtures("deterministic_ops")


def _model(scale=None):
    keras.utils.set_random_seed(0)
    front = [build_preprocessing("rescale", make_base(), scale=scale)] if scale else None
    return build_stacked("sequential", make_base(), make_head(), front=front).model


def _data(x=None, seed=7):
    x_all, y_all = make_data(64)
    x_all = x_all if x is None else x
    return (
        ArrayDataset(x_all[:48], y_all[:48], batch_size=16, shuffle=True, seed=seed),
        ArrayDataset(x_all[48:], y_all[48:], batch_size=16, shuffle=False, seed=0),
    )


def _fit(model, data, cache, epochs=2):
    train, val = data
    phase = Phase("head", epochs, FreezePolicy("frozen"), 0.01)
    return fit_phase(
        model, phase, train, val, loss=LOSS, metrics=["accuracy"], feature_extractors=["base"],
        verbose=0, cache_frozen=True, feature_cache=cache,
    )  # fmt: skip


@pytest.mark.slow
def test_a_head_trained_from_a_cache_hit_equals_one_from_a_fresh_extraction(tmp_path):
    cache = FeatureCache(tmp_path / "features", max_bytes=10**9)
    fresh_model = _model()
    fresh = _fit(fresh_model, _data(), None)
    miss = _fit(_model(), _data(), cache)
    hit_model = _model()
    hit = _fit(hit_model, _data(), cache)

    assert (fresh.cache, miss.cache, hit.cache) == ("off", "miss", "hit")
    assert hit.cache_keys == miss.cache_keys and set(hit.cache_keys) == {"train", "val"}
    assert len(cache.entries()) == 2
    for a, b in zip(fresh_model.get_weights(), hit_model.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert list(hit.history) == list(fresh.history) and len(hit.history["val_loss"]) == 2
    for key, values in fresh.history.items():
        np.testing.assert_allclose(hit.history[key], values, rtol=1e-6, atol=1e-7)


def _status(cache, model, data) -> str:
    return _fit(model, data, cache, epochs=1).cache


@pytest.mark.slow
def test_any_change_of_what_the_features_depend_on_misses(tmp_path):
    cache = FeatureCache(tmp_path / "features", max_bytes=10**9)
    x, _ = make_data(64)
    assert _status(cache, _model(), _data(x)) == "miss"
    # The same model and data in another training order: the rows are stored by sample.
    assert _status(cache, _model(), _data(x, seed=123)) == "hit"

    changed = _model()
    kernel = changed.get_layer("base").get_layer("conv1").kernel
    kernel.assign(kernel.numpy() + np.eye(1, kernel.numpy().size).reshape(kernel.shape) * 1e-3)
    assert _status(cache, changed, _data(x)) == "miss"  # one weight

    assert _status(cache, _model(scale=0.5), _data(x)) == "miss"  # preprocessing in front
    assert _status(cache, _model(scale=0.25), _data(x)) == "miss"  # its setting
    one_sample = x.copy()
    one_sample[3, 0, 0, 0] += 1.0
    assert _status(cache, _model(), _data(one_sample)) == "miss"  # one sample's input

    train, val = _data(x)
    x_y = make_data(64)[1]
    other_split = (  # the same samples, split at another place
        ArrayDataset(x[:40], x_y[:40], batch_size=16, shuffle=True, seed=7),
        ArrayDataset(x[40:], x_y[40:], batch_size=16, shuffle=False, seed=0),
    )
    assert _status(cache, _model(), other_split) == "miss"
    assert _status(cache, _model(), (train, val)) == "hit"  # all the while, the first stays


def test_entries_over_the_limit_are_evicted_least_recently_used_first(tmp_path):
    cache = FeatureCache(tmp_path, max_bytes=3000)
    row = np.zeros((10, 100), np.float32)  # 4,000 bytes: over the limit, not stored
    assert not cache.store("big", [row], {})
    for i, key in enumerate(["a", "b", "c"]):
        assert cache.store(key, [np.full((10, 25), i, np.float32)], {"model": "m"})  # 1,000 B
        os.utime(cache.path(key) / "meta.json", (100 + i, 100 + i))
    assert cache.load("a") is not None  # a hit makes "a" the most recently used
    cache.store("d", [np.zeros((10, 25), np.float32)], {})
    assert sorted(e.key for e in cache.entries()) == ["a", "c", "d"]
    np.testing.assert_array_equal(cache.load("c")[0], np.full((10, 25), 2, np.float32))
    assert cache.clear(["c"]) == (1, 1000)
    assert cache.clear() == (2, 2000) and cache.entries() == []


_WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from tfstack.feature_cache import FeatureCache

    root, log, mode = sys.argv[1:4]
    seconds = 0.0 if mode == "die" else 1.0

    def compute():
        with open(log, "a") as f:
            f.write("computed\\n")
        time.sleep(seconds)
        return [np.arange(200_000, dtype=np.float32).reshape(1000, 200), np.ones((1000, 3))]

    cache = FeatureCache(root, max_bytes=10**9)
    if mode == "die":  # killed between writing the files and renaming them into place
        import os
        os.replace = lambda *a: os._exit(9)
    arrays, hit = cache.get_or_compute("k" * 32, compute, {"model": "m"})
    assert arrays[0][999, 199] == 199_999 and arrays[1].shape == (1000, 3)
    print("hit" if hit else "miss")
    """
)


def _worker(tmp_path, mode="ok"):
    env = {**os.environ, "PYTHONPATH": SRC}
    args = [str(tmp_path / "cache"), str(tmp_path / "log"), mode]
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, *args], env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_two_processes_wanting_the_same_key_compute_it_once(tmp_path):
    first, second = _worker(tmp_path), _worker(tmp_path)
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in (first, second))
    assert outputs == ["hit", "miss"]
    assert (tmp_path / "log").read_text().count("computed") == 1
    (entry,) = FeatureCache(tmp_path / "cache", max_bytes=10**9).entries()
    assert entry.bytes == 200_000 * 4 + 3000 * 8


@pytest.mark.slow
def test_a_job_killed_while_writing_leaves_no_entry_and_the_next_computes_it(tmp_path):
    killed = _worker(tmp_path, "die")
    killed.communicate(timeout=60)
    assert killed.returncode == 9
    cache = FeatureCache(tmp_path / "cache", max_bytes=10**9)
    assert cache.entries() == [] and cache.load("k" * 32) is None
    leftover = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftover) == 1  # the half-written entry, never under the key's name
    again = _worker(tmp_path)  # the lock died with the killed job
    assert again.communicate(timeout=60)[0].strip() == "miss"
    assert len(cache.entries()) == 1
    stale = (tmp_path / "cache" / leftover[0]).stat().st_mtime - 7 * 3600
    os.utime(tmp_path / "cache" / leftover[0], (stale, stale))
    cache.evict()
    assert not (tmp_path / "cache" / leftover[0]).exists()


def test_bfloat16_features_come_back_as_bfloat16(tmp_path):
    import ml_dtypes

    features = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3).astype(ml_dtypes.bfloat16)
    cache = FeatureCache(tmp_path, max_bytes=10**6)
    cache.store("key", [features], {})
    (loaded,) = cache.load("key")
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded.astype(np.float32), features.astype(np.float32))


def test_an_unreadable_entry_is_a_miss_and_is_removed(tmp_path):
    cache = FeatureCache(tmp_path, max_bytes=10**6)
    cache.store("key", [np.zeros((4, 2))], {})
    meta = json.loads((cache.path("key") / "meta.json").read_text())
    meta["shapes"] = [[5, 2]]
    (cache.path("key") / "meta.json").write_text(json.dumps(meta))
    assert cache.load("key") is None and not cache.path("key").exists()
    arrays, hit = cache.get_or_compute("key", lambda: [np.ones((4, 2))], {})
    assert not hit and arrays[0].sum() == 8


@pytest.mark.slow
def test_cache_list_and_clear_on_the_command_line(tmp_path):
    cache = FeatureCache(tmp_path / "c", max_bytes=10**9)
    cache.store("0123abcd" * 4, [np.zeros((100, 8), np.float32)], {"model": "stacked_frozen_part",
                "cut": ["base"], "data": "train split, 100 samples"})  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    command = [sys.executable, "-m", "tfstack.cli", "cache"]
    listed = subprocess.run(
        [*command, "list", "--dir", str(tmp_path / "c")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "0123abcd" * 4 in listed.stdout and "3.2 kB" in listed.stdout
    assert "stacked_frozen_part [base] on train split, 100 samples" in listed.stdout
    assert "1 entries" in listed.stdout
    cleared = subprocess.run(
        [*command, "clear"], env={**env, "TFSTACK_FEATURE_CACHE": str(tmp_path / "c")},
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert cleared.returncode == 0 and "removed 1 entries" in cleared.stdout
    assert cache.entries() == []


@pytest.mark.slow
def test_a_later_tfstack_run_and_a_two_phase_head_phase_hit_the_shared_cache(
    project, feature_cache_dir
):
    from mlflow import MlflowClient
    from project_copy import tfstack

    quick = ["tracking.log_model=false"]
    for overrides in ([], ["schedule=two_phase"]):
        done = tfstack(project, "run", *quick, *overrides)
        assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("tfstack").experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    first, second = (r.data.tags for r in runs)
    assert (first["phase.0.cache"], second["phase.0.cache"]) == ("miss", "hit")
    assert second["phase.0.cache_key"] == first["phase.0.cache_key"]
    assert first["phase.0.cache_key"].startswith("train=") and ",val=" in first["phase.0.cache_key"]
    assert second["phase.1.cache"] == "off"  # fine-tuning trains the base: nothing to cache
    listed = tfstack(project, "cache", "list")
    # train, val, and test (the first run's evaluation, its last phase cached; the second
    # run's ended fine-tuning the base, so its test features were not stored)
    assert listed.returncode == 0 and "3 entries" in listed.stdout
    assert "test split" in listed.stdout
    assert str(feature_cache_dir) in listed.stdout
    assert first["phase.0.cache_key"].split(",")[0].removeprefix("train=") in listed.stdout
