"""Checks of the input paths that need no TensorFlow, run before any MLflow run is created.

A missing data file or model file found after the run has started leaves a FAILED run behind
for a typo, and TensorFlow's import alone takes about 6 s. So ``run_all`` and ``run_stage`` call
`check_inputs` first: every path the stage reads exists and is the right kind (a file, a
SavedModel directory), relative to the project root as ``pipeline.Paths.resolve`` resolves it.
The config's values and Keras names are checked earlier still, by ``config.validate``.

This is the entry layer (it sees ``Config``); it imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import TYPE_CHECKING

from tfstack.errors import ComponentError, DataError
from tfstack.pipeline.schema import ComponentConfig, Config
from tfstack.vocabulary import APPLICATIONS_PREFIX, NAMED_WEIGHTS

if TYPE_CHECKING:
    from tfstack.pipeline.paths import Paths

# As in tfstack.components (which imports Keras); tests/test_preflight.py checks they agree.
MODEL_FILE_EXTENSIONS = (".keras", ".h5", ".hdf5")
SAVEDMODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
DATA_KEYS = "x_train, y_train, x_test, y_test"
# What each stage reads: its config inputs, and the file an earlier stage wrote.
STAGE_READS = {
    "run": ("data", "components"),
    "build": ("components",),
    "train": ("data", "build/stacked.keras"),
    "evaluate": ("data", "train/model.keras"),
}


def kind_of(path: Path) -> str:
    """What is at ``path``, in words: ``a file``, ``a directory``, ``a character device``, ..."""
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_inputs(
    config: Config, paths: Paths, *, stage: str, skip: frozenset[str] = frozenset()
) -> None:
    """Check every path ``stage`` reads, before any MLflow run and any TensorFlow import.

    Args:
        config: the validated config.
        paths: the project's paths (relative config paths are resolved against its root).
        stage: ``run``, ``build``, ``train`` or ``evaluate`` (other stages read nothing here).
        skip: config keys not to check yet (``data.path``, ``components.base.path``, ...):
            inputs the demo makes before it runs (see `made_by_demo`).

    Raises:
        DataError: ``data.path`` or an earlier stage's output is missing or not a file.
        ComponentError: a component path is missing or not a model file or SavedModel.
    """
    for item in STAGE_READS.get(stage, ()):
        if item == "data":
            if "data.path" not in skip:
                check_data_path(config.data.path, paths, data_format=config.data.format)
        elif item == "components":
            for key, component in components(config).items():
                if f"{key}.path" not in skip:
                    check_component(key, component, paths)
        else:
            earlier, _ = item.split("/")
            output = paths.stage(earlier) / item.split("/", 1)[1]
            if not output.is_file():
                raise DataError(
                    f"{output} is missing; run the {earlier} stage first (dvc repro {earlier})."
                )


def components(config: Config) -> dict[str, ComponentConfig]:
    """Every component by its config key: ``components.base``, ``components.extra.<k>``, ..."""
    found = {"components.base": config.components.base}
    found.update({f"components.extra.{k}": c for k, c in config.components.extra.items()})
    found["components.head"] = config.components.head
    return found


def made_by_demo(config: Config) -> frozenset[str]:
    """The input keys ``pipeline.ensure_demo_inputs`` makes when they are missing.

    The same conditions as ``ensure_demo_inputs``: the digits data, and components under
    ``<output_dir>/pretrain``. They are checked after it ran.
    """
    if config.data.name != "digits":
        return frozenset()
    keys = {"data.path"}
    pretrain = str(Path(config.output_dir) / "pretrain")
    for key, component in components(config).items():
        if key in ("components.base", "components.head") and component.path.startswith(pretrain):
            keys.add(f"{key}.path")
    return frozenset(keys)


def check_data_path(value: str, paths: Paths, *, data_format: str = "npz") -> None:
    """``data.path`` names what ``data.format`` reads: an existing file, or a folder of images.

    Raises:
        DataError: naming what is there instead, and what is expected.
    """
    path = paths.resolve(value)
    expected = {
        "npz": f"an .npz file holding {DATA_KEYS}",
        "images": "a folder of class subfolders of images (FOLDER/<class>/*.png or "
        "FOLDER/train/<class>/)",
        "csv": "a CSV file of image paths and labels",
    }[data_format]
    if not path.exists():
        made = " Check the path, or run the stage that writes it (dvc repro prepare)."
        raise DataError(
            f"data.path={value} does not exist (looked for {path}). Expected {expected}."
            + (made if data_format == "npz" else " Check the path.")
        )
    kind = kind_of(path)
    wanted = "a directory" if data_format == "images" else "a file"
    if kind != wanted:
        how = {
            "npz": " (np.savez(path, x_train=..., ...)); point data.path at that file.",
            "images": "; point data.path at that folder (data=npz or data=csv read files).",
            "csv": "; point data.path at the CSV (data=images reads a folder).",
        }[data_format]
        raise DataError(f"data.path={value} is {kind}, not {wanted}. Expected {expected}{how}")


def check_component(key: str, component: ComponentConfig, paths: Paths) -> None:
    """A component path is a model file, a SavedModel directory or ``keras_applications:NAME``.

    Args:
        key: the component's config key, e.g. ``components.base``.
        component: its config.
        paths: the project's paths.

    Raises:
        ComponentError: the path is missing or of the wrong kind, or a Keras application's
            ``weights`` file is missing.
    """
    source = component.path
    if source.startswith(APPLICATIONS_PREFIX):
        # The name is checked by Keras (it needs the import); the weights file is not.
        weights = component.weights
        if weights not in (None, NAMED_WEIGHTS) and not paths.resolve(weights).is_file():
            raise ComponentError(
                f"{key}.weights={weights!r} is neither {NAMED_WEIGHTS} nor a local file (looked "
                f"for {paths.resolve(weights)}). Set {key}.weights={NAMED_WEIGHTS} for Keras's "
                f"pretrained weights, null for random initialisation, or a weights file's path."
            )
        return
    path = paths.resolve(source)
    expected = (
        "a .keras, .h5 or .hdf5 file, a TensorFlow SavedModel directory, or keras_applications:NAME"
    )
    if not path.exists():
        raise ComponentError(
            f"{key}.path={source} does not exist (looked for {path}). Fix the path, or use "
            f"{key}.path=keras_applications:NAME for a Keras application."
        )
    kind = kind_of(path)
    if kind == "a directory":
        if not any((path / name).is_file() for name in SAVEDMODEL_FILES):
            entries = sorted(p.name for p in path.iterdir())[:5]
            raise ComponentError(
                f"{key}.path={source} is a directory but not a TensorFlow SavedModel: expected "
                f"saved_model.pb inside, found {entries or 'nothing'}. Point {key}.path at the "
                "SavedModel directory itself, or at a .keras/.h5 file."
            )
        return
    if kind != "a file":
        raise ComponentError(f"{key}.path={source} is {kind}; expected {expected}.")
    if path.suffix.lower() not in MODEL_FILE_EXTENSIONS:
        raise ComponentError(
            f"{key}.path={source} has extension {path.suffix.lower()!r}; expected {expected}. "
            f"Save the model with model.save('model.keras') and point {key}.path at that file."
        )
