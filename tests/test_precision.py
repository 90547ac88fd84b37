"""Mixed precision (train.precision): layer dtypes, float32 outputs, loss scaling, reload."""

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_base, make_data, make_head

from tfstack.datasets import ArrayDataset
from tfstack.freezing import FreezePolicy
from tfstack.precision import apply_policy, policy_counts, precision_scope, slow_on_this_machine
from tfstack.schedules import make_schedule
from tfstack.stacking import build_stacked
from tfstack.training import run_schedule

CONF = Path(__file__).resolve().parents[1] / "conf"
LOSS = "sparse_categorical_crossentropy"


@pytest.fixture(autouse=True)
def no_leaked_policy():
    """Every test starts and ends under Keras's default policy: the scope restores it."""
    assert keras.config.dtype_policy().name == "float32"
    yield
    assert keras.config.dtype_policy().name == "float32"


@pytest.fixture(scope="module")
def component_files(tmp_path_factory):
    """A float32 base and head saved once, with the base's weights as saved."""
    directory = tmp_path_factory.mktemp("components")
    keras.utils.set_random_seed(0)
    base, head = make_base(), make_head()
    base.save(directory / "base.keras")
    head.save(directory / "head.keras")
    return directory, [w.numpy() for w in base.weights]


def _stacked_from_files(component_files, policy):
    """The saved float32 components loaded and stacked under ``policy``, as build does."""
    directory, _ = component_files
    with precision_scope(policy):
        base = keras.saving.load_model(directory / "base.keras")
        head = keras.saving.load_model(directory / "head.keras")
        assert policy_counts(base) == {"float32": 8}  # the file's explicit policies win
        apply_policy(base, policy)
        kept = apply_policy(head, policy, float32_outputs=True)
        model = build_stacked("sequential", base, head, name="stacked").model
    return model, kept


@pytest.fixture(scope="module")
def bfloat16_stacked(component_files):
    """The components loaded and stacked under mixed_bfloat16 once, for the tests that read it."""
    return _stacked_from_files(component_files, "mixed_bfloat16")


