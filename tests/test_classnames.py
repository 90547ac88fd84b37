"""Class names end to end: the confusion matrix, the run, and a served model that answers with them.

Real Keras models, a real sqlite MLflow store under tmp_path and a real `mlflow models serve`.
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import keras  # noqa: E402
import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from project_copy import env, tfstack  # noqa: E402

from tfstack import evaluation, tracking  # noqa: E402
from tfstack.adapters import Cast  # noqa: E402
from tfstack.errors import DataError  # noqa: E402
from tfstack.pipeline.compose import compose  # noqa: E402
from tfstack.pipeline.inputs import class_names  # noqa: E402
from tfstack.pipeline.paths import Paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "eel"]
PICKLE = re.compile(r"\.(pkl|pickle|cloudpickle|joblib)$")


def uint8_classifier(classes: int = 3, activation: str = "softmax") -> keras.Model:
    """Raw uint8 (4, 4, 1) images -> class probabilities, with tfstack's registered Cast layer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1), name="image")
    x = Cast("float32", name="cast")(inputs)
    x = keras.layers.Rescaling(1 / 255, name="rescale")(x)
    x = keras.layers.Flatten(name="flatten")(x)  # (batch, 4, 4, 1) -> (batch, 16)
    outputs = keras.layers.Dense(classes, activation=activation, name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def uint8_images(n: int = 8) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(n, 4, 4, 1)).astype(np.uint8)


def test_confusion_matrix_axes_and_rows_carry_the_class_names():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x, y = np.random.default_rng(0).normal(size=(12, 4)).astype("float32"), np.arange(12) % 3
    result = evaluation.evaluate(
        model, x, y, task="classification", loss="sparse_categorical_crossentropy",
        class_names=NAMES,
    )  # fmt: skip
    ax = result.figures["confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    rows = result.tables["confusion.json"]
    assert [row["actual"] for row in rows] == [NAMES[label] for label in y]
    assert {row["predicted"] for row in rows} <= set(NAMES)
    # Without names, the rows keep the class ids DVC's template has always received.
    plain = evaluation.confusion_rows(y, y)
    assert plain[:3] == [{"actual": i, "predicted": i} for i in range(3)]


def _config(tmp_path: Path, *overrides: str):
    config = compose([f"output_dir={tmp_path / 'out'}", *overrides], config_dir=ROOT / "conf")
    return config, Paths.from_config(config, tmp_path)


def _npz(path: Path, **extra) -> Path:
    x, y = np.zeros((6, 2), "float32"), np.arange(6) % 3
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y, **extra)
    return path


@pytest.mark.slow
def test_class_names_come_from_the_data_or_are_the_class_ids(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    named = _npz(tmp_path / "named.npz", class_names=np.array(["zebra", "ant", "moth"]))
    config, paths = _config(tmp_path, "data=npz", f"data.path={named}")
    # The file's order is the label order (name i is label i), so it is kept, not sorted.
    assert class_names(config, paths, None, model) == ["zebra", "ant", "moth"]

    plain = _npz(tmp_path / "plain.npz")
    config, paths = _config(tmp_path, "data=npz", f"data.path={plain}")
    assert class_names(config, paths, None, model) == ["0", "1", "2"]

    class FolderSplits:  # what the image-folder loader gives: names from the folders
        class_names = ["bird", "cat", "dog"]

    assert class_names(config, paths, FolderSplits(), model) == ["bird", "cat", "dog"]
    config, paths = _config(tmp_path, "data=npz", f"data.path={plain}", "train=regression")
    assert class_names(config, paths, None, model) is None


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (np.array(["a", "b"]), r"2 class names \['a', 'b'\] for a head .* with 3 classes"),
        (np.array(["a", "b", "a"]), r"repeat \['a'\]"),
        (np.array(["a", "label", "c"]), r"include 'label'.*the served model's column"),
        (np.array([1, 2, 3]), r"class_names must be a 1-D array of strings; received dtype int"),
    ],
)
def test_class_names_that_do_not_fit_are_refused_naming_the_file(tmp_path, names, message):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    path = _npz(tmp_path / "bad.npz", class_names=names)
    config, paths = _config(tmp_path, "data=npz", f"data.path={path}")
    with pytest.raises(DataError, match=message) as caught:
        class_names(config, paths, None, model)
    assert str(caught.value).startswith(f"data.path={path}")


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module's pyfunc tests: creating a sqlite store costs seconds."""
    return tracking.default_tracking_uri(tmp_path_factory.mktemp("store"))


def _model_dir(client: MlflowClient, model_uri: str) -> Path:
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    return Path(urllib.parse.urlparse(logged.artifact_location).path)


