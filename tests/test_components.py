"""Tests of loading pretrained components: every source format and every user error."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tfstack.components import is_opaque, load_component  # noqa: E402
from tfstack.errors import ComponentError  # noqa: E402

X = np.arange(12, dtype="float32").reshape(3, 4) / 10.0


def tiny_model() -> keras.Model:
    """A functional model (batch, 4) -> (batch, 8) features -> (batch, 2) logits."""
    inputs = keras.Input(shape=(4,), name="pixels")
    features = keras.layers.Dense(8, activation="relu", name="features")(inputs)
    logits = keras.layers.Dense(2, name="logits")(features)
    return keras.Model(inputs, logits, name="tiny")


def lambda_model() -> keras.Model:
    """A model with a Lambda layer, which Keras refuses to load in safe mode."""
    inputs = keras.Input(shape=(4,), name="pixels")
    doubled = keras.layers.Lambda(lambda tensor: tensor * 2.0, name="double")(inputs)
    return keras.Model(inputs, doubled, name="with_lambda")


def write_tf_keras_model(path: str, *, with_lambda: bool = False) -> np.ndarray:
    """Write a genuine Keras 2 (tf_keras) .h5 file and return its predictions on X."""
    tf_keras = pytest.importorskip("tf_keras")
    if with_lambda:
        inputs = tf_keras.Input(shape=(4,))
        outputs = tf_keras.layers.Lambda(lambda tensor: tensor * 2.0, name="double")(inputs)
        model = tf_keras.Model(inputs, outputs)
    else:
        model = tf_keras.Sequential(
            [
                tf_keras.layers.InputLayer(input_shape=(4,)),
                tf_keras.layers.Dense(3, name="hidden"),
                tf_keras.layers.Dense(2, name="logits"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is legacy": writing it is the point.
        model.save(path)
    return model.predict(X, verbose=0)


def run_python(code: str) -> None:
    """Run code in a fresh interpreter of this venv, so Keras' name counters start over."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, env=env)


def assert_message(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------- loaders


@pytest.mark.parametrize("extension", [".keras", ".h5"])
def test_keras3_file_loads_renamed_with_same_predictions(tmp_path, extension):
    original = tiny_model()
    path = str(tmp_path / f"model{extension}")
    original.save(path)

    model = load_component(path, name="base")

    assert model.name == "base"
    assert model.output.shape == (None, 2)
    np.testing.assert_allclose(model.predict(X, verbose=0), original.predict(X, verbose=0))
    assert not is_opaque(model)


@pytest.mark.slow
def test_tf_keras_h5_loads(tmp_path):
    path = str(tmp_path / "keras2.h5")
    expected = write_tf_keras_model(path)

    model = load_component(path, name="head")

    assert model.name == "head"
    assert [layer.name for layer in model.layers] == ["hidden", "logits"]
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, rtol=1e-6)


@pytest.mark.slow
def test_keras_application_mobilenetv2_without_download():
    model = load_component(
        "keras_applications:MobileNetV2",
        name="base",
        weights=None,
        input_shape=(32, 32, 3),
        include_top=False,
        pooling="avg",
    )

    assert model.name == "base"
    assert model.input.shape == (None, 32, 32, 3)
    assert model.output.shape == (None, 1280)


@pytest.mark.slow
def test_keras_application_loads_local_weights_file(tmp_path):
    arguments = {"input_shape": (32, 32, 3), "include_top": False, "pooling": "avg"}
    reference = keras.applications.MobileNetV2(weights=None, **arguments)
    weights_path = str(tmp_path / "mobilenet.weights.h5")
    reference.save_weights(weights_path)

    model = load_component(
        "keras_applications:MobileNetV2", name="base", weights=weights_path, **arguments
    )

    for loaded, saved in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, saved)


@pytest.mark.slow
def test_savedmodel_is_wrapped_frozen_and_opaque(tmp_path):
    original = tiny_model()
    export_dir = str(tmp_path / "exported")
    original.export(export_dir)

    model = load_component(export_dir, name="base", trust_code=True)

    assert model.name == "base"
    assert is_opaque(model)
    assert [layer.name for layer in model.layers] == ["base_input", "base_savedmodel"]
    assert model.input.shape == (None, 4)
    assert model.output.shape == (None, 2)
    assert model.trainable_weights == []
    np.testing.assert_allclose(model.predict(X, verbose=0), original.predict(X, verbose=0))


