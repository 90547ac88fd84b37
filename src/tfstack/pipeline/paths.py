"""Where a pipeline execution reads and writes: the project root and its output directory.

`Paths` resolves config paths against the project root, keeps a relative ``output_dir`` inside
it and proves it writable before any work; `main_project_root` finds the workspace from inside a
queued DVC experiment's temporary copy, so every experiment shares one store.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tfstack.errors import ConfigError, OutputError
from tfstack.pipeline.schema import Config

DVC_EXPS_DIR = "/.dvc/tmp/exps/"


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, under the project root."""

    root: Path
    out: Path

    @classmethod
    def from_config(cls, config: Config, root: Path) -> Paths:
        out = Path(config.output_dir)
        out = out if out.is_absolute() else root / out
        resolved = out.resolve()
        if not Path(config.output_dir).is_absolute() and not resolved.is_relative_to(
            root.resolve()
        ):
            raise ConfigError(
                f"output_dir={config.output_dir} leaves the project root {root}; "
                "use a path inside it or an absolute path."
            )
        _check_writable(out, "output_dir")
        return cls(root=root, out=out)

    def stage(self, name: str) -> Path:
        return self.out / name

    @property
    def run_ref(self) -> Path:
        return self.out / "run.json"

    def resolve(self, path: str) -> Path:
        """A config path, relative to the project root unless absolute."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p


def _check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and prove a file can be created in it, before any work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tfstack-probe-", dir=directory):
            pass
    except OSError as err:
        raise OutputError(
            f"{key}={directory} cannot be written: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename and str(err.filename) != str(directory) else "")
            + f". Set {key}=... to a directory you can write."
        ) from err


def main_project_root(root: Path) -> Path:
    """The workspace root, also from inside a queued DVC experiment's temporary copy."""
    text = str(root.resolve())
    if DVC_EXPS_DIR in text:
        return Path(text.split(DVC_EXPS_DIR)[0])
    return root.resolve()
