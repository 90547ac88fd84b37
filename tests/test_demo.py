"""Tests of the digits demo: byte-stable raw data tracked by DVC, the transfer task, components."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tfstack.data import file_hash
from tfstack.errors import DataError
from tfstack.pipeline.demo import make_transfer_task, write_raw_digits

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def run(*args, cwd):
    """Run a command without a terminal (so DVC never prompts); return the finished process."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def raw_path(tmp_path_factory):
    return write_raw_digits(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def task(raw_path, tmp_path_factory):
    return make_transfer_task(raw_path, tmp_path_factory.mktemp("task"), seed=0)


def test_write_raw_digits_holds_all_digits(raw_path):
    assert raw_path.name == "digits.npz"
    with np.load(raw_path) as raw:
        x, y = raw["x"], raw["y"]
    assert x.shape == (1797, 8, 8) and x.dtype == np.uint8 and x.max() == 16
    assert y.dtype == np.int64
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.slow
def test_write_raw_digits_is_byte_identical_across_runs_and_processes(raw_path, tmp_path):
    again = write_raw_digits(tmp_path / "again")
    process = run(
        sys.executable, "-m", "tfstack.pipeline.demo", "write-raw", tmp_path / "cli", cwd=tmp_path
    )

    assert process.returncode == 0, process.stderr
    assert file_hash(again) == file_hash(raw_path)
    assert file_hash(tmp_path / "cli" / "digits.npz") == file_hash(raw_path)
    assert file_hash(raw_path) in process.stdout


@pytest.mark.slow
def test_regenerated_data_matches_the_committed_data_dvc(tmp_path):
    """A fresh clone regenerates data/ and DVC finds it identical to what data.dvc recorded."""
    clone = tmp_path / "clone"
    clone.mkdir()
    assert run(sys.executable, "-m", "dvc", "init", "--no-scm", "-q", cwd=clone).returncode == 0
    shutil.copy(ROOT / "data.dvc", clone / "data.dvc")
    write_raw_digits(clone / "data")

    # What `make` does after writing data/: fills the empty cache, refusing different content.
    commit = run(sys.executable, "-m", "dvc", "commit", "data.dvc", cwd=clone)
    status = run(sys.executable, "-m", "dvc", "status", "data.dvc", "--json", cwd=clone)

    assert commit.returncode == 0, commit.stderr
    assert json.loads(status.stdout) == {}
    assert (clone / "data.dvc").read_bytes() == (ROOT / "data.dvc").read_bytes()

    # The same check notices a changed byte.
    with (clone / "data" / "digits.npz").open("ab") as f:
        f.write(b"\0")
    status = run(sys.executable, "-m", "dvc", "status", "data.dvc", "--json", cwd=clone)
    assert json.loads(status.stdout) == {"data.dvc": [{"changed outs": {"data": "modified"}}]}


def test_make_transfer_task_sizes_and_labels(task):
    assert task["sizes"] == {
        "source": {"train": 721, "test": 180},
        "target": {"train": 50, "test": 846},
    }
    with np.load(task["source"]) as source, np.load(task["target"]) as target:
        for split in (source, target):
            for name in ("x_train", "x_test"):
                assert split[name].shape[1:] == (8, 8, 1)
                assert split[name].dtype == np.float32
                assert 0.0 <= split[name].min() and split[name].max() == 1.0
        assert np.bincount(target["y_train"]).tolist() == [10, 10, 10, 10, 10]
        assert np.bincount(source["y_test"]).tolist() == [36, 36, 35, 37, 36]
        assert sorted(set(source["y_train"].tolist())) == [0, 1, 2, 3, 4]


def test_make_transfer_task_uses_every_image_once_with_relabelled_targets(task, raw_path):
    """Source digits keep their labels, target digits 5-9 become 0-4; no image lost or repeated."""
    with np.load(raw_path) as raw:
        images, digits = raw["x"] / 16.0, raw["y"]
    expected = sorted(
        (image.astype(np.float32).tobytes(), int(digit))
        for image, digit in zip(images, digits, strict=True)
    )
    pairs = []
    for name, offset in (("source", 0), ("target", 5)):
        with np.load(task[name]) as arrays:
            for split in ("train", "test"):
                for image, label in zip(arrays[f"x_{split}"], arrays[f"y_{split}"], strict=True):
                    pairs.append((image[..., 0].tobytes(), int(label) + offset))
    assert sorted(pairs) == expected


def test_make_transfer_task_is_deterministic_given_seed(task, raw_path, tmp_path):
    same = make_transfer_task(raw_path, tmp_path / "same", seed=0)
    other = make_transfer_task(raw_path, tmp_path / "other", seed=1, target_train_per_class=3)

    assert file_hash(same["source"]) == file_hash(task["source"])
    assert file_hash(same["target"]) == file_hash(task["target"])
    assert file_hash(other["target"]) != file_hash(task["target"])
    assert other["sizes"]["target"] == {"train": 15, "test": 881}


def test_make_transfer_task_errors(raw_path, tmp_path):
    with pytest.raises(DataError, match="target_train_per_class must be between 1 and"):
        make_transfer_task(raw_path, tmp_path, seed=0, target_train_per_class=0)
    with pytest.raises(DataError, match="python -m tfstack.pipeline.demo write-raw"):
        make_transfer_task(tmp_path / "missing.npz", tmp_path, seed=0)


@pytest.mark.slow
def test_pretrain_components_saves_base_head_and_wide_head(task, tmp_path):
    # A separate process: pretraining enables TensorFlow's op determinism for the whole process.
    models = tmp_path / "models"
    process = run(
        sys.executable,
        "-m",
        "tfstack.pipeline.demo",
        "pretrain",
        task["source"],
        models,
        "--epochs",
        "2",
        cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    assert result["source_test_accuracy"] > 0.5  # chance is 0.2
    assert result["layers"]["base"][:5] == ["image", "conv1", "bn1", "relu1", "conv2"]

    base = keras.saving.load_model(models / "base.keras")
    head = keras.saving.load_model(models / "head.keras")
    head_wide = keras.saving.load_model(models / "head_wide.keras")
    assert base.input.shape == (None, 8, 8, 1) and base.output.shape == (None, 32)
    assert head.input.shape == (None, 32) and head.output.shape == (None, 5)
    assert head_wide.input.shape == (None, 64) and head_wide.output.shape == (None, 5)
    assert base.get_layer("conv2").output.shape == (None, 8, 8, 32)
    assert [layer.name for layer in head.layers] == ["features_in", "classifier"]

    # The saved parts, stacked again, are the trained classifier.
    with np.load(task["source"]) as source:
        x_test, y_test = source["x_test"], source["y_test"]
    predictions = head.predict(base.predict(x_test, verbose=0), verbose=0)
    accuracy = float(np.mean(predictions.argmax(axis=1) == y_test))
    assert accuracy == pytest.approx(result["source_test_accuracy"], abs=1e-6)