def test_savedmodel_wrapper_stays_opaque_after_keras_reload(tmp_path):
    export_dir = str(tmp_path / "exported")
    tiny_model().export(export_dir)
    wrapper_path = str(tmp_path / "wrapper.keras")
    load_component(export_dir, name="base", trust_code=True).save(wrapper_path)

    with pytest.raises(ComponentError) as error:
        load_component(wrapper_path, name="base")
    assert_message(error, wrapper_path, "TFSMLayer", "components.base.trust_code=true")

    reloaded = load_component(wrapper_path, name="base", trust_code=True)
    assert not hasattr(reloaded, "_tfstack_opaque")
    assert is_opaque(reloaded)
    assert is_opaque(keras.Sequential([reloaded], name="stacked"))


@pytest.mark.slow
def test_two_files_both_named_sequential_can_be_stacked(tmp_path):
    first, second = str(tmp_path / "first.keras"), str(tmp_path / "second.keras")
    for path, (width_in, width_out) in ((first, (4, 6)), (second, (6, 3))):
        run_python(
            f"""
            import keras
            model = keras.Sequential([keras.Input(({width_in},)), keras.layers.Dense({width_out})])
            model.save({path!r})
            """
        )
    # Precondition: each process named its model "sequential", so the names really collide.
    assert keras.saving.load_model(first).name == keras.saving.load_model(second).name
    assert keras.saving.load_model(first).name.startswith("sequential")

    base = load_component(first, name="base")
    head = load_component(second, name="head")
    stacked = keras.Sequential([base, head], name="stacked")

    assert [layer.name for layer in stacked.layers] == ["base", "head"]
    assert stacked.predict(X, verbose=0).shape == (3, 3)


def test_cut_at_keeps_subgraph_to_penultimate_layer(tmp_path):
    path = str(tmp_path / "classifier.keras")
    tiny_model().save(path)

    model = load_component(path, name="base", cut_at="features")

    assert model.name == "base"
    assert model.output.shape == (None, 8)
    assert [layer.name for layer in model.layers][-1] == "features"
    assert "logits" not in [layer.name for layer in model.layers]


def test_cut_at_works_for_sequential_with_input(tmp_path):
    path = str(tmp_path / "sequential.keras")
    keras.Sequential(
        [
            keras.Input(shape=(4,)),
            keras.layers.Dense(5, name="features"),
            keras.layers.Dense(2, name="logits"),
        ]
    ).save(path)

    model = load_component(path, name="base", cut_at="features")

    assert model.output.shape == (None, 5)
    assert model.predict(X, verbose=0).shape == (3, 5)


def test_trust_code_allows_lambda(tmp_path):
    path = str(tmp_path / "lambda.keras")
    lambda_model().save(path)

    model = load_component(path, name="base", trust_code=True)

    np.testing.assert_allclose(model.predict(X, verbose=0), X * 2.0)


def test_load_is_logged(tmp_path, caplog):
    path = str(tmp_path / "model.keras")
    tiny_model().save(path)

    with caplog.at_level(logging.INFO, logger="tfstack.components"):
        load_component(path, name="base")

    assert "base" in caplog.text
    assert path in caplog.text


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.keras")
    with pytest.raises(ComponentError) as error:
        load_component(path, name="base")
    assert_message(error, f"components.base.path={path}", "does not exist")


def test_custom_key_is_used_in_messages(tmp_path):
    path = str(tmp_path / "nowhere.keras")
    with pytest.raises(ComponentError) as error:
        load_component(path, name="base", key="model_1")
    assert_message(error, f"model_1.path={path}")


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"torch")
    with pytest.raises(ComponentError) as error:
        load_component(str(path), name="base")
    assert_message(error, f"components.base.path={path}", "'.pt'", ".keras, .h5", "model.save(")


