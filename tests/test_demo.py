"""Tests of the digits demo: byte-stable raw PNGs tracked by DVC, the transfer task, components."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tfstack.data import file_hash
from tfstack.errors import DataError
from tfstack.file_hashes import sha256_of
from tfstack.pipeline.demo import (
    digits_to_pixels,
    make_transfer_task,
    pixels_to_digits,
    write_raw_digits,
)
from tfstack.png_files import encode_gray_png

ROOT = Path(__file__).resolve().parents[1]
# The sha256 of encode_gray_png of the test image below, fixed: the encoder's bytes never vary.
PNG_SHA256 = "278336662f63be834f349be5fb274937cde93ca24de704ffa2b6e097c67fae3d"
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


def _pngs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


@pytest.mark.slow  # the raw PNGs and the task take seconds to write
def test_write_raw_digits_holds_all_digits_as_png_class_folders(raw_path):
    assert raw_path.name == "digits"
    files = _pngs(raw_path)
    assert len(files) == 1797 and files[0] == "0/0000.png"
    counts = [len(list((raw_path / str(d)).glob("*.png"))) for d in range(10)]
    assert counts == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    with Image.open(raw_path / "0" / "0000.png") as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8))
        assert np.asarray(image).dtype == np.uint8


def test_the_pixel_mapping_is_exact_and_reversible():
    """Pixels 0..16 are stored as round(v * 255 / 16): 17 distinct values from 0 to 255."""
    values = np.arange(17)
    pixels = digits_to_pixels(values)
    assert pixels.dtype == np.uint8 and (pixels[0], pixels[8], pixels[16]) == (0, 128, 255)
    assert len(set(pixels.tolist())) == 17
    assert np.array_equal(pixels_to_digits(pixels), values)


def test_the_png_encoder_gives_the_same_bytes_that_any_decoder_reads():
    pixels = digits_to_pixels(np.arange(64).reshape(8, 8) % 17)
    data = encode_gray_png(pixels)
    assert data == encode_gray_png(pixels.copy())  # the bytes depend on the pixels alone
    assert hashlib.sha256(data).hexdigest() == PNG_SHA256  # and on nothing of this machine
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode) == ("PNG", "L")
        assert np.array_equal(np.asarray(image), pixels)
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_gray_png(pixels.astype(np.float32))


@pytest.mark.slow
def test_the_pngs_hold_scikit_learns_pixels_exactly(raw_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index in (0, 5, 1796):
        [path] = raw_path.glob(f"*/{index:04d}.png")
        assert int(path.parent.name) == digits.target[index]
        with Image.open(path) as image:
            assert np.array_equal(pixels_to_digits(np.asarray(image)), digits.images[index])


@pytest.mark.slow
def test_write_raw_digits_is_byte_identical_across_runs_and_processes(raw_path, tmp_path):
    again = write_raw_digits(tmp_path / "again")
    process = run(
        sys.executable, "-m", "tfstack.pipeline.demo", "write-raw", tmp_path / "cli", cwd=tmp_path
    )

    assert process.returncode == 0, process.stderr
    assert _pngs(again) == _pngs(raw_path)
    assert sha256_of(again) == sha256_of(raw_path)
    assert sha256_of(tmp_path / "cli" / "digits") == sha256_of(raw_path)
    assert sha256_of(raw_path) in process.stdout
    # Written again over itself: the same bytes, no leftover scratch folder.
    write_raw_digits(tmp_path / "again")
    assert sha256_of(again) == sha256_of(raw_path)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["digits"]


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
    with (clone / "data" / "digits" / "7" / "0007.png").open("ab") as f:
        f.write(b"\0")
    status = run(sys.executable, "-m", "dvc", "status", "data.dvc", "--json", cwd=clone)
    assert json.loads(status.stdout) == {"data.dvc": [{"changed outs": {"data": "modified"}}]}


@pytest.mark.slow  # the raw PNGs and the task take seconds to write
def test_make_transfer_task_sizes_and_labels(task):
    assert task["sizes"] == {
        "source": {"train": 721, "test": 180},
        "target": {"train": 50, "test": 846},
    }
    target = task["target"]
    assert sorted(p.name for p in (target / "train").iterdir()) == ["5", "6", "7", "8", "9"]
    assert [len(list((target / "train" / d).glob("*.png"))) for d in "56789"] == [10] * 5
    assert sorted(p.name for p in (task["source"] / "test").iterdir()) == ["0", "1", "2", "3", "4"]
    assert not (target / "val").exists()  # the validation split is taken by data.val_fraction
    with np.load(task["source"].with_suffix(".npz")) as source:
        with np.load(task["target"].with_suffix(".npz")) as arrays:
            for split in (source, arrays):
                for name in ("x_train", "x_test"):
                    assert split[name].shape[1:] == (8, 8, 1)
                    assert split[name].dtype == np.uint8 and split[name].max() == 255
            assert np.bincount(arrays["y_train"]).tolist() == [10, 10, 10, 10, 10]
            assert arrays["class_names"].tolist() == ["5", "6", "7", "8", "9"]
        assert np.bincount(source["y_test"]).tolist() == [36, 36, 35, 37, 36]
        assert sorted(set(source["y_train"].tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.slow  # the raw PNGs and the task take seconds to write
def test_make_transfer_task_uses_every_image_once(task, raw_path):
    """Each raw PNG is in exactly one split of one task, under its own digit, byte for byte."""
    raw = {p.name: p for p in raw_path.rglob("*.png")}
    seen = []
    for name in ("source", "target"):
        for path in task[name].rglob("*.png"):
            seen.append(path.name)
            assert path.parent.name == raw[path.name].parent.name
            assert path.read_bytes() == raw[path.name].read_bytes()
    assert sorted(seen) == sorted(raw)


@pytest.mark.slow  # the raw PNGs and the task take seconds to write
def test_make_transfer_task_is_deterministic_given_seed(task, raw_path, tmp_path):
    same = make_transfer_task(raw_path, tmp_path / "same", seed=0)
    other = make_transfer_task(raw_path, tmp_path / "other", seed=1, target_train_per_class=3)

    for name in ("source", "target"):
        assert sha256_of(same[name]) == sha256_of(task[name])
        assert file_hash(same[name].with_suffix(".npz")) == file_hash(
            task[name].with_suffix(".npz")
        )
    assert sha256_of(other["target"]) != sha256_of(task["target"])
    assert other["sizes"]["target"] == {"train": 15, "test": 881}


@pytest.mark.slow  # the raw PNGs and the task take seconds to write
def test_make_transfer_task_errors(raw_path, tmp_path):
    with pytest.raises(DataError, match="target_train_per_class must be between 1 and"):
        make_transfer_task(raw_path, tmp_path, seed=0, target_train_per_class=0)
    with pytest.raises(DataError, match="python -m tfstack.pipeline.demo write-raw"):
        make_transfer_task(tmp_path / "missing", tmp_path, seed=0)


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
    with np.load(task["source"].with_suffix(".npz")) as source:
        x_test, y_test = source["x_test"] / np.float32(255), source["y_test"]
    predictions = head.predict(base.predict(x_test, verbose=0), verbose=0)
    accuracy = float(np.mean(predictions.argmax(axis=1) == y_test))
    assert accuracy == pytest.approx(result["source_test_accuracy"], abs=1e-6)
