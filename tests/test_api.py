"""The public Python API: ten names from `tfstack`, each with an example that runs.

`tfstack/__init__.py` re-exports them lazily; every one's docstring `Example:` runs here as a
doctest, in a fresh directory. The README's "Python API" example runs in a subprocess where
importing MLflow, Hydra, OmegaConf or DVC fails, so the library is shown to need none of them.
"""

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tfstack

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = sorted(set(tfstack.__all__) - {"__version__"})

# Makes `import mlflow` (and hydra, omegaconf, dvc) fail in the process that runs the example.
BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"mlflow", "hydra", "omegaconf", "dvc"}:
            raise ImportError(f"{name} is blocked: the tfstack library must not need it")
sys.meta_path.insert(0, Blocked())
"""


def test_the_public_api_is_about_ten_names_each_documented_with_an_example():
    assert len(PUBLIC) == 10
    for name in PUBLIC:
        doc = getattr(tfstack, name).__doc__ or ""
        assert "Example:" in doc and ">>>" in doc, f"tfstack.{name} has no runnable Example:"
    assert set(dir(tfstack)) >= set(PUBLIC)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        tfstack.nosuch  # noqa: B018


def test_importing_tfstack_loads_no_tensorflow():
    code = "import sys, tfstack; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["tfstack", *PUBLIC])
@pytest.mark.slow
def test_docstring_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tfstack if name == "tfstack" else getattr(tfstack, name)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(target, name, globs={}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0, f"{name}: {results}"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_without_mlflow_hydra_or_dvc(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKER + readme_example(), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    # one line per phase (name, trainable parameters), then the test metrics
    assert lines[0].startswith("head ") and lines[1].startswith("fine_tune ")
    assert int(lines[0].split()[1]) < int(lines[1].split()[1])  # fine-tuning unfreezes more
    assert "accuracy" in lines[-1]