@pytest.mark.parametrize("extension", [".keras", ".h5"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_file(tmp_path, extension, damage):
    path = tmp_path / f"model{extension}"
    if damage == "garbage":
        path.write_bytes(b"not a model at all" * 10)
    else:
        tiny_model().save(str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ComponentError) as error:
        load_component(str(path), name="base")
    assert_message(error, f"components.base.path={path}", "truncated or corrupt")


@pytest.mark.parametrize("writer", ["keras3", "tf_keras", "plain_hdf5"])
def test_h5_without_model_config(tmp_path, writer):
    path = str(tmp_path / "weights.h5")
    if writer == "keras3":
        tiny_model().save_weights(str(tmp_path / "weights.weights.h5"))
        path = str(tmp_path / "weights.weights.h5")
    elif writer == "tf_keras":
        tf_keras = pytest.importorskip("tf_keras")
        model = tf_keras.Sequential([tf_keras.layers.Dense(2)])
        model.build((None, 4))
        model.save_weights(path)
    else:
        with h5py.File(path, "w") as file:
            file["table"] = np.arange(3)

    with pytest.raises(ComponentError) as error:
        load_component(path, name="base")
    assert_message(error, f"components.base.path={path}", "no model_config", "model.save(")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ComponentError) as error:
        load_component(str(tmp_path), name="base")
    assert_message(error, f"components.base.path={tmp_path}", "saved_model.pb", "notes.txt")


@pytest.mark.parametrize("extension", [".keras", ".h5"])
def test_lambda_in_untrusted_file_is_refused(tmp_path, extension):
    path = str(tmp_path / f"lambda{extension}")
    lambda_model().save(path)

    with pytest.raises(ComponentError) as error:
        load_component(path, name="base")
    assert_message(
        error,
        f"components.base.path={path} holds a Lambda layer (double), which runs arbitrary code",
        "safe_mode=True",
        "set components.base.trust_code=true",
    )


def test_lambda_in_untrusted_tf_keras_h5_is_refused(tmp_path):
    path = str(tmp_path / "keras2_lambda.h5")
    write_tf_keras_model(path, with_lambda=True)

    with pytest.raises(ComponentError) as error:
        load_component(path, name="base")
    assert_message(error, path, "Lambda layer (double)", "components.base.trust_code=true")


def test_sequential_without_input_is_refused(tmp_path):
    path = str(tmp_path / "unbuilt.keras")
    with pytest.warns(UserWarning):  # Keras warns that the model is not built; that is the point.
        keras.Sequential([keras.layers.Dense(2, name="logits")]).save(path)

    with pytest.raises(ComponentError) as error:
        load_component(path, name="base")
    assert_message(error, path, "no defined input", "keras.Input(shape=...)", "model.build(")


def test_cut_at_unknown_layer_lists_available_names(tmp_path):
    path = str(tmp_path / "classifier.keras")
    tiny_model().save(path)

    with pytest.raises(ComponentError) as error:
        load_component(path, name="base", cut_at="penultimate")
    assert_message(error, "components.base.cut_at=penultimate", path, "features, logits")


def test_cut_at_on_savedmodel_is_refused(tmp_path):
    export_dir = str(tmp_path / "exported")
    tiny_model().export(export_dir)
    with pytest.raises(ComponentError) as error:
        load_component(export_dir, name="base", cut_at="features", trust_code=True)
    assert_message(error, "components.base.cut_at=features", export_dir, "opaque")


def test_savedmodel_with_several_inputs_is_refused(tmp_path):
    left, right = keras.Input(shape=(3,), name="left"), keras.Input(shape=(2,), name="right")
    joined = keras.layers.Concatenate(name="joined")([left, right])
    export_dir = str(tmp_path / "two_inputs")
    keras.Model([left, right], joined).export(export_dir)

    with pytest.raises(ComponentError) as error:
        load_component(export_dir, name="base", trust_code=True)
    assert_message(error, export_dir, "takes 2 inputs", "one input only", ".keras")


def test_savedmodel_with_several_outputs_is_refused(tmp_path):
    inputs = keras.Input(shape=(3,), name="pixels")
    outputs = [keras.layers.Dense(1, name="a")(inputs), keras.layers.Dense(2, name="b")(inputs)]
    export_dir = str(tmp_path / "two_outputs")
    keras.Model(inputs, outputs).export(export_dir)

    with pytest.raises(ComponentError) as error:
        load_component(export_dir, name="base", trust_code=True)
    assert_message(error, export_dir, "returns 2 outputs", "one output only")


def test_application_weights_that_are_no_file_are_refused():
    # weights=imagenet (the Keras cache, or a download) is tested in test_backbones.py.
    weights = "/no/such/weights.h5"
    with pytest.raises(ComponentError) as error:
        load_component("keras_applications:MobileNetV2", name="base", weights=weights)
    assert_message(
        error, f"components.base.weights={weights!r}", "neither imagenet nor a local file"
    )


@pytest.mark.parametrize("application", ["MobileNetV9", "mobilenet_v2"])
def test_unknown_application_suggests_a_name(application):
    with pytest.raises(ComponentError) as error:
        load_component(f"keras_applications:{application}", name="base")
    assert_message(
        error, f"components.base.path=keras_applications:{application}", "Did you mean", "MobileNet"
    )


def test_application_that_cannot_be_built():
    with pytest.raises(ComponentError) as error:
        load_component(
            "keras_applications:MobileNetV2", name="base", input_shape=(8, 8, 3), pooling="avg"
        )
    assert_message(error, "keras_applications:MobileNetV2", "input_shape=(8, 8, 3)", "32x32")


def test_application_arguments_on_a_file_are_refused(tmp_path):
    path = str(tmp_path / "model.keras")
    tiny_model().save(path)
    with pytest.raises(ComponentError) as error:
        load_component(path, name="base", pooling="avg", input_shape=(4,))
    assert_message(
        error, path, "components.base.pooling", "components.base.input_shape", "keras_applications"
    )
