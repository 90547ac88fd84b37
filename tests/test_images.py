"""Image folders and CSVs as streamed datasets: layouts, formats, decoding, order, errors.

Images are written by each test into ``tmp_path`` (PIL), a few pixels each, so every test runs
in seconds; decoding is compared with ``keras.utils.image_dataset_from_directory`` itself.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from project_copy import tfstack

from tfstack.datasets import ArrayDataset
from tfstack.errors import DataError
from tfstack.image_files import ImageOptions, find_image_folder, load_csv
from tfstack.images import ImageDataset, check_fits, naming_unreadable_files


def _write(path, seed=0, size=(6, 10), mode="RGB", fmt=None):
    """A random image of ``size`` (height, width) in ``mode``, saved by extension (or ``fmt``)."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(*size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path, format=fmt)
    return path


def _folder(root, classes=("cat", "dog"), per_class=4, ext=".png", **kwargs):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _write(root / name / f"{i:02d}{ext}", seed=100 * c + i, **kwargs)
    return root


def _all(dataset):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# Layouts and splits
# ---------------------------------------------------------------------------------------------


def test_train_val_test_folders_give_their_splits_and_sorted_class_names(tmp_path):
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        _folder(tmp_path / split, classes=("zebra", "ant"), per_class=n)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored, as Keras
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class, as in Keras
    splits = find_image_folder(tmp_path)
    assert splits.class_names == ["ant", "zebra"]
    assert splits.summary()["sizes"] == {"train": 6, "val": 4, "test": 2}
    assert list(splits.y_train) == [0, 0, 0, 1, 1, 1]
    assert all("/train/" in f for f in splits.train_files)
    assert all("/test/" in f for f in splits.test_files)
    assert splits.summary()["class_names"] == ["ant", "zebra"]


def test_without_val_folder_validation_comes_from_train(tmp_path):
    _folder(tmp_path / "train", per_class=5)
    _folder(tmp_path / "test", per_class=1)
    splits = find_image_folder(tmp_path, val_fraction=0.2)
    assert splits.summary()["sizes"] == {"train": 8, "val": 2, "test": 2}
    assert sorted(splits.y_val) == [0, 1]  # stratified: one of each class
    assert all("/train/" in f for f in splits.val_files)


def test_one_class_folder_split_is_stratified_seeded_stable_and_disjoint(tmp_path):
    _folder(tmp_path, classes=("a", "b", "c"), per_class=10)
    first = find_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.3, seed=3)
    again = find_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.3, seed=3)
    other = find_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.3, seed=4)

    assert first.summary()["sizes"] == {"train": 17, "val": 4, "test": 9}
    assert first.summary()["class_counts"]["test"] == {"0": 3, "1": 3, "2": 3}
    assert set(first.y_val) == {0, 1, 2}
    parts = [set(first.train_files), set(first.val_files), set(first.test_files)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 30
    assert first.test_files == again.test_files and first.val_files == again.val_files
    assert first.test_files != other.test_files
    assert first.train_files == sorted(first.train_files)  # input order is the sorted order


def test_no_test_split_names_the_key(tmp_path):
    _folder(tmp_path / "train")
    with pytest.raises(DataError, match=r"has no test split.*data\.test_fraction"):
        find_image_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Formats and decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".PNG"])
@pytest.mark.parametrize("color_mode", ["grayscale", "rgb", "rgba"])
def test_every_format_decodes_in_every_color_mode(tmp_path, ext, color_mode):
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".PNG": "PNG"}.get(ext)
    _folder(tmp_path, per_class=2, ext=ext, fmt=fmt)
    splits = find_image_folder(tmp_path, val_fraction=0.25, test_fraction=0.25)
    options = ImageOptions((5, 7), color_mode=color_mode)
    data = ImageDataset(
        splits.train_files, splits.y_train, options, batch_size=2, shuffle=False, seed=0
    )
    x, y = _all(data.batches())
    assert x.shape == (2, 5, 7, options.channels) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 255 and x.max() > 1


