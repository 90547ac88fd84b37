"""`tfstack predict`: a run's, a registered and a saved model on image files, folders, CSVs, .npz.

Real Keras models, a real sqlite MLflow store under tmp_path (the model registered with
MlflowClient directly), real PNG files decoded by TensorFlow; the command runs in-process.
"""

import csv
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from tfstack import tracking  # noqa: E402
from tfstack.cli import main  # noqa: E402
from tfstack.image_files import ImageOptions  # noqa: E402

NAMES = ["cat", "dog", "eel"]
HEADER = ["path", "label", "p_cat", "p_dog", "p_eel"]


def classifier(channels: int = 1) -> keras.Model:
    """(6, 6, channels) pixels 0..255 -> 3 class probabilities, its rescaling in front."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, channels), name="image")
    x = keras.layers.Rescaling(1 / 255, name="preprocess")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)  # (batch, 6, 6, c) -> (batch, 36 c)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="classifier")


def write_images(folder, count: int, seed: int = 0, size=(9, 7), mode="L") -> list[str]:
    """PNG files of random pixels, another size than the model's (they are resized)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(str(path))
    return paths


def expected_labels(model, files, names=NAMES) -> list[str]:
    """The model's own argmax on the images decoded as training decodes them."""
    import tensorflow as tf

    from tfstack.images import decode_image

    options = ImageOptions((6, 6), color_mode="grayscale")
    x = np.stack([decode_image(tf.constant(f), options).numpy() for f in files])
    return [names[i] for i in model.predict(x, verbose=0).argmax(axis=1)]


def read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def predict(capsys, *args) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two loose images, a folder of class folders, a CSV of paths and an .npz."""
    root = tmp_path_factory.mktemp("inputs")
    loose = write_images(root / "loose", 2, seed=1, mode="RGB")  # RGB, decoded to grayscale
    folder = write_images(root / "folder" / "a", 2, seed=2) + write_images(
        root / "folder" / "b" / "deep", 1, seed=3
    )
    listed = write_images(root / "listed", 2, seed=4)
    (root / "listed.csv").write_text("path,note\nlisted/0.png,x\nlisted/1.png,y\n")
    x = np.random.default_rng(5).integers(0, 256, (3, 6, 6, 1)).astype(np.uint8)
    np.savez(root / "arrays.npz", x=x)
    return {"root": root, "loose": loose, "folder": folder, "listed": listed, "x": x}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one run that logged the classifier and the TensorFlow flavor, registered."""
    directory = tmp_path_factory.mktemp("store")
    uri = tracking.default_tracking_uri(directory)
    model = classifier()
    example = np.zeros((2, 6, 6, 1), np.uint8)
    run_id = tracking.start_run(uri, "predict")
    tracking.log_params_flat(run_id, {"train": {"task": "classification"}})
    tracking.log_json(run_id, NAMES, "class_names.json")
    model_uri = tracking.log_classifier_model(run_id, model, example, NAMES)
    tracking.log_keras_model(run_id, model, example, name="model")
    tracking.end_run(run_id)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("digits")
    mlflow.set_tracking_uri(uri)  # the registry finds the LoggedModel in the process's store
    try:
        version = client.create_model_version("digits", model_uri, run_id=run_id)
        # Version 2 from the run's URI, as mlflow.register_model("runs:/...") or a hand makes it.
        client.create_model_version("digits", f"runs:/{run_id}/classifier", run_id=run_id)
    finally:
        mlflow.set_tracking_uri(None)
    client.set_registered_model_alias("digits", "champion", version.version)
    return {"uri": uri, "run_id": run_id, "model": model}


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_uri", ["runs:/{run}/classifier", "runs:/{run}/model", "models:/digits@champion",
                  "models:/digits/1", "models:/digits/2"],
)  # fmt: skip
def test_predict_with_a_model_of_the_store_labels_as_the_model_does(
    store, inputs, tmp_path, capsys, model_uri
):
    root, out = inputs["root"], tmp_path / "predictions.csv"
    args = [model_uri.format(run=store["run_id"]), *inputs["loose"], root / "folder"]
    args += [root / "listed.csv", root / "arrays.npz", "--output", out]
    code, stdout, stderr = predict(capsys, *args, "--tracking-uri", store["uri"])
    assert code == 0, stderr
    assert "wrote 10 rows" in stdout
    header, rows = read_csv(out)
    assert header == HEADER
    files = inputs["loose"] + inputs["folder"] + inputs["listed"]
    npz = str(root / "arrays.npz")
    assert [row["path"] for row in rows] == [
        *inputs["loose"], *inputs["folder"], *(os.path.join(root, f"listed/{i}.png")
                                               for i in range(2)),
        *(f"{npz}[{i}]" for i in range(3)),
    ]  # fmt: skip
    model = store["model"]
    from_arrays = model.predict(inputs["x"], verbose=0)
    expected = expected_labels(model, files) + [NAMES[i] for i in from_arrays.argmax(axis=1)]
    assert [row["label"] for row in rows] == expected
    np.testing.assert_allclose(
        [[float(row[f"p_{n}"]) for n in NAMES] for row in rows[-3:]], from_arrays, rtol=1e-5
    )


