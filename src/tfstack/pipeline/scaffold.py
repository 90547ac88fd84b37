"""``tfstack init``: scaffold tfstack's pipeline into the user's own git repository.

It writes ``conf/`` (a primary ``config.yaml`` whose ``hydra.searchpath`` names the packaged
groups, and the user's ``components/project.yaml`` and ``data/project.yaml``, each extending a
packaged option), ``dvc.yaml`` (build -> train -> evaluate, whose deps are the user's files
through ``${dvc_deps.*}``), ``params.yaml`` (conf/ composed as DVC composes it), an
``MLproject``, ``TFSTACK.md`` with the next commands, and appends tfstack's entries to
``.gitignore`` and ``.dvcignore``. It runs ``dvc init`` where DVC is not set up and enables
DVC's Hydra composition in ``.dvc/config`` (so ``dvc exp run -S`` composes conf/).

Everything is checked before anything is written: a git repository, the given paths, the files
it would overwrite (refused without ``force``), and that the config composes and validates.
The templates are package data (``templates/``).
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tfstack.errors import ProjectError
from tfstack.files import atomic_path
from tfstack.vocabulary import APPLICATIONS_PREFIX

TEMPLATES = Path(__file__).resolve().parent / "templates"
COMPONENTS = "conf/components/project.yaml"
DATA = "conf/data/project.yaml"
# What tfstack writes in a project that git should not track (runs, stores, sweeps, caches).
GITIGNORE = [
    "/mlflow.db",
    "/mlflow.db.lock",
    "/mlruns/",
    "/mlartifacts/",
    "/multirun/",
    "/outputs/run.json",
    "/outputs/.tfstack-lock",
    "/outputs/compare/",
    "/outputs/reproduce/",
    "/outputs/train/checkpoint/",
    "/outputs/train/tensorboard/",
]
# What DVC need not look at: the MLflow stores, sweeps and the training checkpoint.
DVCIGNORE = ["/mlflow.db*", "/mlruns/", "/mlartifacts/", "/multirun/", "/outputs/train/checkpoint/"]
CHANNELS = {1: "grayscale", 4: "rgba"}  # 3 channels: the packaged default, rgb


@dataclass
class Plan:
    """What ``tfstack init`` would do in ``root``."""

    root: Path
    files: dict[str, str]  # path relative to root -> content
    appends: dict[str, list[str]]  # .gitignore / .dvcignore -> the lines they lack
    dvc_init: list[str] = field(default_factory=list)  # `dvc init`'s arguments, if needed
    enable_hydra: bool = False
    placeholders: list[str] = field(default_factory=list)  # files with ??? to fill in

    def existing(self) -> list[str]:
        return [name for name in self.files if (self.root / name).exists()]


def init_project(
    root: Path,
    *,
    base: str | None = None,
    head: str | None = None,
    data: str | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> str:
    """Scaffold tfstack into the git repository at ``root``; returns what it did, as text.

    Raises:
        ProjectError: no git (or no repository), a given path that does not exist, or files in
            the way (without ``force``).
        ConfigError: the written config would not compose or validate.
    """
    root = root.resolve()
    plan = make_plan(root, base=base, head=head, data=data)
    existing = plan.existing()
    if dry_run:
        return describe(plan, existing)
    if existing and not force:
        raise ProjectError(
            f"tfstack init would overwrite {', '.join(existing)} in {root}. Move them away, or "
            "pass --force to replace them (--dry-run lists what it writes)."
        )
    done = []
    if plan.dvc_init:
        _dvc(root, *plan.dvc_init)
        done.append("ran dvc " + " ".join(plan.dvc_init))
    if plan.enable_hydra:
        _dvc(root, "config", "hydra.enabled", "true")
        done.append("set hydra.enabled = true in .dvc/config (dvc exp run composes conf/)")
    for name, text in plan.files.items():
        with atomic_path(root / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        done.append(f"wrote {name}" + (" (replaced)" if name in existing else ""))
    for name, lines in plan.appends.items():
        path = root / name
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        with atomic_path(path) as tmp:
            tmp.write_text(_appended(old, lines), encoding="utf-8")
        done.append(f"appended {len(lines)} lines to {name}")
    lines = [f"tfstack init: {line}" for line in done]
    if plan.placeholders:
        lines.append(
            f"tfstack init: set the ??? values in {', '.join(plan.placeholders)}, then run "
            "`tfstack params` (writes params.yaml)"
        )
    lines.append("Next: git add -A && git commit -m 'tfstack init', then dvc repro (TFSTACK.md)")
    return "\n".join(lines)


def describe(plan: Plan, existing: list[str]) -> str:
    """The ``--dry-run`` listing: what would be run, written and appended; nothing is."""
    lines = ["tfstack init --dry-run: nothing written. It would"]
    if plan.dvc_init:
        lines.append(f"  run      dvc {' '.join(plan.dvc_init)}")
    if plan.enable_hydra:
        lines.append("  set      hydra.enabled = true in .dvc/config")
    for name in plan.files:
        note = "  (exists: --force replaces it)" if name in existing else ""
        lines.append(f"  write    {name}{note}")
    for name, added in plan.appends.items():
        lines.append(f"  append   {len(added)} lines to {name}")
    return "\n".join(lines)


def make_plan(root: Path, *, base: str | None, head: str | None, data: str | None) -> Plan:
    """Check the repository and the inputs, and make every file's content (nothing written)."""
    git_root = _git_root(root)
    components, component_todo = _components_yaml(root, base, head)
    data_yaml, data_todo = _data_yaml(root, data, base)
    files = {
        "conf/config.yaml": (TEMPLATES / "config.yaml").read_text(encoding="utf-8"),
        COMPONENTS: components,
        DATA: data_yaml,
        # Not named dvc.yaml: DVC would read the template as a pipeline of tfstack's own repo.
        "dvc.yaml": (TEMPLATES / "dvc.yaml.in").read_text(encoding="utf-8"),
    }
    placeholders = [
        name for name, todo in ((COMPONENTS, component_todo), (DATA, data_todo)) if todo
    ]
    if not placeholders:
        files["params.yaml"] = _params_yaml(files)
    name = json.dumps(root.name or "tfstack")
    files["MLproject"] = (
        (TEMPLATES / "MLproject").read_text(encoding="utf-8").replace("@NAME@", name)
    )
    todo = (
        f"\nStill to do: set the `???` values in {' and '.join(placeholders)}, then run "
        "`tfstack params` (it writes `params.yaml`).\n"
        if placeholders
        else ""
    )
    files["TFSTACK.md"] = (
        (TEMPLATES / "TFSTACK.md").read_text(encoding="utf-8").replace("@TODO@", todo)
    )
    appends = {
        name: missing
        for name, wanted in ((".gitignore", GITIGNORE), (".dvcignore", DVCIGNORE))
        if (missing := _missing_lines(root / name, wanted))
    }
    dvc_init = [] if (root / ".dvc").is_dir() else ["init", "-q"]
    if dvc_init and git_root != root:
        dvc_init.append("--subdir")  # DVC in a folder of a bigger git repository
    return Plan(
        root=root,
        files=files,
        appends=appends,
        dvc_init=dvc_init,
        enable_hydra=bool(dvc_init) or not _hydra_enabled(root / ".dvc" / "config"),
        placeholders=placeholders,
    )