@pytest.mark.parametrize(
    ("image_size", "color_mode", "interpolation", "crop"),
    [
        ((4, 4), "rgb", "bilinear", False),
        ((9, 5), "grayscale", "nearest", False),
        ((4, 4), "rgb", "bicubic", True),
        ((3, 8), "rgba", "area", True),
    ],
)
def test_decoding_equals_keras_image_dataset_from_directory(
    tmp_path, image_size, color_mode, interpolation, crop
):
    _folder(tmp_path, per_class=3, mode="RGBA" if color_mode == "rgba" else "RGB")
    expected = keras.utils.image_dataset_from_directory(
        tmp_path,
        image_size=image_size,
        color_mode=color_mode,
        interpolation=interpolation,
        crop_to_aspect_ratio=crop,
        shuffle=False,
        batch_size=4,
        verbose=False,
    )
    keras_x, keras_y = _all(expected)
    splits = find_image_folder(tmp_path, val_fraction=0.25, test_fraction=0.25)
    files = sorted(splits.train_files + splits.val_files + splits.test_files)
    labels = np.array([0 if "/cat/" in f else 1 for f in files])
    options = ImageOptions(image_size, color_mode, interpolation, crop)
    ours = ImageDataset(files, labels, options, batch_size=4, shuffle=False, seed=0)
    x, y = _all(ours.batches())
    np.testing.assert_array_equal(y, keras_y)
    np.testing.assert_allclose(x, keras_x.astype(np.float32), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Order and cached features
# ---------------------------------------------------------------------------------------------


def test_epoch_seeded_order_equals_array_datasets_order(tmp_path):
    _folder(tmp_path, classes=("a",), per_class=11, size=(2, 2))
    files = sorted(str(p) for p in tmp_path.rglob("*.png"))
    index = np.arange(11)  # the targets name each sample's index
    options = ImageOptions((2, 2))
    images = ImageDataset(
        files, index, options, batch_size=4, shuffle=True, seed=5, epoch_seeded=True
    )
    arrays = ArrayDataset(
        np.zeros((11, 1)), index, batch_size=4, shuffle=True, seed=5, epoch_seeded=True
    )
    orders = []
    for epoch in (0, 1, 0):
        images.set_epoch(epoch)
        arrays.set_epoch(epoch)
        image_order = [list(y.numpy()) for _, y in images.batches()]
        assert image_order == [list(y.numpy()) for _, y in arrays.batches()]
        orders.append(image_order)
    assert orders[0] == orders[2] != orders[1]
    assert (len(images), images.steps) == (11, 3)


def test_with_inputs_gathers_the_rows_of_the_same_samples(tmp_path):
    _folder(tmp_path, classes=("a", "b"), per_class=5, size=(3, 3))
    splits = find_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.2)
    options = ImageOptions((3, 3))
    data = ImageDataset(
        splits.train_files,
        splits.y_train,
        options,
        batch_size=2,
        shuffle=True,
        seed=1,
        epoch_seeded=True,
    )
    # A "frozen feature" per sample: its image's mean, in input order.
    features = np.concatenate([b.numpy().mean(axis=(1, 2, 3)) for b in data.input_batches()])
    data.set_epoch(2)
    decoded = [(x.numpy().mean(axis=(1, 2, 3)), y.numpy()) for x, y in data.batches()]
    gathered = [(f.numpy(), y.numpy()) for f, y in data.with_inputs(features)]
    for (mean, y), (feature, y_gathered) in zip(decoded, gathered, strict=True):
        np.testing.assert_allclose(mean, feature, rtol=1e-6)
        np.testing.assert_array_equal(y, y_gathered)


