"""Pretrained backbones as users have them: ImageNet weights from the Keras cache, builder
arguments (``components.<key>.kwargs``), every component key without '+', and the sha256 of each
component file tagged on the run.

Nothing downloads: each test that could reach the network runs behind a proxy on a closed port
of 127.0.0.1 (a real, refused connection), and a weights file is a real HDF5 file written under
the name Keras asks for, in a temporary ``KERAS_HOME``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import socket
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import make_base, make_head
from mlflow.tracking import MlflowClient
from project_copy import leftovers, tfstack

from tfstack.components import check_pretrained_weights, component_file, load_component
from tfstack.errors import ComponentError, ConfigError
from tfstack.file_hashes import sha256_of
from tfstack.pipeline import Paths, records, stages
from tfstack.pipeline.compose import compose
from tfstack.pipeline.schema import ComponentConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# MobileNetV2 at alpha 0.35 and 96x96 without its top: Keras's name for its ImageNet weights.
MOBILENET = {"input_shape": (96, 96, 3), "include_top": False}
MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"


@pytest.fixture
def keras_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch) -> str:
    """Downloads go to a proxy on a closed port: every connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return f"127.0.0.1:{port}"


def cached_mobilenet(keras_home: Path) -> keras.Model:
    """A MobileNetV2 (alpha 0.35) whose weights are in the Keras cache as Keras names them."""
    keras.utils.set_random_seed(3)
    reference = keras.applications.MobileNetV2(alpha=0.35, weights=None, **MOBILENET)
    # Keras loads a cached *.h5 with its legacy HDF5 reader (save_weights writes only
    # .weights.h5, another format), so write the file in the legacy layout the download has.
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(keras_home / "models" / MOBILENET_FILE, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, reference)
    return reference


# ---------------------------------------------------------------- weights=imagenet


@pytest.mark.slow
def test_imagenet_weights_load_from_the_keras_cache(keras_home, offline):
    reference = cached_mobilenet(keras_home)

    model = load_component(
        "keras_applications:MobileNetV2",
        name="base",
        weights="imagenet",
        builder_kwargs={"alpha": 0.35},
        **MOBILENET,
    )

    assert model.name == "base"
    for loaded, cached in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, cached)
    # The build records the weights file actually used, and its sha256, for the run's tags.
    weights = keras_home / "models" / MOBILENET_FILE
    assert component_file(model) == str(weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert records.component_files({"base": model}) == {
        "base": {"path": str(weights), "sha256": digest}
    }


@pytest.mark.slow
def test_missing_weights_offline_fail_in_seconds_naming_file_and_folder(keras_home, offline):
    start = time.perf_counter()
    with pytest.raises(ComponentError) as error:
        load_component(
            "keras_applications:MobileNetV2",
            name="base",
            weights="imagenet",
            builder_kwargs={"alpha": 0.35},
            **MOBILENET,
        )
    seconds = time.perf_counter() - start

    message = str(error.value)
    folder = keras_home / "models"
    assert message.startswith(
        f"components.base.weights=imagenet needs the weights file {MOBILENET_FILE}, which is "
        f"not in the Keras cache folder {folder} and cannot be downloaded (cannot connect to "
        f"proxy {offline}"
    ), message
    assert f"put it in {folder}" in message and "\n" not in message
    assert seconds < 5, seconds
    assert list(folder.iterdir()) == []  # nothing half-downloaded


@pytest.mark.slow  # builds a real Application
def test_the_check_finds_a_cached_file_without_loading_it(keras_home, offline):
    # An empty file under Keras's name: loading it would fail, so finding it proves the check
    # stopped at the request. MobileNetV2 passes no hash, so Keras would take it as it is.
    cached = keras_home / "models" / MOBILENET_FILE
    cached.touch()
    found = check_pretrained_weights(
        "keras_applications:MobileNetV2",
        key="components.base",
        weights="imagenet",
        builder_kwargs={"alpha": 0.35},
        **MOBILENET,
    )
    assert found == str(cached)
    assert cached.stat().st_size == 0
    # Nothing to check for random weights or a file component.
    assert check_pretrained_weights("keras_applications:MobileNetV2", key="k", weights=None) is None
    assert check_pretrained_weights("head.keras", key="k", weights=None) is None


def _offline_imagenet_config(tmp_path: Path):
    """The default config with an ImageNet MobileNetV2 base (not cached) and a head file."""
    head = keras.Sequential([keras.Input((56,)), keras.layers.Dense(5, "softmax")])
    head.save(tmp_path / "head.keras")
    overrides = [
        "components.base.path=keras_applications:MobileNetV2",
        "components.base.weights=imagenet",
        "components.base.kwargs={alpha:0.35}",
        "components.base.input_shape=[96,96,3]",
        "components.base.pooling=avg",
        f"components.head.path={tmp_path / 'head.keras'}",
    ]
    config = compose(overrides, config_dir=CONF)
    return config, Paths(root=tmp_path, out=tmp_path / "outputs")


@pytest.mark.slow  # builds a real Application
@pytest.mark.parametrize("stage", ["run", "build"])
def test_offline_missing_weights_are_refused_before_any_run_or_output(
    tmp_path, keras_home, offline, stage
):
    config, paths = _offline_imagenet_config(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ComponentError) as error:
        if stage == "run":
            stages.run_all(config, paths)
        else:
            stages.run_stage("build", config, paths)
    seconds = time.perf_counter() - start

    assert str(error.value).startswith(
        f"components.base.weights=imagenet needs the weights file {MOBILENET_FILE}, which is "
        f"not in the Keras cache folder {keras_home / 'models'}"
    ), error.value
    # Before the store is opened (no mlflow.db, so no FAILED run) and before the demo's data
    # and pretraining or the build wrote anything.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.keras", "keras_home"]
    assert list((keras_home / "models").iterdir()) == []
    assert seconds < 5, seconds


@pytest.mark.slow
def test_a_cached_file_that_fails_kerass_hash_check_is_named(keras_home, offline):
    # MobileNetV3 passes Keras a hash of its weights file. The first message names the file;
    # a file of other bytes put there fails the hash check.
    arguments = {"input_shape": (32, 32, 3), "include_top": False}
    with pytest.raises(ComponentError) as missing:
        load_component(
            "keras_applications:MobileNetV3Small", name="base", weights="imagenet", **arguments
        )
    name = re.search(r"needs the weights file (\S+),", str(missing.value)).group(1)
    (keras_home / "models" / name).write_bytes(b"not the weights")

    with pytest.raises(ComponentError) as mismatch:
        load_component(
            "keras_applications:MobileNetV3Small", name="base", weights="imagenet", **arguments
        )
    assert str(mismatch.value).startswith(
        f"components.base.weights=imagenet: the cached {keras_home / 'models' / name} does not "
        "match the hash Keras expects for it"
    )
    assert "Replace it with the file from https://" in str(mismatch.value)


# ---------------------------------------------------------------- kwargs


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (
            {"alpa": 0.35},
            [
                "components.base.kwargs.alpa is not an argument of "
                "keras.applications.MobileNetV2, which takes: input_shape, alpha, include_top,",
                "Did you mean components.base.kwargs.alpha?",
            ],
        ),
        (
            {"pooling": "avg"},
            ["components.base.kwargs.pooling='avg' repeats components.base.pooling"],
        ),
    ],
)
def test_builder_arguments_are_checked_against_the_builder(kwargs, fragments):
    with pytest.raises(ComponentError) as error:
        load_component("keras_applications:MobileNetV2", name="base", builder_kwargs=kwargs)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_builder_arguments_on_a_file_are_refused(tmp_path):
    path = tmp_path / "base.keras"
    make_base().save(path)
    with pytest.raises(ComponentError, match=r"components.base.kwargs only apply to keras_app"):
        load_component(str(path), name="base", builder_kwargs={"alpha": 0.35})
    # In the config: at validation, before any run and TensorFlow.
    with pytest.raises(ConfigError) as error:
        compose(["components.base.kwargs={alpha:0.35}"], config_dir=CONF)
    assert str(error.value).startswith(
        "components.base.kwargs (alpha=0.35) passes arguments to a Keras Applications builder, "
        "but components.base.path=outputs/pretrain/base.keras is not keras_applications:NAME"
    )