@pytest.mark.slow
def test_predict_prints_a_table_and_names_wrong_store_models(store, inputs, capsys):
    image = inputs["loose"][0]
    store_uri = ["--tracking-uri", store["uri"]]
    code, stdout, _ = predict(capsys, "models:/digits@champion", image, *store_uri)
    assert code == 0
    assert stdout.split("\n")[0].split() == HEADER
    assert image in stdout
    run = store["run_id"]
    wrong = {
        f"runs:/{run}/nope": f"run {run} has no model 'nope'.*\\['classifier', 'model'\\]",
        "runs:/0123/classifier": "run 0123 does not exist",
        "models:/nope@champion": r"no registered model 'nope'.*\['digits'\]",
        "models:/digits@best": r"'digits' has no alias 'best'.*\['champion'\]",
        "models:/digits/7": r"'digits' has no version 7.*\[1, 2\]",
    }
    for model_uri, message in wrong.items():
        code, _, stderr = predict(capsys, model_uri, image, *store_uri)
        assert code == 2
        [line] = stderr.strip().splitlines()
        assert line.startswith("tfstack: error: ")
        assert re.search(message, line), line


@pytest.mark.slow
def test_predict_with_a_keras_file_and_class_names(inputs, tmp_path, capsys):
    model, path = classifier(), tmp_path / "model.keras"
    model.save(path)
    out = tmp_path / "out.csv"
    args = [path, inputs["root"] / "folder", "--class-names", ",".join(NAMES), "--output", out]
    code, _, stderr = predict(capsys, *args)
    assert code == 0, stderr
    header, rows = read_csv(out)
    assert header == HEADER
    assert [row["label"] for row in rows] == expected_labels(model, inputs["folder"])
    # Without names, a classifier's file is refused, naming the fix.
    code, _, stderr = predict(capsys, path, inputs["loose"][0])
    assert code == 2
    assert "is a classifier without class names" in stderr
    assert "--class-names 0,1,2" in stderr


def test_predict_with_a_regression_head_gives_prediction_columns(inputs, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    path = tmp_path / "regression.keras"
    model.save(path)
    out = tmp_path / "out.csv"
    code, _, stderr = predict(capsys, path, inputs["root"] / "arrays.npz", "--output", out)
    assert code == 0, stderr
    header, rows = read_csv(out)
    assert header == ["path", "prediction"]
    np.testing.assert_allclose(
        [float(row["prediction"]) for row in rows], model.predict(inputs["x"], verbose=0)[:, 0],
        rtol=1e-5,
    )  # fmt: skip


def test_bad_inputs_get_one_line_each(inputs, tmp_path, capsys):
    model, path = classifier(), tmp_path / "model.keras"
    model.save(path)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "rgb.npz", x=np.zeros((2, 6, 6, 3), np.uint8))
    np.savez(tmp_path / "other.npz", y=np.zeros(2))
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    (tmp_path / "missing.csv").write_text("path\nnothere.png\n")
    names = ["--class-names", ",".join(NAMES)]
    cases = {
        (path, tmp_path / "nothere.png"): "nothere.png: no such file or folder",
        (path, text): "notes.png is not an image",
        (path, tmp_path / "empty"): "the folder holds no image",
        (path, tmp_path / "rgb.npz"): r"shape \(6, 6, 3\), but the model takes \(6, 6, 1\) "
        r"\(3 channels; the model takes 1\)",
        (path, tmp_path / "other.npz"): r"no x or x_test array",
        (path, tmp_path / "bad.csv"): "no column 'path'.*--path-column",
        (path, tmp_path / "missing.csv"): "line 2: nothere.png does not exist",
        (tmp_path / "nothere.keras", inputs["loose"][0]): "no such model file",
        ("s3:/bucket/m", inputs["loose"][0]): "not a model tfstack can read: expected runs:/",
        (path, inputs["loose"][0], "--class-names", "a,b"): "3 outputs per input, but there "
        "are 2 class names",
    }
    for args, message in cases.items():
        code, _, stderr = predict(capsys, *args, *([] if "--class-names" in args else names))
        assert code == 2, args
        [line] = stderr.strip().splitlines()
        assert line.startswith("tfstack: error: ")
        assert re.search(message, line), line