@pytest.mark.slow
def test_evaluate_streams_batches_with_the_arrays_result(tmp_path):
    from tfstack.evaluation import evaluate

    _folder(tmp_path, classes=("a", "b"), per_class=4, size=(4, 4))
    splits = find_image_folder(tmp_path, val_fraction=0.25, test_fraction=0.25)
    data = ImageDataset(
        splits.train_files,
        splits.y_train,
        ImageOptions((4, 4)),
        batch_size=3,
        shuffle=False,
        seed=0,
    )
    x, y = _all(data.batches())
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    streamed = evaluate(model, data.batches(), splits.y_train, task="classification")
    in_memory = evaluate(model, x, y, task="classification", batch_size=3)
    assert streamed.metrics == pytest.approx(in_memory.metrics, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def _csv(tmp_path, labels, extra_rows=""):
    rows = []
    for i, label in enumerate(labels):
        _write(tmp_path / "img" / f"{i}.png", seed=i, size=(3, 3))
        rows.append(f"img/{i}.png,{label}")
    path = tmp_path / "labels.csv"
    path.write_text("file,target\n" + "\n".join(rows) + "\n" + extra_rows)
    return path


@pytest.mark.parametrize(
    ("labels", "dtype", "class_names"),
    [
        (["dog", "cat", "emu"] * 4, np.int64, ["cat", "dog", "emu"]),
        ([2, 0, 1] * 4, np.int64, None),
        ([0.5, 1, 2.25] * 4, np.float32, None),
    ],
)
def test_csv_labels_are_class_names_integers_or_regression_targets(
    tmp_path, labels, dtype, class_names
):
    path = _csv(tmp_path, labels)
    splits = load_csv(
        path, path_column="file", label_column="target", val_fraction=0.25, test_fraction=0.25
    )
    assert splits.class_names == class_names and splits.y_train.dtype == dtype
    assert splits.summary()["sizes"] == {"train": 7, "val": 2, "test": 3}  # val: 0.25 of 9
    every = dict(
        zip(
            splits.train_files + splits.val_files + splits.test_files,
            np.concatenate([splits.y_train, splits.y_val, splits.y_test]),
            strict=True,
        )
    )
    first = every[str(tmp_path / "img" / "0.png")]
    assert (class_names[first] if class_names else first) == labels[0]


def test_csv_row_whose_file_is_missing_names_the_csv_line_and_path(tmp_path):
    path = _csv(tmp_path, ["a", "b"] * 3, extra_rows="img/gone.png,a\n")
    with pytest.raises(DataError) as err:
        load_csv(path, path_column="file", label_column="target")
    assert str(err.value).startswith(f"{path} line 8: img/gone.png does not exist")


def test_csv_missing_column_names_the_key(tmp_path):
    path = _csv(tmp_path, ["a", "b"] * 3)
    with pytest.raises(
        DataError, match=r"no column 'label' \(data\.label_column\).*\['file', 'target'\]"
    ):
        load_csv(path, path_column="file", label_column="label")


# ---------------------------------------------------------------------------------------------
# Errors name the file or the key
# ---------------------------------------------------------------------------------------------


def test_empty_class_folder_is_named(tmp_path):
    _folder(tmp_path / "train")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/empty holds no image"):
        find_image_folder(tmp_path, test_fraction=0.2)


def test_class_in_test_that_train_lacks_is_named(tmp_path):
    _folder(tmp_path / "train")
    _folder(tmp_path / "test", classes=("cat", "owl"), per_class=1)
    with pytest.raises(DataError, match=r"test/owl is a class that train/ lacks"):
        find_image_folder(tmp_path)


def test_file_that_is_not_an_image_is_named_up_front(tmp_path):
    _folder(tmp_path / "train")
    _folder(tmp_path / "test", per_class=1)
    bad = tmp_path / "train" / "cat" / "fake.png"
    bad.write_text("<html>not a png</html>")
    with pytest.raises(DataError, match=rf"{bad} is not an image"):
        find_image_folder(tmp_path)


@pytest.mark.slow
def test_truncated_png_is_named_when_its_batch_is_decoded(tmp_path):
    _folder(tmp_path, per_class=3)
    bad = tmp_path / "dog" / "01.png"
    bad.write_bytes(bad.read_bytes()[:40])  # the header survives, the pixels do not
    splits = find_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.2)  # header: fine
    files = sorted(splits.train_files + splits.val_files + splits.test_files)
    data = ImageDataset(
        files, np.zeros(len(files)), ImageOptions((4, 4)), batch_size=2, shuffle=False, seed=0
    )
    with pytest.raises(DataError) as err, naming_unreadable_files(data):
        _all(data.batches())
    message = str(err.value)
    assert message.startswith(f"cannot decode {bad} (") and "\n" not in message


def test_other_tensorflow_errors_pass_unchanged(tmp_path):
    _folder(tmp_path, per_class=1)
    data = ImageDataset(
        sorted(map(str, tmp_path.rglob("*.png"))),
        np.zeros(2),
        ImageOptions((2, 2)),
        batch_size=1,
        shuffle=False,
        seed=0,
    )
    with pytest.raises(tf.errors.InvalidArgumentError), naming_unreadable_files(data):
        raise tf.errors.InvalidArgumentError(None, None, "something else")


