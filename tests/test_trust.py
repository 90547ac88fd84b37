"""Code-bearing model formats need trust (issue 11, point 1, and the trust parts of point 8).

Every fixture carries code with an observable side effect: it writes a marker file when it runs
(a Lambda's function, a custom layer's module on import, a SavedModel signature calling
tf.io.write_file). Untrusted, the load is refused with one line naming the file, the kind of
code and the key, and the marker never appears; trusted, the model loads and the marker does.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from project_copy import PROJECT_FILES, ROOT, shrink, tfstack  # noqa: E402

from tfstack import cli  # noqa: E402
from tfstack.components import load_component  # noqa: E402
from tfstack.errors import ComponentError  # noqa: E402
from tfstack.pipeline.compose import compose  # noqa: E402
from tfstack.pipeline.inputs import load_model  # noqa: E402

X = np.ones((2, 4), dtype="float32")


def run_python(code: str, *, cwd: Path) -> None:
    """Run code in a fresh interpreter of this venv (a fresh Keras registry, no tfstack)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], check=True, env=env, cwd=cwd, timeout=300
    )


def marker_lambda_model(marker: Path, *, name: str = "with_lambda") -> keras.Model:
    """(batch, 4) -> (batch, 4) through a Lambda whose function writes `marker`."""
    inputs = keras.Input((4,), name="pixels")
    outputs = keras.layers.Lambda(
        lambda t, path: (open(path, "w").close(), t)[1],
        arguments={"path": str(marker)},
        name="pwn",
    )(inputs)
    return keras.Model(inputs, outputs, name=name)


def save_lambda_model(path: Path, marker: Path) -> Path:
    """Save a marker-writing Lambda model; building it ran the Lambda, so the marker is removed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "HDF5 is legacy": writing one is the point.
        marker_lambda_model(marker).save(path)
    marker.unlink(missing_ok=True)
    return path


def write_hostile_savedmodel(directory: Path, marker: Path, *, shape=(4,)) -> Path:
    """A SavedModel whose serving signature writes `marker` with tf.io.write_file."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.float32, name="x")])
    def serve(x):
        tf.io.write_file(str(marker), "pwned")
        return {"output_0": tf.reshape(x, (-1, int(np.prod(shape)))) * 2.0}

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})
    assert not marker.exists()  # tracing it wrote nothing: only running it does
    return directory


def refused(marker: Path, *args, **kwargs) -> str:
    """Load, expect a refusal; the code did not run. Returns the message."""
    with pytest.raises(ComponentError) as error:
        load_component(*args, **kwargs)
    assert not marker.exists(), "the untrusted code ran"
    message = str(error.value)
    assert "\n" not in message
    return message