@pytest.mark.slow
def test_kwargs_compose_as_a_mapping_or_one_entry_with_plus():
    application = ["components.base.path=keras_applications:EfficientNetB0"]
    config = compose(
        [*application, "components.base.kwargs={include_preprocessing:false,alpha:0.5}"],
        config_dir=CONF,
    )
    assert config.components.base.kwargs == {"include_preprocessing": False, "alpha": 0.5}
    one_entry = "components.base.kwargs.drop_connect_rate=0.1"
    config = compose([*application, f"+{one_entry}"], config_dir=CONF)
    assert config.components.base.kwargs == {"drop_connect_rate": 0.1}
    with pytest.raises(ConfigError) as error:
        compose([*application, one_entry], config_dir=CONF)
    assert str(error.value).endswith(f"needs Hydra's '+' prefix: +{one_entry}")


# ---------------------------------------------------------------- every key without '+'

# A value for every field of ComponentConfig, as a user writes it on the command line.
OVERRIDES = {
    "path": "keras_applications:MobileNetV2",
    "name": "backbone",
    "cut_at": "out_relu",
    "trust_code": "true",
    "modules": "[json]",
    "weights": "imagenet",
    "include_top": "true",
    "pooling": "avg",
    "input_shape": "[96,96,3]",
    "kwargs": "{alpha:0.35}",
}


def test_every_documented_component_key_composes_without_plus():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `components` |"))
    documented = re.findall(r"`(\w+)`", row.split("(", 1)[1].split(")", 1)[0])
    fields = [field.name for field in dataclasses.fields(ComponentConfig)]
    assert set(documented) <= set(fields) == set(OVERRIDES)
    for key in ("base", "head"):
        config = compose([f"components.{key}.{f}={OVERRIDES[f]}" for f in fields], config_dir=CONF)
        component = getattr(config.components, key)
        assert component.weights == "imagenet" and component.kwargs == {"alpha": 0.35}
        assert (component.name, component.input_shape) == ("backbone", [96, 96, 3])