def test_channel_mismatch_names_color_mode(tmp_path):
    with pytest.raises(DataError) as err:
        check_fits(ImageOptions((8, 8), color_mode="rgb"), (8, 8, 1), model="components.base")
    assert str(err.value) == (
        "data.color_mode=rgb gives 3 channels, but components.base takes 1 (input (8, 8, 1)): "
        "set data.color_mode=grayscale."
    )
    with pytest.raises(
        DataError, match=r"data\.image_size=\[8, 8\] .* set data\.image_size=\[4, 4\]"
    ):
        check_fits(ImageOptions((8, 8), color_mode="grayscale"), (4, 4, 1), model="the base")


def test_content_hash_follows_the_bytes_not_the_folder(tmp_path):
    _folder(tmp_path / "a" / "train")
    _folder(tmp_path / "a" / "test", per_class=1)
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = find_image_folder(tmp_path / "a").content_hash()
    assert find_image_folder(tmp_path / "b").content_hash() == first
    _write(tmp_path / "b" / "train" / "cat" / "00.png", seed=999)
    assert find_image_folder(tmp_path / "b").content_hash() != first


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_config_composes_images_and_refuses_image_options_for_npz():
    from pathlib import Path

    from tfstack.errors import ConfigError
    from tfstack.pipeline.compose import compose

    conf = Path(__file__).resolve().parents[1] / "conf"
    config = compose(["data=images", "data.path=pics"], config_dir=conf)
    assert (config.data.format, config.data.color_mode, config.data.test_fraction) == (
        "images",
        "rgb",
        0.0,
    )
    with pytest.raises(
        ConfigError, match=r"data\.color_mode='rgb' applies only to data=images or data=csv"
    ):
        compose(["data=npz", "data.path=x.npz", "data.color_mode=rgb"], config_dir=conf)


