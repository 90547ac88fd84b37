"""Adapter planning, building from configs, description, and the Cast layer's round trip."""

import copy
import json

import keras
import numpy as np
import pytest

from tfstack.adapters import (
    Cast,
    build_adapter_layers,
    check_compatibility,
    describe_adapter,
    plan_adapter,
)
from tfstack.errors import ShapeError
from tfstack.shapes import TensorSpec

BATCH = 2


def _sample(spec: TensorSpec) -> np.ndarray:
    """A real batch of the spec's shape (unknown dimensions become 3) and dtype."""
    shape = [BATCH] + [3 if dim is None else dim for dim in spec.shape[1:]]
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 10).astype(spec.dtype)


def _apply(layers: list[keras.layers.Layer], x: np.ndarray):
    for layer in layers:
        x = layer(x)
    return x


# (upstream shape, upstream dtype, downstream shape, downstream dtype, expected layer classes)
RULES = [
    ((None, 4, 4, 2), "float32", (None, 32), "float32", ["Flatten"]),
    ((None, 4, 4, 32), "float32", (None, 32), "float32", ["GlobalAveragePooling2D"]),
    ((None, 4, 4, 8), "float32", (None, 12), "float32", ["GlobalAveragePooling2D", "Dense"]),
    ((None, None, None, 8), "float32", (None, 12), "float32", ["GlobalAveragePooling2D", "Dense"]),
    ((None, 7, 16), "float32", (None, 16), "float32", ["GlobalAveragePooling1D"]),
    ((None, 7, 16), "float32", (None, 12), "float32", ["GlobalAveragePooling1D", "Dense"]),
    ((None, 32), "float32", (None, 4, 4, 2), "float32", ["Reshape"]),
    ((None, 10), "float32", (None, 4, 4, 2), "float32", ["Dense", "Reshape"]),
    ((None, 8, 8, 3), "float32", (None, 16, 16, 3), "float32", ["Resizing"]),
    ((None, 8, 8, 3), "float32", (None, 16, 16, 5), "float32", ["Resizing", "Dense"]),
    ((None, 8, 8, 3), "float32", (None, 8, 8, 5), "float32", ["Dense"]),
    ((None, 10), "float32", (None, 12), "float32", ["Dense"]),
    ((None, 5, 10), "float32", (None, 5, 12), "float32", ["Dense"]),
    ((None, 10), "float32", (None, 10), "float16", ["Cast"]),
    ((None, 10), "float32", (None, 12), "float16", ["Dense", "Cast"]),
    # Flatten keeps an integer dtype, so a Cast follows; pooling already yields float32.
    ((None, 4, 4, 2), "int32", (None, 32), "float32", ["Flatten", "Cast"]),
    ((None, 4, 4, 2), "uint8", (None, 10), "float32", ["GlobalAveragePooling2D", "Dense"]),
    # Every layer autocasts float inputs to float32: float16 in and out still needs a Cast.
    ((None, 4, 4, 2), "float16", (None, 32), "float16", ["Flatten", "Cast"]),
    ((None, 10), "float16", (None, 12), "float32", ["Dense"]),
]


@pytest.mark.parametrize(("up_shape", "up_dtype", "down_shape", "down_dtype", "classes"), RULES)
def test_plan_adapter_rule_turns_upstream_into_downstream(
    up_shape, up_dtype, down_shape, down_dtype, classes
):
    upstream, downstream = TensorSpec(up_shape, up_dtype), TensorSpec(down_shape, down_dtype)

    plan = plan_adapter(upstream, downstream)

    assert [entry["class_name"] for entry in plan] == classes
    assert all(entry["reason"] for entry in plan)
    json.dumps(plan)  # logged as JSON / written as YAML
    result = _apply(build_adapter_layers(plan), _sample(upstream))
    result_spec = TensorSpec(tuple(result.shape), keras.backend.standardize_dtype(result.dtype))
    assert result_spec.rank == downstream.rank
    for got, want in zip(result_spec.shape[1:], downstream.shape[1:], strict=True):
        assert want is None or got == want
    assert result_spec.dtype == downstream.dtype
    assert check_compatibility("adapter", result_spec, "head", downstream).compatible


def test_plan_adapter_names_every_layer_and_records_why():
    plan = plan_adapter(TensorSpec((None, 4, 4, 32)), TensorSpec((None, 64)))

    assert [entry["config"]["name"] for entry in plan] == [
        "adapter_1_global_average_pooling2d",
        "adapter_2_dense",
    ]
    assert plan[0]["reason"] == "rank 4 -> 2: GlobalAveragePooling2D (flattened size 512 != 64)"
    assert plan[1]["config"]["units"] == 64
    layers = build_adapter_layers(plan)
    assert [layer.name for layer in layers] == [e["config"]["name"] for e in plan]