# ---------------------------------------------------------------- sha256 of component files


@pytest.mark.slow
def test_sha256_of_a_file_and_of_a_savedmodel_directory(tmp_path):
    file = tmp_path / "head.keras"
    make_head().save(file)
    assert sha256_of(file) == hashlib.sha256(file.read_bytes()).hexdigest()

    exported = tmp_path / "exported"
    make_base().export(str(exported), verbose=False)
    digest = sha256_of(exported)
    moved = shutil.copytree(exported, tmp_path / "elsewhere" / "exported")
    assert sha256_of(moved) == digest  # the bytes, not where they are
    (moved / "assets" / "notes.txt").parent.mkdir(exist_ok=True)
    (moved / "assets" / "notes.txt").write_text("a file more")
    assert sha256_of(moved) != digest


@pytest.mark.slow
def test_a_run_tags_the_sha256_of_the_files_it_loaded(project):
    result = tfstack(project, "run", "tracking.experiment=hashes")
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hashes")
    (run,) = client.search_runs([experiment.experiment_id])
    for name in ("base", "head"):
        file = project / "outputs" / "pretrain" / f"{name}.keras"
        assert run.data.tags[f"component.{name}.sha256"] == sha256_of(file)
        assert run.data.tags[f"component.{name}.file"] == str(file.resolve())


@pytest.mark.slow
def test_tfstack_run_offline_without_the_weights_says_so_in_one_line(
    project, keras_home, offline, capsys
):
    from tfstack import cli

    start = time.perf_counter()
    code = cli.main(
        [
            "run",
            "components.base.path=keras_applications:MobileNetV2",
            "components.base.weights=imagenet",
            "components.base.kwargs={alpha:0.35}",
            "components.base.input_shape=[96,96,3]",
            "components.base.pooling=avg",
        ]
    )
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tfstack: error: ")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert lines == [
        f"tfstack: error: components.base.weights=imagenet needs the weights file "
        f"{MOBILENET_FILE}, which is not in the Keras cache folder {keras_home / 'models'} "
        f"and cannot be downloaded (cannot connect to proxy {offline}: Connection refused). "
        f"Download https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
        f"{MOBILENET_FILE} where there is network access and put it in "
        f"{keras_home / 'models'} (or set KERAS_HOME to a folder whose models/ holds it), or "
        f"set components.base.weights=null."
    ], err[-3000:]
    assert seconds < 60, seconds  # TensorFlow and one build of the architecture; no network
    # Refused before the run starts: no run in the store (not even FAILED), nothing written.
    assert not (project / "mlflow.db").exists()
    assert not (project / "outputs" / "run.json").exists()
    assert not (project / "outputs" / "build").exists()
    assert not leftovers(project / "outputs")


# ---------------------------------------------------------------- the whole recipe


@pytest.mark.slow
def test_the_keras_transfer_learning_recipe_from_config_alone(project, keras_home, offline):
    """Issue 13's user: class folders, a cached ImageNet MobileNetV2, its preprocess_input,
    flip/rotate augmentation, freeze=frozen + schedule=two_phase, all from config; the logged
    classifier answers raw uint8 images with the folder names."""
    import mlflow
    from PIL import Image

    cached_mobilenet(keras_home)
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "fox"]
    for split, count in (("train", 6), ("test", 3)):
        for label, name in enumerate(names):
            folder = project / "pics" / split / name
            folder.mkdir(parents=True)
            for i in range(count):  # a class is a colour, so the model has something to learn
                pixels = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
    keras.Sequential(
        [keras.Input((1280,)), keras.layers.Dense(3, activation="softmax", name="out")]
    ).save(project / "head.keras")

    result = tfstack(
        project,
        "run",
        "data=images",
        "data.path=pics",
        "preprocess=applications",
        "augment=flip_rotate",
        "components.base.path=keras_applications:MobileNetV2",
        "components.base.weights=imagenet",
        "components.base.kwargs={alpha:0.35}",
        "components.base.input_shape=[96,96,3]",
        "components.base.pooling=avg",
        "components.head.path=head.keras",
        "freeze=frozen",
        "schedule=two_phase",
        "tracking.experiment=recipe",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("recipe")
    (run,) = client.search_runs([experiment.experiment_id])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["component.base.sha256"] == sha256_of(keras_home / "models" / MOBILENET_FILE)
    # Augmentation in front of the frozen base: its features change every epoch, so no cache.
    assert tags["phase.0.cached"] == "false" and tags["phase.1.cached"] == "false"
    assert {"test_accuracy", "test_loss"} <= set(run.data.metrics)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/classifier")
    # uint8 pixels at the size the data was decoded to (the base's); the model preprocesses.
    image = np.asarray(Image.open(project / "pics" / "test" / "dog" / "0.png").resize((96, 96)))
    table = served.predict(image[None])
    assert list(table.columns) == ["label", *names]
    assert table["label"][0] in names
    assert table[names].to_numpy().sum() == pytest.approx(1.0, abs=1e-5)