def test_the_scope_restores_the_previous_policy_also_on_an_error():
    with pytest.raises(RuntimeError), precision_scope("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="Unknown precision 'fp16'"), precision_scope("fp16"):
        pass


def test_loaded_components_compute_in_bfloat16_with_float32_variables_and_output(
    component_files, bfloat16_stacked
):
    policy = "mixed_bfloat16"
    model, kept = bfloat16_stacked
    base = model.get_layer("base")
    conv = base.get_layer("conv1")
    assert (conv.compute_dtype, conv.variable_dtype) == ("bfloat16", "float32")
    assert {v.dtype for v in model.weights} == {"float32"}
    for ours, saved in zip(base.weights, component_files[1], strict=True):
        np.testing.assert_array_equal(ours.numpy(), saved)  # the file's weights, exactly
    assert kept == ["logits"]
    assert model.get_layer("head").get_layer("logits").compute_dtype == "float32"
    assert model.dtype_policy.name == policy  # what makes Keras scale the loss for float16
    x, _ = make_data(4)
    assert keras.backend.standardize_dtype(model(x).dtype) == "float32"
    assert policy_counts(model) == {policy: 8, "float32": 1}


def test_a_saved_stacked_model_reloads_with_its_dtypes(bfloat16_stacked, tmp_path):
    model, _ = bfloat16_stacked
    model.save(tmp_path / "stacked.keras")
    with precision_scope("mixed_bfloat16"):
        reloaded = keras.saving.load_model(tmp_path / "stacked.keras")
    assert policy_counts(reloaded) == {"mixed_bfloat16": 8, "float32": 1}
    assert reloaded.dtype_policy.name == "mixed_bfloat16"
    x, _ = make_data(4)
    np.testing.assert_array_equal(reloaded(x), model(x))


def test_float16_on_a_machine_without_a_gpu_warns_and_bfloat16_does_not():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert "slower than float32" in slow_on_this_machine("mixed_float16")
    assert slow_on_this_machine("mixed_bfloat16") is None
    assert slow_on_this_machine("float32") is None


def test_an_unknown_precision_is_one_line_naming_the_key():
    from tfstack.errors import ConfigError
    from tfstack.pipeline.compose import compose

    with pytest.raises(ConfigError) as caught:
        compose(["train.precision=float16"], config_dir=CONF)
    assert "train.precision='float16' is not valid. Expected one of" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.slow  # two phases of fitting
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_a_cached_head_phase_and_a_discriminative_fine_tune_give_finite_losses(
    component_files, policy, tmp_path
):
    model, _ = _stacked_from_files(component_files, policy)
    x, y = make_data(48)
    train = ArrayDataset(x, y, batch_size=16, shuffle=True, seed=0, epoch_seeded=True)
    val = ArrayDataset(*make_data(16, seed=1), batch_size=16, shuffle=False, seed=0)
    phases = make_schedule(
        "two_phase",
        epochs=2,
        lr=0.01,
        optimizer="adam",
        freeze=FreezePolicy("frozen"),
        lr_multipliers={"base": 0.5},
    )
    with precision_scope(policy):
        head, fine_tune = run_schedule(
            model,
            phases,
            train,
            val,
            loss=LOSS,
            metrics=["accuracy"],
            feature_extractors=["base"],
            verbose=0,
            cache_frozen=True,
        )
    conv = model.get_layer("base").get_layer("conv1")
    assert conv.compute_dtype == policy.removeprefix("mixed_")
    assert head.cached and not fine_tune.cached
    for result in (head, fine_tune):
        assert np.isfinite(result.history["loss"]).all() and result.epochs == 2
    optimizer = type(model.optimizer).__name__
    assert optimizer == (
        "LossScaleOptimizer" if policy == "mixed_float16" else "DiscriminativeAdam"
    )
    if policy == "mixed_float16":
        assert type(model.optimizer.inner_optimizer).__name__ == "DiscriminativeAdam"
    # As the evaluate stage reloads the trained model: with its (wrapped) optimizer.
    model.save(tmp_path / "model.keras")
    with precision_scope(policy):
        reloaded = keras.saving.load_model(tmp_path / "model.keras", compile=True)
    assert type(reloaded.optimizer).__name__ == optimizer
    np.testing.assert_array_equal(reloaded(x[:4]), model(x[:4]))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tfstack_run_in_mixed_bfloat16_with_balanced_class_weights_finishes(project):
    """The demo in bfloat16, a cached head phase then fine-tuning, its model logged."""
    import json

    from mlflow.tracking import MlflowClient
    from project_copy import tfstack

    result = tfstack(
        project,
        "run",
        "train.precision=mixed_bfloat16",
        "train.class_weight=balanced",
        "schedule=two_phase",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "slower than float32" not in result.stderr
    phases = json.loads((project / "outputs/train/phases.json").read_text())
    assert [p["cached"] for p in phases] == [True, False]

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tfstack").experiment_id])
    assert run.info.status == "FINISHED"
    assert np.isfinite(run.data.metrics["loss"]) and "test_accuracy" in run.data.metrics
    tags, params = run.data.tags, run.data.params
    assert params["train.precision"] == "mixed_bfloat16" and tags["precision"] == "mixed_bfloat16"
    # float32: the head's output layer and the demo's rescaling in front of the base.
    assert tags["precision.layers"].startswith("float32: 2, mixed_bfloat16: ")
    names = json.loads(
        Path(client.download_artifacts(run.info.run_id, "class_names.json")).read_text()
    )
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, "training/class_weight.json")).read_text()
    )
    assert logged["setting"] == "balanced" and list(logged["weights"]) == names
    assert {tags[f"class_weight.{name}"] for name in names} == {
        f"{w:.6g}" for w in logged["weights"].values()
    }

    with precision_scope("mixed_bfloat16"):
        model = keras.saving.load_model(project / "outputs/train/model.keras")
    counts = policy_counts(model)
    assert counts["float32"] == 2 and counts["mixed_bfloat16"] > 1, counts
    x = np.zeros((1, *model.inputs[0].shape[1:]), "float32")
    assert keras.backend.standardize_dtype(model(x).dtype) == "float32"


def test_the_front_blocks_stay_float32_so_the_base_takes_their_output():
    inputs = keras.Input((4,), name="pixels")
    front = keras.Sequential([keras.layers.Rescaling(1 / 255, name="scale")], name="preprocess")
    x = front(inputs)
    outputs = keras.layers.Dense(2, name="logits")(keras.layers.Dense(3, name="hidden")(x))
    model = keras.Model(inputs, outputs)
    kept = apply_policy(
        model, "mixed_bfloat16", float32_outputs=True, float32_blocks=("preprocess",)
    )
    assert set(kept) == {"scale", "logits"}
    assert model.get_layer("preprocess").get_layer("scale").dtype_policy.name == "float32"
    assert model.get_layer("hidden").dtype_policy.name == "mixed_bfloat16"
