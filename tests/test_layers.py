"""The import rules that draw the layers: who may import mlflow, hydra and omegaconf.

Every import statement under src/tfstack/ is read with `ast` (also the ones inside functions,
and `importlib.import_module("...")` / `__import__("...")` with a literal name), so a lazy
import does not slip past. ruff's banned-api rule (pyproject.toml) enforces the mlflow rule in
`make lint` too; `test_ruff_bans_mlflow_outside_tracking` checks that configuration.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tfstack"

# Package -> the paths (relative to src/tfstack/) allowed to import it: a directory ends in "/".
ALLOWED = {
    "mlflow": ["tracking/"],
    "hydra": ["pipeline/"],
    "omegaconf": ["pipeline/"],
}


def imported_packages(source: str) -> dict[str, list[int]]:
    """Top-level packages a module's source imports, with the line numbers of the imports."""
    found: dict[str, list[int]] = {}

    def add(name: str, line: int) -> None:
        found.setdefault(name.split(".", 1)[0], []).append(line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            add(node.module, node.lineno)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    add(first.value, node.lineno)
    return found


def _allowed(relative: str, package: str) -> bool:
    return any(
        relative.startswith(rule) if rule.endswith("/") else relative == rule
        for rule in ALLOWED[package]
    )


def test_detects_every_form_of_import() -> None:
    source = (
        "import mlflow.tensorflow\n"
        "from omegaconf import OmegaConf\n"
        "from . import tracking\n"
        "def later():\n"
        "    import hydra\n"
        "    importlib.import_module('mlflow.pyfunc')\n"
    )
    assert imported_packages(source) == {"mlflow": [1, 6], "omegaconf": [2], "hydra": [5]}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_is_imported_only_where_allowed(package: str) -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20  # the walk sees the package, not an empty directory
    offenders = []
    for path in sources:
        relative = path.relative_to(PACKAGE).as_posix()
        lines = imported_packages(path.read_text(encoding="utf-8")).get(package, [])
        if lines and not _allowed(relative, package):
            offenders += [f"src/tfstack/{relative}:{line}" for line in lines]
    assert not offenders, f"{package} may be imported only in {ALLOWED[package]}: {offenders}"


def test_tracking_package_does_import_mlflow() -> None:
    # The rule above is about something real: tracking/ is where mlflow is used.
    users = [
        path.name
        for path in (PACKAGE / "tracking").glob("*.py")
        if "mlflow" in imported_packages(path.read_text(encoding="utf-8"))
    ]
    assert "store.py" in users and "models.py" in users


def _ruff() -> str | None:
    return shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed")
@pytest.mark.parametrize(
    ("filename", "banned"),
    [("src/tfstack/stacking.py", True), ("src/tfstack/tracking/store.py", False)],
)
def test_ruff_bans_mlflow_outside_tracking(filename: str, banned: bool) -> None:
    checked = subprocess.run(
        [_ruff(), "check", "--no-cache", "--stdin-filename", filename, "-"],
        input="import mlflow\n\nprint(mlflow)\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert ("TID251" in checked.stdout) is banned, checked.stdout
    assert checked.returncode == (1 if banned else 0), checked.stdout + checked.stderr


def _tfstack_imports(source: str) -> set[str]:
    """The tfstack modules a source imports (``tfstack.x.y``, ``from tfstack import x``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("tfstack."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tfstack":
                names.update(f"tfstack.{a.name}" for a in node.names)
            elif node.module.startswith("tfstack."):
                names.add(node.module)
    return names


def test_the_library_never_imports_the_pipeline_or_tracking() -> None:
    library = [p for p in PACKAGE.glob("*.py") if p.name != "cli.py"]
    assert len(library) > 20
    offenders = {
        path.name: sorted(
            name
            for name in _tfstack_imports(path.read_text(encoding="utf-8"))
            if name.startswith(("tfstack.pipeline", "tfstack.tracking"))
        )
        for path in library
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_tracking_never_imports_the_pipeline() -> None:
    for path in (PACKAGE / "tracking").glob("*.py"):
        found = _tfstack_imports(path.read_text(encoding="utf-8"))
        assert not [name for name in found if name.startswith("tfstack.pipeline")], path.name


MAX_LINES = 600  # a file that grows past this has grown a second job: split it by concept


def test_no_source_file_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in (ROOT / "src").rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long