def test_plan_adapter_name_prefix():
    plan = plan_adapter(TensorSpec((None, 10)), TensorSpec((None, 12)), name_prefix="adapter_base")
    assert plan[0]["config"]["name"] == "adapter_base_1_dense"


@pytest.mark.parametrize(
    ("upstream", "downstream"),
    [
        (TensorSpec((None, 10)), TensorSpec((None, 10))),
        (TensorSpec((None, None)), TensorSpec((None, 12))),
        (TensorSpec((8, 10)), TensorSpec((None, 10))),
        (TensorSpec((None, None, None, 3)), TensorSpec((None, 32, 32, 3))),
    ],
)
def test_plan_adapter_compatible_is_empty(upstream, downstream):
    assert plan_adapter(upstream, downstream) == []


def test_plan_adapter_unknown_channels_count_as_compatible():
    # As in check_compatibility, an unknown size fits any size: no Dense is guessed.
    plan = plan_adapter(TensorSpec((None, 4, 4, None)), TensorSpec((None, 12)))
    assert describe_adapter(plan) == "GlobalAveragePooling2D"


def test_plan_adapter_never_uses_lambda():
    for up_shape, up_dtype, down_shape, down_dtype, _ in RULES:
        plan = plan_adapter(TensorSpec(up_shape, up_dtype), TensorSpec(down_shape, down_dtype))
        assert all(entry["class_name"] != "Lambda" for entry in plan)


@pytest.mark.parametrize(
    ("upstream", "downstream", "why"),
    [
        (TensorSpec((None, 2, 2, 2, 2)), TensorSpec((None, 12)), "rank 5 -> 2"),
        (TensorSpec((None, 7, 16)), TensorSpec((None, 4, 4, 2)), "rank 3 -> 4"),
        (TensorSpec((None, 10)), TensorSpec((None, None, None, 3)), "Reshape"),
        (TensorSpec((None, None)), TensorSpec((None, 4, 4, 2)), "known input size"),
        (TensorSpec((None, 5, 10)), TensorSpec((None, 6, 10)), "dimension(s) [1]"),
    ],
)
def test_plan_adapter_impossible_asks_for_explicit_adapter(upstream, downstream, why):
    with pytest.raises(ShapeError) as caught:
        plan_adapter(upstream, downstream)
    message = str(caught.value)
    assert why in message
    assert str(upstream) in message and str(downstream) in message
    assert "stacking.adapter=[" in message


def test_build_adapter_layers_from_explicit_configs():
    configs = [
        {"class_name": "Dense", "config": {"units": 12, "activation": "relu"}},
        {"class_name": "Dropout", "config": {"rate": 0.1}, "reason": "ignored"},
        {"class_name": "Dense", "config": {"units": 6, "name": "my_projection"}},
        {"class_name": "Cast", "config": {"target_dtype": "float16"}},
    ]
    original = copy.deepcopy(configs)

    layers = build_adapter_layers(configs)

    assert [type(layer).__name__ for layer in layers] == ["Dense", "Dropout", "Dense", "Cast"]
    assert [layer.name for layer in layers] == [
        "adapter_1_dense",
        "adapter_2_dropout",
        "my_projection",
        "adapter_4_cast",
    ]
    assert layers[0].units == 12 and layers[0].activation is keras.activations.relu
    assert configs == original  # the user's configs are not mutated
    result = _apply(layers, np.ones((BATCH, 10), "float32"))
    assert tuple(result.shape) == (BATCH, 6)
    assert keras.backend.standardize_dtype(result.dtype) == "float16"


