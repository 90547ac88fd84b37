"""One config vocabulary: the library registries, the schema and conf/ agree, and every option a
strategy, policy or preset does not use is refused, naming its key."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from conftest import make_base, make_head
from omegaconf import OmegaConf
from project_copy import option_files

from tfstack import distribute, evaluation, labels, schedules, stacking, vocabulary
from tfstack.errors import ConfigError, FreezeError, ScheduleError, ShapeError
from tfstack.freezing import FreezePolicy
from tfstack.pipeline import config as config_module
from tfstack.pipeline.compose import compose
from tfstack.pipeline.schema import Config

CONF = Path(__file__).resolve().parents[1] / "conf"
# The groups that fill one section of the schema each (experiment/ and hparams_search/ are
# overrides of several sections, not defaults).
SECTION_GROUPS = (
    "data",
    "components",
    "stacking",
    "preprocess",
    "augment",
    "freeze",
    "schedule",
    "train",
    "tracking",
    "distribute",
)


def _keyword_options(function, common=()) -> set[str]:
    """The keyword-only parameters of a builder or preset, without the common ones."""
    parameters = inspect.signature(function).parameters.values()
    names = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return names - set(common)


def test_each_registry_is_keyed_by_its_vocabulary():
    assert tuple(stacking.STRATEGIES) == vocabulary.STRATEGIES
    assert tuple(schedules.SCHEDULES) == vocabulary.SCHEDULES
    assert tuple(vocabulary.STRATEGY_OPTIONS) == vocabulary.STRATEGIES
    assert tuple(vocabulary.SCHEDULE_OPTIONS) == vocabulary.SCHEDULES
    assert tuple(vocabulary.FREEZE_OPTIONS) == vocabulary.FREEZE_POLICIES
    assert distribute.KINDS == vocabulary.DISTRIBUTE_KINDS
    assert labels.TASKS == evaluation.TASKS == vocabulary.TASKS
    for policy in vocabulary.FREEZE_POLICIES:
        FreezePolicy(policy, unfreeze_last=1 if policy == "partial" else None)
    with pytest.raises(FreezeError, match="Expected one of \\['frozen', 'joint', 'partial'\\]"):
        FreezePolicy("thawed")
    # The schema checks the same lists (no copy of them in config.py).
    assert config_module.STRATEGIES is vocabulary.STRATEGIES
    assert config_module.TASKS is vocabulary.TASKS


def test_each_builder_and_preset_takes_exactly_the_options_its_table_lists():
    for name, builder in stacking.STRATEGIES.items():
        assert _keyword_options(builder, ["name", "front"]) == set(
            vocabulary.STRATEGY_OPTIONS[name]
        )
        # No catch-all that would swallow an option.
        assert all(
            p.kind is not p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()
        )
    for name, preset in schedules.SCHEDULES.items():
        options = _keyword_options(preset, schedules.COMMON_ARGUMENTS)
        assert options == set(vocabulary.SCHEDULE_OPTIONS[name])
        assert all(
            p.kind is not p.VAR_KEYWORD for p in inspect.signature(preset).parameters.values()
        )


def test_the_schema_fields_are_the_freeze_and_schedule_options():
    schema = OmegaConf.structured(Config)
    stacking_options = {k for keys in vocabulary.STRATEGY_OPTIONS.values() for k in keys}
    assert stacking_options == set(schema.stacking) - {"strategy"}
    freeze_options = {k for keys in vocabulary.FREEZE_OPTIONS.values() for k in keys}
    assert freeze_options == set(schema.freeze) - {"policy"}
    schedule_options = {k for keys in vocabulary.SCHEDULE_OPTIONS.values() for k in keys}
    # lr_multipliers, early_stopping and lr_schedule (per phase) apply to every preset.
    every = {"name", "lr_multipliers", "early_stopping", "lr_schedule"}
    assert schedule_options == set(schema.schedule) - every
    lr_schedule_options = {k for keys in vocabulary.LR_SCHEDULE_OPTIONS.values() for k in keys}
    assert lr_schedule_options == set(schema.train.lr_schedule) - {"name"}


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a YAML mapping; mappings of the schema recurse."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _schema_default(schema, dotted: str):
    """The schema's default of a dotted key, or MISSING."""
    node = schema
    *parents, leaf = dotted.split(".")
    for part in parents:
        if OmegaConf.is_missing(node, part):
            return "???"
        node = node[part]
    if OmegaConf.is_missing(node, leaf):
        return "???"
    value = node[leaf]
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("group", SECTION_GROUPS)
def test_schema_defaults_equal_every_yaml_option_or_are_missing(group):
    schema = OmegaConf.structured(Config)
    differences = []
    for option in option_files(group):
        values = OmegaConf.to_container(OmegaConf.load(option))
        for key, value in _leaves(values):
            default = _schema_default(schema[group], key)
            if default != "???" and default != value:
                differences.append(f"{option.name}: {group}.{key}={value!r}, schema {default!r}")
    assert not differences, differences


