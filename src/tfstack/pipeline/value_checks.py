"""The two checks every config value goes through: a choice among names, a number in range.

Shared by `tfstack.pipeline.config` and `tfstack.pipeline.phase_settings`; each failure is one
line naming the key and what to set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from tfstack.errors import ConfigError


def check_choice(value: Any, choices: tuple[str, ...], key: str, group: str | None = None):
    if value not in choices:
        how = f"{group}=NAME" if group else f"{key}=VALUE"
        raise ConfigError(
            f"{key}={value!r} is not valid. Expected one of {list(choices)} (set {how})."
        )


def check_jit_compile(train) -> None:
    """``train.jit_compile``: auto, true or false; true needs op determinism off.

    Keras compiles no XLA under TensorFlow's op determinism (``train.deterministic=true``), so
    true there would be ignored with a warning; it is refused instead.
    """
    value = train.jit_compile
    if not (value == "auto" or isinstance(value, bool)):
        raise ConfigError(
            f"train.jit_compile={value!r} is not valid. Expected auto, true or false "
            "(set train.jit_compile=VALUE)."
        )
    if value is True and train.deterministic:
        raise ConfigError(
            "train.jit_compile=true cannot apply under train.deterministic=true: Keras compiles "
            "no XLA under TensorFlow's op determinism. Set train.deterministic=false, or "
            "train.jit_compile=auto."
        )


class Bound(NamedTuple):
    """The lowest value a number of the config may take, and a hint shown when it is below."""

    lowest: float
    inclusive: bool  # whether `lowest` itself is allowed
    hint: str = ""


def check_number(key: str, value: Any, bound: Bound) -> None:
    """Refuse a non-finite float, or a number below its bound, naming the key."""
    lowest, inclusive, hint = bound
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} is not a finite number. Set {key} to a finite number.")
    if value < lowest or (value == lowest and not inclusive):
        least = (
            f"at least {lowest:g}" if inclusive else "positive" if lowest == 0 else f"> {lowest}"
        )
        raise ConfigError(f"{key}={value} must be {least}{f' ({hint})' if hint else ''}.")


def check_finite_everywhere(config: Any) -> None:
    """Refuse a non-finite float anywhere in the config, naming its key.

    The keys with bounds are checked (with their own hints) before; this sweep covers the
    rest, such as ``preprocess.offset`` and the numbers of ``augment.layers`` and
    ``train.callbacks`` entries, which Keras would take and turn into nan weights or inputs.
    """
    pending: list[tuple[str, Any]] = [("", config)]
    while pending:
        key, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{key}={value} is not a finite number. Set {key} to a finite number."
            )
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        elif isinstance(value, Mapping):
            items = [(str(name), item) for name, item in value.items()]
        elif isinstance(value, list | tuple):
            pending.extend((f"{key}[{i}]", item) for i, item in reversed(list(enumerate(value))))
            continue
        else:
            continue
        prefix = f"{key}." if key else ""
        pending.extend((f"{prefix}{name}", item) for name, item in reversed(items))
