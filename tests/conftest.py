"""Shared fixtures: tiny Keras models built in the test, and quiet TensorFlow logs."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from project_copy import clone, make_template  # noqa: E402


def make_base(name: str = "base", input_shape=(8, 8, 1), features: int = 8) -> keras.Model:
    """A tiny CNN feature extractor with BatchNormalization: (batch, 8, 8, 1) -> (batch, k)."""
    inputs = keras.Input(input_shape, name=f"{name}_input")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)  # (batch, 8, 8, 6) -> (batch, 6)
    x = keras.layers.Dense(features, activation="relu", name="features")(x)
    return keras.Model(inputs, x, name=name)


def make_head(name: str = "head", in_features: int = 8, classes: int = 3) -> keras.Model:
    """A tiny classifier head: (batch, in_features) -> (batch, classes) softmax."""
    return keras.Sequential(
        [
            keras.Input((in_features,), name=f"{name}_input"),
            keras.layers.Dense(classes, activation="softmax", name="logits"),
        ],
        name=name,
    )


def make_data(n: int = 48, classes: int = 3, seed: int = 0, input_shape=(8, 8, 1)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *input_shape)).astype("float32")
    y = rng.integers(0, classes, size=n).astype("int32")
    return x, y


@pytest.fixture
def base():
    keras.utils.set_random_seed(0)
    return make_base()


@pytest.fixture
def head():
    keras.utils.set_random_seed(1)
    return make_head()


def make_stacked(seed: int = 0) -> keras.Model:
    """`make_base` and `make_head` stacked in sequence, their weights drawn from ``seed``."""
    from tfstack.stacking import build_stacked

    keras.utils.set_random_seed(seed)
    return build_stacked("sequential", make_base(), make_head()).model


@pytest.fixture(scope="module")
def deterministic_ops():
    """As the pipeline runs (seed_everything): deterministic TensorFlow ops.

    A module asks for it with ``pytestmark = pytest.mark.usefixtures("deterministic_ops")``.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


@pytest.fixture
def data():
    return make_data()


@pytest.fixture(autouse=True)
def feature_cache_dir(tmp_path_factory, monkeypatch):
    """The shared frozen-feature cache of `tfstack run` in a test: its own, never ~/.cache."""
    directory = tmp_path_factory.mktemp("feature_cache")
    monkeypatch.setenv("TFSTACK_FEATURE_CACHE", str(directory))
    return directory


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """The shrunk demo project, prepared and pretrained once per session; tests use a `project`."""
    return make_template(tmp_path_factory.mktemp("project"))


@pytest.fixture
def project(template, tmp_path, monkeypatch):
    """A copy of the template as the working directory, with no tracking URI leaked into it."""
    for name in (
        "TFSTACK_TRACKING_URI",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "HYDRA_FULL_ERROR",
    ):
        monkeypatch.delenv(name, raising=False)
    project = clone(template, tmp_path / "project")
    monkeypatch.chdir(project)
    yield project
    if "mlflow" in sys.modules:  # a test that ran tfstack in-process set the process-wide URI
        sys.modules["mlflow"].set_tracking_uri(None)
