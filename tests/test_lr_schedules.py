"""Learning-rate schedules per phase (tfstack.lr_schedules): the rates applied, resume, config.

The formulas are checked on the built schedules (no training); the rates applied in training
are read from the optimizer before every step of tiny dense models (slow: a few seconds each
on the shared machine); one slow end-to-end test
runs `tfstack run` with a cosine schedule and reads the MLflow run back.
"""

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
from stop_callbacks import KillAfter, Killed

from tfstack import checkpoints
from tfstack.datasets import ArrayDataset
from tfstack.errors import ConfigError, ScheduleError
from tfstack.freezing import FreezePolicy
from tfstack.lr_schedules import LrScheduleSpec
from tfstack.schedules import Phase, make_optimizer, make_schedule
from tfstack.stacking import build_stacked
from tfstack.training import run_schedule

LR = 0.1
SPE = 3  # steps per epoch: 12 samples in batches of 4
CONF = Path(__file__).resolve().parents[1] / "conf"


def _rate(spec, step, epochs=4):
    return float(spec.build(LR, steps_per_epoch=SPE, epochs=epochs)(step))


# ---------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------


def test_cosine_decays_from_the_rate_to_its_final_fraction_over_the_phase():
    spec = LrScheduleSpec("cosine", final_fraction=0.1)
    total = 4 * SPE
    for step in (0, 1, 5, 11, 12, 40):
        expected = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        assert _rate(spec, step) == pytest.approx(expected, rel=1e-6), step


@pytest.mark.parametrize("warmup", [{"warmup_epochs": 1}, {"warmup_steps": 3}])
def test_cosine_warms_up_linearly_to_the_rate_then_decays_over_the_rest(warmup):
    spec = LrScheduleSpec("cosine", **warmup)
    warming = [LR / 4, 2 * LR / 4, 3 * LR / 4, LR]  # no step at 0
    assert [_rate(spec, s) for s in (0, 1, 2, 3)] == pytest.approx(warming)
    decay = 4 * SPE - 3
    for step in (4, 8, 12):
        expected = LR * 0.5 * (1 + math.cos(math.pi * (step - 3) / decay))
        assert _rate(spec, step) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_exponential_decays_per_step_or_per_decay_epochs_with_staircase():
    smooth = LrScheduleSpec("exponential", decay_rate=0.5)
    assert [_rate(smooth, s) for s in (0, 1, 3, 6)] == pytest.approx(
        [LR, LR * 0.5 ** (1 / 3), LR * 0.5, LR * 0.25]
    )
    stairs = LrScheduleSpec("exponential", decay_rate=0.5, decay_epochs=2, staircase=True)
    assert [_rate(stairs, s) for s in (0, 5, 6, 11, 12)] == pytest.approx(
        [LR, LR, LR / 2, LR / 2, LR / 4]
    )