def test_build_adapter_layers_accepts_missing_config_and_registered_name():
    layers = build_adapter_layers(
        [
            {"class_name": "Flatten"},
            {"class_name": "tfstack>Cast", "config": {"target_dtype": "int32"}},
        ],
        name_prefix="bridge",
    )
    assert [layer.name for layer in layers] == ["bridge_1_flatten", "bridge_2_cast"]
    assert isinstance(layers[1], Cast)


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ("Dense", ["stacking.adapter must be a list", "'Dense'"]),
        (["Dense"], ["stacking.adapter[0]", "class_name", "'Dense'"]),
        (
            [{"class_name": "Dens", "config": {"units": 12}}],
            ["stacking.adapter[0]", "class_name='Dens'", "Did you mean Dense"],
        ),
        (
            [{"class_name": "Flatten"}, {"class_name": "Dense", "config": {"unit": 12}}],
            ["stacking.adapter[1]", "cannot build Dense", "{'unit': 12}", "unit"],
        ),
        (
            [{"class_name": "Dense", "config": {"units": -3}}],
            ["stacking.adapter[0]", "cannot build Dense", "-3"],
        ),
        (
            [{"class_name": "Dense", "units": 12}],
            ["stacking.adapter[0]", "['units']", "under 'config'"],
        ),
        (
            [{"class_name": "Dense", "config": 12}],
            ["stacking.adapter[0].config", "Received: 12"],
        ),
        (
            [{"class_name": "Lambda", "config": {"function": "x"}}],
            ["stacking.adapter[0]", "Lambda layers are not allowed"],
        ),
        (
            [{"class_name": "Cast", "config": {}}],
            ["stacking.adapter[0]", "cannot build Cast", "target_dtype"],
        ),
        (
            [
                {"class_name": "Dense", "config": {"units": 3, "name": "same"}},
                {"class_name": "Dense", "config": {"units": 3, "name": "same"}},
            ],
            ["unique", "'same'"],
        ),
    ],
)
def test_build_adapter_layers_bad_config_messages(configs, expected):
    with pytest.raises(ShapeError) as caught:
        build_adapter_layers(configs)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message
    assert "Full object config" not in message


def test_build_adapter_layers_error_names_custom_key():
    with pytest.raises(ShapeError, match=r"stacking\.adapters\.base\[0\]"):
        build_adapter_layers([{"class_name": "Nope"}], key="stacking.adapters.base")


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ([], "no adapter"),
        (
            plan_adapter(TensorSpec((None, 4, 4, 8)), TensorSpec((None, 12))),
            "GlobalAveragePooling2D -> Dense(12)",
        ),
        (
            plan_adapter(TensorSpec((None, 10)), TensorSpec((None, 4, 4, 2), "float16")),
            "Dense(32) -> Reshape((4, 4, 2)) -> Cast(float16)",
        ),
        (
            plan_adapter(TensorSpec((None, 8, 8, 3)), TensorSpec((None, 16, 16, 3))),
            "Resizing(16, 16)",
        ),
        ([{"class_name": "Dropout", "config": {"rate": 0.5}}], "Dropout"),
    ],
)
def test_describe_adapter(configs, expected):
    assert describe_adapter(configs) == expected


def test_cast_does_not_autocast_and_keeps_shape():
    layer = Cast("float16", name="to_half")
    result = layer(np.ones((BATCH, 3), "float64"))
    assert keras.backend.standardize_dtype(result.dtype) == "float16"
    assert layer.compute_output_shape((None, 3)) == (None, 3)
    symbolic = layer(keras.KerasTensor((None, 3), dtype="float32"))
    assert symbolic.dtype == "float16"
    assert layer.get_config()["target_dtype"] == "float16"
    # Autocasting would round float64 through float32 before the cast and lose this digit.
    precise = np.array([[1 + 1e-12]], "float64")
    np.testing.assert_array_equal(np.asarray(Cast("float64")(precise)), precise)


def test_cast_round_trip_in_saved_model(tmp_path):
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(3, name="dense")(inputs)
    outputs = Cast("float16", name="adapter_1_cast")(hidden)
    model = keras.Model(inputs, outputs, name="tiny")
    x = np.random.default_rng(1).random((5, 4)).astype("float32")
    expected = model.predict(x, verbose=0)
    path = tmp_path / "tiny.keras"

    model.save(path)
    reloaded = keras.models.load_model(path)  # safe_mode=True: no Lambda, registered class

    assert [layer.name for layer in reloaded.layers] == ["features", "dense", "adapter_1_cast"]
    cast = reloaded.get_layer("adapter_1_cast")
    assert isinstance(cast, Cast) and cast.target_dtype == "float16"
    got = reloaded.predict(x, verbose=0)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)


def test_planned_adapter_round_trip_in_saved_model(tmp_path):
    upstream, downstream = TensorSpec((None, 4, 4, 8)), TensorSpec((None, 12), "float16")
    plan = plan_adapter(upstream, downstream)
    inputs = keras.Input(upstream.shape[1:], name="feature_map")
    outputs = _apply(build_adapter_layers(plan), inputs)
    model = keras.Model(inputs, outputs, name="adapted")
    x = _sample(upstream)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "adapted.keras"

    model.save(path)
    reloaded = keras.models.load_model(path)

    assert [layer.name for layer in reloaded.layers[1:]] == [e["config"]["name"] for e in plan]
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), expected)
