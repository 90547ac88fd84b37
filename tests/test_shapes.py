"""Specs, layer tables, summaries and compatibility verdicts on tiny models."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from tfstack.adapters import Verdict, check_compatibility
from tfstack.errors import ShapeError
from tfstack.shapes import (
    TensorSpec,
    input_specs,
    layer_table,
    output_specs,
    summary_text,
)

LONG_NAME = "a_very_long_dense_layer_name_that_keras_would_cut_in_a_narrow_summary_table"


def _base() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
        ],
        name="base",
    )


def _head() -> keras.Model:
    inputs = keras.Input((4,), name="head_in")
    outputs = keras.layers.Dense(2, name=LONG_NAME)(inputs)
    return keras.Model(inputs, outputs, name="head")


def _stacked(base: keras.Model, head: keras.Model) -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="image")
    return keras.Model(inputs, head(base(inputs)), name="stacked")


def _rows_by_name(model: keras.Model) -> dict[str, dict]:
    return {row["name"]: row for row in layer_table(model)}


# --- TensorSpec --------------------------------------------------------------------------------


def test_tensor_spec_normalizes_and_prints():
    spec = TensorSpec((None, np.int64(4), 4, 32), np.float32)

    assert spec.shape == (None, 4, 4, 32)
    assert all(type(dim) is int for dim in spec.shape[1:])
    assert spec.dtype == "float32"
    assert spec.rank == 4
    assert str(spec) == "(None, 4, 4, 32) float32"
    assert json.loads(json.dumps(spec.to_dict())) == {"shape": [None, 4, 4, 32], "dtype": "float32"}
    assert spec == TensorSpec((None, 4, 4, 32), "float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dtype = "int32"


def test_input_and_output_specs_of_functional_model():
    image = keras.Input((8, 8, 3), name="image")
    token = keras.Input((5,), dtype="int32", name="token")
    merged = keras.layers.Concatenate(name="cat")(
        [keras.layers.Flatten(name="flat")(image), keras.layers.Embedding(10, 2)(token)[:, 0]]
    )
    model = keras.Model([image, token], [merged, keras.layers.Dense(3, name="out")(merged)])

    assert input_specs(model) == [
        TensorSpec((None, 8, 8, 3), "float32"),
        TensorSpec((None, 5), "int32"),
    ]
    assert [str(spec) for spec in output_specs(model)] == [
        "(None, 194) float32",
        "(None, 3) float32",
    ]


def test_specs_of_sequential_without_input_raise_shape_error():
    model = keras.Sequential([keras.layers.Dense(3)], name="no_input")
    for specs in (input_specs, output_specs):
        with pytest.raises(ShapeError) as caught:
            specs(model)
        message = str(caught.value)
        assert "'no_input'" in message
        assert "no defined" in message
        assert "keras.Input" in message


# --- layer_table -------------------------------------------------------------------------------


def test_layer_table_expands_nested_models_with_shapes():
    model = _stacked(_base(), _head())

    rows = layer_table(model)

    assert [(row["name"], row["depth"]) for row in rows] == [
        ("image", 0),
        ("base", 0),
        ("base/conv", 1),
        ("base/bn", 1),
        ("base/gap", 1),
        ("head", 0),
        ("head/head_in", 1),
        (f"head/{LONG_NAME}", 1),
    ]
    by_name = {row["name"]: row for row in rows}
    assert by_name["base/conv"] == {
        "name": "base/conv",
        "class": "Conv2D",
        "input_shape": [None, 8, 8, 3],
        "output_shape": [None, 6, 6, 4],
        "dtype": "float32",
        "params": 3 * 3 * 3 * 4 + 4,
        "trainable": True,
        "depth": 1,
    }
    assert by_name["base"]["class"] == "Sequential"
    assert by_name["base"]["input_shape"] == [None, 8, 8, 3]
    assert by_name["base"]["output_shape"] == [None, 4]
    assert by_name["head"]["class"] == "Functional"
    assert by_name["image"]["output_shape"] == [None, 8, 8, 3]
    assert json.loads(json.dumps(rows)) == rows


def test_layer_table_param_counts_add_up():
    model = _stacked(_base(), _head())

    rows = layer_table(model)

    top = [row for row in rows if row["depth"] == 0]
    assert sum(row["params"] for row in top) == model.count_params() == 112 + 16 + 10
    for parent in ("base", "head"):
        children = [row for row in rows if row["name"].startswith(f"{parent}/")]
        parent_row = next(row for row in rows if row["name"] == parent)
        assert parent_row["params"] == sum(row["params"] for row in children) > 0


def test_layer_table_trainable_reflects_frozen_nested_model():
    base, head = _base(), _head()
    model = _stacked(base, head)
    base.trainable = False
    # Keras keeps the child's own flag; the frozen parent still freezes it.
    base.get_layer("conv").trainable = True

    by_name = _rows_by_name(model)

    assert by_name["base"]["trainable"] is False
    assert by_name["base/conv"]["trainable"] is False
    assert by_name["base/bn"]["trainable"] is False
    assert by_name["head"]["trainable"] is True
    assert by_name[f"head/{LONG_NAME}"]["trainable"] is True


def test_layer_table_container_with_only_frozen_children_is_not_trainable():
    head = _head()
    model = _stacked(_base(), head)
    head.get_layer(LONG_NAME).trainable = False
    assert head.trainable  # the flag alone says trainable

    by_name = _rows_by_name(model)

    assert by_name["head"]["trainable"] is False
    assert by_name["base"]["trainable"] is True


def test_layer_table_whole_model_frozen():
    model = _stacked(_base(), _head())
    model.trainable = False
    assert not any(row["trainable"] for row in layer_table(model))


def test_layer_table_shared_layer_call_sites():
    same = keras.layers.Dense(3, name="same_shapes")
    different = keras.layers.Dense(3, name="different_shapes")
    flat_in = keras.Input((5,), name="flat_in")
    seq_in = keras.Input((7, 5), name="seq_in")
    outputs = [same(flat_in), same(flat_in), different(flat_in), different(seq_in)]
    model = keras.Model([flat_in, seq_in], outputs)

    by_name = _rows_by_name(model)

    assert by_name["same_shapes"]["input_shape"] == [None, 5]
    assert by_name["same_shapes"]["output_shape"] == [None, 3]
    assert by_name["different_shapes"]["input_shape"] is None
    assert by_name["different_shapes"]["output_shape"] is None
    assert by_name["different_shapes"]["params"] == 18


def test_layer_table_of_multi_input_layer_lists_shapes():
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    model = keras.Model([a, b], keras.layers.Concatenate(name="cat")([a, b]))
    assert _rows_by_name(model)["cat"]["input_shape"] == [[None, 2], [None, 3]]


def test_layer_table_of_unbuilt_model_degrades_gracefully():
    model = keras.Sequential([keras.layers.Dense(3, name="dense")], name="unbuilt")

    rows = layer_table(model)

    assert rows == [
        {
            "name": "dense",
            "class": "Dense",
            "input_shape": None,
            "output_shape": None,
            "dtype": "float32",
            "params": 0,
            "trainable": True,
            "depth": 0,
        }
    ]


# --- summary_text ------------------------------------------------------------------------------


def test_summary_text_expands_nested_models_with_trainable_column(capsys):
    base = _base()
    model = _stacked(base, _head())
    base.trainable = False
    columns_before = os.environ.get("COLUMNS")

    text = summary_text(model)

    assert 'Model: "stacked"' in text
    for name in ("base (Sequential)", "conv (Conv2D)", "bn (BatchNormalization)", "head_in"):
        assert name in text
    assert f"{LONG_NAME} (Dense)" in text  # not cut at the default console width
    assert "Trainable" in text
    conv_line = next(line for line in text.splitlines() if "conv (Conv2D)" in line)
    assert conv_line.rstrip(" │").endswith("N")
    dense_line = next(line for line in text.splitlines() if LONG_NAME in line)
    assert dense_line.rstrip(" │").endswith("Y")
    assert "Total params: 138" in text
    assert capsys.readouterr().out == ""  # captured, not printed
    assert os.environ.get("COLUMNS") == columns_before


# --- check_compatibility -----------------------------------------------------------------------


def test_check_compatibility_last_dimension():
    verdict = check_compatibility(
        "base", TensorSpec((None, 10)), "head", TensorSpec((None, 12), "float32")
    )

    assert isinstance(verdict, Verdict)
    assert not verdict.compatible
    assert verdict.problems == ["last dimension 10 != 12"]
    assert str(verdict) == (
        "head expects (None, 12) float32; base gives (None, 10) float32: last dimension 10 != 12."
        " Fix: use stacking=adapter (adapter: auto adds Dense(12)), or set stacking.adapter=[...]"
    )


def test_check_compatibility_rank():
    verdict = check_compatibility(
        "model_1", TensorSpec((None, 4, 4, 32)), "model_2", TensorSpec((None, 64))
    )

    assert not verdict.compatible
    assert verdict.problems == ["rank 4 != 2"]
    message = str(verdict)
    for fragment in (
        "model_2 expects (None, 64) float32",
        "model_1 gives (None, 4, 4, 32) float32",
        "rank 4 != 2",
        "stacking=adapter",
        "GlobalAveragePooling2D -> Dense(64)",
        "stacking.adapter=[...]",
    ):
        assert fragment in message


def test_check_compatibility_dtype():
    verdict = check_compatibility(
        "base", TensorSpec((None, 10)), "head", TensorSpec((None, 10), "float16")
    )

    assert not verdict.compatible
    assert verdict.problems == ["dtype float32 != float16"]
    assert "Cast(float16)" in verdict.fix
    assert "head expects (None, 10) float16; base gives (None, 10) float32" in str(verdict)


def test_check_compatibility_lists_every_problem():
    verdict = check_compatibility(
        "base", TensorSpec((None, 8, 8, 3)), "head", TensorSpec((None, 16, 16, 5), "float16")
    )
    assert verdict.problems == [
        "dimension 1 8 != 16",
        "dimension 2 8 != 16",
        "last dimension 3 != 5",
        "dtype float32 != float16",
    ]
    assert "Resizing(16, 16) -> Dense(5) -> Cast(float16)" in verdict.fix


@pytest.mark.parametrize(
    ("upstream", "downstream"),
    [
        (TensorSpec((None, 10)), TensorSpec((None, 10))),
        (TensorSpec((None, None)), TensorSpec((None, 12))),
        (TensorSpec((None, 12)), TensorSpec((None, None))),
        (TensorSpec((4, 10)), TensorSpec((8, 10))),  # batch never has to match
    ],
)
def test_check_compatibility_compatible(upstream, downstream):
    verdict = check_compatibility("base", upstream, "head", downstream)
    assert verdict.compatible
    assert verdict.problems == [] and verdict.fix == ""
    assert str(verdict).endswith(": compatible.")


def test_check_compatibility_without_standard_adapter_asks_for_explicit_one():
    verdict = check_compatibility(
        "base", TensorSpec((None, 2, 2, 2, 2)), "head", TensorSpec((None, 12))
    )
    assert not verdict.compatible
    assert verdict.problems == ["rank 5 != 2"]
    assert "stacking=adapter" not in verdict.fix
    assert "stacking.adapter=[" in verdict.fix
    assert "base gives (None, 2, 2, 2, 2) float32" in str(verdict)


def test_check_compatibility_on_real_models():
    base, head = _base(), _head()
    verdict = check_compatibility(base.name, output_specs(base)[0], head.name, input_specs(head)[0])
    assert verdict.compatible

    wide_head = keras.Sequential([keras.Input((12,)), keras.layers.Dense(2)], name="wide_head")
    verdict = check_compatibility(
        base.name, output_specs(base)[0], wide_head.name, input_specs(wide_head)[0]
    )
    assert verdict.problems == ["last dimension 4 != 12"]
    assert str(verdict).startswith("wide_head expects (None, 12) float32; base gives (None, 4)")
