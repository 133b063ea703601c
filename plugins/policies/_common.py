"""
Shared pieces of the built-in ranking policies: state reads, outputs, parameter checks.

The parameter checks are :mod:`plugins.params`' (shared with the privacy plugins),
re-exported here for the policies.

Scores carried by position. A policy that moves items without computing new scores of
its own (MMR, exploration, business rules) gives position p the p-th best of the
scores it received (:func:`carried_scores`). The output stays sorted by score, so a
later policy that sorts by score keeps this policy's order, and the response's scores
keep the scale the caller knows. Each item's own score is in its explain entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from plugins.base import PolicyInput, PolicyOutput
from plugins.params import check_bool, check_number, check_unknown, param_error

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

_EMPTY: Final[Mapping[str, Any]] = {}


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
