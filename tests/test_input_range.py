"""Tests of tfstack.input_range: the range of the data against what the first layers expect.

Unit tests use tiny models built here (the base nested in a stacked model, as tfstack trains it)
and two Keras Applications models with and without their own preprocessing; one end-to-end test
runs `tfstack run` on uint8 images and checks the warning line, the run tag and the FINISHED run.
"""

from __future__ import annotations

import tracemalloc

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from project_copy import clone, tfstack

from tfstack.input_range import check_input_range, value_range
from tfstack.pipeline import demo

SHAPE = (8, 8, 1)


def stacked(*first_layers, input_shape=SHAPE, dtype="float32") -> keras.Model:
    """A tiny base (``first_layers`` then a Conv2D) nested in a stacked model with a head."""
    image = keras.Input(input_shape, dtype=dtype, name="image")
    x = image
    for layer in first_layers:
        x = layer(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(x)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    base = keras.Model(image, features, name="base")
    head = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="classifier")], name="head"
    )
    inputs = keras.Input(input_shape, dtype=dtype)
    return keras.Model(inputs, head(base(inputs)), name="stacked")


def uint8_images(n: int = 40, shape=SHAPE) -> np.ndarray:
    x = np.random.default_rng(0).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x[0].flat[0], x[0].flat[1] = 0, 255  # the full range
    return x


def kinds(x: np.ndarray, model: keras.Model) -> list[str]:
    return [warning.kind for warning in check_input_range(x, model)]


def test_uint8_images_into_a_base_without_rescaling_warn_and_name_the_fix():
    warnings = check_input_range(uint8_images(), stacked(), key="data.path=u8.npz x_train")

    assert [w.kind for w in warnings] == ["unscaled_images"]
    message = warnings[0].message
    assert message.startswith(
        "data.path=u8.npz x_train holds images with uint8 values from 0 to 255"
    )
    assert "no rescaling layer before its first layer 'conv1'" in message
    assert "keras.layers.Rescaling(1/255)" in message
    assert "include_preprocessing=True" in message
    assert "x.astype('float32') / 255" in message
    assert warnings[0].summary == "uint8 images 0..255, no rescaling layer"


def test_whole_number_float_images_up_to_255_warn_too():
    x = uint8_images().astype("float32")
    warnings = check_input_range(x, stacked())
    assert [w.kind for w in warnings] == ["unscaled_images"]
    assert "whole-number float32 values from 0 to 255" in warnings[0].message


def test_a_rescaling_first_layer_silences_the_warning():
    model = stacked(keras.layers.Rescaling(1 / 255, name="rescale"))
    assert kinds(uint8_images(), model) == []


def test_float_data_in_0_1_does_not_warn():
    x = uint8_images().astype("float32") / 255
    assert kinds(x, stacked()) == []
    assert kinds(x * 2 - 1, stacked()) == []  # [-1, 1]
    assert kinds(np.random.default_rng(1).normal(size=(40, *SHAPE)), stacked()) == []  # z-scores


def test_float_data_of_range_1000_warns():
    x = np.random.default_rng(2).uniform(-1000, 1000, size=(40, *SHAPE)).astype("float32")
    x[0, 0, 0, 0], x[0, 0, 1, 0] = -1000, 1000

    warnings = check_input_range(x, stacked())

    assert [w.kind for w in warnings] == ["large_values"]
    message = warnings[0].message
    assert (
        "float32 values from -1000 to 1000, which reach the model's first layer 'conv1'" in message
    )
    assert "keras.layers.Normalization" in message and "x_train.std()" in message
    assert warnings[0].summary == "values -1000..1000 reach conv1"


def test_a_rescaling_too_weak_for_the_data_still_warns_and_names_it():
    x = np.full((4, *SHAPE), 25_500.0, dtype="float32")
    x[0] = 0
    warnings = check_input_range(x, stacked(keras.layers.Rescaling(1 / 255, name="rescale")))
    assert [w.kind for w in warnings] == ["large_values"]
    assert "after the model's 'rescale' still 0 to 100" in warnings[0].message


def test_first_layers_that_take_ids_or_normalize_by_their_own_statistics_do_not_warn():
    ids = np.random.default_rng(3).integers(0, 1000, size=(40, 6))
    text_model = keras.Sequential(
        [keras.Input((6,), dtype="int32"), keras.layers.Embedding(1000, 4), keras.layers.Dense(2)]
    )
    assert kinds(ids, text_model) == []
    assert kinds(uint8_images(), stacked(keras.layers.BatchNormalization(name="bn0"))) == []
    assert kinds(uint8_images(), stacked(keras.layers.LayerNormalization(name="ln0"))) == []


