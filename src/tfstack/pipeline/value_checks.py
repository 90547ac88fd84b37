"""The two checks every config value goes through: a choice among names, a number in range.

Shared by `tfstack.pipeline.config` and `tfstack.pipeline.phase_settings`; each failure is one
line naming the key and what to set.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from tfstack.errors import ConfigError


def check_choice(value: Any, choices: tuple[str, ...], key: str, group: str | None = None):
    if value not in choices:
        how = f"{group}=NAME" if group else f"{key}=VALUE"
        raise ConfigError(
            f"{key}={value!r} is not valid. Expected one of {list(choices)} (set {how})."
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
