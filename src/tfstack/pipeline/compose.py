"""Composing the config: Hydra over ``conf/`` and the packaged groups, or DVC's ``params.yaml``.

Both end in `tfstack.pipeline.config.validate`. Hydra's own errors (an unknown group option, a
key that needs ``+``, an override its grammar cannot parse) become one `ConfigError` line that
names the override and the fix.
"""

from __future__ import annotations

import difflib
import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import hydra_plugins.tfstack_resolvers  # noqa: F401  (registers conf/'s tfstack_dep resolver)
from tfstack.errors import ConfigError
from tfstack.pipeline.conf_dirs import PRIMARY, SEARCHPATH, ConfigSource, config_source
from tfstack.pipeline.config import validate
from tfstack.pipeline.schema import Config, adds_to_mapping, first_unknown, in_schema, known_keys


def load_params(path: str | Path) -> Config:
    """Load and validate a composed config file (DVC's ``params.yaml``).

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid config.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} does not exist. Run `dvc exp run` (which composes it from conf/) "
            "or pass overrides to `tfstack run`."
        )
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # YAML errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return validate(raw, source=str(path))


def compose(overrides: list[str], *, config_dir: str | Path) -> Config:
    """Compose ``conf/`` and the packaged groups with Hydra overrides, and validate it.

    Args:
        overrides: Hydra overrides such as ``["stacking=adapter", "train.epochs=3"]``.
        config_dir: the project's ``conf/`` directory (`conf_dirs.config_source`: without one,
            the packaged config).

    Raises:
        ConfigError: an unknown group option, a bad override or an invalid config.
    """
    from hydra.errors import HydraException

    source = config_source(config_dir)
    try:
        cfg = _hydra_compose(source, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise _compose_error(err, source) from err
    default = "conf/" if source.project is not None else source.label
    return validate(cfg, source="overrides " + " ".join(overrides) if overrides else default)


def _hydra_compose(source: ConfigSource, overrides: list[str], **kwargs: Any) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(source.directory), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides), **kwargs)


def _compose_error(err: Exception, source: ConfigSource) -> ConfigError:
    """Turn Hydra's compose errors into a message that lists the valid choices."""
    text = str(err).strip()
    missing = re.search(r"Could not find '([\w/]+)/([\w.-]+)'", text)
    if missing:
        group, option = missing.groups()
        options = source.options(group)
        if option in options and not source.searches_package():
            return ConfigError(
                f"{group}={option} is one of tfstack's packaged options, which "
                f"{source.directory / PRIMARY} does not search. Add to it: "
                f"'hydra: {{searchpath: [{SEARCHPATH}]}}' (as tfstack init writes it)."
            )
        if options:
            where = " and ".join(str(d) for d in source.group_dirs(group))
            return ConfigError(
                f"{group}={option} is not an option of config group {group!r}. "
                f"Options: {options} (files in {where})."
            )
        return ConfigError(f"{group!r} is not a config group. Groups: {source.groups()}.")
    bad_key = re.search(r"Could not override '([\w.]+)'", text)
    if bad_key and adds_to_mapping(bad_key.group(1)):
        full_key = bad_key.group(1)
        cause = str(err.__cause__ or "").strip().splitlines()[:1] or ["a new key"]
        append = re.search(r"To append to your config use (.+)", text)
        how = append.group(1).strip() if append else f"+{full_key}=VALUE"
        return ConfigError(
            f"Cannot override {full_key}: {cause[0]}. A new entry in a mapping needs Hydra's "
            f"'+' prefix: {how}"
        )
    if bad_key and in_schema(bad_key.group(1)):
        # A schema key that the composed YAML leaves out (e.g. components.base.input_shape).
        full_key = bad_key.group(1)
        return ConfigError(
            f"{full_key} is a config key that conf/ does not set, so Hydra needs its '+' prefix "
            f"to add it: +{full_key}=VALUE."
        )
    if bad_key:
        full_key = bad_key.group(1)
        full_key = first_unknown(full_key)
        known = known_keys(full_key)
        close = difflib.get_close_matches(full_key.split(".")[-1], known, n=1)
        parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        hint = f" Did you mean {parent}{close[0]}?" if close else ""
        return ConfigError(f"{full_key} is not a config key.{hint} Valid keys here: {known}.")
    override = getattr(err, "override", None)  # hydra.errors.OverrideParseException
    if override is not None:
        return _unparsable_override(override, text)
    if "LexerNoViableAltException" in text or "mismatched input" in text:
        bad = text.split(":", 1)[-1].strip().splitlines()[0]
        return ConfigError(
            f"Cannot parse the override {bad}. Quote values with special characters for Hydra, "
            """and the whole override for the shell: 'freeze.unfreeze_pattern="^conv"'."""
        )
    return ConfigError(f"Cannot compose the config: {text.splitlines()[0]}")


def _unparsable_override(override: str, text: str) -> ConfigError:
    """The message for an override Hydra's grammar refuses: which one, and how to quote it.

    Hydra reads ``[``, ``(``, ``^``, ``*``, ``,``, ``$``, spaces and quotes in an unquoted value
    as grammar (lists, sweeps, functions, interpolations). Quoted with ``"..."`` or ``'...'``
    the value is a plain string, backslashes and all (only a backslash before a quote is an
    escape). The shell removes one level of quotes first, so the whole override goes in single
    quotes: bash passes ``'freeze.unfreeze_pattern="conv[12]"'`` to Hydra as
    ``freeze.unfreeze_pattern="conv[12]"``.
    """
    lines = [line.strip() for line in text.splitlines()]
    skip = ("See https", "^", "Error parsing override")
    detail = next((line for line in lines if line and not line.startswith(skip)), "")
    if detail.startswith("LexerNoViableAltException"):
        detail = "a character it cannot read there"
    key, equals, value = override.partition("=")
    if not equals or not key.strip():
        return ConfigError(
            f"Cannot parse the override {override!r}: an override is KEY=VALUE (train.lr=0.01) "
            "or GROUP=OPTION (freeze=joint)."
        )
    quoted = _hydra_quoted(key, value)
    if quoted is None:
        return ConfigError(
            f"Cannot parse the override {override!r} (Hydra's override grammar: {detail}). "
            "Quote the value for Hydra, and the whole override for the shell."
        )
    return ConfigError(
        f"Cannot parse the override {override!r}: Hydra reads characters such as [ ] ( ) ^ * , "
        f"in an unquoted value as its grammar ({detail}). Quote the value for Hydra and the "
        f"whole override for the shell: {shlex.quote(quoted)}"
    )


def _hydra_quoted(key: str, value: str) -> str | None:
    """``key="value"`` as Hydra's grammar reads back to exactly ``value``, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for quote in ('"', "'"):
        if quote in value:
            continue
        candidate = f"{key}={quote}{value}{quote}"
        try:
            parsed = OverridesParser.create().parse_overrides([candidate])[0]
        except HydraException:
            continue
        if parsed.value() == value:
            return candidate
    return None


def compose_yaml(config_dir: str | Path, overrides: list[str] | None = None) -> str:
    """``conf/`` composed and resolved exactly as DVC writes it into ``params.yaml``."""
    cfg = _hydra_compose(config_source(config_dir), list(overrides or []))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)
