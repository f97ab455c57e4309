"""Numbers read from environment variables: an unset or empty variable gives the default, anything else outside
its range is refused with one line naming the variable and the range."""

from __future__ import annotations

from collections.abc import Mapping


def env_number(env: Mapping[str, str], name: str, default: float, low: float, high: float,
               error: type[Exception], *, whole: bool = False) -> float:
    """The number ``name`` holds; ``error`` is raised when it is not a number from ``low`` to ``high``."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value: float = int(text) if whole else float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # NaN fails every comparison
        what = "a whole number" if whole else "a number of seconds"
        raise error(f"{name}={text!r}: give {what} from {low:g} to {high:g}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, low: int, high: int, error: type[Exception]) -> int:
    """The whole number ``name`` holds, as :func:`env_number` with ``whole``."""
    return int(env_number(env, name, default, low, high, error, whole=True))