def test_schema_defaults_equal_the_top_level_of_the_default_config():
    composed = OmegaConf.to_container(OmegaConf.structured(compose([], config_dir=CONF)))
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    for key in ("seed", "output_dir", "demo"):
        assert schema[key] == composed[key]
    # The schema's leaves that are not MISSING equal the default composition's values.
    for group in SECTION_GROUPS:
        for key, value in _leaves(schema[group]):
            if value != "???" and not key.startswith("extra"):
                assert value == _schema_default(OmegaConf.create(composed[group]), key), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["stacking=adapter", "stacking.intermediate=[{class_name: Dense, config: {units: 8}}]"],
            "stacking.intermediate=[...] applies only to stacking=functional, and stacking is "
            "'adapter', so it would be ignored. Add stacking=functional, or remove "
            "stacking.intermediate.",
        ),
        (["stacking=adapter", "stacking.merge=average"], "stacking.merge='average' applies only"),
        (["stacking.merge=concatenate"], "stacking.merge='concatenate' applies only to stacking"),
        (
            ["stacking.adapter=auto"],
            "stacking.adapter='auto' applies only to stacking=adapter or stacking=functional",
        ),
        (["schedule.stages=4"], "schedule.stages=4 applies only to schedule=gradual, and "),
        (
            ["schedule=gradual", "schedule.fine_tune_lr_factor=0.2"],
            "schedule.fine_tune_lr_factor=0.2 applies",
        ),
        (["schedule=two_phase", "schedule.lr_decay=0.3"], "schedule.lr_decay=0.3 applies only"),
        (["freeze=joint", "freeze.components=[base]"], "freeze.components=[base] applies only"),
        (["freeze.bn=train"], "freeze.bn='train' with freeze=frozen applies only to the phases"),
        (
            ["experiment=fine_tune", "schedule.unfreeze_last=3"],
            "schedule.unfreeze_last=3 applies only to schedule=two_phase with freeze=frozen, and "
            "freeze is 'partial'",
        ),
    ],
)
def test_validation_refuses_an_option_the_choice_does_not_use(overrides, message):
    # Before: composed without a word (the option was dropped at build or train time).
    with pytest.raises(ConfigError) as err:
        compose(overrides, config_dir=CONF)
    assert str(err.value).startswith(message)


@pytest.mark.slow
def test_every_group_option_composes_with_the_defaults_of_the_others():
    for group in ("stacking", "freeze", "schedule"):
        for option in option_files(group):
            compose([f"{group}={option.stem}"], config_dir=CONF)


@pytest.mark.parametrize(
    ("strategy", "options", "message"),
    [
        (
            "adapter",
            {"intermediate": [{"class_name": "Dense", "config": {"units": 4}}]},
            "stacking.intermediate=[...] applies only to stacking=functional",
        ),
        ("adapter", {"merge": "average"}, "stacking.merge='average' applies only"),
        ("sequential", {"merge": "concatenate"}, "stacking.merge='concatenate' applies only"),
        ("sequential", {"adapter": "auto"}, "stacking.adapter='auto' applies only"),
    ],
)
def test_build_stacked_refuses_an_option_the_strategy_does_not_use(strategy, options, message):
    # Before: build_adapter(**_) dropped intermediate and merge; the model had no such layers.
    with pytest.raises(ShapeError) as err:
        stacking.build_stacked(strategy, make_base(), make_head(), **options)
    assert str(err.value).startswith(message)


