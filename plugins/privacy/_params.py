"""
Parameter checks of the built-in privacy plugins.

Each raises :class:`plugins.base.PluginError` with a message of the form
``[plugins.<name>].<key>: <rule>``, the form the ranking policies use too, so an
operator can find the line in the TOML file. Unknown keys never get this far: the
registry refuses them against the constructor's signature.
"""

from __future__ import annotations

from typing import Any, Final

from plugins.base import PluginError

__all__ = ["check_bool", "check_int", "check_str", "check_str_list", "param_error"]

_MAX_REPR: Final = 60


def param_error(plugin: str, key: str, rule: str, value: Any = ...) -> PluginError:
    """The error for ``[plugins.<plugin>].<key>`` breaking ``rule`` (``value`` shortened)."""
    got = ""
    if value is not ...:
        text = repr(value)
        got = f", got {text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + '...'}"
    return PluginError(f"[plugins.{plugin}].{key}: {rule}{got}")


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


def check_bool(plugin: str, key: str, value: Any) -> bool:
    """``value`` as a bool."""
    if not isinstance(value, bool):
        raise param_error(plugin, key, "must be true or false", value)
    return value


def check_int(plugin: str, key: str, value: Any, *, lo: int, hi: int) -> int:
    """``value`` as an integer in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise param_error(plugin, key, f"must be an integer between {lo} and {hi}", value)
    return value