@pytest.mark.slow
def test_pyfunc_classifier_answers_raw_images_with_names_and_probabilities(uri):
    model, x = uint8_classifier(), uint8_images()
    run_id = tracking.start_run(uri, "classes")
    model_uri = tracking.log_classifier_model(run_id, model, x, NAMES)
    tracking.end_run(run_id)

    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model(f"runs:/{run_id}/classifier")
        table = served.predict(x)
        [spec] = served.metadata.signature.inputs.inputs
        with pytest.raises(mlflow.exceptions.MlflowException, match="dtype"):
            served.predict(x.astype("float32"))  # the signature keeps the data's uint8
    finally:
        mlflow.set_tracking_uri(None)
    assert list(table.columns) == ["label", *NAMES]
    probabilities = table[NAMES].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probabilities, model.predict(x, verbose=0), rtol=1e-6)
    assert list(table["label"]) == [NAMES[i] for i in probabilities.argmax(axis=1)]
    assert (str(spec.type), tuple(spec.shape)) == ("uint8", (-1, 4, 4, 1))
    assert served.metadata.metadata["class_names"] == NAMES
    # A model from code: the class's file, the .keras model and the names; no pickle at all.
    files = {p.name for p in _model_dir(MlflowClient(uri), model_uri).rglob("*") if p.is_file()}
    assert {"classifier.py", "model.keras", "class_names.json"} <= files
    assert not [name for name in files if PICKLE.search(name)]


@pytest.mark.slow
def test_pyfunc_classifier_of_a_binary_head_gives_both_probabilities(uri):
    model, x = uint8_classifier(classes=1, activation="sigmoid"), uint8_images()
    run_id = tracking.start_run(uri, "classes")
    tracking.log_classifier_model(run_id, model, x, ["no", "yes"], name="binary")
    tracking.end_run(run_id)
    mlflow.set_tracking_uri(uri)
    try:
        table = mlflow.pyfunc.load_model(f"runs:/{run_id}/binary").predict(x)
    finally:
        mlflow.set_tracking_uri(None)
    positive = model.predict(x, verbose=0)[:, 0]
    np.testing.assert_allclose(table["yes"], positive, rtol=1e-6)
    np.testing.assert_allclose(table["no"] + table["yes"], 1.0, rtol=1e-6)
    assert list(table["label"]) == ["yes" if p >= 0.5 else "no" for p in positive]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(server: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer /ping within {timeout} s")


@pytest.mark.slow
def test_a_run_logs_class_names_and_mlflow_models_serve_answers_with_them(project):
    # The default config: the demo's target task as an image folder, class folders "5".."9".
    names = ["5", "6", "7", "8", "9"]
    result = tfstack(project, "run")
    assert result.returncode == 0, result.stderr
    with np.load(project / "outputs" / "prepare" / "target.npz") as target:
        x_test = target["x_test"]  # the same PNGs' pixels, uint8 0..255

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs(client.get_experiment_by_name("tfstack").experiment_id)
    run_id = run.info.run_id
    stored = Path(client.download_artifacts(run_id, "class_names.json", str(project)))
    assert json.loads(stored.read_text()) == names
    rows = json.loads((project / "outputs/evaluate/plots/confusion.json").read_text())
    assert {row["actual"] for row in rows} == set(names)
    # Signed with the images' natural dtype: a client sends the PNGs' uint8 pixels.
    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.models.get_model_info(f"runs:/{run_id}/classifier")
    finally:
        mlflow.set_tracking_uri(None)
    [spec] = info.signature.inputs.inputs
    assert (str(spec.type), tuple(spec.shape)) == ("uint8", (-1, 8, 8, 1))

    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"runs:/{run_id}/classifier",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=project, env={**env(), "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_ping(server, port)
        body = json.dumps({"inputs": x_test[:3].tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
        server.wait(timeout=30)
    assert len(predictions) == 3
    for prediction in predictions:
        assert prediction["label"] in names
        assert sum(prediction[name] for name in names) == pytest.approx(1.0, abs=1e-5)
        assert prediction["label"] == max(names, key=lambda name: prediction[name])


def test_the_served_input_example_is_a_few_samples_in_the_data_dtype():
    from tfstack.datasets import ArrayDataset
    from tfstack.pipeline.inputs import served_example

    def example(shape, dtype):
        x = np.zeros((12, *shape), dtype)
        return served_example(ArrayDataset(x, np.zeros(12), batch_size=4, shuffle=False, seed=0))

    small, large = example((8, 8, 1), "uint8"), example((224, 224, 3), "uint8")
    assert (small.shape, small.dtype) == ((5, 8, 8, 1), np.uint8)
    assert large.shape == (1, 224, 224, 3)  # one sample: 0.79 MB of JSON, stored twice
    assert example((64, 64, 3), "float32").dtype == np.float32  # floats stay floats