def assert_names(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------- Lambda layers, every format


@pytest.mark.parametrize("extension", [".keras", ".h5"])
def test_lambda_in_keras3_file_needs_trust(tmp_path, extension):
    marker = tmp_path / "pwned"
    path = str(save_lambda_model(tmp_path / f"lambda{extension}", marker))

    message = refused(marker, path, name="base")
    assert_names(
        message,
        f"components.base.path={path}",
        "Lambda layer (pwn), which runs arbitrary code",
        "components.base.trust_code=true",
    )

    model = load_component(path, name="base", trust_code=True)
    assert marker.exists()  # rebuilding the model ran the Lambda
    np.testing.assert_allclose(model.predict(X, verbose=0), X)


@pytest.fixture(scope="module")
def fresh_files(tmp_path_factory) -> dict:
    """Files written in one fresh process: a Keras 2 .h5 (tf_keras) with a marker Lambda, and
    one custom-layer model per user module (each module writes its marker on import).

    Returns:
        {"keras2": (path, marker), "<label>": (module, path, marker)}; each module is
        importable from its own directory, which the process's working directory is not.
    """
    pytest.importorskip("tf_keras")
    directory = tmp_path_factory.mktemp("fresh")
    files: dict = {"keras2": (directory / "keras2.h5", directory / "keras2_pwned")}
    script = [
        "import sys, warnings, keras, tf_keras",
        "warnings.simplefilter('ignore')",
        "inputs = tf_keras.Input((4,))",
        "outputs = tf_keras.layers.Lambda(lambda t, path: (open(path, 'w').close(), t)[1],",
        f"    arguments={{'path': {str(files['keras2'][1])!r}}}, name='pwn')(inputs)",
        f"tf_keras.Model(inputs, outputs).save({str(files['keras2'][0])!r})",
    ]
    for label, extension in (("keras", ".keras"), ("h5", ".h5"), ("inspect", ".keras")):
        module = f"hostile_{label}_{uuid.uuid4().hex[:6]}"  # sys.modules caches imports
        home, marker = directory / label, directory / label / "pwned"
        home.mkdir()
        (home / f"{module}.py").write_text(
            textwrap.dedent(
                f"""
                import keras
                open({str(marker)!r}, "w").close()

                @keras.saving.register_keras_serializable(package={module!r})
                class Doubling(keras.layers.Layer):
                    def call(self, x):
                        return x * 2.0
                """
            )
        )
        path = home / f"custom{extension}"
        script += [
            f"sys.path.insert(0, {str(home)!r})",
            f"import {module}",
            "inputs = keras.Input((4,))",
            f"model = keras.Model(inputs, {module}.Doubling(name='doubling')(inputs))",
            f"model.save({str(path)!r})",
        ]
        files[label] = (module, path, marker)
    run_python("\n".join(script), cwd=directory)
    for value in files.values():
        value[-1].unlink(missing_ok=True)  # building ran the code; the tests start clean
    return files


@pytest.mark.slow
def test_lambda_in_keras2_h5_needs_trust(fresh_files):
    path, marker = fresh_files["keras2"]

    message = refused(marker, str(path), name="head")
    assert_names(message, f"components.head.path={path}", "Lambda layer (pwn)", "head.trust_code")

    model = load_component(str(path), name="head", trust_code=True)
    assert marker.exists()
    np.testing.assert_allclose(model.predict(X, verbose=0), X)


# ---------------------------------------------------------------- custom classes and modules


@pytest.mark.slow
def test_custom_class_needs_trust_and_its_module(fresh_files, monkeypatch):
    module, path, marker = fresh_files["keras"]
    monkeypatch.chdir(path.parent)  # the module is found from the working directory

    message = refused(marker, str(path), name="base")
    assert_names(
        message,
        f"components.base.path={path}",
        f"custom class Doubling (layer doubling; registered as {module}>Doubling, module {module})",
        "components.base.trust_code=true",
        f"components.base.modules=[{module}]",
    )
    # Modules without trust: importing is running code.
    message = refused(marker, str(path), name="base", modules=[module])
    assert_names(message, f"components.base.modules=[{module}]", "components.base.trust_code")

    # Trusted but no module: one line instead of Keras' config dump.
    message = refused(marker, str(path), name="base", trust_code=True)
    assert_names(
        message,
        "uses custom classes that no imported module registers",
        f"Doubling (registered as {module}>Doubling, module {module})",
        f"Set components.base.modules=[{module}]",
    )
    assert len(message) < 600

    model = load_component(str(path), name="base", trust_code=True, modules=[module])
    assert marker.exists()
    np.testing.assert_allclose(model.predict(X, verbose=0), X * 2.0)


@pytest.mark.slow
def test_custom_class_in_h5_is_code_too(fresh_files, monkeypatch):
    module, path, marker = fresh_files["h5"]
    monkeypatch.chdir(path.parent)

    message = refused(marker, str(path), name="base")
    assert_names(message, "custom class Doubling", f"{module}>Doubling", "trust_code=true")

    model = load_component(str(path), name="base", trust_code=True, modules=[module])
    assert marker.exists()
    np.testing.assert_allclose(model.predict(X, verbose=0), X * 2.0)


def test_a_module_that_cannot_be_imported(tmp_path):
    (tmp_path / "broken_layers.py").write_text("raise RuntimeError('no GPU here')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        message = refused(
            tmp_path / "none",
            str(tmp_path / "model.keras"),
            name="head",
            trust_code=True,
            modules=["broken_layers", "not_a_module_anywhere"],
        )
    finally:
        sys.path.remove(str(tmp_path))
    assert_names(
        message,
        "components.head.modules=[broken_layers,not_a_module_anywhere]",
        "module 'broken_layers' cannot be imported (RuntimeError: no GPU here)",
    )


# ---------------------------------------------------------------- SavedModels and TFSMLayer


def test_savedmodel_directory_needs_trust(tmp_path):
    marker = tmp_path / "pwned"
    directory = write_hostile_savedmodel(tmp_path / "exported", marker)

    message = refused(marker, str(directory), name="base")
    assert_names(
        message,
        f"components.base.path={directory} is a TensorFlow SavedModel directory",
        "tf.io.write_file",
        "components.base.trust_code=true",
    )

    model = load_component(str(directory), name="base", trust_code=True)
    np.testing.assert_allclose(model.predict(X, verbose=0), X * 2.0)
    assert marker.exists()  # its graph ran


def test_tfsmlayer_inside_a_keras_file_needs_trust(tmp_path):
    marker = tmp_path / "pwned"
    directory = write_hostile_savedmodel(tmp_path / "exported", marker)
    wrapper = tmp_path / "wrapper.keras"
    load_component(str(directory), name="base", trust_code=True).save(wrapper)
    marker.unlink(missing_ok=True)

    message = refused(marker, str(wrapper), name="base")
    assert_names(
        message,
        f"components.base.path={wrapper} holds a TFSMLayer (base_savedmodel), which loads and "
        f"runs an external SavedModel {directory}",
        "components.base.trust_code=true",
    )

    model = load_component(str(wrapper), name="base", trust_code=True)
    model.predict(X, verbose=0)
    assert marker.exists()


# ---------------------------------------------------------------- reloading the stacked model


def stacked_config(tmp_path: Path, **trust: bool):
    overrides = [f"components.{key}.path={tmp_path / key}.keras" for key in ("base", "head")]
    overrides += [f"components.{key}.trust_code={str(v).lower()}" for key, v in trust.items()]
    return compose(overrides, config_dir=ROOT / "conf")


def save_stacked(path: Path, base_marker: Path | None, head_marker: Path | None) -> Path:
    """A stacked model of a base and a head, each with a marker-writing Lambda if given one."""
    parts = []
    for name, marker in (("base", base_marker), ("head", head_marker)):
        if marker is None:
            inputs = keras.Input((4,))
            parts.append(keras.Model(inputs, keras.layers.Dense(4)(inputs), name=name))
        else:
            parts.append(marker_lambda_model(marker, name=name))
    keras.Sequential([keras.Input((4,)), *parts], name="stacked").save(path)
    for marker in (base_marker, head_marker):
        if marker is not None:
            marker.unlink(missing_ok=True)
    return path


def test_stacked_reload_keeps_per_component_trust(tmp_path):
    base_marker, head_marker = tmp_path / "base_pwned", tmp_path / "head_pwned"
    path = save_stacked(tmp_path / "stacked.keras", base_marker, head_marker)

    # The head is trusted, the base is not: the base's code is still refused.
    with pytest.raises(ComponentError) as error:
        load_model(path, stacked_config(tmp_path, head=True), stage="build")
    assert not base_marker.exists() and not head_marker.exists()
    assert_names(
        str(error.value),
        f"{path}: component 'base' holds a Lambda layer (pwn)",
        "components.base.trust_code=true",
    )

    # Both trusted: it loads, and the code runs.
    load_model(path, stacked_config(tmp_path, base=True, head=True), stage="build")
    assert base_marker.exists() and head_marker.exists()


@pytest.mark.slow
def test_stacked_reload_with_code_only_in_the_trusted_component(tmp_path):
    head_marker = tmp_path / "head_pwned"
    path = save_stacked(tmp_path / "stacked.keras", None, head_marker)

    model = load_model(path, stacked_config(tmp_path, head=True), stage="build")
    assert head_marker.exists()
    assert [layer.name for layer in model.layers] == ["base", "head"]

    head_marker.unlink()
    with pytest.raises(ComponentError) as error:
        load_model(path, stacked_config(tmp_path, base=True), stage="build")
    assert not head_marker.exists()
    assert_names(str(error.value), "component 'head'", "components.head.trust_code=true")


# ---------------------------------------------------------------- tfstack inspect


@pytest.mark.slow
def test_inspect_names_its_own_options(fresh_files, monkeypatch, capsys):
    module, path, marker = fresh_files["inspect"]
    monkeypatch.chdir(path.parent)

    assert cli.main(["inspect", str(path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tfstack: error: ") and "--trust-code" in line
    assert f"--modules {module}" in line and "trust_code=true" not in line
    assert not marker.exists()

    assert cli.main(["inspect", "--trust-code", "--modules", module, str(path)]) == 0
    assert marker.exists()
    assert "doubling" in capsys.readouterr().out


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_refuses_a_hostile_savedmodel_base(tmp_path):
    """`tfstack run` with components.base.path at a hostile SavedModel: exit 2, nothing ran."""
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if name == "src":
            continue
        if source.is_dir():
            shutil.copytree(source, project / name)
        elif source.exists():
            shutil.copy2(source, project / name)
    shrink(project)
    marker = tmp_path / "pwned"
    write_hostile_savedmodel(project / "evil", marker, shape=(8, 8, 1))
    head_inputs = keras.Input((64,))
    keras.Model(head_inputs, keras.layers.Dense(5, activation="softmax")(head_inputs)).save(
        project / "head.keras"
    )
    overrides = ["components.base.path=evil", "components.head.path=head.keras"]

    result = tfstack(project, "run", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tfstack: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "is a TensorFlow SavedModel directory" in lines[0]
    assert "components.base.trust_code=true" in lines[0]
    assert not marker.exists()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    recorded = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(run.info.status != "RUNNING" for run in recorded)
    assert not (project / "outputs" / "build" / "stacked.keras").exists()

    # Trusted, the same run goes through build, train and evaluate, and the graph runs.
    result = tfstack(project, "run", *overrides, "components.base.trust_code=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()