def _git_root(root: Path) -> Path:
    """The top of the git work tree that holds ``root``."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True
        )
    except FileNotFoundError as err:
        raise ProjectError(
            "tfstack init needs git, which is not installed. Install it (apt-get install git), "
            "then run `git init` in your project."
        ) from err
    if found.returncode != 0:
        raise ProjectError(
            f"{root} is not in a git repository; tfstack init needs one (DVC versions the "
            "pipeline in git). Run `git init` first."
        )
    return Path(found.stdout.strip()).resolve()


def _path(root: Path, option: str, given: str, *, application: bool = False) -> str:
    """A given path as conf/ stores it: relative to the project root when inside it."""
    if application and given.startswith(APPLICATIONS_PREFIX):
        return given
    path = Path(given).expanduser()
    absolute = (path if path.is_absolute() else root / path).resolve()
    if not absolute.exists():
        raise ProjectError(
            f"{option} {given} does not exist (in {root}). Give an existing file or folder, or "
            f"leave {option} out to write a placeholder to fill in later."
        )
    return str(absolute.relative_to(root)) if absolute.is_relative_to(root) else str(absolute)


def _components_yaml(root: Path, base: str | None, head: str | None) -> tuple[str, bool]:
    """conf/components/project.yaml, and whether it has a placeholder."""
    lines = [
        "# Your components (written by `tfstack init`): model_1, the feature extractor (base), and",
        "# model_2, the head. Every key of the packaged components/default.yaml applies (cut_at,",
        '# trust_code, weights, ...): see tfstack\'s README, "Bring your own models and data".',
        "defaults:",
        "  - default",
    ]
    todo = False
    for key, option, given, what in (
        ("base", "--base", base, "the feature extractor"),
        ("head", "--head", head, "the head"),
    ):
        lines.append(f"{key}:")
        if given is None:
            todo = True
            lines.append(f"  # {what}: a .keras or .h5 file, a SavedModel directory (with")
            lines.append("  # trust_code: true) or keras_applications:NAME")
            lines.append("  path: ???")
        else:
            path = _path(root, option, given, application=True)
            lines.append(f"  path: {json.dumps(path)}")
    return "\n".join(lines) + "\n", todo


def _data_yaml(root: Path, data: str | None, base: str | None) -> tuple[str, bool]:
    """conf/data/project.yaml, and whether it has a placeholder."""
    header = "# Your data (written by `tfstack init`). Every key of the packaged data/{0}.yaml"
    if data is None:
        lines = [
            header.format("images"),
            "# applies. A folder of class folders; for a CSV of image paths and labels, or an .npz",
            "# of arrays, change the defaults entry to csv or npz.",
            "defaults:",
            "  - images",
            "path: ???",
        ]
        return "\n".join(lines) + "\n", True
    path = _path(root, "--data", data)
    absolute = root / path
    if absolute.is_dir():
        fmt = "images"
    elif absolute.suffix.lower() in (".csv", ".npz"):
        fmt = absolute.suffix.lower().lstrip(".")
    else:
        raise ProjectError(
            f"--data {data} is neither a folder of class folders nor a .csv or .npz file. Give "
            "one of those, or leave --data out to write a placeholder."
        )
    lines = [header.format(fmt) + " applies:", "# see its comments.", "defaults:", f"  - {fmt}"]
    lines.append(f"path: {json.dumps(path)}")
    if fmt == "images" and not (absolute / "test").is_dir():
        lines.append(
            f"# {path} has no test/ folder: this fraction of the images is the test split."
        )
        lines.append("test_fraction: 0.2")
    channels = _input_channels(root, base) if fmt != "npz" else None
    if channels in CHANNELS:
        lines.append(f"# the base's input has {channels} channel{'s' if channels > 1 else ''}")
        lines.append(f"color_mode: {CHANNELS[channels]}")
    return "\n".join(lines) + "\n", False


def _input_channels(root: Path, base: str | None) -> int | None:
    """The channels of a ``.keras`` base's input, read from its config (no TensorFlow)."""
    if base is None or not base.endswith(".keras"):
        return None
    try:
        with zipfile.ZipFile(root / base) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # the build stage reports an unreadable file in its own words
    shape = _first_input_shape(config)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _first_input_shape(node: object) -> list | None:
    """The batch shape of the first InputLayer in a Keras config (the outermost model's)."""
    if isinstance(node, dict):
        if node.get("class_name") == "InputLayer":
            return node.get("config", {}).get("batch_shape")
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _first_input_shape(child)
        if found:
            return found
    return None


