"""Stacking strategies: construction, shape refusals, adapters, merges, save/reload."""

import keras
import numpy as np
import pytest
from conftest import make_base, make_data, make_head

from tfstack.errors import ShapeError
from tfstack.freezing import FreezePolicy, apply_freeze_policy
from tfstack.shapes import layer_table
from tfstack.stacking import STRATEGIES, build_stacked


def _flags(model):
    return [(row["name"], row["trainable"]) for row in layer_table(model)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_round_trip_keeps_predictions_names_and_trainable_flags(strategy, tmp_path):
    keras.utils.set_random_seed(0)
    result = build_stacked(strategy, make_base(), make_head())
    model = result.model
    # Non-trivial flags: only the last layer with weights of the base trains.
    apply_freeze_policy(
        model, FreezePolicy("partial", unfreeze_last=1), feature_extractors=["base"]
    )
    x, _ = make_data(8)
    before = model.predict(x, verbose=0)
    path = tmp_path / f"{strategy}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), before, rtol=0, atol=1e-6)
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]
    assert _flags(reloaded) == _flags(model)
    assert ("base/features", True) in _flags(reloaded)
    assert ("base/conv1", False) in _flags(reloaded)


def test_strategies_are_distinct_constructions():
    seq = build_stacked("sequential", make_base(), make_head()).model
    fun = build_stacked("functional", make_base(), make_head()).model
    assert isinstance(seq, keras.Sequential)
    assert not isinstance(fun, keras.Sequential)
    assert [layer.name for layer in seq.layers] == ["base", "head"]
    assert [layer.name for layer in fun.layers] == ["input", "base", "head"]


def test_sequential_refuses_mismatch_with_verdict_naming_both_and_the_fix():
    with pytest.raises(ShapeError) as err:
        build_stacked("sequential", make_base(features=10), make_head(in_features=12))
    message = str(err.value)
    assert "base" in message and "head" in message
    assert "10" in message and "12" in message
    assert "stacking=adapter" in message


def test_sequential_refuses_adapter_setting():
    with pytest.raises(ShapeError, match="stacking=adapter"):
        build_stacked("sequential", make_base(), make_head(), adapter="auto")


def test_adapter_strategy_projects_last_dimension():
    result = build_stacked("adapter", make_base(features=10), make_head(in_features=12))
    model = result.model
    assert [layer.name for layer in model.layers] == ["base", "adapter_1", "head"]
    assert result.adapters[0]["layers"][0]["class_name"] == "Dense"
    assert "Dense" in result.describe_adapters()
    x, _ = make_data(4)
    assert model.predict(x, verbose=0).shape == (4, 3)


def test_adapter_strategy_pools_a_feature_map():
    base = make_base()
    feature_map = keras.Model(base.inputs, base.get_layer("relu2").output, name="base")
    result = build_stacked("adapter", feature_map, make_head(in_features=6))
    classes = [c["class_name"] for c in result.adapters[0]["layers"]]
    assert classes == ["GlobalAveragePooling2D"]
    x, _ = make_data(4)
    assert result.model.predict(x, verbose=0).shape == (4, 3)


def test_adapter_strategy_accepts_explicit_layer_configs():
    result = build_stacked(
        "adapter",
        make_base(features=10),
        make_head(in_features=12),
        adapter=[{"class_name": "Dense", "config": {"units": 12, "activation": "relu"}}],
    )
    dense = result.model.get_layer("adapter_1").layers[-1]
    assert isinstance(dense, keras.layers.Dense) and dense.units == 12


def test_explicit_adapter_that_does_not_fit_is_refused():
    with pytest.raises(ShapeError, match="expects"):
        build_stacked(
            "adapter",
            make_base(features=10),
            make_head(in_features=12),
            adapter=[{"class_name": "Dense", "config": {"units": 7}}],
        )


@pytest.mark.slow
@pytest.mark.parametrize(("merge", "head_in"), [("concatenate", 16), ("average", 8)])
def test_functional_merges_several_feature_extractors(merge, head_in):
    result = build_stacked(
        "functional",
        [make_base("base_a"), make_base("base_b")],
        make_head(in_features=head_in),
        merge=merge,
    )
    assert result.feature_extractors == ["base_a", "base_b"]
    assert "merge" in [layer.name for layer in result.model.layers]
    x, _ = make_data(4)
    assert result.model.predict(x, verbose=0).shape == (4, 3)


def test_functional_intermediate_layers_sit_before_the_head():
    result = build_stacked(
        "functional",
        make_base(),
        make_head(in_features=5),
        intermediate=[
            {"class_name": "Dropout", "config": {"rate": 0.1}},
            {"class_name": "Dense", "config": {"units": 5}},
        ],
    )
    names = [layer.name for layer in result.model.layers]
    assert names[-1] == "head" and sum(n.startswith("intermediate") for n in names) == 2


def test_functional_calls_the_base_as_a_layer_so_freezing_works(data):
    keras.utils.set_random_seed(0)
    model = build_stacked("functional", make_base(), make_head()).model
    apply_freeze_policy(model, FreezePolicy("frozen"), feature_extractors=["base"])
    base_before = [w.copy() for w in model.get_layer("base").get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
    x, y = data
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    for before, after in zip(base_before, model.get_layer("base").get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ShapeError, match="adapter"):
        build_stacked("stackish", make_base(), make_head())


def test_components_with_one_name_are_refused_with_the_fix():
    with pytest.raises(ShapeError, match="unique name"):
        build_stacked("sequential", make_base(name="m"), make_head(name="m"))
