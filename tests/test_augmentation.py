"""Augmentation as seeded Keras layers in front of the base: active in fit, identity in predict,
the same for the same seed, and in front of a frozen base it stops the phase's caching, saying
why. Random layers inside a frozen base are switched off, but never silently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_base, make_data, make_head
from mlflow import MlflowClient

from tfstack import cli
from tfstack.augmentation import build_augmentation
from tfstack.datasets import ArrayDataset
from tfstack.errors import ConfigError, ShapeError
from tfstack.freezing import FreezePolicy
from tfstack.pipeline.compose import compose
from tfstack.pipeline.records import _inference_mode_tags
from tfstack.preprocessing import build_preprocessing
from tfstack.schedules import Phase
from tfstack.shapes import TensorSpec, output_specs
from tfstack.stacking import build_stacked
from tfstack.training import fit_phase

LOSS = "sparse_categorical_crossentropy"
FLIP_ROTATE = [
    {"class_name": "RandomFlip", "config": {"mode": "horizontal"}},
    {"class_name": "RandomRotation", "config": {"factor": 0.1}},
]
CONF = Path(__file__).resolve().parents[1] / "conf"
SPEC = TensorSpec((None, 8, 8, 1), "float32")


pytestmark = pytest.mark.usefixtures("deterministic_ops")


def _images(n=16, seed=0):
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


def _stacked(layers=FLIP_ROTATE, *, seed=42, strategy="sequential", preprocess=None):
    keras.utils.set_random_seed(0)
    base, head = make_base(), make_head()
    spec = output_specs(preprocess)[0] if preprocess is not None else SPEC
    augment = build_augmentation(layers, spec, seed=seed) if layers else None
    return build_stacked(strategy, base, head, front=[preprocess, augment])


def _fit(model, *, cache=True, epochs=1):
    x, y = make_data(32)
    train = ArrayDataset(x, y, batch_size=16, shuffle=True, seed=7)
    phase = Phase("head", epochs, FreezePolicy("frozen"), 0.01)
    return fit_phase(
        model, phase, train, None, loss=LOSS, feature_extractors=["base"], verbose=0,
        cache_frozen=cache,
    )  # fmt: skip


def test_each_layer_is_seeded_from_the_run_seed_and_its_position():
    block = build_augmentation(FLIP_ROTATE, SPEC, seed=42)
    assert [(layer.name, layer.seed) for layer in block.layers] == [
        ("augment_0_random_flip", 42),
        ("augment_1_random_rotation", 43),
    ]


@pytest.mark.slow
def test_active_in_training_only_and_identity_in_predict():
    block = build_augmentation(FLIP_ROTATE, SPEC, seed=42)
    x = _images()
    assert not np.allclose(keras.ops.convert_to_numpy(block(x, training=True)), x)
    np.testing.assert_array_equal(block.predict(x, verbose=0), x)
    # The stacked model predicts as its base and head alone.
    stack = _stacked()
    plain = stack.model.get_layer("head")(stack.model.get_layer("base")(x))
    np.testing.assert_allclose(
        stack.model.predict(x, verbose=0), keras.ops.convert_to_numpy(plain), atol=1e-6
    )


def test_the_same_seed_gives_the_same_augmentation():
    x = _images()

    def augmented(seed):
        return keras.ops.convert_to_numpy(
            build_augmentation(FLIP_ROTATE, SPEC, seed=seed)(x, training=True)
        )

    np.testing.assert_array_equal(augmented(42), augmented(42))
    assert not np.allclose(augmented(42), augmented(7))


@pytest.mark.slow  # two fits
def test_a_frozen_phase_with_augmentation_is_not_cached_and_says_why():
    with_augment = _fit(_stacked().model)
    assert not with_augment.cached
    note = with_augment.to_dict()["cache_note"]  # what phases.json keeps
    assert "the input of frozen feature extractor 'base' changes every epoch" in note
    assert "'augment_0_random_flip' (RandomFlip)" in note
    # Augmentation acts in fit: the same data and seed without it train another head.
    without = _fit(_stacked(layers=None).model, cache=False)
    assert with_augment.history["loss"] != without.history["loss"]


@pytest.mark.slow
def test_preprocessing_alone_is_deterministic_so_the_frozen_phase_is_cached():
    preprocess = build_preprocessing("rescale", make_base(), scale=0.5)
    result = _fit(_stacked(layers=None, preprocess=preprocess).model)
    assert result.cached and "cached the outputs of base" in result.cache_note


def _base_with_flip(name="base"):
    inputs = keras.Input((8, 8, 1), name=f"{name}_input")
    x = keras.layers.RandomFlip("horizontal", seed=1, name="baked_flip")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, name="features")(x)
    return keras.Model(inputs, x, name=name)


@pytest.mark.slow
def test_random_layers_inside_a_frozen_base_are_off_but_named_in_a_warning_and_a_tag(caplog):
    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", _base_with_flip(), make_head()).model
    with caplog.at_level(logging.WARNING, logger="tfstack.training"):
        result = _fit(model, cache=False)
    assert result.inference_mode == ["base"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "frozen feature extractor 'base'" in w and "baked_flip (RandomFlip)" in w for w in warnings
    )
    assert _inference_mode_tags(model, [result]) == {
        "phase.0.inference_mode": "base: baked_flip (RandomFlip)"
    }


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [FLIP_ROTATE[0], {"class_name": "RandomZom"}],
            "augment.layers[1]: 'RandomZom' is not an augmentation layer tfstack builds. Use "
            "one of ['RandomFlip', 'RandomRotation', 'RandomZoom'",
        ),
        (
            [{"class_name": "RandomRotation", "config": {"factr": 0.1}}],
            "augment.layers[0]: 'factr' is not a parameter of RandomRotation. Its parameters: "
            "['factor', 'fill_mode', 'interpolation', 'fill_value']",
        ),
        (
            [{"class_name": "RandomFlip", "config": {"seed": 3}}],
            "'seed' is not a parameter of RandomFlip (seeds come from the run's `seed`",
        ),
        (
            [{"class_name": "RandomRotation", "config": {"factor": 0.1, "fill_mode": "bent"}}],
            "augment.layers[0]: RandomRotation({'factor': 0.1, 'fill_mode': 'bent'}) is refused "
            "by Keras: Unknown `fill_mode` bent.",
        ),
    ],
)
def test_bad_layers_are_refused_naming_the_entry_and_the_valid_names(layers, message):
    with pytest.raises(ShapeError) as raised:
        build_augmentation(layers, SPEC, seed=0)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_the_config_refuses_a_bad_layer_before_anything_runs():
    with pytest.raises(ConfigError, match=r"augment.layers\[0\]: 'RandomZom' is not"):
        compose(["augment.layers=[{class_name: RandomZom}]"], config_dir=CONF)
    with pytest.raises(
        ConfigError, match=r"preprocess.family='resnet50' applies only to preprocess=applications"
    ):
        compose(["preprocess=rescale", "preprocess.family=resnet50"], config_dir=CONF)
    config = compose(["preprocess=rescale", "augment=flip_rotate"], config_dir=CONF)
    assert config.preprocess.scale == pytest.approx(1 / 255)
    assert [entry["class_name"] for entry in config.augment.layers] == [
        "RandomFlip",
        "RandomRotation",
    ]


@pytest.mark.slow
def test_tfstack_run_with_rescale_and_flip_rotate_finishes(project, capsys):
    code = cli.main(["run", "preprocess=rescale", "augment=flip_rotate"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["preprocess.kind"] == "rescale"
    assert run.data.tags["phase.0.cached"] == "false"
    (phase,) = json.loads((project / "outputs" / "train" / "phases.json").read_text())
    assert "augment_0_random_flip" in phase["cache_note"]
    model = keras.saving.load_model(project / "outputs" / "train" / "model.keras", safe_mode=True)
    assert [layer.name for layer in model.layers][:2] == ["preprocess", "augment"]


def test_a_value_range_left_at_its_default_is_warned_about(caplog):
    brightness = [{"class_name": "RandomBrightness", "config": {"factor": 0.2}}]
    with caplog.at_level(logging.WARNING, logger="tfstack.augmentation"):
        build_augmentation(brightness, SPEC, seed=0)
    assert "augment.layers[0] RandomBrightness uses Keras's default value_range [0, 255]" in (
        caplog.text
    )
    caplog.clear()
    brightness[0]["config"]["value_range"] = [0, 1]
    with caplog.at_level(logging.WARNING, logger="tfstack.augmentation"):
        build_augmentation(brightness, SPEC, seed=0)
    assert caplog.text == ""