def _params_yaml(files: dict[str, str]) -> str:
    """conf/ as it will be written, composed and resolved as DVC writes params.yaml."""
    from tfstack.pipeline.compose import compose, compose_yaml

    with tempfile.TemporaryDirectory(prefix="tfstack-init-") as tmp:
        for name, text in files.items():
            if name.startswith("conf/"):
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
        conf = Path(tmp) / "conf"
        compose([], config_dir=conf)  # validates: a bad value fails before anything is written
        return compose_yaml(conf)


def _missing_lines(path: Path, wanted: list[str]) -> list[str]:
    have = set(path.read_text(encoding="utf-8").splitlines()) if path.exists() else set()
    return [line for line in wanted if line not in have]


def _appended(old: str, lines: list[str]) -> str:
    separator = "" if not old or old.endswith("\n") else "\n"
    block = "\n".join(["# tfstack (tfstack init)", *lines]) + "\n"
    return old + separator + ("\n" if old else "") + block


def _hydra_enabled(config: Path) -> bool:
    """Whether ``.dvc/config`` enables DVC's Hydra composition."""
    parser = configparser.ConfigParser()
    try:
        parser.read(config, encoding="utf-8")
        return parser.getboolean("hydra", "enabled", fallback=False)
    except (configparser.Error, ValueError):
        return False


def _dvc(root: Path, *args: str) -> None:
    """Run this environment's DVC in ``root``; a failure is one line."""
    command = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ProjectError(f"`dvc {' '.join(args)}` failed in {root}: {last}")
