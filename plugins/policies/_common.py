"""
Shared pieces of the built-in ranking policies: parameter checks, state reads, outputs.

Parameter checks raise :class:`plugins.base.PluginError` with a message of the form
``[plugins.<name>].<key>: <rule>, got <value>``, so an operator can find the line in
the TOML file. They never echo more than a short prefix of a value.

Scores carried by position. A policy that moves items without computing new scores of
its own (MMR, exploration, business rules) gives position p the p-th best of the
scores it received (:func:`carried_scores`). The output stays sorted by score, so a
later policy that sorts by score keeps this policy's order, and the response's scores
keep the scale the caller knows. Each item's own score is in its explain entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from plugins.base import PluginError, PolicyInput, PolicyOutput

if TYPE_CHECKING:
    from eventstore.state import State

__all__ = [
    "carried_scores",
    "check_bool",
    "check_number",
    "check_unknown",
    "column",
    "field_values",
    "minmax",
    "now_of",
    "output",
    "param_error",
]

_MAX_REPR: Final = 60
_EMPTY: Final[Mapping[str, Any]] = {}


# --- parameter checks ------------------------------------------------------------


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


# --- reading the state -------------------------------------------------------------


def column(state: State, name: str, rows: np.ndarray, fill: float = 0) -> np.ndarray:
    """
    Column ``name`` of the state at item ``rows``; ``fill`` where a row is -1.

    Rows beyond the column's length (an item the state grew for after the request
    looked its rows up cannot be one, but a bad caller can) also read ``fill``.
    """
    arr = state.array(name)
    known = (rows >= 0) & (rows < arr.shape[0])
    out = arr[np.where(known, rows, 0)]
    return np.where(known, out, fill)


def now_of(request: PolicyInput) -> float:
    """
    The time, in seconds since the epoch, to which decays and ages are taken.

    ``context["now"]`` when it is a finite number (the daemon passes the "now" its
    model features use, so the two agree); else the wall clock or the newest event
    time among the candidates, whichever is earlier. The latter, the daemon's own
    rule restricted to the candidates, makes a replayed historical log rank as it
    would have at its end instead of decaying everything to zero.
    """
    given = request.context.get("now")
    if isinstance(given, int | float) and not isinstance(given, bool) and math.isfinite(given):
        return float(given)
    wall = time.time()
    if not len(request.rows):
        return wall
    newest = float(column(request.state, "pop_ts", request.rows).max())
    return min(wall, newest) if newest > 0 else wall


# --- scores and outputs --------------------------------------------------------------


def minmax(scores: np.ndarray) -> np.ndarray:
    """
    ``scores`` scaled to ``[0, 1]`` by their minimum and maximum, float64 ``[N]``.

    All-equal scores (and a single item) give 1 everywhere. Non-finite scores (NaN,
    -inf from a masked stage) are treated as the lowest, 0.
    """
    s = np.asarray(scores, np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        return np.zeros(s.shape)
    lo, hi = s[finite].min(), s[finite].max()
    if hi == lo:
        return np.where(finite, 1.0, 0.0)
    return np.where(finite, (s - lo) / (hi - lo), 0.0)


def carried_scores(scores: np.ndarray, n: int) -> np.ndarray:
    """
    The ``n`` best of ``scores``, best first, float32: the scores carried by position.

    NaN counts as the lowest score.
    """
    s = np.asarray(scores, np.float32)
    s = np.where(np.isnan(s), -np.inf, s).astype(np.float32)
    return -np.sort(-s)[:n]


def output(order: np.ndarray, scores: np.ndarray, explain: list[dict[str, Any]]) -> PolicyOutput:
    """A :class:`PolicyOutput` with the protocol's dtypes (int64 order, float32 scores)."""
    return PolicyOutput(
        order=np.asarray(order, np.int64), scores=np.asarray(scores, np.float32), explain=explain
    )


def field_values(state: State, rows: np.ndarray, key: str) -> list[Any]:
    """The metadata field ``key`` of each item row (None for unknown items and absent fields)."""
    get = state.item_fields.get
    return [get(r, _EMPTY).get(key) for r in rows.tolist()]
