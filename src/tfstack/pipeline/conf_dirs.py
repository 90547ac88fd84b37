"""Where the config comes from: the project's ``conf/`` and the groups packaged with tfstack.

The generic groups (freeze, stacking, schedule, train, data/images, ...) are package data of
``tfstack.conf``, on Hydra's search path as ``pkg://tfstack.conf``. A project's
``conf/config.yaml`` names that path in ``hydra.searchpath`` (so DVC's own composition, which
reads the same file, finds the groups too); its options join the packaged ones, and one of the
same name wins, since Hydra searches the primary config's directory first. With no ``conf/``
at all, the packaged primary config is the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tfstack.errors import ConfigError

PACKAGE = "tfstack.conf"
SEARCHPATH = f"pkg://{PACKAGE}"
PRIMARY = "config.yaml"


def packaged_dir() -> Path:
    """The directory of the packaged config groups (``tfstack/conf`` of the installed package)."""
    import tfstack.conf

    return Path(tfstack.conf.__file__).resolve().parent


@dataclass(frozen=True)
class ConfigSource:
    """What Hydra composes: ``initialize_config_dir(directory)``."""

    directory: Path
    # The project's conf/ (None without one), searched before the packaged groups.
    project: Path | None

    @property
    def label(self) -> str:
        """Where the config came from, for messages."""
        if self.project is None:
            return "tfstack's packaged config.yaml"
        return str(self.project)

    def searches_package(self) -> bool:
        """Whether the composition sees the packaged groups (a project's config.yaml names them)."""
        primary = self.directory / PRIMARY
        if self.project is None or not primary.is_file():
            return True
        return SEARCHPATH in primary.read_text(encoding="utf-8")

    def group_dirs(self, group: str) -> list[Path]:
        """The directories that hold ``group``'s options, in Hydra's search order."""
        roots = [self.project] if self.project is not None else []
        return [root / group for root in [*roots, packaged_dir()] if (root / group).is_dir()]

    def options(self, group: str) -> list[str]:
        """Every option of ``group``: the project's and the packaged ones."""
        return sorted({p.stem for d in self.group_dirs(group) for p in d.glob("*.yaml")})

    def groups(self) -> list[str]:
        """The top-level config groups of the project and the package."""
        roots = [self.project] if self.project is not None else []
        names = {p.name for root in [*roots, packaged_dir()] for p in root.iterdir() if p.is_dir()}
        return sorted(names - {"__pycache__", "hydra"})


def config_source(config_dir: str | Path) -> ConfigSource:
    """The config to compose for ``--config-dir`` (default ``conf``, in the working directory).

    Raises:
        ConfigError: a config directory without a config.yaml, or an explicitly named one that
            does not exist.
    """
    config_dir = Path(config_dir).resolve()
    if (config_dir / PRIMARY).is_file():
        return ConfigSource(directory=config_dir, project=config_dir)
    if config_dir.is_dir():
        # Hydra looks the primary config up before it reads any search path, and caches the
        # miss: a conf/ of groups alone cannot borrow the packaged config.yaml.
        raise ConfigError(
            f"{config_dir} has no {PRIMARY}. Run `tfstack init` (it writes one that adds your "
            f"options to tfstack's packaged groups), or write one with "
            f"'hydra: {{searchpath: [{SEARCHPATH}]}}' and a defaults list."
        )
    if config_dir != (Path.cwd() / "conf").resolve():
        raise ConfigError(
            f"--config-dir {config_dir} does not exist. Give the directory of your config groups, "
            "or leave --config-dir out to use ./conf (or, without one, tfstack's packaged config)."
        )
    return ConfigSource(directory=packaged_dir(), project=None)
