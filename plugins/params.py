"""
Parameter checks of the built-in plugins (privacy plugins and ranking policies).

Each raises :class:`plugins.base.PluginError` with a message of the form
``[plugins.<name>].<key>: <rule>, got <value>``, so an operator can find the line in
the TOML file. They never echo more than a short prefix of a value.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, Final

from plugins.base import PluginError

__all__ = [
    "check_bool",
    "check_int",
    "check_number",
    "check_str",
    "check_str_list",
    "check_unknown",
    "param_error",
]

_MAX_REPR: Final = 60


def param_error(policy: str, key: str, rule: str, value: Any = ...) -> PluginError:
    """
    The error for ``[plugins.<policy>].<key>`` breaking ``rule``.

    Args:
        policy: the policy's name (its config table).
        key: the offending key, with any sub-path (``boost[0].by``).
        rule: what the value must be, e.g. ``"must be between 0 and 1"``.
        value: the value given; left out of the message when ``...``.
    """
    got = "" if value is ... else f", got {_short(value)}"
    return PluginError(f"[plugins.{policy}].{key}: {rule}{got}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def check_unknown(policy: str, unknown: Mapping[str, Any], known: Collection[str]) -> None:
    """
    Raise for the first key of ``unknown`` (keys the constructor did not take).

    Raises:
        PluginError: naming the key and listing the known ones.
    """
    for key in sorted(unknown):
        rule = f"unknown key; known: {', '.join(sorted(known))}"
        raise param_error(policy, key, rule)


def check_number(
    policy: str,
    key: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    integer: bool = False,
) -> float:
    """
    ``value`` as a number within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``).

    Raises:
        PluginError: the value is not a (finite, integral when ``integer``) number or
            lies outside the bounds.
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise param_error(
            policy, key, "must be an integer" if integer else "must be a number", value
        )
    if not math.isfinite(value):
        raise param_error(policy, key, "must be finite", value)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and value > hi
    if below or above:
        raise param_error(policy, key, _bounds_rule(lo, hi, lo_open=lo_open), value)
    return value


def _bounds_rule(lo: float | None, hi: float | None, *, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"must be between {lo:g} and {hi:g}" + (f" (above {lo:g})" if lo_open else "")
    if lo is not None:
        return f"must be {'>' if lo_open else '>='} {lo:g}"
    return f"must be <= {hi:g}"


def check_bool(policy: str, key: str, value: Any) -> bool:
    """
    ``value`` as a bool.

    Raises:
        PluginError: the value is not ``true`` or ``false``.
    """
    if not isinstance(value, bool):
        raise param_error(policy, key, "must be true or false", value)
    return value


def check_str(plugin: str, key: str, value: Any, *, max_chars: int = 4096) -> str:
    """``value`` as a string of at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise param_error(plugin, key, "must be a string", value)
    if len(value) > max_chars:
        raise param_error(plugin, key, f"must be at most {max_chars} characters")
    return value


def check_str_list(plugin: str, key: str, value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings (a TOML list of strings)."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise param_error(plugin, key, "must be a list of non-empty strings", value)
    return tuple(value)


def check_int(plugin: str, key: str, value: Any, *, lo: int, hi: int) -> int:
    """``value`` as an integer in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise param_error(plugin, key, f"must be an integer between {lo} and {hi}", value)
    return value