def test_build_stacked_passes_on_the_options_it_uses():
    layers = [{"class_name": "Dense", "config": {"units": 4}}]
    result = stacking.build_stacked(
        "functional", make_base(), make_head(in_features=4), intermediate=layers, merge=None
    )
    assert [layer.name for layer in result.model.layers][-2:] == ["intermediate_1_dense", "head"]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("single", {"stages": 4}, "schedule.stages=4 applies only to schedule=gradual"),
        ("single", {"fine_tune_epochs": 0}, "schedule.fine_tune_epochs=0 applies only"),
        ("two_phase", {"unfreeze_step": 2}, "schedule.unfreeze_step=2 applies only"),
        ("gradual", {"unfreeze_last": 3}, "schedule.unfreeze_last=3 applies only to schedule=two"),
    ],
)
def test_make_schedule_refuses_an_option_the_preset_does_not_use(name, options, message):
    # Before: single(**_) and the others dropped these options without a word.
    with pytest.raises(ScheduleError) as err:
        schedules.make_schedule(
            name, epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), **options
        )
    assert str(err.value).startswith(message)


def test_make_schedule_takes_none_as_the_presets_default_and_refuses_unknown_options():
    phases = schedules.make_schedule(
        "gradual", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), stages=None
    )
    assert len(phases) == 3  # gradual's own default
    with pytest.raises(ScheduleError, match="unknown option\\(s\\) \\['stagse'\\]"):
        schedules.make_schedule(
            "gradual", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(), stagse=4
        )


def test_two_phase_refuses_schedule_unfreeze_last_when_the_policy_decides_the_fine_tuning():
    # Before: with freeze=partial, schedule.unfreeze_last was dropped in silence.
    with pytest.raises(ScheduleError) as err:
        schedules.make_schedule(
            "two_phase",
            epochs=1,
            lr=1e-3,
            optimizer="adam",
            freeze=FreezePolicy("partial", unfreeze_last=1),
            unfreeze_last=3,
        )
    assert str(err.value).startswith(
        "schedule.unfreeze_last=3 applies only to schedule=two_phase with freeze=frozen"
    )
    frozen = schedules.make_schedule(
        "two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy()
    )
    assert frozen[1].freeze.unfreeze_last == 2


@pytest.mark.parametrize(
    ("policy", "options", "message"),
    [
        ("frozen", {"unfreeze_last": 2}, "freeze.unfreeze_last=2 applies only to freeze=partial"),
        ("joint", {"unfreeze_pattern": "conv"}, "freeze.unfreeze_pattern='conv' applies only"),
        (
            "joint",
            {"components": ("base",)},
            "freeze.components=[base] applies only to freeze=frozen or freeze=partial",
        ),
    ],
)
def test_freeze_policy_refuses_an_option_it_does_not_use(policy, options, message):
    # Before: FreezePolicy("joint", components=...) trained every component anyway.
    with pytest.raises(FreezeError) as err:
        FreezePolicy(policy, **options)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("options", [{"bn": "train"}, {"components": ("base",)}])
def test_single_refuses_frozen_settings_that_only_an_unfreezing_schedule_uses(options):
    with pytest.raises(ScheduleError) as err:
        schedules.make_schedule(
            "single", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(**options)
        )
    assert "schedule=single trains the head only, so it would be ignored" in str(err.value)
    two = schedules.make_schedule(
        "two_phase", epochs=1, lr=1e-3, optimizer="adam", freeze=FreezePolicy(**options)
    )
    assert two[1].freeze.kind == "partial"


def test_check_labels_speaks_the_configs_task_names():
    assert labels.check_labels(np.array([0, 2, 1]), 3, task="classification") == [0, 1, 2]
    with pytest.raises(Exception, match="Expected one of: classification, binary, regression"):
        labels.check_labels(np.array([0, 1]), 2, task="multiclass")
