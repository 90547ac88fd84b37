"""Freeze policies: counts checked against Keras, BatchNormalization behaviour, clear refusals."""

import keras
import numpy as np
import pytest
from conftest import make_base, make_data, make_head

from tfstack.errors import FreezeError
from tfstack.freezing import FreezePolicy, apply_freeze_policy, count_params
from tfstack.stacking import build_stacked


def _stack(strategy="sequential"):
    keras.utils.set_random_seed(0)
    return build_stacked(strategy, make_base(), make_head()).model


def _params(layer):
    return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


def test_frozen_trains_only_the_head():
    model = _stack()
    report = apply_freeze_policy(model, FreezePolicy("frozen"), feature_extractors=["base"])
    head_params = model.get_layer("head").count_params()
    assert report.counts.trainable == head_params == 27
    assert report.counts.total == model.count_params()
    assert model.get_layer("base").trainable is False


def test_joint_trains_everything_but_bn_statistics():
    model = _stack()
    report = apply_freeze_policy(model, FreezePolicy("joint"), feature_extractors=["base"])
    bn_stats = sum(
        2 * layer.moving_mean.shape[0]
        for layer in model.get_layer("base").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert report.counts.non_trainable == bn_stats
    assert report.counts.trainable == model.count_params() - bn_stats


def test_partial_unfreeze_last_counts_match_the_layers():
    model = _stack()
    report = apply_freeze_policy(
        model, FreezePolicy("partial", unfreeze_last=1), feature_extractors=["base"]
    )
    features = model.get_layer("base").get_layer("features")
    assert report.counts.trainable == features.count_params() + 27
    assert "base/features" in report.trainable_layers
    assert "base/conv2" not in report.trainable_layers


def test_partial_pattern_keeps_bn_frozen_unless_bn_train():
    model = _stack()
    base = model.get_layer("base")
    report = apply_freeze_policy(
        model, FreezePolicy("partial", unfreeze_pattern="conv2|bn2"), feature_extractors=["base"]
    )
    assert base.get_layer("conv2").trainable and not base.get_layer("bn2").trainable
    assert report.counts.trainable == base.get_layer("conv2").count_params() + 27

    report = apply_freeze_policy(
        model,
        FreezePolicy("partial", unfreeze_pattern="conv2|bn2", bn="train"),
        feature_extractors=["base"],
    )
    assert base.get_layer("bn2").trainable
    assert report.counts.trainable == (
        base.get_layer("conv2").count_params() + _params(base.get_layer("bn2")) + 27
    )


def test_counts_agree_with_keras_after_switching_policies():
    model = _stack("functional")
    for policy in [
        FreezePolicy("frozen"),
        FreezePolicy("joint"),
        FreezePolicy("partial", unfreeze_last=2),
        FreezePolicy("frozen"),
    ]:
        report = apply_freeze_policy(model, policy, feature_extractors=["base"])
        assert report.counts == count_params(model)


def _nested_base():
    """A base whose second block is itself a nested model with BatchNormalization."""
    block = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(4, 3, padding="same", name="block_conv"),
            keras.layers.BatchNormalization(name="block_bn"),
        ],
        name="block",
    )
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = block(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)  # (batch, 8, 8, 4) -> (batch, 4)
    return keras.Model(inputs, x, name="base")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sequential", "functional"])
def test_frozen_phase_leaves_nested_bn_statistics_and_weights_bit_identical(strategy):
    keras.utils.set_random_seed(0)
    model = build_stacked(strategy, _nested_base(), make_head(in_features=4)).model
    apply_freeze_policy(model, FreezePolicy("frozen"), feature_extractors=["base"])
    base = model.get_layer("base")
    before = [w.copy() for w in base.get_weights()]
    head_before = [w.copy() for w in model.get_layer("head").get_weights()]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    x, y = make_data(64)
    model.fit(x * 5 + 3, y, epochs=2, batch_size=16, verbose=0)
    after = base.get_weights()
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
    # The head did train, so the check above is not vacuous.
    assert any(
        not np.array_equal(b, a)
        for b, a in zip(head_before, model.get_layer("head").get_weights(), strict=True)
    )


@pytest.mark.slow
def test_joint_updates_bn_statistics():
    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", _nested_base(), make_head(in_features=4)).model
    apply_freeze_policy(model, FreezePolicy("joint"), feature_extractors=["base"])
    bn = model.get_layer("base").get_layer("block").get_layer("block_bn")
    before = bn.moving_mean.numpy().copy()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = make_data(32)
    model.fit(x * 5 + 3, y, epochs=1, batch_size=16, verbose=0)
    assert not np.array_equal(before, bn.moving_mean.numpy())


def test_partial_reaches_into_nested_models():
    keras.utils.set_random_seed(0)
    model = build_stacked("sequential", _nested_base(), make_head(in_features=4)).model
    report = apply_freeze_policy(
        model, FreezePolicy("partial", unfreeze_pattern="block_conv"), feature_extractors=["base"]
    )
    assert report.trainable_layers.count("base/block/block_conv") == 1
    block = model.get_layer("base").get_layer("block")
    assert report.counts.trainable == block.get_layer("block_conv").count_params() + 15