@pytest.mark.slow
def test_keras_applications_with_their_own_preprocessing():
    """MobileNetV3 rescales 0..255 to [-1, 1] itself: raw pixels fit, pre-scaled pixels do not."""
    images = uint8_images(8, (32, 32, 3))
    with_preprocessing = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, include_top=False
    )
    without = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, include_top=False, include_preprocessing=False
    )

    assert kinds(images, with_preprocessing) == []
    assert kinds(images, without) == ["unscaled_images"]
    assert kinds(images / np.float32(255), without) == []
    twice = check_input_range(images / np.float32(255), with_preprocessing)
    assert [w.kind for w in twice] == ["scaled_twice"]
    assert "they span only 0.0078 at its first layer 'conv'" in twice[0].message
    assert "include_preprocessing=False" in twice[0].message


def test_per_channel_normalization_is_followed_channel_by_channel():
    """ImageNet mean/std per channel (as ConvNeXt starts): 0..255 fits, [0, 1] is scaled twice."""
    normalization = keras.layers.Normalization(
        mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
        variance=[(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2],
        name="prestem",
    )
    model = stacked(normalization, input_shape=(8, 8, 3))
    images = uint8_images(8, (8, 8, 3))
    assert kinds(images, model) == []
    assert kinds(images / np.float32(255), model) == ["scaled_twice"]


def test_an_adapted_normalization_is_read_after_a_reload(tmp_path):
    """train reloads the built model from .keras: the adapted mean and variance must count."""
    pixels = np.random.default_rng(4).uniform(0, 255, size=(40, *SHAPE)).astype("float32")
    normalization = keras.layers.Normalization(name="adapted")
    normalization.adapt(pixels)
    stacked(normalization).save(tmp_path / "stacked.keras")
    model = keras.models.load_model(tmp_path / "stacked.keras")

    assert kinds(pixels, model) == []
    assert kinds(pixels / 255, model) == ["scaled_twice"]


def test_the_demo_data_does_not_warn_through_its_rescaling_and_would_without():
    from sklearn.datasets import load_digits

    # What the demo's PNGs hold (test_demo checks they hold exactly this): uint8 0..255.
    pixels = demo.digits_to_pixels(load_digits().images)[..., np.newaxis]
    base, head, _ = demo.build_components(seed=42)
    inputs = keras.Input(demo.IMAGE_SHAPE)
    bare = keras.Model(inputs, head(base(inputs)))
    # preprocess=rescale, the demo's default: the stacked model takes the PNGs' 0..255 pixels.
    rescaled = keras.Model(inputs, head(base(keras.layers.Rescaling(1 / 255)(inputs))))

    assert kinds(pixels, rescaled) == []
    warnings = check_input_range(pixels, bare)
    assert [w.kind for w in warnings] == ["unscaled_images"]
    assert "Rescaling(1/255)" in warnings[0].message


def test_value_range_scans_in_chunks_without_a_float_copy():
    x = np.zeros((64, 1024, 1024), dtype=np.uint8)  # 64 MiB
    x[17, 3, 5], x[63, -1, -1] = 255, 7
    tracemalloc.start()
    found = value_range(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (found.minimum, found.maximum, found.integral, found.dtype) == (0, 255, True, "uint8")
    assert peak < 1 << 20, peak  # not even one chunk is copied

    floats = np.linspace(-3, 3, 64 * 256 * 256, dtype=np.float32).reshape(64, 256, 256)  # 16 MiB
    tracemalloc.start()
    found = value_range(floats, chunk_elements=1 << 18)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (found.minimum, found.maximum, found.integral) == (-3, 3, False)
    assert peak < 4 << 20, peak  # a few 1 MiB chunks, not a copy of the 16 MiB array


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tfstack_run_on_uint8_images_warns_tags_the_run_and_finishes(template, tmp_path):
    project = clone(template, tmp_path / "project")
    with np.load(project / "outputs" / "prepare" / "target.npz") as data:
        arrays = {k: data[k] for k in data.files}
    assert arrays["x_train"].dtype == np.uint8  # the demo's pixels 0..255, as in its PNGs
    np.savez(project / "u8.npz", **arrays)

    result = tfstack(project, "run", "data=npz", "data.path=u8.npz", "preprocess=none")

    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("tfstack: warning:")]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert warnings[0].startswith(
        "tfstack: warning: data.path=u8.npz x_train holds images with uint8 values from 0 to 255"
    )
    assert "keras.layers.Rescaling(1/255)" in warnings[0]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["input_range_warning"] == "uint8 images 0..255, no rescaling layer"