def test_step_multiplies_by_factor_at_the_first_step_of_every_step_epochs_th_epoch():
    spec = LrScheduleSpec("step", step_epochs=2, factor=0.5)
    rates = [_rate(spec, s, epochs=5) for s in range(5 * SPE)]
    epoch_rates = [LR * 0.5 ** (epoch // 2) for epoch in range(5)]
    assert rates == pytest.approx([r for r in epoch_rates for _ in range(SPE)])
    # A phase no longer than step_epochs never reduces: the plain rate.
    assert LrScheduleSpec("step", step_epochs=5).build(LR, steps_per_epoch=SPE, epochs=5) == LR


def test_constant_and_reduce_on_plateau_compile_with_the_plain_rate():
    for name in ("constant", "reduce_on_plateau"):
        assert LrScheduleSpec(name).build(LR, steps_per_epoch=None, epochs=3) == LR


def test_the_multipliers_scale_the_scheduled_rate_of_each_step():
    """A component at 0.1x gets 0.1x the schedule's rate (SGD: the update is rate * gradient)."""
    model = _model()
    schedule = LrScheduleSpec("exponential", decay_rate=0.5).build(LR, steps_per_epoch=1, epochs=4)
    optimizer = make_optimizer("sgd", schedule, model=model, lr_multipliers={"base": 0.1})
    variables = model.trainable_variables
    optimizer.build(variables)
    for step in (0, 1, 2):
        before = [np.array(v) for v in variables]
        optimizer.apply_gradients([(keras.ops.ones(v.shape), v) for v in variables])
        rate = LR * 0.5**step
        for variable, old in zip(variables, before, strict=True):
            factor = 0.1 if variable.path.startswith("base/") else 1.0
            np.testing.assert_allclose(old - np.array(variable), rate * factor, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# In training
# ---------------------------------------------------------------------------------------------


class StepRates(keras.callbacks.Callback):
    """The learning rate the optimizer gives each step, read just before the step."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def _model():
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(4)],
        name="base",
    )
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, "softmax")], name="head")
    return build_stacked("sequential", base, head).model


def _data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)).astype("float32"), np.arange(12) % 2
    train = ArrayDataset(x, y, batch_size=4, shuffle=True, seed=0, epoch_seeded=True)
    return train, ArrayDataset(x[:8], y[:8], batch_size=8, shuffle=False, seed=0)


def _fit(phases, lr_schedule, **options):
    model = _model()
    train, val = _data()
    results = run_schedule(
        model,
        phases,
        train,
        val,
        loss="sparse_categorical_crossentropy",
        feature_extractors=["base"],
        verbose=0,
        lr_schedule=lr_schedule,
        **options,
    )
    return model, results


@pytest.mark.slow
def test_training_applies_the_schedule_from_each_phases_first_step_and_logs_its_epoch_start():
    spec = LrScheduleSpec("cosine", warmup_steps=2)
    phases = make_schedule(
        "two_phase", epochs=2, lr=LR, optimizer="sgd", freeze=FreezePolicy("frozen")
    )
    steps = StepRates()
    _, results = _fit(phases, spec, callbacks=[steps])
    for index, result in enumerate(results):
        expected = [_rate(spec, s, epochs=2) * (0.1 if index else 1) for s in range(2 * SPE)]
        assert steps.rates[index * 2 * SPE : (index + 1) * 2 * SPE] == pytest.approx(expected)
        # The epoch's row: the rate of its first step.
        assert result.history["lr"] == pytest.approx([expected[0], expected[SPE]])
        assert result.lr_schedule == {"name": "cosine", "warmup_steps": 2, "final_fraction": 0.0}


@pytest.mark.slow
def test_reduce_on_plateau_reduces_after_patience_epochs_without_improvement():
    # min_delta that no change reaches: only the first epoch improves.
    spec = LrScheduleSpec(
        "reduce_on_plateau", monitor="loss", patience=2, factor=0.5, min_delta=1e9
    )
    phase = Phase("train", 6, FreezePolicy("joint"), LR, "sgd")
    _, (result,) = _fit([phase], spec)
    assert result.history["lr"] == pytest.approx([LR, LR, LR, LR / 2, LR / 2, LR / 4])
    assert "learning_rate" not in result.history  # Keras's copy of it is not logged twice


@pytest.mark.slow
def test_a_constant_schedule_trains_and_logs_as_without_one():
    phase = Phase("train", 2, FreezePolicy("joint"), LR, "adam")
    plain, (without,) = _fit([phase], None)
    constant, (with_it,) = _fit([phase], LrScheduleSpec())
    assert without.history == with_it.history and "lr" not in with_it.history
    for a, b in zip(plain.get_weights(), constant.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


RESUMED = [
    LrScheduleSpec("cosine", warmup_epochs=1, final_fraction=0.2),
    LrScheduleSpec("reduce_on_plateau", monitor="loss", patience=1, factor=0.5, min_delta=1e9),
]


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 4])  # inside the cosine phase; after a reduction
def test_a_resumed_phase_continues_its_schedule_to_the_uninterrupted_rates_and_weights(
    tmp_path, kill_after
):
    phases = make_schedule(
        "two_phase", epochs=3, lr=LR, optimizer="adam", freeze=FreezePolicy("frozen")
    )
    whole, whole_results = _fit(phases, RESUMED, checkpoint_dir=tmp_path / "whole")
    with pytest.raises(Killed):
        _fit(phases, RESUMED, checkpoint_dir=tmp_path / "k", callbacks=[KillAfter(kill_after)])
    state = checkpoints.read_state(tmp_path / "k")
    assert state.epochs_done == kill_after + 1
    steps = StepRates()
    resumed, results = _fit(
        phases, RESUMED, checkpoint_dir=tmp_path / "k", resume_from=state, callbacks=[steps]
    )
    assert [r.history for r in results] == [r.history for r in whole_results]
    assert results[1].history["lr"] == pytest.approx([LR / 10, LR / 10, LR / 20])
    # The resumed process's first step has the rate the uninterrupted run logged for its epoch.
    logged = [rate for r in whole_results for rate in r.history["lr"]]
    assert steps.rates[0] == pytest.approx(logged[kill_after + 1])
    for a, b in zip(whole.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_cached_head_phase_applies_the_same_rates():
    spec = LrScheduleSpec("step", step_epochs=1, factor=0.5)
    phase = Phase("head", 2, FreezePolicy("frozen"), LR, "sgd")
    rates = {}
    for cache in (False, True):
        steps = StepRates()
        _, (result,) = _fit([phase], spec, callbacks=[steps], cache_frozen=cache)
        assert result.cached is cache
        rates[cache] = steps.rates
    assert rates[True] == rates[False] == pytest.approx([LR] * SPE + [LR / 2] * SPE)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "linear"}, "train.lr_schedule.name='linear' is not a schedule"),
        (
            {"name": "cosine", "warmup_epochs": 1, "warmup_steps": 3},
            "train.lr_schedule.warmup_epochs and train.lr_schedule.warmup_steps are both set",
        ),
        (
            {"name": "cosine", "factor": 0.5},
            "train.lr_schedule.factor=0.5 applies only to train.lr_schedule.name=step",
        ),
        ({"name": "reduce_on_plateau", "factor": 1.5}, "factor=1.5 must be below 1"),
        ({"name": "exponential", "decay_rate": 0.0}, "decay_rate=0.0 must be above 0."),
        ({"name": "cosine", "final_fraction": 2.0}, "final_fraction=2.0 must be at most 1"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key(kwargs, message):
    with pytest.raises(ScheduleError) as caught:
        LrScheduleSpec(**kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_warmup_that_fills_the_phase_is_refused_naming_the_setting():
    spec = LrScheduleSpec("cosine", warmup_epochs=3, setting="schedule.lr_schedule.fine_tune")
    with pytest.raises(ScheduleError, match=r"^schedule.lr_schedule.fine_tune: the warmup"):
        spec.build(LR, steps_per_epoch=SPE, epochs=3)


@pytest.fixture(scope="module")
def two_phase_config():
    """One composed config (a compose costs about a second); tests change copies of it."""
    from tfstack.pipeline.compose import compose

    return compose(["schedule=two_phase"], config_dir=CONF)


def _per_phase(config, train=None, per_phase=None):
    """`lr_schedule_per_phase` of a copy of ``config`` with those settings."""
    import copy

    from tfstack.pipeline.phase_settings import lr_schedule_per_phase
    from tfstack.pipeline.schema import LrScheduleConfig

    config = copy.deepcopy(config)
    config.train.lr_schedule = LrScheduleConfig(**(train or {}))
    config.schedule.lr_schedule = per_phase or {}
    return lr_schedule_per_phase(config, ["head", "fine_tune"])


@pytest.mark.parametrize(
    ("train", "per_phase", "message"),
    [
        ({"name": "linear"}, None, "train.lr_schedule.name='linear' is not a schedule"),
        (
            {"warmup_epochs": 2},
            None,
            "train.lr_schedule.warmup_epochs=2 applies only to train.lr_schedule.name=cosine, "
            "and the name is 'constant', so it would be ignored.",
        ),
        (
            {"name": "cosine", "warmup_epochs": 1, "warmup_steps": 5},
            None,
            "train.lr_schedule.warmup_epochs and train.lr_schedule.warmup_steps are both set",
        ),
        (
            {"name": "reduce_on_plateau", "monitor": "val_acc"},
            None,
            "train.lr_schedule.monitor='val_acc' is not in the training history.",
        ),
        (
            {"name": "step", "step_epochs": 0},
            None,
            "train.lr_schedule.step_epochs=0 must be at least 1.",
        ),
        (
            None,
            {"finetune": {"name": "cosine"}},
            "schedule.lr_schedule.finetune: schedule=two_phase has no phase 'finetune'.",
        ),
        (
            None,
            {"head": {"name": "cosine", "warmup": 2}},
            "schedule.lr_schedule.head.warmup is not a config key.",
        ),
        (
            None,
            {"head": {"name": "exponential", "staircase": 1}},
            "schedule.lr_schedule.head.staircase=1 must be true or false.",
        ),
        (
            None,
            {"head": "cosine"},
            "schedule.lr_schedule.head='cosine' is not valid. Use null",
        ),
    ],
)
def test_a_bad_lr_schedule_setting_is_one_line_naming_the_key(
    two_phase_config, train, per_phase, message
):
    with pytest.raises(ConfigError) as caught:
        _per_phase(two_phase_config, train, per_phase)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_tfstack_run_refuses_a_bad_lr_schedule_before_training_naming_the_key(project):
    from project_copy import tfstack

    result = tfstack(project, "run", "train.lr_schedule.name=cosine", "train.lr_schedule.factor=2")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("tfstack: error: train.lr_schedule.factor=2.0 applies only to")
    )
    assert not (project / "outputs/train").exists()


def test_a_phase_overrides_the_common_schedule_replaces_it_with_a_name_or_turns_it_off(
    two_phase_config,
):
    common = {"name": "cosine", "final_fraction": 0.1}
    per_phase = _per_phase(two_phase_config, common, {"head": {"warmup_epochs": 1}})
    assert per_phase == [
        ({**common, "warmup_epochs": 1}, "schedule.lr_schedule.head"),
        (common, "train.lr_schedule"),
    ]
    replaced = _per_phase(
        two_phase_config, common, {"head": {"name": "step", "step_epochs": 3}, "fine_tune": None}
    )
    assert replaced == [
        ({"name": "step", "step_epochs": 3}, "schedule.lr_schedule.head"),
        ({"name": "constant"}, "schedule.lr_schedule.fine_tune"),
    ]
    assert _per_phase(two_phase_config) == [({"name": "constant"}, "train.lr_schedule")] * 2


@pytest.mark.slow
def test_tfstack_run_with_cosine_logs_the_rates_the_schedule_and_its_tags(project):
    from mlflow.tracking import MlflowClient
    from project_copy import tfstack

    result = tfstack(
        project,
        "run",
        "schedule=two_phase",
        "train.epochs=3",
        "train.lr_schedule.name=cosine",
        "+schedule.lr_schedule.fine_tune={warmup_epochs: 1}",
        "tracking.log_model=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    head, fine_tune = json.loads((project / "outputs/train/phases.json").read_text())
    assert head["lr_schedule"] == {"name": "cosine", "warmup_epochs": 0, "final_fraction": 0.0}
    assert fine_tune["lr_schedule"]["warmup_epochs"] == 1
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr_schedule.name"] == "cosine"
    assert run.data.tags["phase.0.lr_schedule"] == "cosine(warmup_epochs=0, final_fraction=0.0)"
    assert run.data.tags["phase.1.lr_schedule"] == "cosine(warmup_epochs=1, final_fraction=0.0)"
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert sorted(lr) == list(range(6))
    assert lr[0] == pytest.approx(head["lr"]) and lr[0] > lr[1] > lr[2] > 0  # decays
    assert 0 < lr[3] < lr[4] and lr[4] == pytest.approx(fine_tune["lr"])  # warms up
    assert lr[5] == pytest.approx(fine_tune["lr"] / 2)  # half-way down the cosine
    history = json.loads((project / "outputs/train/history.json").read_text())
    assert [row["lr"] for row in history] == pytest.approx([lr[step] for step in range(6)])
