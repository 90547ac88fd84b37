"""Preprocessing as built-in layers: each family's preprocess_input to 1e-6, normalize adapted on
the training split, no second scaling of a base that preprocesses itself, raw pixels in the
saved model."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_head

from tfstack.augmentation import build_augmentation
from tfstack.components import read_model_config
from tfstack.errors import ConfigError, ShapeError
from tfstack.preprocessing import APPLICATION_MODES, build_preprocessing
from tfstack.shapes import output_specs
from tfstack.stacking import build_stacked
from tfstack.trust import find_code
from tfstack.vocabulary import APPLICATION_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PIXELS = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3)).astype("float32")


def rgb_base(name="base", *, first=()) -> keras.Model:
    """A tiny RGB feature extractor (batch, 8, 8, 3) -> (batch, 8), optionally with ``first``
    layers (its own preprocessing) before its first convolution."""
    inputs = keras.Input((8, 8, 3), name=f"{name}_input")
    x = inputs
    for layer in first:
        x = layer(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, name="features")(x)
    return keras.Model(inputs, x, name=name)


def test_every_family_has_a_mode_and_the_vocabulary_lists_them():
    assert tuple(APPLICATION_MODES) == APPLICATION_FAMILIES
    assert set(APPLICATION_MODES.values()) == {"tf", "torch", "caffe", "none"}


@pytest.mark.parametrize("family", APPLICATION_FAMILIES)
def test_applications_matches_the_familys_own_preprocess_input(family):
    keras_preprocess = importlib.import_module(f"keras.applications.{family}").preprocess_input
    expected = keras_preprocess(PIXELS.copy())
    block = build_preprocessing("applications", rgb_base(), family=family)
    if APPLICATION_MODES[family] == "none":
        # EfficientNet, ConvNeXt, MobileNetV3, ...: preprocess_input is the identity.
        assert block is None
        np.testing.assert_array_equal(expected, PIXELS)
        return
    got = block.predict(PIXELS, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert all(type(layer).__module__.startswith("keras.") for layer in block.layers)


def test_normalize_adapts_to_the_training_split_batch_by_batch():
    rng = np.random.default_rng(1)
    x_train = (rng.normal(size=(50, 8, 8, 3)) * [10, 20, 30] + [100, 50, 5]).astype("float32")
    # Uneven batches of a tf.data pipeline, as streamed data comes.
    batches = tf.data.Dataset.from_tensor_slices(x_train).batch(7)
    block = build_preprocessing("normalize", rgb_base(), train_inputs=batches)
    layer = block.get_layer("preprocess_normalize")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.mean).reshape(-1), x_train.mean(axis=(0, 1, 2)), rtol=1e-4
    )
    np.testing.assert_allclose(
        np.sqrt(keras.ops.convert_to_numpy(layer.variance).reshape(-1)),
        x_train.std(axis=(0, 1, 2)),
        rtol=1e-4,
    )
    out = block.predict(x_train, verbose=0)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_a_base_that_preprocesses_itself_gets_a_warning_not_a_second_scaling(caplog):
    base = rgb_base(first=[keras.layers.Rescaling(1 / 255, name="own_rescaling")])
    with caplog.at_level(logging.WARNING, logger="tfstack.preprocessing"):
        assert build_preprocessing("rescale", base) is None
    assert "already preprocesses its input (own_rescaling)" in caplog.text
    assert "preprocess.force=true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tfstack.preprocessing"):
        forced = build_preprocessing("rescale", base, force=True)
    assert [layer.name for layer in forced.layers] == ["preprocess_rescale"]
    assert "scaled twice" in caplog.text


def test_resize_lets_the_model_take_images_of_any_size():
    block = build_preprocessing("rescale", rgb_base(), resize=True)
    stacked = build_stacked("sequential", rgb_base(), make_head(), front=[block]).model
    assert tuple(stacked.inputs[0].shape) == (None, None, None, 3)
    big = np.random.default_rng(2).integers(0, 256, size=(3, 20, 14, 3)).astype("float32")
    assert stacked.predict(big, verbose=0).shape == (3, 3)
    # (batch, any, any, 3) -> (batch, 8, 8, 3), the base's input.
    assert tuple(output_specs(block)[0].shape) == (None, 8, 8, 3)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sequential", "adapter", "functional"])
def test_the_saved_model_takes_raw_pixels_and_reloads_in_safe_mode(strategy, tmp_path):
    keras.utils.set_random_seed(0)
    base = rgb_base()
    preprocess = build_preprocessing("applications", base, family="resnet50")  # caffe: BGR
    augment = build_augmentation(
        [{"class_name": "RandomFlip", "config": {"mode": "horizontal"}}],
        output_specs(preprocess)[0],
        seed=3,
    )
    stacked = build_stacked(strategy, base, make_head(), front=[preprocess, augment]).model
    names = [
        layer.name for layer in stacked.layers if not isinstance(layer, keras.layers.InputLayer)
    ]
    assert names[:2] == ["preprocess", "augment"] and "base" in names
    expected = stacked.predict(PIXELS, verbose=0)
    # The front is the Keras recipe: preprocess_input, then the base and head (augmentation off).
    direct = stacked.get_layer("head")(
        base(keras.applications.resnet50.preprocess_input(PIXELS.copy()))
    )
    np.testing.assert_allclose(expected, keras.ops.convert_to_numpy(direct), atol=1e-5)
    path = tmp_path / "stacked.keras"
    stacked.save(path)
    assert find_code(read_model_config(str(path), key="test")) == []
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(reloaded.predict(PIXELS, verbose=0), expected)


def test_bad_preprocessing_settings_are_refused_naming_the_key():
    gray = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3)], name="gray")
    with pytest.raises(ShapeError, match=r"preprocess.family=vgg16 preprocesses RGB images"):
        build_preprocessing("applications", gray, family="vgg16")
    with pytest.raises(ShapeError, match=r"preprocess.family='resnet18' is not a Keras"):
        build_preprocessing("applications", gray, family="resnet18")
    with pytest.raises(
        ShapeError, match=r"preprocess.scale=0.5 applies only to preprocess=rescale"
    ):
        build_preprocessing("normalize", gray, scale=0.5, train_inputs=[PIXELS[..., :1]])
    with pytest.raises(ShapeError, match=r"preprocess.force=True applies only to"):
        build_preprocessing("none", gray, force=True)
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="flat")
    with pytest.raises(ShapeError, match=r"preprocess.resize=true resizes images"):
        build_preprocessing("none", flat, resize=True)


def test_the_layer_table_lists_the_front_blocks_and_their_layers():
    from tfstack.shapes import layer_table

    base = rgb_base()
    front = [build_preprocessing("applications", base, family="vgg16")]
    rows = layer_table(build_stacked("adapter", base, make_head(), front=front).model)
    names = [row["name"] for row in rows]
    assert names[0] == "preprocess" and "preprocess/preprocess_bgr" in names
    assert {row["params"] for row in rows if row["name"].startswith("preprocess")} == {0}
    assert rows[names.index("preprocess/preprocess_vgg16_center")]["output_shape"] == [
        None,
        8,
        8,
        3,
    ]


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("keras_applications:MobileNetV2", "mobilenet_v2"),
        ("keras_applications:ResNet50", "resnet"),
        ("keras_applications:EfficientNetB0", "efficientnet"),
    ],
)
def test_applications_takes_the_family_of_a_keras_applications_base(path, family):
    from tfstack.pipeline.compose import compose
    from tfstack.pipeline.inputs import application_family

    conf = ROOT / "conf"
    config = compose(["preprocess=applications", f"components.base.path={path}"], config_dir=conf)
    assert application_family(config) == family
    config = compose(["preprocess=applications"], config_dir=conf)
    with pytest.raises(ConfigError, match=r"preprocess=applications needs preprocess.family="):
        application_family(config)


@pytest.mark.slow
def test_the_build_stage_adapts_normalize_on_the_configured_training_split(project):
    from tfstack.data import load_npz
    from tfstack.pipeline.compose import compose
    from tfstack.pipeline.inputs import load_components, make_front
    from tfstack.pipeline.paths import Paths

    overrides = ["preprocess=normalize", "augment=flip_rotate"]
    arrays = ["data=npz", "data.path=outputs/prepare/target.npz"]  # the demo's images as arrays
    config = compose([*overrides, *arrays], config_dir=project / "conf")
    paths = Paths.from_config(config, project)
    bases, _ = load_components(config, paths)
    preprocess, augment = make_front(config, paths, bases[0])
    assert (preprocess.name, augment.name) == ("preprocess", "augment")
    x_train = load_npz(paths.resolve(config.data.path), val_fraction=0.2, seed=config.seed).x_train
    mean = keras.ops.convert_to_numpy(preprocess.get_layer("preprocess_normalize").mean)
    np.testing.assert_allclose(mean.reshape(-1), x_train.mean(axis=(0, 1, 2)), rtol=1e-4)
    assert [layer.seed for layer in augment.layers] == [config.seed, config.seed + 1]