def test_a_model_carrying_code_is_refused_without_trust_code(inputs, tmp_path, capsys):
    inputs_ = keras.Input((6, 6, 1))
    x = keras.layers.Lambda(lambda t: t / 255.0, name="scale")(inputs_)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs_, keras.layers.Dense(3, activation="softmax")(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    args = [path, inputs["loose"][0], "--class-names", ",".join(NAMES)]
    code, _, stderr = predict(capsys, *args)
    assert code == 2
    assert "holds a Lambda layer (scale)" in stderr and "set --trust-code" in stderr
    code, stdout, stderr = predict(capsys, *args, "--trust-code")
    assert code == 0, stderr
    assert stdout.split("\n")[0].split() == HEADER


@pytest.mark.slow
def test_mlflow_models_serve_needs_the_venv_on_path(store):
    # With --env-manager local MLflow starts `bash -c "exec uvicorn ..."`: uvicorn from PATH.
    import shutil
    import subprocess

    from project_copy import VENV_BIN, env

    bare = "/usr/bin:/bin"
    if shutil.which("uvicorn", path=bare):
        pytest.skip(f"a uvicorn is installed in {bare}")
    environment = {**env(), "PATH": bare, "MLFLOW_TRACKING_URI": store["uri"]}
    result = subprocess.run(
        [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"runs:/{store['run_id']}/classifier",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", "1"],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "exec uvicorn" in result.stderr and "uvicorn: not found" in result.stderr


def test_the_store_is_the_one_tfstack_run_uses_here(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from tfstack.pipeline.predict import store_uri

    for name in ("TFSTACK_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    assert store_uri("sqlite:///given.db", tmp_path) == "sqlite:///given.db"
    assert store_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store_uri(None, tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # A project's conf/: its tracking.uri, a relative sqlite path made absolute as tfstack run does.
    # (the project's own conf/tracking/sqlite.yaml replaces the packaged one)
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "conf", tmp_path / "conf")
    packaged = root / "src" / "tfstack" / "conf" / "tracking" / "sqlite.yaml"
    sqlite = tmp_path / "conf" / "tracking" / "sqlite.yaml"
    sqlite.parent.mkdir(exist_ok=True)
    sqlite.write_text(packaged.read_text().replace("uri: null", "uri: sqlite:///runs/team.db"))
    assert store_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/team.db"


@pytest.mark.slow
def test_predict_on_the_demo_test_folder_gives_the_evaluation_predictions(project):
    # A real run of the demo (class folders "5".."9"), then predict from the project root with
    # the store tfstack run used (no --tracking-uri): the same labels the evaluate stage got.
    import json

    from project_copy import tfstack

    result = tfstack(project, "run")
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("tfstack").experiment_id)
    test_folder = "outputs/prepare/target/test"
    args = ["predict", f"runs:/{run.info.run_id}/classifier", test_folder, "--output", "p.csv"]
    result = tfstack(project, *args)
    assert result.returncode == 0, result.stderr
    header, rows = read_csv(project / "p.csv")
    assert header == ["path", "label", *(f"p_{digit}" for digit in "56789")]
    evaluated = json.loads((project / "outputs/evaluate/plots/confusion.json").read_text())
    assert [row["label"] for row in rows] == [row["predicted"] for row in evaluated]
    assert [row["path"].split("/")[-2] for row in rows] == [row["actual"] for row in evaluated]