def test_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(FreezeError, match="matches no layer") as err:
        apply_freeze_policy(
            _stack(),
            FreezePolicy("partial", unfreeze_pattern="^nothing$"),
            feature_extractors=["base"],
        )
    assert "base/features" in str(err.value)


def test_pattern_that_selects_only_bn_is_an_error():
    with pytest.raises(FreezeError, match="freeze.bn=train"):
        apply_freeze_policy(
            _stack(), FreezePolicy("partial", unfreeze_pattern="bn1"), feature_extractors=["base"]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "partial"}, "unfreeze_last"),
        ({"kind": "partial", "unfreeze_pattern": "conv["}, "not a valid regex"),
        ({"kind": "partial", "unfreeze_last": 0}, "at least 1"),
        ({"kind": "thawed"}, "frozen"),
        ({"kind": "joint", "bn": "maybe"}, "freeze.bn"),
    ],
)
def test_invalid_policies_are_refused(kwargs, message):
    with pytest.raises(FreezeError, match=message):
        FreezePolicy(**kwargs)


def test_unfreeze_last_beyond_the_component_is_an_error():
    with pytest.raises(FreezeError, match="has only 3 layers with weights"):
        apply_freeze_policy(
            _stack(), FreezePolicy("partial", unfreeze_last=50), feature_extractors=["base"]
        )


def test_unknown_feature_extractor_is_named():
    with pytest.raises(FreezeError, match="'backbone', which is not a layer"):
        apply_freeze_policy(_stack(), FreezePolicy("frozen"), feature_extractors=["backbone"])


def test_head_is_never_frozen_by_a_policy():
    model = build_stacked("sequential", make_base(), make_head()).model
    apply_freeze_policy(model, FreezePolicy("frozen"), feature_extractors=["base"])
    assert model.get_layer("head").trainable


def test_savedmodel_component_refuses_partial_and_stays_frozen_under_joint(tmp_path):
    from tfstack.components import load_component

    exported = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, name="dense")], name="exported"
    )
    exported.export(str(tmp_path / "saved"))
    base = load_component(str(tmp_path / "saved"), name="base", trust_code=True)
    model = build_stacked("sequential", base, make_head()).model
    with pytest.raises(FreezeError, match="SavedModel") as err:
        apply_freeze_policy(
            model, FreezePolicy("partial", unfreeze_last=1), feature_extractors=["base"]
        )
    assert "freeze.components" in str(err.value)
    report = apply_freeze_policy(model, FreezePolicy("joint"), feature_extractors=["base"])
    assert report.counts.trainable == 27  # only the head: the SavedModel never trains


def test_a_pattern_matching_nothing_fails_even_when_unfreeze_last_selects_layers():
    # Before: the union of both selectors was checked, so unfreeze_last=2 hid a pattern typo.
    with pytest.raises(FreezeError, match="matches no layer") as err:
        apply_freeze_policy(
            _stack(),
            FreezePolicy("partial", unfreeze_last=2, unfreeze_pattern="^base/conv9$"),
            feature_extractors=["base"],
        )
    assert "freeze.unfreeze_pattern='^base/conv9$'" in str(err.value)
    assert "each selector must match on its own" in str(err.value)


def test_a_pattern_selecting_only_bn_fails_even_when_unfreeze_last_selects_layers():
    with pytest.raises(FreezeError, match="selects only BatchNormalization"):
        apply_freeze_policy(
            _stack(),
            FreezePolicy("partial", unfreeze_last=1, unfreeze_pattern="bn2"),
            feature_extractors=["base"],
        )


def test_both_selectors_that_match_unfreeze_their_union():
    model = _stack()
    report = apply_freeze_policy(
        model,
        FreezePolicy("partial", unfreeze_last=1, unfreeze_pattern="conv1"),
        feature_extractors=["base"],
    )
    assert {"base/conv1", "base/features"} <= set(report.trainable_layers)
    assert "base/conv2" not in report.trainable_layers


def test_unfreeze_last_from_a_schedule_names_the_schedule_key():
    with pytest.raises(FreezeError, match=r"^schedule.unfreeze_last=9 but component 'base'"):
        apply_freeze_policy(
            _stack(),
            FreezePolicy(
                "partial", unfreeze_last=9, unfreeze_last_setting="schedule.unfreeze_last=9"
            ),
            feature_extractors=["base"],
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "partial", "unfreeze_pattern": ""}, "freeze.unfreeze_pattern='' is empty"),
        ({"kind": "partial", "unfreeze_last": 1, "components": ()}, "freeze.components=\\[\\]"),
    ],
)
def test_empty_selectors_are_refused_not_read_as_unset(kwargs, message):
    # Before: '' counted as "no pattern" and () as "every feature extractor".
    with pytest.raises(FreezeError, match=message):
        FreezePolicy(**kwargs)