@pytest.mark.slow
def test_cached_frozen_phase_on_images_equals_the_uncached_phase(tmp_path):
    """tests/test_training.py's comparison, on images decoded from files."""
    from conftest import make_base, make_head

    from tfstack.freezing import FreezePolicy
    from tfstack.schedules import Phase
    from tfstack.stacking import build_stacked
    from tfstack.training import run_schedule

    _folder(tmp_path, classes=("a", "b", "c"), per_class=8, size=(8, 8), mode="L")
    splits = find_image_folder(tmp_path, val_fraction=0.25, test_fraction=0.1)
    options = ImageOptions((8, 8), color_mode="grayscale")

    def train(cache):
        keras.utils.set_random_seed(0)
        stack = build_stacked("sequential", make_base(), make_head())
        train_ds = ImageDataset(
            splits.train_files,
            splits.y_train,
            options,
            batch_size=4,
            shuffle=True,
            seed=7,
            epoch_seeded=True,
        )
        val_ds = ImageDataset(
            splits.val_files, splits.y_val, options, batch_size=4, shuffle=False, seed=0
        )
        results = run_schedule(
            stack.model,
            [Phase("head", 3, FreezePolicy("frozen"), 0.01)],
            train_ds,
            val_ds,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            feature_extractors=["base"],
            verbose=0,
            cache_frozen=cache,
        )
        return stack.model, results[0]

    tf.config.experimental.enable_op_determinism()
    plain, plain_result = train(False)
    cached, cached_result = train(True)
    assert cached_result.cached and not plain_result.cached
    for a, b in zip(plain.get_weights(), cached.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for key, values in plain_result.history.items():
        np.testing.assert_allclose(cached_result.history[key], values, rtol=1e-6, atol=1e-7)


def _digit_folder(root, project):
    """The demo's target digits (8x8, pixels 0..255) as 8-bit grayscale PNGs in train/ and test/."""
    with np.load(project / "outputs" / "prepare" / "target.npz") as data:
        for split in ("train", "test"):
            x, y = data[f"x_{split}"], data[f"y_{split}"]
            # All five classes: one class folder per output of the demo head (a class name
            # for each; fewer folders than the head's classes is refused, naming both).
            for i, (image, label) in enumerate(zip(x, y, strict=True)):
                pixels = image[..., 0]  # uint8 0..255, as the demo's PNGs hold them
                path = root / split / f"digit{label}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "L").save(path)
    return root


@pytest.mark.slow
def test_tfstack_run_on_an_image_folder_finishes_with_metrics(project):
    from mlflow.tracking import MlflowClient

    _digit_folder(project / "pics", project)
    result = tfstack(project, "run", "data=images", "data.path=pics", "data.color_mode=grayscale")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(run.data.tags["data_hash"]) == 64  # the folder's content hash, not an md5
    assert "test_accuracy" in run.data.metrics


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_png", "rgb_for_a_grayscale_base"])
def test_bad_images_fail_the_run_in_one_line_naming_the_file_or_key(project, capsys, damage):
    from test_errors import assert_left_clean, fail

    folder = _digit_folder(project / "pics", project)
    overrides = ["run", "data=images", "data.path=pics", "data.color_mode=grayscale"]
    if damage == "truncated_png":
        bad = sorted((folder / "train" / "digit1").glob("*.png"))[2]
        bad.write_bytes(bad.read_bytes()[:45])
        expected = f"tfstack: error: cannot decode {bad.resolve()} ("
    else:
        overrides[-1] = "data.color_mode=rgb"
        expected = "tfstack: error: data.color_mode=rgb gives 3 channels, but the stacked model"
    line = fail(capsys, *overrides)
    assert line.startswith(expected), line
    assert_left_clean(project, completed=("build",))


def test_preflight_wants_a_folder_for_images_and_a_file_for_csv(tmp_path):
    from tfstack.pipeline import preflight
    from tfstack.pipeline.paths import Paths

    paths = Paths(root=tmp_path, out=tmp_path / "outputs")
    _write(tmp_path / "one.png")
    (tmp_path / "pics").mkdir()
    preflight.check_data_path("pics", paths, data_format="images")
    with pytest.raises(DataError, match=r"^data\.path=one\.png is a file, not a directory"):
        preflight.check_data_path("one.png", paths, data_format="images")
    with pytest.raises(DataError, match=r"^data\.path=pics is a directory, not a file\. .*CSV"):
        preflight.check_data_path("pics", paths, data_format="csv")


def test_csv_content_hash_covers_the_csv_itself(tmp_path):
    path = _csv(tmp_path, ["a", "b"] * 3)
    before = load_csv(path, path_column="file", label_column="target").content_hash()
    path.write_text(path.read_text().replace("img/0.png,a", "img/0.png,b"))
    assert load_csv(path, path_column="file", label_column="target").content_hash() != before


# ---------------------------------------------------------------------------------------------
# preprocess=normalize on image files (issue 13, point 8: adapted batch by batch)
# ---------------------------------------------------------------------------------------------

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_normalize_adapts_on_the_decoded_training_images(tmp_path):
    # Before: 'FileSplits' object has no attribute 'x_train' (an AttributeError, no run).
    from tfstack.pipeline.compose import compose
    from tfstack.pipeline.inputs import make_front
    from tfstack.pipeline.paths import Paths

    _folder(tmp_path / "images" / "train", per_class=5)
    _folder(tmp_path / "images" / "test", per_class=1)
    config = compose(
        ["data=images", f"data.path={tmp_path / 'images'}", "preprocess=normalize"],
        config_dir=CONF,
    )
    paths = Paths(root=tmp_path, out=tmp_path / "outputs")
    base = keras.Sequential([keras.Input((6, 10, 3)), keras.layers.Conv2D(2, 1)], name="base")

    (preprocess,) = make_front(config, paths, base)

    (layer,) = [lay for lay in preprocess.layers if isinstance(lay, keras.layers.Normalization)]
    splits = find_image_folder(tmp_path / "images", val_fraction=0.2, seed=config.seed)
    pixels = np.stack([np.asarray(Image.open(f), "float64") for f in splits.train_files])
    assert len(splits.train_files) == 8  # the training split only, not val/ or test/
    np.testing.assert_allclose(np.ravel(layer.mean), pixels.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(np.ravel(layer.variance), pixels.var(axis=(0, 1, 2)), rtol=1e-4)
